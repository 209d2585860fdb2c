"""``fatrain-train``: compose the config, build the trainer, train, return the final val loss.

    fatrain-train experiment=quickstart
    fatrain-train model=gpt2-small attention=flash_v2 data.seq_len=8192 trainer.precision=bf16
    fatrain-train -m experiment=ablate_backends_cpu          # a Hydra multirun sweep

Each run directory holds the composed config (.hydra/), metrics.jsonl, checkpoints/,
the W&B run (wandb/) and result.json. A bad setting exits with one line naming it.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fatrain.checkpoint import CheckpointError, atomic_save, list_checkpoints, load_checkpoint
from fatrain.config import register_configs, validate_train_config
from fatrain.metrics import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger
from fatrain.trainer import Trainer, resolve_resume, rewind_metrics

register_configs()

USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, NotImplementedError)


def make_loggers(cfg, run_dir: str, trainer: Trainer, progress) -> MultiLogger:
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


def run(cfg: DictConfig, run_dir: str) -> dict:
    """Train one run in ``run_dir``; returns the result dict (also written to result.json)."""
    validate_train_config(cfg)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if cfg.resume is None and list_checkpoints(ckpt_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass resume=auto to continue that run, "
                         "or choose another hydra.run.dir (nothing was overwritten)")
    trainer = Trainer(cfg, run_dir, logger=None)
    resume_path = resolve_resume(cfg.resume, trainer.checkpoints)
    if resume_path is not None:
        trainer.load_state_dict(load_checkpoint(resume_path), resume_path)
        rewind_metrics(os.path.join(run_dir, "metrics.jsonl"), trainer.step)
    t = cfg.trainer
    progress = tqdm(total=t.max_steps, initial=trainer.step, desc="train", dynamic_ncols=True,
                    disable=not t.progress_bar) if t.progress_bar else None
    logger = make_loggers(cfg, run_dir, trainer, progress)
    trainer.logger, trainer.progress = logger, progress
    if resume_path is None:
        n = trainer.model.num_params()
        msg = (f"model: {n / 1e6:.2f}M parameters ({trainer.model.num_params(non_embedding=True) / 1e6:.2f}M "
               f"non-embedding), attention={cfg.attention.backend}, device={trainer.device}, "
               f"precision={t.precision}, tokens/step={trainer.tokens_per_step}")
        (progress.write if progress is not None else print)(msg)
        logger.log({"model/params": n}, 0)
    try:
        result = trainer.fit()
    finally:
        logger.close()
        if progress is not None:
            progress.close()
    result["status"] = "ok"
    return result


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        result = run(cfg, run_dir)
    except torch.cuda.OutOfMemoryError as e:
        # Recorded, not raised: in a sweep one point running out of memory must not stop the rest.
        gc.collect()
        torch.cuda.empty_cache()
        result = {"status": "oom", "error": str(e).splitlines()[0]}
        print(f"out of memory: {result['error']}", file=sys.stderr)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    write_result(run_dir, result)
    return result.get("final_val_loss", float("inf"))


if __name__ == "__main__":
    main()
