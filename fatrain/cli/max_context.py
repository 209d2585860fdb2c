"""``fatrain-max-context``: the longest seq_len each attention backend can train at batch 1.

    fatrain-max-context                                       # experiment=max_context, its backends
    fatrain-max-context backends=[naive,flash_v2] trainer.activation_checkpointing=true
    fatrain-max-context out=multirun/ablate_backends/<date>   # next to a sweep: fatrain-report shows it
    torchrun --nproc_per_node=4 -m fatrain.cli.max_context trainer.strategy=ddp trainer.context_parallel=4 \
        backends=[flash_v2] start=8192 granularity=8192      # one sequence over 4 GPUs (ring)

Composes ``experiment=max_context`` plus any Hydra overrides and runs
``fatrain.max_context.find_max_context`` per backend: on one GPU, guided by the memory model's
predictions (first try at the longest length predicted to fit, then galloping and bisection);
elsewhere, or with ``guide=false``, doubling from start, then bisection. The
backends searched by default are the ``attention`` values of that experiment's sweep.
Writes ``max_context.json`` and ``max_context.csv`` into ``out``. The search's own settings
(backends, start, granularity, limit, guide, plan, out) are ``key=value`` like the overrides; the old
``--backends a,b`` spellings still work, with a line saying how to write them now.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Optional

from hydra.errors import HydraException
from omegaconf import open_dict

from fatrain.cli_help import Setting, parse_settings, settings_help
from fatrain.config import register_configs
from fatrain.max_context import CPU_CHECK, GUIDE_MARGIN, find_max_context, plan_max_context
from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, report_user_error

SETTINGS = [
    Setting("backends", list, None, "backends to search, [a,b] (default: the backends of experiment=max_context's "
            "sweep)", flag="--backends"),
    Setting("start", int, 1024, "shortest seq_len tried (the first when doubling)", flag="--start"),
    Setting("granularity", int, 1024, "bisection stops at this many tokens", flag="--granularity"),
    Setting("limit", int, 1 << 22, "longest seq_len tried", flag="--limit"),
    Setting("guide", bool, True, "true: on one GPU, first try the longest length the memory model predicts fits in "
            f"{GUIDE_MARGIN} x the free memory, then gallop and bisect from it (an exact guess costs 2 tries); "
            "false: double "
            "from start. No effect on the CPU (no memory capacity to aim at) or over several ranks (the memory model "
            "covers one device): both double from start"),
    Setting("plan", bool, False, "true: print the memory model's predicted peak at start, 2 start, ... up to limit "
            f"on this device and, on a GPU, the longest multiple of granularity predicted to fit in {GUIDE_MARGIN} x "
            "its memory; train nothing"),
    Setting("out", str, None, "output folder (default max_context/<date>); a sweep folder puts the result where "
            "fatrain-report finds it", flag="--out"),
]
HELP = settings_help(
    "fatrain-max-context",
    "fatrain-max-context: the longest seq_len each attention backend can train (forward, backward, AdamW step)\n"
    "at trainer.batch_size. On one GPU the first try is the longest length the memory model predicts fits\n"
    "(guide=true), then it gallops from there until a length runs out of memory, and bisects; on the CPU it\n"
    "doubles from start instead.",
    ["fatrain-max-context",
     "fatrain-max-context backends=[naive,flash_v2] trainer.activation_checkpointing=true",
     "fatrain-max-context out=multirun/ablate_backends/<date>",
     "fatrain-max-context plan=true backends=[flash_v2] start=131072 trainer.activation_checkpointing=true "
     "model.loss_chunk_tokens=8192",
     f"fatrain-max-context {CPU_CHECK} trainer.device=cpu"],
    SETTINGS,
    rest="Any other key=value is a Hydra override of the training config, on top of experiment=max_context\n"
         "(GPT-2 small, bf16, batch 1, trainer.max_steps=2 per try). The CPU searches trainer.precision=fp32 only:\n"
         "the last example is a functional check there (about 30 s).")


def compose_config(overrides: list[str]):
    """The training config of ``experiment=max_context`` with ``overrides``, and the backends its
    sweep names (``hydra.sweeper.params.attention``)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name="train", overrides=["experiment=max_context", *overrides],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    backends = str(params.get("attention", cfg.attention.backend))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, backends


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_settings(argv, SETTINGS, prog="fatrain-max-context", help_text=HELP,
                                         pass_through=True)
        out_dir = args["out"] or os.path.join("max_context",
                                              datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        cfg, default_backends = compose_config(overrides)
        backends = args["backends"] or [b for b in default_backends.split(",") if b]
        if args["plan"]:
            plan_max_context(cfg, backends, start=args["start"], limit=args["limit"], granularity=args["granularity"])
            return 0
        out = find_max_context(cfg, backends, out_dir, start=args["start"], granularity=args["granularity"],
                               limit=args["limit"], guide=args["guide"])
    except (*USER_ERRORS, HydraException) as e:
        report_user_error(e)
        return USER_ERROR_EXIT
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the job
    for r in out["results"]:
        print(f"{r['backend']}: {r['max_seq_len']}")
    print(os.path.join(out_dir, "max_context.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
