"""A training sweep turned into the tables and plots of a paper (``fatrain-report``).

Reads, for every job directory under the sweep (any folder holding ``.hydra/config.yaml``),
its config, ``metrics.jsonl`` and ``result.json`` (no W&B account needed), and writes:

    report.md        backend x seq_len tables: tokens/s, MFU, peak memory, final loss, OOM
    report.csv       one row per job, every number in the tables and more
    tokens_per_sec.png   tokens/s vs seq_len, one line per backend
    peak_memory.png      peak allocated memory vs seq_len, log-log (N^2 against N)
    loss_curves.png      training loss vs step, backends overlaid, one panel per seq_len
    max_context.png      longest trainable seq_len per backend (with a max_context.json)

Throughput is the median of the per-log-step tokens/s after the warm-up (compilation and
Triton autotuning happen in the first steps): a row logged at step s covers steps
(s - log_every, s], and is used when s - log_every >= --warmup-steps.
Jobs that vary in more than backend and seq_len (e.g. block sizes) get one table row per
variant, labelled with the overrides that differ between jobs. With a ``baseline`` (a row
label: a backend, or a backend and its variant) the report adds each row's throughput
relative to it at the same seq_len; without one, or when the sweep has no such row, there
is no relative table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

import yaml

REPORT_FILES = ("report.md", "report.csv", "tokens_per_sec.png", "peak_memory.png", "loss_curves.png")
# Overrides that never distinguish two points of a sweep.
IGNORED_OVERRIDE_PREFIXES = ("experiment", "logger.", "hydra.", "trainer.device", "trainer.progress_bar")
# Keys the report tabulates along its two axes; any other override that varies names a variant.
AXIS_KEYS = ("attention", "attention.backend", "data.seq_len")


@dataclass
class Job:
    """One training run of a sweep, reduced to the numbers the report shows."""

    path: str
    backend: str
    seq_len: int
    variant: str = ""  # overrides besides backend and seq_len that differ between the sweep's jobs
    status: str = "missing"  # ok | oom | missing (no result.json: crashed, killed, or still running)
    error: str = ""
    tokens_per_sec: Optional[float] = None
    mfu: Optional[float] = None
    step_time_s: Optional[float] = None
    peak_allocated_gib: Optional[float] = None
    peak_requested_gib: Optional[float] = None
    peak_reserved_gib: Optional[float] = None
    final_train_loss: Optional[float] = None
    final_val_loss: Optional[float] = None
    steps: int = 0
    timed_steps: int = 0  # log rows the throughput median is taken over
    batch_size: Optional[int] = None
    tokens_per_step: Optional[int] = None
    params: Optional[int] = None
    overrides: dict = field(default_factory=dict)
    loss_curve: list = field(default_factory=list)  # [(step, train/loss)]

    @property
    def label(self) -> str:
        return f"{self.backend} {self.variant}".strip()


# ----- reading a sweep ---------------------------------------------------------------------------


def find_job_dirs(sweep_dir: str) -> list[str]:
    """Every directory under ``sweep_dir`` that holds a Hydra job config, sorted by job number."""
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        if os.path.isfile(os.path.join(root, ".hydra", "config.yaml")):
            found.append(root)
            dirs[:] = []  # a job directory holds no further jobs (checkpoints/, wandb/ only)
    return sorted(found, key=_job_sort_key)


def _job_sort_key(path: str):
    head = os.path.basename(path).split("_", 1)[0]
    return (0, int(head), path) if head.isdigit() else (1, 0, path)


def _read_yaml(path: str):
    # NOTE: plain YAML, not OmegaConf: the saved config keeps interpolations such as ${now:...}
    # that only Hydra can resolve; the report needs literal values only.
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (the run was killed mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if not key.startswith(IGNORED_OVERRIDE_PREFIXES):
            out[key] = value
    return out


def _number(value) -> Optional[float]:
    # JsonlLogger writes non-finite floats as null (older runs: as strings, "nan", "inf").
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


def summarize_job(path: str, warmup_steps: int) -> Job:
    cfg = _read_yaml(os.path.join(path, ".hydra", "config.yaml"))
    overrides_path = os.path.join(path, ".hydra", "overrides.yaml")
    overrides = parse_overrides(_read_yaml(overrides_path) if os.path.exists(overrides_path) else [])
    trainer = cfg.get("trainer", {})
    job = Job(path=path, backend=str(cfg["attention"]["backend"]), seq_len=int(cfg["data"]["seq_len"]),
              overrides=overrides, batch_size=trainer.get("batch_size"),
              tokens_per_step=trainer.get("tokens_per_step"))
    if job.tokens_per_step:  # the trainer derives the batch from it (fatrain.trainer.micro_batch_size)
        job.batch_size = job.tokens_per_step // (job.seq_len * int(trainer.get("grad_accum_steps", 1) or 1))

    result_path = os.path.join(path, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
        job.status = result.get("status", "ok")
        job.error = result.get("error", "")
        job.final_val_loss = _number(result.get("final_val_loss"))

    rows = read_metrics(os.path.join(path, "metrics.jsonl"))
    log_every = int(trainer.get("log_every", 1) or 1)
    train_rows = [r for r in rows if "train/loss" in r]
    job.loss_curve = [(r["step"], _number(r["train/loss"])) for r in train_rows]
    job.steps = max((r["step"] for r in train_rows), default=0)
    if train_rows:
        job.final_train_loss = _number(train_rows[-1]["train/loss"])
    if job.final_val_loss is None:
        val = [_number(r["val/loss"]) for r in rows if "val/loss" in r]
        job.final_val_loss = val[-1] if val else None
    for r in rows:
        if "model/params" in r:
            job.params = int(r["model/params"])
    timed = [r for r in train_rows if r["step"] - log_every >= warmup_steps and "perf/tokens_per_sec" in r]
    if not timed and job.status == "ok":
        # A run shorter than the warm-up: its later rows are still better than nothing.
        timed = [r for r in train_rows if "perf/tokens_per_sec" in r][1:] or train_rows
    job.timed_steps = len(timed)
    job.tokens_per_sec = _median(timed, "perf/tokens_per_sec")
    job.step_time_s = _median(timed, "perf/step_time_s")
    job.mfu = _median(timed, "perf/mfu")
    job.peak_allocated_gib = _max(train_rows, "mem/peak_allocated_gib")
    job.peak_requested_gib = _max(train_rows, "mem/peak_requested_gib")
    job.peak_reserved_gib = _max(train_rows, "mem/peak_reserved_gib")
    return job


def _median(rows: list[dict], key: str) -> Optional[float]:
    values = [v for v in (_number(r.get(key)) for r in rows) if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _max(rows: list[dict], key: str) -> Optional[float]:
    values = [v for v in (_number(r.get(key)) for r in rows) if v is not None and math.isfinite(v)]
    return max(values) if values else None


def label_variants(jobs: list[Job]) -> None:
    """Name each job's variant by the overrides (beyond backend and seq_len) that differ across jobs."""
    keys = sorted({k for j in jobs for k in j.overrides if k not in AXIS_KEYS})
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    for j in jobs:
        j.variant = ",".join(f"{k.split('.')[-1]}={j.overrides.get(k, '-')}" for k in varying)


