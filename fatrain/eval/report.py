"""What an evaluation writes: eval.json, the plots, a W&B eval job, the table, a summary line.

    eval.json             every number of one checkpoint's evaluation
    loss_vs_position.png  mean loss per position bucket, one line per evaluated length
    passkey.png           passkey accuracy, context length x depth of the key; a cell that was not
                          run says why ("no room": the length cannot hold the task), with a note
    task_<name>.png       a RULER-style task's accuracy, context length x depth (one row without depth)
    tasks_summary.png     accuracy per context length, one line per task and their mean
    table.csv, table.md   one row per evaluated checkpoint (several for a run or sweep folder)
    compare_*.png         several checkpoints side by side: loss per length, loss by position at the
                          longest length, the tasks' mean accuracy (write_comparison_plots)
    W&B                   one run (job_type=eval) in the training run's group
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional

from omegaconf import OmegaConf

from fatrain.eval.loading import sweep_overrides
from fatrain.plotting import date_span, describe, pyplot, seq_len_axis, title, value_axis


def write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----- plots -------------------------------------------------------------------------------------


def run_description(result: dict) -> str:
    """'0.2M-parameter GPT (2 layers, d_model 64), fp32, cpu (...), 2026-12-03': a title's second line."""
    environment = result.get("environment") or {}
    return describe(result.get("train", {}).get("model"), result.get("precision"), environment.get("gpu"),
                    date_span([environment.get("date")]))


# Short heat-map labels for why a passkey cell was not run, by a phrase of the recorded reason.
SKIP_LABELS = (("cannot hold", "no room"), ("longer than", "> max len"), ("exceeds", "> max len"),
               ("max_seq_len", "> max len"), ("split", "no data"))


def skip_label(reason: str) -> str:
    """'no room', '> max len', 'no data' or 'skipped': a cell's label for ``reason``."""
    for phrase, label in SKIP_LABELS:
        if phrase in reason:
            return label
    return "skipped"


def passkey_cell_labels(passkey: dict) -> tuple[list[list[str]], list[str]]:
    """The text of every heat-map cell (accuracy, or why it was not run) and the notes that explain
    the labels: one line per skipped length, '<label>: <reason>' (passkey and the long-context tasks)."""
    skipped = passkey.get("skipped") or {}
    labels, notes = [], {}
    for row in passkey["accuracy"]:
        cells = []
        for length, value in zip(passkey["context_lens"], row):
            if value is not None:
                cells.append(f"{value:.2f}")
                continue
            reason = skipped.get(str(length))
            label = skip_label(reason) if reason else "not run"
            notes[length] = f"{label}: {reason}" if reason else f"not run: context {length} has no result"
            cells.append(label)
        labels.append(cells)
    return labels, list(notes.values())


