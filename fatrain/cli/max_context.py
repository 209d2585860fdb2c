"""``fatrain-max-context``: the longest seq_len each attention backend can train at batch 1.

    fatrain-max-context                                       # experiment=max_context, its backends
    fatrain-max-context --backends <name>,<name> trainer.activation_checkpointing=true
    fatrain-max-context --out multirun/ablate_backends/<date>  # next to a sweep: fatrain-report shows it

Composes ``experiment=max_context`` plus any Hydra overrides and runs
``fatrain.max_context.find_max_context`` (doubling, then bisection, per backend). The
backends searched by default are the ``attention`` values of that experiment's sweep.
Writes ``max_context.json`` and ``max_context.csv`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Optional

from hydra.errors import HydraException
from omegaconf import open_dict

from fatrain.config import register_configs
from fatrain.max_context import find_max_context
from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, report_user_error


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
    parser = argparse.ArgumentParser(prog="fatrain-max-context", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=max_context")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: the backends of experiment=max_context's sweep)")
    parser.add_argument("--start", type=int, default=1024, help="first seq_len tried (default 1024)")
    parser.add_argument("--granularity", type=int, default=1024, help="bisection stops at this many tokens")
    parser.add_argument("--limit", type=int, default=1 << 20, help="longest seq_len tried (default 1048576)")
    parser.add_argument("--out", default=None,
                        help="output folder (default max_context/<date>); a sweep folder puts the result "
                             "where fatrain-report finds it")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join("max_context", datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    try:
        cfg, default_backends = compose_config(args.overrides)
        backends = [b for b in (args.backends or default_backends).split(",") if b]
        out = find_max_context(cfg, backends, out_dir, start=args.start, granularity=args.granularity,
                               limit=args.limit)
    except (*USER_ERRORS, HydraException) as e:
        report_user_error(e)
        return USER_ERROR_EXIT
    for r in out["results"]:
        print(f"{r['backend']}: {r['max_seq_len']}")
    print(os.path.join(out_dir, "max_context.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
