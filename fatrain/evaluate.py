"""``fatrain-eval``: evaluate a checkpoint, a run or a sweep; return the first length's loss.

    fatrain-eval ckpt_path=outputs/train/<run>/checkpoints/ckpt_00000600.pt
    fatrain-eval ckpt_path=<run> eval.seq_lens=[128,512,2048] passkey.trials=20
    fatrain-eval ckpt_path=<run> attention.backend=flash_v2 eval.backends=[naive,flash_v1,flash_v2,sdpa]
    fatrain-eval ckpt_path=multirun/<date>      # every job's newest checkpoint, one table

The output folder (outputs/eval/<time>, or hydra.run.dir=...) holds eval.json, the plots
and table.csv / table.md; see fatrain.evaluation for what is measured. A bad checkpoint or
an override that does not fit it exits with one line naming it.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fatrain.evaluation import register_eval_configs, run_eval
from fatrain.train import USER_ERRORS

register_eval_configs()


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run_eval(cfg, out_dir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    evaluated = [r for r in summary["results"][0]["lengths"] if "skipped" not in r]
    return evaluated[0]["loss"] if evaluated else float("inf")


if __name__ == "__main__":
    main()
