"""``fatrain-train``: compose the config, train one run, write result.json, return the final val loss.

    fatrain-train experiment=quickstart
    fatrain-train model=gpt2-small attention=<name> data.seq_len=8192 trainer.precision=bf16
    fatrain-train -m experiment=ablate_backends_cpu          # a Hydra multirun sweep
    torchrun --standalone --nproc_per_node=8 -m fatrain.cli.train trainer.strategy=fsdp ...

``attention=<name>`` is one of configs/attention/ (one file per registry backend). Each run
directory holds the composed config (.hydra/), metrics.jsonl, checkpoints/, the W&B run
(wandb/) and result.json. A bad setting exits 2 with one line naming it; so does a run stopped at a
non-finite step (trainer.on_nonfinite=stop; result.json status "nonfinite"). Under torchrun every
rank runs this entry point; all use rank 0's run directory, and only rank 0 writes metrics,
W&B, the console lines and result.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fatrain import distributed
from fatrain.config import register_configs, validate_train_config
from fatrain.distributed import DistEnv
from fatrain.metrics import strict_json
from fatrain.runlock import RunDirLocked
from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, free_memory, report_user_error, select_device
from fatrain.trainer import run_training

register_configs()


def shared_run_dir(run_dir: str, dist_env: DistEnv) -> str:
    """Rank 0's Hydra output folder, on every rank.

    Each rank composes its own config, and a time-stamped ``hydra.run.dir`` can differ by a
    second between ranks (or nodes); a folder that Hydra made for another rank and that holds
    only Hydra's own files is removed. Passing ``hydra.run.dir=...`` avoids the question.
    """
    shared = distributed.broadcast_object(run_dir, dist_env)
    if os.path.abspath(shared) != os.path.abspath(run_dir) and os.path.isdir(run_dir):
        if set(os.listdir(run_dir)) <= {".hydra", f"{HydraConfig.get().job.name}.log"}:
            shutil.rmtree(run_dir, ignore_errors=True)
    return shared


def write_result(run_dir: str, result: dict) -> None:
    path = os.path.join(run_dir, "result.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(strict_json(result), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    dist_env = None
    try:
        validate_train_config(cfg)
        dist_env = distributed.init_distributed(cfg.trainer)
        with distributed.process_group(dist_env):
            run_dir = shared_run_dir(run_dir, dist_env)
            result = run_training(cfg, run_dir, dist_env)
    except torch.cuda.OutOfMemoryError as e:
        if dist_env is not None and dist_env.distributed and dist_env.world_size > 1:
            raise  # the other ranks wait in a collective: end the job (torchrun stops them)
        # Recorded, not raised: in a sweep one point running out of memory must not stop the rest.
        result = {"status": "oom", "error": str(e).splitlines()[0]}
        print(f"out of memory: {result['error']}", file=sys.stderr)
    except USER_ERRORS as e:
        # Every rank that fails says so (a failure on one rank must not be hidden); rank 0 plainly.
        report_user_error(e, dist_env.rank if dist_env is not None else int(os.environ.get("RANK", "0") or 0))
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(USER_ERROR_EXIT)
        if isinstance(e, RunDirLocked):
            return float("inf")  # the folder is another run's: nothing of this job is written into it
        # In a sweep, a point a backend cannot run (a length, a block size) is recorded like an OOM.
        result = {"status": "error", "error": str(e).splitlines()[0]}
    # Freed here, not in the except block: until it ends, the traceback keeps the run's frames (model,
    # optimizer, activations) alive; and the trainer holds reference cycles that only gc frees. The
    # next job of a sweep runs in this same process.
    free_memory(select_device("auto"))
    if dist_env is None or dist_env.is_main:
        write_result(run_dir, result)
    if result["status"] == "nonfinite":
        # Like a bad setting: one line and exit 2; a sweep records the point (result.json) and goes on.
        if dist_env is None or dist_env.is_main:
            print(f"error: {result['error']}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(USER_ERROR_EXIT)
    return result.get("final_val_loss", float("inf"))


if __name__ == "__main__":
    main()