def load_sweep(sweep_dir: str, warmup_steps: int = 10) -> list[Job]:
    if not os.path.isdir(sweep_dir):
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    if os.path.isfile(os.path.join(sweep_dir, ".hydra", "config.yaml")):
        raise ValueError(f"{sweep_dir} is one run's folder (it holds .hydra/config.yaml), not a sweep: "
                         "pass the folder a multirun wrote (hydra.sweep.dir)")
    jobs = [summarize_job(p, warmup_steps) for p in find_job_dirs(sweep_dir)]
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (none has .hydra/config.yaml): "
                                "pass the folder a multirun wrote (hydra.sweep.dir)")
    label_variants(jobs)
    return jobs


def load_max_context(path: str) -> list[dict]:
    """Rows {backend, max_seq_len, ...} from fatrain-max-context's max_context.json."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data["results"] if isinstance(data, dict) else data


# ----- writing the report ------------------------------------------------------------------------


CSV_FIELDS = ("backend", "variant", "seq_len", "status", "tokens_per_sec", "mfu", "step_time_s",
              "peak_allocated_gib", "peak_requested_gib", "peak_reserved_gib", "final_train_loss", "final_val_loss", "steps",
              "timed_steps", "batch_size", "tokens_per_step", "params", "error", "path")


def write_csv(jobs: list[Job], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for j in jobs:
            row = asdict(j)
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_FIELDS})


def _ordered_labels(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(j.label for j in jobs))


def _seq_lens(jobs: list[Job]) -> list[int]:
    return sorted({j.seq_len for j in jobs})


def _cell(job: Optional[Job], value_of) -> str:
    if job is None:
        return "-"
    if job.status == "oom":
        return "OOM"
    if job.status != "ok":
        return job.status
    value = value_of(job)
    return "-" if value is None else value


def pivot_table(jobs: list[Job], title: str, value_of) -> str:
    labels, seq_lens = _ordered_labels(jobs), _seq_lens(jobs)
    by_key = {(j.label, j.seq_len): j for j in jobs}
    lines = [f"### {title}", "", "| backend | " + " | ".join(str(n) for n in seq_lens) + " |",
             "|---|" + "---:|" * len(seq_lens)]
    for label in labels:
        cells = [_cell(by_key.get((label, n)), value_of) for n in seq_lens]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float], spec: str) -> Optional[str]:
    return None if value is None else format(value, spec)


def markdown_report(jobs: list[Job], sweep_dir: str, warmup_steps: int, baseline: Optional[str],
                    max_context: Optional[list[dict]]) -> str:
    n_ok = sum(j.status == "ok" for j in jobs)
    n_oom = sum(j.status == "oom" for j in jobs)
    mfu = pivot_table(jobs, "MFU (%)", lambda j: _fmt(None if j.mfu is None else 100 * j.mfu, ".1f"))
    if not any(j.mfu is not None for j in jobs):
        mfu = "MFU: not measured (the device is not in fatrain.metrics.PEAK_TFLOPS, e.g. a CPU run).\n"
    parts = [
        f"# Backend report: {os.path.basename(os.path.abspath(sweep_dir))}", "",
        f"{len(jobs)} jobs from `{sweep_dir}`: {n_ok} ok, {n_oom} out of memory, "
        f"{len(jobs) - n_ok - n_oom} without a result. tokens/s is the median over the log steps after "
        f"step {warmup_steps} (all but the first, for runs shorter than that); peak memory is the largest "
        "`mem/peak_allocated_gib` of the run in GiB (the process's peak RSS on the CPU), and the peak of the "
        "bytes requested (`mem/peak_requested_gib`: the same without the allocator's rounding and unsplit "
        "cached blocks); final loss is the last validation loss. OOM: the job ran out of GPU memory.", "",
        pivot_table(jobs, "Throughput (tokens/s)", lambda j: _fmt(j.tokens_per_sec, ",.0f")),
        mfu,
        pivot_table(jobs, "Peak memory (GiB allocated)", lambda j: _fmt(j.peak_allocated_gib, ".2f")),
        pivot_table(jobs, "Peak memory (GiB requested)", lambda j: _fmt(j.peak_requested_gib, ".4f")),
        pivot_table(jobs, "Final validation loss", lambda j: _fmt(j.final_val_loss, ".4f")),
    ]
    base = {j.seq_len: j for j in jobs if j.label == baseline and j.status == "ok" and j.tokens_per_sec}
    if base:
        def ratio(j):
            b = base.get(j.seq_len)
            return None if b is None or not j.tokens_per_sec else f"{j.tokens_per_sec / b.tokens_per_sec:.2f}x"
        parts.append(pivot_table(jobs, f"Throughput relative to {baseline}", ratio))
    if max_context:
        parts += ["### Longest trainable seq_len at batch 1", "", "| backend | max seq_len | first failure |",
                  "|---|---:|---|"]
        for r in max_context:
            fail = f"{r['first_fail']} ({r.get('fail_status') or 'oom'})" if r.get("first_fail") else "-"
            parts.append(f"| {r['backend']} | {r.get('max_seq_len') or '-'} | {fail} |")
        parts.append("")
    failed = [j for j in jobs if j.status not in ("ok",)]
    if failed:
        parts += ["### Jobs without a full result", ""]
        parts += [f"- `{os.path.relpath(j.path, sweep_dir)}`: {j.status}" + (f" ({j.error})" if j.error else "")
                  for j in failed]
        parts.append("")
    parts += ["### Plots", "", "![tokens/s](tokens_per_sec.png)", "![peak memory](peak_memory.png)",
              "![loss curves](loss_curves.png)"]
    if max_context:
        parts.append("![max context](max_context.png)")
    return "\n".join(parts) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a GPU box or in CI
    import matplotlib.pyplot as plt

    return plt


def _plain_numbers():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def _series(jobs: list[Job], label: str, value_of) -> tuple[list[int], list[float]]:
    points = sorted((j.seq_len, value_of(j)) for j in jobs
                    if j.label == label and j.status == "ok" and value_of(j) is not None)
    return [n for n, _ in points], [v for _, v in points]


def _mark_ooms(ax, jobs: list[Job], label: str, color, y: float) -> None:
    ooms = [j.seq_len for j in jobs if j.label == label and j.status == "oom"]
    if ooms:
        ax.scatter(ooms, [y] * len(ooms), marker="x", color=color, zorder=3)


def plot_tokens_per_sec(jobs: list[Job], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in _ordered_labels(jobs):
        x, y = _series(jobs, label, lambda j: j.tokens_per_sec)
        line, = ax.plot(x, y, marker="o", label=label)
        _mark_ooms(ax, jobs, label, line.get_color(), 0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(_seq_lens(jobs), [str(n) for n in _seq_lens(jobs)])
    ax.set_xlabel("seq_len")
    ax.set_ylabel("training tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Training throughput (x at 0: out of memory)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_peak_memory(jobs: list[Job], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seq_lens = _seq_lens(jobs)
    for label in _ordered_labels(jobs):
        x, y = _series(jobs, label, lambda j: j.peak_allocated_gib)
        ax.plot(x, y, marker="o", label=label)
    # Guides through the first measured point: memory linear in N (tiled kernels) and quadratic (S held in memory).
    ok = [j for j in jobs if j.status == "ok" and j.peak_allocated_gib]
    if ok and len(seq_lens) > 1:
        ref = min(ok, key=lambda j: (j.seq_len, j.peak_allocated_gib))
        for power, style in ((1, ":"), (2, "--")):
            ax.plot(seq_lens, [ref.peak_allocated_gib * (n / ref.seq_len) ** power for n in seq_lens],
                    color="gray", linestyle=style, linewidth=1, label=f"~N^{power}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_numbers())
    ax.yaxis.set_minor_formatter(_plain_numbers())
    ax.set_xticks(seq_lens, [str(n) for n in seq_lens])
    ax.set_xlabel("seq_len")
    ax.set_ylabel("peak allocated memory (GiB)")
    ax.set_title("Peak memory per training step (log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(jobs: list[Job], path: str) -> None:
    plt = _pyplot()
    seq_lens = _seq_lens(jobs)
    cols = min(3, len(seq_lens))
    rows = math.ceil(len(seq_lens) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax, n in zip(axes.flat, seq_lens):
        for label in _ordered_labels(jobs):
            for j in jobs:
                if j.label == label and j.seq_len == n and j.loss_curve:
                    steps, losses = zip(*j.loss_curve)
                    ax.plot(steps, losses, label=label + (" (OOM)" if j.status == "oom" else ""), alpha=0.8)
        ax.set_title(f"seq_len {n}")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(seq_lens):]:
        ax.set_visible(False)
    fig.suptitle("Training loss: exact backends must coincide")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_max_context(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["backend"] for r in rows]
    values = [r.get("max_seq_len") or 0 for r in rows]
    bars = ax.bar(names, values)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:,}" if v else "none fit", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("longest seq_len trained at batch 1")
    ax.set_title("Maximum context per backend")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str, out_dir: Optional[str] = None, *, warmup_steps: int = 10,
                 baseline: Optional[str] = None, max_context_path: Optional[str] = None) -> list[str]:
    """Write the report files for ``sweep_dir`` into ``out_dir`` (default: the sweep dir); return their paths."""
    jobs = load_sweep(sweep_dir, warmup_steps)  # before anything is written: a folder that is not a sweep
    out_dir = out_dir or sweep_dir
    os.makedirs(out_dir, exist_ok=True)
    if max_context_path is None and os.path.exists(os.path.join(sweep_dir, "max_context.json")):
        max_context_path = os.path.join(sweep_dir, "max_context.json")
    max_context = load_max_context(max_context_path) if max_context_path else None

    plots = {"tokens_per_sec.png": lambda p: plot_tokens_per_sec(jobs, p),
             "peak_memory.png": lambda p: plot_peak_memory(jobs, p),
             "loss_curves.png": lambda p: plot_loss_curves(jobs, p)}
    if max_context:
        plots["max_context.png"] = lambda p: plot_max_context(max_context, p)
    written = [os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.csv")]
    with open(written[0], "w", encoding="utf-8") as f:
        f.write(markdown_report(jobs, sweep_dir, warmup_steps, baseline, max_context))
    write_csv(jobs, written[1])
    for name, plot in plots.items():
        written.append(os.path.join(out_dir, name))
        plot(written[-1])
    return written
