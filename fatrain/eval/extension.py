"""Train short, extend, measure: the context-extension study as one chain of the project's own runs.

    fatrain-extend experiment=context_extension [train overrides] [out=<dir>]

    <out>/base/               fatrain-train with the composed config (data.seq_len = L)
    <out>/extend-<type>/      fatrain-train init_from=<out>/base data.seq_len=factor*L
                              model.rope_scaling.type=<type> factor=<factor> original_seq_len=L,
                              extension.finetune_steps steps at extension.finetune_lr (type none:
                              the same fine-tune without scaling)
    <out>/eval/<run>/         fatrain-eval of each run at extension.eval_multiples x L, in the
                              training precision: loss, loss by position, the RULER-style tasks
    <out>/summary.json, summary.md, extension_loss.png, extension_tasks.png,
    extension_position.png    every model side by side

The trained model is evaluated as it is (no scaling) next to the fine-tuned ones. A stage whose
folder already holds ``result.json`` with status ok (training) or ``eval.json`` (evaluation) is
reused, so an interrupted chain continues where it stopped when given the same ``out=``.
Each stage is the same call ``fatrain-train`` / ``fatrain-eval`` makes, with the overrides above;
the README lists the equivalent command sequence.
"""

from __future__ import annotations

import json
import os
import time

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fatrain.config import register_configs, validate_train_config


def _compose(name: str, overrides: list[str]):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name=name, overrides=overrides)


def _fmt(value) -> str:
    return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, (list, tuple)) else str(value)


def finetune_overrides(cfg, scaling: str, base_dir: str) -> list[str]:
    """The overrides that turn the base run's config into one extension fine-tune."""
    x, length = cfg.extension, cfg.data.seq_len
    factor = float(x.factor)
    return [f"init_from={base_dir}", f"data.seq_len={int(round(factor * length))}",
            f"model.rope_scaling.type={scaling}", f"model.rope_scaling.factor={factor if scaling != 'none' else 1.0}",
            f"model.rope_scaling.original_seq_len={length}", f"trainer.max_steps={x.finetune_steps}",
            f"optim.lr={x.finetune_lr}", f"optim.min_lr={min(cfg.optim.min_lr, x.finetune_lr)}",
            f"optim.warmup_steps={x.finetune_warmup_steps}", f"logger.wandb.name=extend-{scaling}"]


def eval_overrides(cfg, run_dir: str) -> list[str]:
    x, length = cfg.extension, cfg.data.seq_len
    lengths = [length * m for m in x.eval_multiples]
    out = [f"ckpt_path={run_dir}", f"eval.seq_lens={_fmt(lengths)}", f"eval.batches={x.eval_batches}",
           f"eval.long_documents={str(x.long_documents).lower()}", f"eval.tasks={_fmt(list(x.tasks))}",
           f"ruler.context_lens={_fmt(lengths)}", f"ruler.trials={x.trials}", f"ruler.depths={_fmt(list(x.depths))}",
           f"eval.precision={cfg.trainer.precision}", f"logger.wandb.mode={cfg.logger.wandb.mode}"]
    if x.eval_batch_size is not None:
        out.append(f"eval.batch_size={x.eval_batch_size}")
    return out


def _done(path: str, key: str = "status") -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data.get(key, "ok") == "ok"