def write_plots(result: dict, out_dir: str) -> dict:
    """loss_vs_position.png (one line per length) and passkey.png (context x depth heat map)."""
    plt = pyplot()
    files = {}
    where = run_description(result)
    evaluated = [r for r in result["lengths"] if "skipped" not in r]
    if evaluated:
        fig, ax = plt.subplots(figsize=(7, 4.8))
        losses = []
        for r in evaluated:
            centers = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
            losses += [b["loss"] for b in r["buckets"]]
            ax.plot(centers, [b["loss"] for b in r["buckets"]], marker=".", label=f"seq_len {r['seq_len']}")
        ax.axvline(result["train"]["seq_len"], color="grey", linestyle="--", linewidth=1, label="training length")
        # NOTE: positions stay linear, so the stretch past the training length reads in proportion.
        value_axis(ax, losses)
        ax.set_xlabel(f"position in the sequence (tokens; buckets of {result['bucket_size']})")
        ax.set_ylabel("mean loss (nats/token)")
        ax.set_title(title(f"Loss by position: step {result['step']}, attention={result['attention']}, "
                           f"{result['data']['split']} split", where), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files["loss_vs_position"] = os.path.join(out_dir, "loss_vs_position.png")
        fig.savefig(files["loss_vs_position"], dpi=120)
        plt.close(fig)
    passkey = result.get("passkey")
    if passkey and passkey["context_lens"] and passkey["depths"]:
        files["passkey"] = os.path.join(out_dir, "passkey.png")
        heat_map(plt, passkey, [f"{d:g}" for d in passkey["depths"]], "depth of the key (fraction of the filler)",
                 f"Passkey retrieval ({passkey['trials']} trials per cell)", where,
                 "accuracy (fraction of trials retrieved)", files["passkey"])
    files.update(write_task_plots(result.get("long_tasks"), out_dir, plt, where))
    return files


def write_comparison_plots(results: list[tuple[str, dict]], out_dir: str, prefix: str = "compare",
                           marks: Optional[list[tuple[int, str, str]]] = None) -> dict:
    """Several checkpoints' evaluations side by side, one line per (label, eval result):

        <prefix>_loss.png      validation loss at each evaluated length
        <prefix>_position.png  loss by position at each result's longest evaluated length
        <prefix>_tasks.png     mean accuracy of the RULER-style tasks per length (when they ran)

    ``marks``: vertical guides (position, label, line style); by default the training length
    when every checkpoint was trained at one."""
    plt = pyplot()
    files = {}
    trained = {r["train"]["seq_len"] for _, r in results}
    if marks is None:
        marks = [(trained.pop(), "training length", "--")] if len(trained) == 1 else []
    where = describe(*dict.fromkeys(run_description(r) for _, r in results))

    def guides(ax):
        for x, label, style in marks:
            ax.axvline(x, color="grey", linestyle=style, linewidth=1, label=label)

    def save(fig, ax, key):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files[key] = os.path.join(out_dir, f"{prefix}_{key}.png")
        fig.savefig(files[key], dpi=120)
        plt.close(fig)

    evaluated = [(label, [x for x in r["lengths"] if "skipped" not in x]) for label, r in results]
    lengths = sorted({x["seq_len"] for _, rows in evaluated for x in rows})
    if lengths:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for label, rows in evaluated:
            ax.plot([x["seq_len"] for x in rows], [x["loss"] for x in rows], marker="o", label=label)
        guides(ax)
        value_axis(ax, [x["loss"] for _, rows in evaluated for x in rows])
        seq_len_axis(ax, lengths, "evaluated context length (tokens)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(title("Loss by evaluated length", where), fontsize=10)
        save(fig, ax, "loss")
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        losses = []
        for label, rows in evaluated:
            if rows:
                buckets = rows[-1]["buckets"]
                losses += [b["loss"] for b in buckets]
                ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["loss"] for b in buckets],
                        label=f"{label} (seq_len {rows[-1]['seq_len']})")
        guides(ax)
        value_axis(ax, losses)
        ax.set_xlabel("position in the sequence (tokens)")
        ax.set_ylabel("mean loss (nats/token)")
        ax.set_title(title("Loss by position at the longest evaluated length", where), fontsize=10)
        save(fig, ax, "position")
    tasks = [(label, r["long_tasks"]["summary"]) for label, r in results if r.get("long_tasks")]
    if tasks:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for label, summary in tasks:
            points = [(n, a) for n, a in zip(summary["context_lens"], summary["mean_accuracy"]) if a is not None]
            ax.plot([n for n, _ in points], [a for _, a in points], marker="o", label=label)
        guides(ax)
        seq_len_axis(ax, sorted({n for _, s in tasks for n in s["context_lens"]}), "context length (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("mean exact-match accuracy over tasks")
        ax.set_title(title("Long-context tasks", where), fontsize=10)
        save(fig, ax, "tasks")
    return files


def heat_map(plt, cells: dict, row_labels: list[str], ylabel: str, heading: str, where: str, colorbar_label: str,
             path: str) -> None:
    """A context length x row heat map of ``cells`` (``accuracy`` rows, ``context_lens``, and
    ``skipped``: length -> why it was not run): a cell not run is grey and says why, with a note."""
    grid = [[float("nan") if v is None else v for v in row] for row in cells["accuracy"]]
    labels, notes = passkey_cell_labels(cells)
    lens = cells["context_lens"]
    height = 0.6 * len(row_labels) + 2.4 + 0.25 * len(notes)
    fig, ax = plt.subplots(figsize=(max(1.2 * len(lens) + 2.5, 6.5), height))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # a cell not run: grey, with its reason
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(lens)), [str(c) for c in lens])
    ax.set_yticks(range(len(row_labels)), row_labels)
    for i, row in enumerate(cells["accuracy"]):
        for j, value in enumerate(row):
            color = "k" if value is None or value > 0.5 else "w"  # readable on viridis' dark and light ends
            ax.text(j, i, labels[i][j], ha="center", va="center", color=color, fontsize=9 if value is not None else 8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title(heading, where, width=60), fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if notes:
        fig.text(0.01, 0.01, "\n".join(["grey cells were not run:", *notes]), fontsize=7, va="bottom", ha="left",
                 wrap=True)
        fig.tight_layout(rect=(0, 0.04 + 0.05 * len(notes), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_task_plots(long_tasks: Optional[dict], out_dir: str, plt, where: str = "") -> dict:
    """task_<name>.png per task (context x depth heat map) and tasks_summary.png (accuracy vs length)."""
    files = {}
    if not long_tasks:
        return files
    trials = long_tasks["trials"]
    for name, entry in long_tasks["tasks"].items():
        depths = entry["depths"]
        labels = [f"{d:g}" for d in depths] if depths is not None else ["all"]
        files[f"task_{name}"] = os.path.join(out_dir, f"task_{name}.png")
        heat_map(plt, entry, labels, "depth of the needle" if depths is not None else "",
                 f"{name} ({trials} trials per cell)", where, "exact-match accuracy", files[f"task_{name}"])
    summary = long_tasks["summary"]
    lens = summary["context_lens"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in long_tasks["tasks"].items():
        means = [_mean_of([row[j] for row in entry["accuracy"]]) for j in range(len(lens))]
        ax.plot(lens, [float("nan") if m is None else m for m in means], marker=".", label=name)
    ax.plot(lens, [float("nan") if m is None else m for m in summary["mean_accuracy"]], marker="o", color="k",
            linewidth=2, label="mean over tasks")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens, [str(n) for n in lens])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title("Long-context tasks: accuracy by context length", where), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files["tasks_summary"] = os.path.join(out_dir, "tasks_summary.png")
    fig.savefig(files["tasks_summary"], dpi=120)
    plt.close(fig)
    return files


def _mean_of(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ----- W&B -------------------------------------------------------------------------------------


def flat_metrics(result: dict) -> dict:
    """The scalar numbers of one eval result, W&B-style keys (eval/loss@256, passkey/acc@1024/d0.5, ...)."""
    unit = result["bits_unit"]
    out = {}
    for r in result["lengths"]:
        if "skipped" in r:
            continue
        n = r["seq_len"]
        out[f"eval/loss@{n}"] = r["loss"]
        out[f"eval/perplexity@{n}"] = r["perplexity"]
        out[f"eval/bits_per_{unit}@{n}"] = r[f"bits_per_{unit}"]
    passkey = result.get("passkey")
    if passkey:
        for i, depth in enumerate(passkey["depths"]):
            for j, length in enumerate(passkey["context_lens"]):
                if passkey["accuracy"][i][j] is not None:
                    out[f"passkey/accuracy@{length}/depth{depth:g}"] = passkey["accuracy"][i][j]
    long_tasks = result.get("long_tasks")
    if long_tasks:
        for name, entry in long_tasks["tasks"].items():
            for i, row in enumerate(entry["accuracy"]):
                depth = "" if entry["depths"] is None else f"/depth{entry['depths'][i]:g}"
                for j, length in enumerate(entry["context_lens"]):
                    if row[j] is not None:
                        out[f"tasks/{name}/accuracy@{length}{depth}"] = row[j]
        for length, mean in zip(long_tasks["summary"]["context_lens"], long_tasks["summary"]["mean_accuracy"]):
            if mean is not None:
                out[f"tasks/mean_accuracy@{length}"] = mean
    agreement = result.get("backend_agreement", {})
    if "max_abs_diff" in agreement:
        out["eval/backend_max_abs_diff"] = agreement["max_abs_diff"]
        for name, loss in agreement["losses"].items():
            out[f"eval/backend_loss/{name}"] = loss
    return out


def log_to_wandb(cfg, result: dict, saved_cfg: dict, out_dir: str) -> Optional[str]:
    """One W&B run (job_type=eval) in the training run's group; returns its id, or None when disabled."""
    w = cfg.logger.wandb
    if w.mode == "disabled":
        return None
    from fatrain.metrics import WandbLogger

    saved_w = saved_cfg.get("logger", {}).get("wandb", {})
    run_name = saved_w.get("name") or os.path.basename(os.path.dirname(os.path.dirname(result["checkpoint"])))
    logger = WandbLogger(mode=w.mode, project=w.project or saved_w.get("project") or "fatrain",
                         entity=w.entity or saved_w.get("entity"), name=w.name or f"eval-{run_name}-step{result['step']}",
                         group=w.group or saved_w.get("group"), tags=list(w.tags), run_dir=out_dir,
                         job_type="eval", config={"eval": OmegaConf.to_container(cfg, resolve=True),
                                                  "checkpoint": result["checkpoint"], "step": result["step"],
                                                  "train_wandb_id": result["train"]["wandb_id"], "train": saved_cfg})
    try:
        metrics = flat_metrics(result)
        for key, png in result["files"].items():
            if png.endswith(".png"):
                metrics[f"plots/{key}"] = logger._wandb.Image(png)
        logger.log(metrics, result["step"] or 0)
        return logger.run_id
    finally:
        logger.close()


# ----- the table over checkpoints, the console line -----------------------------------------------


def run_folder_name(checkpoint: str) -> str:
    """The name of the training run a checkpoint belongs to: its run folder's (the folder that holds
    ``checkpoints/``), or the folder the checkpoint lies in."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.basename(folder) == "checkpoints":
        folder = os.path.dirname(folder)
    return os.path.basename(folder) or folder


def table_rows(results: list[tuple[str, dict]], root: str) -> list[dict]:
    """One row per (run name, result): step, backends, loss and bits per length, passkey per length."""
    rows = []
    for name, r in results:
        row = {"run": name or run_folder_name(r["checkpoint"]), "step": r["step"], "tokens_seen": r["tokens_seen"],
               "train_attention": r["train"]["attention"], "attention": r["attention"],
               "rope_scaling": _scaling_label(r.get("rope_scaling")),
               "overrides": sweep_overrides(os.path.join(root, name)) if os.path.isdir(root) else ""}
        unit = r["bits_unit"]
        for length in r["lengths"]:
            n = length["seq_len"]
            row[f"loss@{n}"] = length.get("loss")
            row[f"bits_per_{unit}@{n}"] = length.get(f"bits_per_{unit}")
        if "passkey" in r:
            p = r["passkey"]
            for j, n in enumerate(p["context_lens"]):
                cells = [row_[j] for row_ in p["accuracy"] if row_[j] is not None]
                row[f"passkey@{n}"] = sum(cells) / len(cells) if cells else None
        if "long_tasks" in r:
            summary = r["long_tasks"]["summary"]
            for n, mean in zip(summary["context_lens"], summary["mean_accuracy"]):
                row[f"tasks@{n}"] = mean
        if "max_abs_diff" in r.get("backend_agreement", {}):
            row["backend_max_abs_diff"] = r["backend_agreement"]["max_abs_diff"]
        rows.append(row)
    return rows


def comparison_labels(results: list[tuple[str, dict]], root: str) -> list[str]:
    """A legend label per (run name, result) of one evaluation: the step when every checkpoint is
    one run's; else the sweep overrides that differ between the jobs (``model.position=alibi``);
    else the run's name."""
    names = [name or run_folder_name(r["checkpoint"]) for name, r in results]
    if len(set(names)) == 1:
        return [f"step {r['step']}" for _, r in results]
    overrides = [sweep_overrides(os.path.join(root, name)).split() if name and os.path.isdir(root) else []
                 for name, _ in results]
    common = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    labels = []
    for name, parts in zip(names, overrides):
        own = [o for o in parts if o not in common]
        labels.append(", ".join(own) if own else name)
    return labels if len(set(labels)) == len(labels) else names


def _scaling_label(scaling: Optional[dict]) -> str:
    if not scaling or scaling.get("type", "none") == "none":
        return "none"
    return f"{scaling['type']} x{scaling['factor']:g}"


def write_table(rows: list[dict], out_dir: str) -> tuple[str, str]:
    """table.csv and table.md: one row per evaluated checkpoint, columns in first-seen order."""
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    csv_path, md_path = os.path.join(out_dir, "table.csv"), os.path.join(out_dir, "table.md")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        if v is None:
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    with open(md_path, "w", encoding="utf-8") as f:
        f.write("| " + " | ".join(columns) + " |\n")
        f.write("|" + "---|" * len(columns) + "\n")
        for row in rows:
            f.write("| " + " | ".join(cell(row.get(c)) for c in columns) + " |\n")
    return csv_path, md_path


def summary_line(name: str, result: dict) -> str:
    """One console line per checkpoint: loss, perplexity and bits per length, backend agreement."""
    unit = result["bits_unit"]
    parts = [f"{name or os.path.basename(result['checkpoint'])} step {result['step']}"]
    for r in result["lengths"]:
        if "skipped" in r:
            parts.append(f"L={r['seq_len']}: skipped ({r['skipped']})")
        else:
            parts.append(f"L={r['seq_len']}: loss {r['loss']:.4f} ppl {r['perplexity']:.2f} "
                         f"bits/{unit} {r[f'bits_per_{unit}']:.4f}")
    agreement = result.get("backend_agreement", {})
    if "max_abs_diff" in agreement:
        parts.append(f"backends max |loss diff| {agreement['max_abs_diff']:.2e}")
    return " | ".join(parts)
