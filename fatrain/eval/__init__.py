"""Checkpoint evaluation: loss by context length and position, passkey, backend agreement.

    checkpoint -> its saved training config, merged with the eval overrides
               -> GPT built from the saved spec (loading.py: runtime fields such as the attention
                  backend may change; anything else must match, or the eval stops with the reason)
    data       -> the checkpoint's corpus (or data=... / data.*), one split's token stream,
                  repacked into blocks of each length in eval.seq_lens
    numbers    -> per length: loss, perplexity, bits per byte or token, loss per position
                  bucket (loss.py)
               -> passkey accuracy over passkey.context_lens x passkey.depths (passkey.py)
               -> RULER-style tasks (eval.tasks): accuracy per task x length (x depth), a mean
                  per length (tasks.py)
               -> backend agreement: the same batches with each of eval.backends, in fp32
                  (agreement.py)
    outputs    -> eval.json, the plots, a W&B eval job in the training run's group, and
                  table.csv / table.md with one row per evaluated checkpoint (report.py); several
                  checkpoints also get compare_*.png, one line each

``fatrain-eval`` (fatrain/cli/eval.py) composes the config and calls :func:`run_eval`;
``fatrain-sample`` draws text from a checkpoint (sample.py). Evaluation runs on one device
(no DDP/FSDP).
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields

from omegaconf import OmegaConf

from fatrain.config import validate_eval_config
from fatrain.data import PackedBlocks
from fatrain.eval.agreement import backend_agreement
from fatrain.kernels import autotune_seconds
from fatrain.eval.loading import LoadedCheckpoint, find_checkpoints, load_model, with_backend
from fatrain.eval.loss import multi_length_eval, split_stream
from fatrain.eval.passkey import run_passkey
from fatrain.eval.tasks import TaskParams, run_tasks
from fatrain.eval.report import (comparison_labels, log_to_wandb, summary_line, table_rows, write_comparison_plots,
                                 write_json, write_plots, write_table)
from fatrain.plotting import describe_model
from fatrain.progress import note_interpreter
from fatrain.runtime import autocast_for, check_precision, run_info


def run_eval(cfg, out_dir: str) -> dict:
    """Evaluate every checkpoint ``cfg.ckpt_path`` names; write per-checkpoint outputs and the table."""
    validate_eval_config(cfg)
    targets = find_checkpoints(cfg.ckpt_path, cfg.eval.all_checkpoints)
    results = []
    for name, path in targets:
        step_name = os.path.splitext(os.path.basename(path))[0]
        sub_dir = out_dir if len(targets) == 1 else os.path.join(out_dir, name or ".", step_name)
        result = evaluate_checkpoint(cfg, path, sub_dir)
        print(summary_line(name, result))
        results.append((name, result))
    csv_path, md_path = write_table(table_rows(results, cfg.ckpt_path), out_dir)
    print(f"wrote {csv_path} and {md_path}")
    summary = {"results": [r for _, r in results], "table_csv": csv_path, "table_md": md_path}
    if len(results) > 1 and cfg.eval.plots:
        labels = comparison_labels(results, cfg.ckpt_path)
        summary["comparison_plots"] = write_comparison_plots([(label, r) for label, (_, r) in zip(labels, results)],
                                                             out_dir)
        print(f"wrote {', '.join(summary['comparison_plots'].values())}")
    return summary


def evaluate_checkpoint(cfg, path: str, out_dir: str) -> dict:
    """Evaluate one checkpoint with the settings ``cfg``; write eval.json and plots to ``out_dir``."""
    e = cfg.eval
    loaded = load_model(path, model_overrides=cfg.model, attention_overrides=cfg.attention,
                        data_overrides=cfg.data, device=e.device)
    for note in loaded.notes:
        print(f"note: {note}")
    train_cfg, device = loaded.config, loaded.device
    check_precision(e.precision, device, loaded.spec.attention, key="eval.precision")
    if device.type == "cpu":
        note_interpreter(loaded.spec.attention)
    autocast = autocast_for(e.precision, device)
    saved_cfg = OmegaConf.create(loaded.saved_config)
    train_len = saved_cfg.data.seq_len
    lengths = list(e.seq_lens) or [train_cfg.data.seq_len]
    batch_size = e.batch_size or train_cfg.trainer.batch_size

    tokens, doc_ids, tokenizer = split_stream(train_cfg.data, e.split)
    byte_level = tokenizer.name == "byte"
    lengths_out = multi_length_eval(loaded.model, tokens, doc_ids, lengths, train_len=train_len, split=e.split,
                                    batch_size=batch_size, max_batches=e.batches, bucket_size=e.bucket_size,
                                    device=device, autocast=autocast, count_bytes=byte_level,
                                    long_documents=e.long_documents)
    result = {
        "checkpoint": os.path.abspath(path),
        "step": loaded.state.get("step"),
        "tokens_seen": loaded.state.get("tokens_seen"),
        "train": {"seq_len": train_len, "attention": saved_cfg.attention.backend,
                  "model": describe_model(loaded.model.num_params(), OmegaConf.to_container(saved_cfg.model), None),
                  "group": OmegaConf.select(saved_cfg, "logger.wandb.group"),
                  "project": OmegaConf.select(saved_cfg, "logger.wandb.project"),
                  "wandb_id": loaded.state.get("wandb_id")},
        "attention": loaded.spec.attention,
        "rope_scaling": asdict(loaded.spec.rope_scaling),
        "data": {"name": train_cfg.data.name, "source": train_cfg.data.source, "path": train_cfg.data.path,
                 "hf_name": train_cfg.data.hf_name, "split": e.split, "split_tokens": int(len(tokens))},
        "tokenizer": tokenizer.name,
        "bits_unit": "byte" if byte_level else "token",
        "precision": e.precision,
        "batch_size": batch_size,
        "bucket_size": e.bucket_size,
        "long_documents": e.long_documents,
        "lengths": lengths_out,
        "environment": run_info(device),
        "notes": loaded.notes,
    }
    if cfg.passkey.enabled:
        p = cfg.passkey
        result["passkey"] = run_passkey(loaded.model, tokenizer, context_lens=list(p.context_lens) or lengths,
                                        depths=list(p.depths), trials=p.trials, seed=p.seed, digits=p.key_digits,
                                        batch_size=batch_size, device=device, autocast=autocast)
    if e.tasks:
        r = cfg.ruler
        params = TaskParams(**{f.name: r[f.name] for f in fields(TaskParams)})
        result["long_tasks"] = run_tasks(loaded.model, tokenizer, list(e.tasks),
                                         context_lens=list(r.context_lens) or lengths, depths=list(r.depths),
                                         trials=r.trials, seed=r.seed, params=params, batch_size=batch_size,
                                         device=device, autocast=autocast)
    if e.backends:
        evaluated = [r for r in lengths_out if "skipped" not in r]
        if evaluated:
            blocks = PackedBlocks(tokens, doc_ids, evaluated[0]["seq_len"])
            result["backend_agreement"] = backend_agreement(loaded, list(e.backends), blocks, batch_size=batch_size,
                                                            batches=e.agreement_batches,
                                                            tolerance=e.agreement_tolerance)
        else:
            result["backend_agreement"] = {"skipped": "no evaluation length fits the split"}

    result["autotune_seconds"] = autotune_seconds()  # time spent tuning kernels (0: every pick cached)
    os.makedirs(out_dir, exist_ok=True)
    result["files"] = {"json": os.path.join(out_dir, "eval.json")}
    if e.plots:
        result["files"].update(write_plots(result, out_dir))
    result["wandb_id"] = log_to_wandb(cfg, result, loaded.saved_config, out_dir)
    write_json(result, result["files"]["json"])
    return result


def first_loss(summary: dict) -> float:
    """The metric a sweep over evaluations optimises: the first checkpoint's first evaluated length's loss."""
    evaluated = [r for r in summary["results"][0]["lengths"] if "skipped" not in r]
    return evaluated[0]["loss"] if evaluated else float("inf")


__all__ = ["LoadedCheckpoint", "backend_agreement", "evaluate_checkpoint", "find_checkpoints", "first_loss",
           "load_model", "run_eval", "split_stream", "with_backend"]