def run_chain(overrides: list[str], out_dir: str) -> dict:
    """Train, fine-tune once per scaling type, evaluate everything; returns the summary (summary.json)."""
    from fatrain.eval import run_eval
    from fatrain.trainer import run_training

    register_configs()
    base_cfg = _compose("train", overrides)
    validate_train_config(base_cfg)
    from fatrain.model import ROPE_SCALING_TYPES
    for t in base_cfg.extension.types:
        if t not in ROPE_SCALING_TYPES:
            raise ValueError(f"extension.types holds {t!r}: choose from {', '.join(ROPE_SCALING_TYPES)}")
    runs = {"base": (os.path.join(out_dir, "base"), base_cfg)}
    for t in base_cfg.extension.types:
        cfg = _compose("train", [*overrides, *finetune_overrides(base_cfg, t, runs["base"][0])])
        runs[f"extend-{t}"] = (os.path.join(out_dir, f"extend-{t}"), cfg)
    for name, (run_dir, cfg) in runs.items():
        if _done(os.path.join(run_dir, "result.json")):
            print(f"[extend] {name}: already trained in {run_dir}", flush=True)
            continue
        print(f"[extend] training {name} (seq_len {cfg.data.seq_len}, rope_scaling {cfg.model.rope_scaling.type}) "
              f"in {run_dir}", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        result = run_training(cfg, run_dir)
        _write(os.path.join(run_dir, "result.json"), result)
        if result.get("status") != "ok":
            raise RuntimeError(f"[extend] {name} ended with status {result.get('status')}: {result.get('error', '')}")
    evals = {}
    eval_cfg = None
    for name, (run_dir, _) in runs.items():
        eval_dir = os.path.join(out_dir, "eval", name)
        path = os.path.join(eval_dir, "eval.json")
        if not os.path.isfile(path):
            print(f"[extend] evaluating {name} in {eval_dir}", flush=True)
            # One composition for every run: the runs differ only in ckpt_path.
            eval_cfg = eval_cfg or _compose("eval", eval_overrides(base_cfg, run_dir))
            eval_cfg.ckpt_path = run_dir
            run_eval(eval_cfg, eval_dir)
        with open(path, encoding="utf-8") as f:
            evals[name] = json.load(f)
    summary = summarize(evals, base_cfg)
    _write(os.path.join(out_dir, "summary.json"), summary)
    write_summary(summary, out_dir, evals)
    return summary


def _write(path: str, obj) -> None:
    from fatrain.files import write_json_atomic
    from fatrain.metrics import strict_json

    write_json_atomic(path, strict_json(obj))


def summarize(evals: dict, base_cfg) -> dict:
    """Per model: its scaling, loss per evaluated length, the tasks' mean accuracy per length, and the
    loss-by-position buckets at the longest length it was evaluated at."""
    models = {}
    for name, r in evals.items():
        lengths = [x for x in r["lengths"] if "skipped" not in x]
        tasks = r.get("long_tasks", {}).get("summary", {})
        models[name] = {
            "rope_scaling": r.get("rope_scaling"), "checkpoint": r["checkpoint"], "train_seq_len": r["train"]["seq_len"],
            "loss": {str(x["seq_len"]): x["loss"] for x in lengths},
            "task_accuracy": dict(zip([str(n) for n in tasks.get("context_lens", [])], tasks.get("mean_accuracy", []))),
            "per_task": {t: e["accuracy"] for t, e in r.get("long_tasks", {}).get("tasks", {}).items()},
            "buckets": lengths[-1]["buckets"] if lengths else [], "bucket_seq_len": lengths[-1]["seq_len"] if lengths else None,
        }
    return {"base_seq_len": base_cfg.data.seq_len, "factor": base_cfg.extension.factor,
            "eval_lengths": [base_cfg.data.seq_len * m for m in base_cfg.extension.eval_multiples],
            "models": models, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": OmegaConf.to_container(base_cfg, resolve=True)}


def write_summary(summary: dict, out_dir: str, evals: dict) -> dict:
    """summary.md (loss and task accuracy per model x length) and the three comparison plots
    (extension_loss.png, extension_position.png, extension_tasks.png) of ``evals`` (run name ->
    its eval.json)."""
    from fatrain.eval.report import write_comparison_plots

    lengths = [str(n) for n in summary["eval_lengths"]]
    lines = ["| model | rope scaling | " + " | ".join(f"loss@{n}" for n in lengths) + " | "
             + " | ".join(f"tasks@{n}" for n in lengths) + " |", "|" + "---|" * (2 + 2 * len(lengths))]

    def cell(v):
        return "" if v is None else f"{v:.3f}"
    for name, m in summary["models"].items():
        s = m["rope_scaling"] or {}
        label = s.get("type", "none") if s.get("type", "none") == "none" else f"{s['type']} x{s['factor']:g}"
        lines.append(f"| {name} | {label} | " + " | ".join(cell(m["loss"].get(n)) for n in lengths) + " | "
                     + " | ".join(cell(m["task_accuracy"].get(n)) for n in lengths) + " |")
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    base = summary["base_seq_len"]
    marks = [(base, "trained length", "--"), (int(base * summary["factor"]), "fine-tuned length", ":")]
    return write_comparison_plots(list(evals.items()), out_dir, prefix="extension", marks=marks)
