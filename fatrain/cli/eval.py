"""``fatrain-eval``: evaluate a checkpoint, a run or a sweep; return the first length's loss.

    fatrain-eval ckpt_path=outputs/train/<run>/checkpoints/ckpt_00000600.pt
    fatrain-eval ckpt_path=<run> eval.seq_lens=[128,512,2048] passkey.trials=20
    fatrain-eval ckpt_path=<run> attention.backend=flash_v2 eval.backends=[naive,flash_v1,flash_v2,sdpa]
    fatrain-eval ckpt_path=multirun/<date>      # every job's newest checkpoint, one table

The output folder (outputs/eval/<time>, or hydra.run.dir=...) holds eval.json, the plots
and table.csv / table.md; see fatrain.eval for what is measured. A bad checkpoint or an
override that does not fit it exits with one line naming it.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fatrain.config import register_configs
from fatrain.eval import first_loss, run_eval
from fatrain.runtime import user_errors

register_configs()


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    with user_errors():
        summary = run_eval(cfg, HydraConfig.get().runtime.output_dir)
    return first_loss(summary)


if __name__ == "__main__":
    main()
