"""``fatrain-train``: compose the config, build the trainer, train, return the final val loss.

    fatrain-train experiment=quickstart
    fatrain-train model=gpt2-small attention=flash_v2 data.seq_len=8192 trainer.precision=bf16
    fatrain-train -m experiment=ablate_backends_cpu          # a Hydra multirun sweep
    torchrun --standalone --nproc_per_node=8 -m fatrain.train trainer.strategy=fsdp ...

Each run directory holds the composed config (.hydra/), metrics.jsonl, checkpoints/,
the W&B run (wandb/) and result.json. A bad setting exits with one line naming it.
Under torchrun every rank runs this entry point; all use rank 0's run directory, and only
rank 0 writes metrics, W&B, the console lines and result.json.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fatrain import distributed
from fatrain.checkpoint import CheckpointError, list_checkpoints
from fatrain.config import register_configs, validate_train_config
from fatrain.distributed import DistEnv
from fatrain.metrics import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger
from fatrain.trainer import Trainer, resolve_resume, rewind_metrics, set_aside_metrics

register_configs()

USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, NotImplementedError)


def make_loggers(cfg, run_dir: str, trainer: Trainer, progress) -> MultiLogger:
    if not trainer.dist.is_main:
        return MultiLogger([])  # the other ranks compute the same global numbers and write nothing
    loggers = []
    if cfg.logger.jsonl:
        loggers.append(JsonlLogger(os.path.join(run_dir, "metrics.jsonl")))
    if cfg.logger.console:
        loggers.append(ConsoleLogger(write=progress.write if progress is not None else None))
    w = cfg.logger.wandb
    if w.mode != "disabled":
        wandb_logger = WandbLogger(mode=w.mode, project=w.project, entity=w.entity, name=w.name, group=w.group,
                                   tags=w.tags, run_dir=run_dir, resume_id=trainer.wandb_id,
                                   config=OmegaConf.to_container(cfg, resolve=True))
        trainer.wandb_id = wandb_logger.run_id
        loggers.append(wandb_logger)
    return MultiLogger(loggers)


def write_result(run_dir: str, result: dict) -> None:
    path = os.path.join(run_dir, "result.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def run(cfg: DictConfig, run_dir: str, dist_env: DistEnv | None = None) -> dict:
    """Train one run in ``run_dir``; returns the result dict (main() writes it to result.json).

    Without ``dist_env``, joins (and at the end leaves) the process group that
    ``trainer.strategy`` asks for; the entry point passes its own.
    """
    validate_train_config(cfg)
    if dist_env is not None:
        return _train(cfg, run_dir, dist_env)
    dist_env = distributed.init_distributed(cfg.trainer)
    with distributed.process_group(dist_env):
        return _train(cfg, run_dir, dist_env)


def _train(cfg: DictConfig, run_dir: str, dist_env: DistEnv) -> dict:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if cfg.resume is None and list_checkpoints(ckpt_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass resume=auto to continue that run, "
                         "or choose another hydra.run.dir (nothing was overwritten)")
    distributed.barrier(dist_env)  # every rank checked before rank 0 may write the first checkpoint
    trainer = Trainer(cfg, run_dir, logger=None, dist_env=dist_env)
    resume_path = resolve_resume(cfg.resume, trainer.checkpoints)
    if resume_path is not None:
        trainer.resume_from(resume_path)
        if dist_env.is_main:
            rewind_metrics(os.path.join(run_dir, "metrics.jsonl"), trainer.step)
    elif dist_env.is_main:
        set_aside_metrics(os.path.join(run_dir, "metrics.jsonl"))
    t = cfg.trainer
    show = t.progress_bar and dist_env.is_main
    progress = tqdm(total=t.max_steps, initial=trainer.step, desc="train", dynamic_ncols=True) if show else None
    logger = make_loggers(cfg, run_dir, trainer, progress)
    trainer.logger, trainer.progress = logger, progress
    if resume_path is None:
        n = trainer.model.num_params()
        msg = (f"model: {n / 1e6:.2f}M parameters ({trainer.model.num_params(non_embedding=True) / 1e6:.2f}M "
               f"non-embedding), attention={cfg.attention.backend}, device={trainer.device}, "
               f"precision={t.precision}, tokens/step={trainer.tokens_per_step}")
        if dist_env.distributed:
            msg += f", strategy={dist_env.strategy} on {dist_env.world_size} ranks ({dist_env.backend})"
        if dist_env.is_main:
            (progress.write if progress is not None else print)(msg)
        logger.log({"model/params": n}, 0)
    try:
        result = trainer.fit()
    finally:
        logger.close()
        if progress is not None:
            progress.close()
    result["status"] = "ok"
    if cfg.attention.backend == "flash_v2" and torch.cuda.is_available():
        picks = flash_v2_picks(cfg.data.seq_len)
        if picks:
            result["flash_v2_autotune"] = picks
    return result


def flash_v2_picks(seq_len: int) -> list[dict]:
    """The configs flash_v2's autotuners picked for queries of ``seq_len`` tokens (the autotuners
    live in the process, so the shapes of a multirun's earlier jobs are left out)."""
    from fatrain.kernels import flash_v2
    return [row for row in flash_v2.autotune_picks() if row["key"].get("Nq") == str(seq_len)]


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


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    dist_env = None
    try:
        validate_train_config(cfg)
        dist_env = distributed.init_distributed(cfg.trainer)
        with distributed.process_group(dist_env):
            run_dir = shared_run_dir(run_dir, dist_env)
            result = run(cfg, run_dir, dist_env)
    except torch.cuda.OutOfMemoryError as e:
        if dist_env is not None and dist_env.distributed and dist_env.world_size > 1:
            raise  # the other ranks wait in a collective: end the job (torchrun stops them)
        # Recorded, not raised: in a sweep one point running out of memory must not stop the rest.
        result = {"status": "oom", "error": str(e).splitlines()[0]}
        print(f"out of memory: {result['error']}", file=sys.stderr)
    except USER_ERRORS as e:
        # Every rank that fails says so (a failure on one rank must not be hidden); rank 0 plainly.
        rank = dist_env.rank if dist_env is not None else int(os.environ.get("RANK", "0") or 0)
        print(f"error: {e}" if rank == 0 else f"error: [rank {rank}] {e}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(2)
        # In a sweep, a point a backend cannot run (a length, a block size) is recorded like an OOM.
        result = {"status": "error", "error": str(e).splitlines()[0]}
    # Freed here, not in the except block: until it ends, the traceback keeps run()'s frames (model,
    # optimizer, activations) alive; and the trainer holds reference cycles that only gc frees. The
    # next job of a sweep runs in this same process.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist_env is None or dist_env.is_main:
        write_result(run_dir, result)
    return result.get("final_val_loss", float("inf"))


if __name__ == "__main__":
    main()
