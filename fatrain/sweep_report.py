"""A training sweep turned into the tables and plots of a paper (``fatrain-report``).

Reads, for every job directory under the sweep (any folder holding ``.hydra/config.yaml``),
its config, ``metrics.jsonl`` and ``result.json`` (no W&B account needed), and writes:

    report.md        backend x seq_len tables: tokens/s, MFU, peak memory, final loss, OOM
    report.csv       one row per job, every number in the tables and more
    tokens_per_sec.png   tokens/s vs seq_len, one line per backend
    peak_memory.png      peak memory vs seq_len, log-log, with N and N^2 guides
    loss_curves.png      training loss vs step, backends overlaid, one panel per seq_len
    max_context.png      longest trainable seq_len per backend (with a max_context.json)

The plots follow ``fatrain.plotting``: a value axis spanning more than 10x is log, and every
title names the model, the device and the date, from what the jobs recorded (result.json's
``environment``; for older sweeps the config's trainer.device and metrics.jsonl's times, and
what ``device_name=`` / ``date=`` say). Peak memory is what ``fatrain.metrics`` logs: on a GPU
``torch.cuda.max_memory_allocated`` (reset at the start of every job); on the CPU the peak RSS of
the process, which never goes down, so in a multirun (all jobs in one process) a job's number
includes the jobs before it: the labels say so. A folder with a ``report.csv`` and no job
folders (a study's committed results) is re-plotted from that CSV: tokens/s and peak memory
(the loss curves need the jobs' metrics.jsonl).

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
import datetime
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

import yaml

from fatrain.plotting import (date_span, describe, describe_model, device_names, log_axis, plain_numbers, pyplot,
                              seq_len_axis, spans_decade, title, value_axis)

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
    device: str = ""  # cuda | cpu | "" (not recorded)
    device_name: str = ""  # GPU name, or "cpu (<model name>)"
    date: str = ""  # when the job ran (UTC, ISO 8601)
    model: str = ""  # e.g. "124M-parameter GPT (12 layers, d_model 768), bf16"
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
        environment = result.get("environment") or {}
        job.device = str(environment.get("device", "")).split(":")[0]
        job.device_name = environment.get("gpu") or ""
        job.date = environment.get("date") or ""

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
    configured = str(trainer.get("device", ""))
    if not job.device and (configured == "cpu" or configured.startswith("cuda")):
        job.device = configured.split(":")[0]
    if not job.device and job.mfu is not None:
        job.device = "cuda"  # MFU is logged for a GPU in fatrain.metrics.PEAK_TFLOPS only
    if not job.date:
        times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
        if times:
            job.date = datetime.datetime.fromtimestamp(min(times), datetime.timezone.utc).isoformat(timespec="seconds")
    job.model = describe_model(job.params, cfg.get("model") or {}, trainer.get("precision"))
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
    return load_max_context_file(path)[0]


def load_max_context_file(path: str) -> tuple[list[dict], str]:
    """The rows of a max_context.json and what ran where (model, precision, batch, GPU, date)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        return data, ""
    runs = [data, *(data.get("runs") or {}).values()]  # one run's file, or several merged (each under "runs")
    config = data.get("config") or {}
    model, trainer = config.get("model") or {}, config.get("trainer") or {}
    what = describe(model.get("name") and f"model {model['name']}", trainer.get("precision"),
                    trainer.get("batch_size") and f"batch {trainer['batch_size']}",
                    "activation checkpointing" if trainer.get("activation_checkpointing") else "",
                    device_names(r.get("gpu") for r in runs), date_span(r.get("date") for r in runs))
    return data["results"], what


# ----- a study's committed report.csv ------------------------------------------------------------


def _csv_value(kind, text: str):
    if text in ("", None):
        return None
    return int(float(text)) if kind is int else float(text)


def load_report_csv(path: str) -> list[Job]:
    """The jobs of a report.csv that fatrain-report wrote (no loss curves: those need metrics.jsonl)."""
    kinds = {"seq_len": int, "steps": int, "timed_steps": int, "batch_size": int, "tokens_per_step": int,
             "params": int, "tokens_per_sec": float, "mfu": float, "step_time_s": float,
             "peak_allocated_gib": float, "peak_requested_gib": float, "peak_reserved_gib": float,
             "final_train_loss": float, "final_val_loss": float}
    jobs = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if not {"backend", "seq_len", "path"} <= set(row):
                raise ValueError(f"{path} is not a report.csv that fatrain-report wrote "
                                 "(it lacks the backend, seq_len and path columns)")
            values = {k: (_csv_value(kinds[k], v) if k in kinds else v or "") for k, v in row.items()
                      if k in CSV_FIELDS}
            values["steps"] = values.get("steps") or 0
            values["timed_steps"] = values.get("timed_steps") or 0
            job = Job(**values)
            if not job.device and job.mfu is not None:
                job.device = "cuda"  # MFU is logged for a GPU only
            if not job.model and job.params:
                job.model = describe_model(job.params, {}, None)
            jobs.append(job)
    if not jobs:
        raise ValueError(f"{path} holds no jobs")
    return jobs


def fill_unrecorded(jobs: list[Job], device_name: Optional[str] = None, date: Optional[str] = None) -> None:
    """Give the jobs that did not record their device name or date the ones the user states."""
    for j in jobs:
        if device_name and not j.device_name:
            j.device_name = device_name
        if date and not j.date:
            j.date = date


# ----- what ran where, what memory means -----------------------------------------------------------


def run_description(jobs: list[Job]) -> str:
    """'124M-parameter GPT (...), bf16, NVIDIA H100 80GB HBM3, 2026-11-26': a plot title's second line."""
    return describe(device_names(j.model for j in jobs), device_names(j.device_name for j in jobs),
                    date_span(j.date for j in jobs))


def memory_kind(jobs: list[Job]) -> str:
    """'gpu' or 'cpu' when every job that recorded a device ran on that kind; '' when unknown or mixed."""
    kinds = {j.device for j in jobs if j.device}
    if kinds == {"cuda"}:
        return "gpu"
    return "cpu" if kinds == {"cpu"} else ""


RSS_CAVEAT = "peak RSS of the process, not comparable across jobs of one process"
MEMORY_AXIS_LABELS = {
    "gpu": "peak GPU memory allocated (GiB)",
    "cpu": "peak RSS of the process (GiB),\nnot comparable across jobs of one process",
    "": "peak memory (GiB): GPU allocated,\nor the process's peak RSS on a CPU",
}
MEMORY_TABLE_TITLES = {
    "gpu": "Peak GPU memory allocated (GiB)",
    "cpu": f"Peak memory (GiB; {RSS_CAVEAT})",
    "": "Peak memory (GiB; GPU allocated, or the process's peak RSS on a CPU)",
}
MEMORY_NOTES = {
    "gpu": "peak memory is the largest `mem/peak_allocated_gib` of the run (`torch.cuda.max_memory_allocated`, "
           "reset at the start of every job) in GiB, and the peak of the bytes requested "
           "(`mem/peak_requested_gib`: the same without the allocator's rounding and unsplit cached blocks)",
    "cpu": f"peak memory is the {RSS_CAVEAT}: the jobs of a multirun share one process and its peak RSS never "
           "goes down, so each job's number includes the jobs before it (it grows in job order)",
    "": "peak memory is the largest `mem/peak_allocated_gib` of the run in GiB: `torch.cuda.max_memory_allocated` "
        f"on a GPU, the {RSS_CAVEAT} on a CPU; and the peak of the bytes requested (`mem/peak_requested_gib`: "
        "on a GPU the same without the allocator's rounding and unsplit cached blocks)",
}


# ----- writing the report ------------------------------------------------------------------------


CSV_FIELDS = ("backend", "variant", "seq_len", "status", "tokens_per_sec", "mfu", "step_time_s",
              "peak_allocated_gib", "peak_requested_gib", "peak_reserved_gib", "final_train_loss", "final_val_loss", "steps",
              "timed_steps", "batch_size", "tokens_per_step", "params", "error", "path",
              "device", "device_name", "date", "model")


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


def loss_curve_gap(curve: list, base: list) -> Optional[tuple[float, float]]:
    """(mean, max) of |loss - base loss| over the steps both curves logged, or None without any."""
    at = {step: loss for step, loss in base if loss is not None}
    gaps = [abs(loss - at[step]) for step, loss in curve if loss is not None and step in at]
    return (sum(gaps) / len(gaps), max(gaps)) if gaps else None


def markdown_report(jobs: list[Job], sweep_dir: str, warmup_steps: int, baseline: Optional[str],
                    max_context: Optional[list[dict]]) -> str:
    n_ok = sum(j.status == "ok" for j in jobs)
    n_oom = sum(j.status == "oom" for j in jobs)
    memory = memory_kind(jobs)
    where = run_description(jobs)
    mfu = pivot_table(jobs, "MFU (%)", lambda j: _fmt(None if j.mfu is None else 100 * j.mfu, ".1f"))
    if not any(j.mfu is not None for j in jobs):
        mfu = "MFU: not measured (the device is not in fatrain.metrics.PEAK_TFLOPS, e.g. a CPU run).\n"
    parts = [
        f"# Backend report: {os.path.basename(os.path.abspath(sweep_dir))}", "",
        *([where, ""] if where else []),
        f"{len(jobs)} jobs from `{sweep_dir}`: {n_ok} ok, {n_oom} out of memory, "
        f"{len(jobs) - n_ok - n_oom} without a result. tokens/s is the median over the log steps after "
        f"step {warmup_steps} (all but the first, for runs shorter than that); {MEMORY_NOTES[memory]}; "
        "final loss is the last validation loss. OOM: the job ran out of GPU memory.", "",
        pivot_table(jobs, "Throughput (tokens/s)", lambda j: _fmt(j.tokens_per_sec, ",.0f")),
        mfu,
        pivot_table(jobs, MEMORY_TABLE_TITLES[memory], lambda j: _fmt(j.peak_allocated_gib, ".2f")),
    ]
    if memory != "cpu":  # on the CPU "requested" is the same peak RSS again
        parts.append(pivot_table(jobs, "Peak memory (GiB requested)", lambda j: _fmt(j.peak_requested_gib, ".4f")))
    parts.append(pivot_table(jobs, "Final validation loss", lambda j: _fmt(j.final_val_loss, ".4f")))
    base = {j.seq_len: j for j in jobs if j.label == baseline and j.status == "ok" and j.tokens_per_sec}
    if base:
        def ratio(j):
            b = base.get(j.seq_len)
            return None if b is None or not j.tokens_per_sec else f"{j.tokens_per_sec / b.tokens_per_sec:.2f}x"
        parts.append(pivot_table(jobs, f"Throughput relative to {baseline}", ratio))

        def gap(j):
            b = base.get(j.seq_len)
            g = None if b is None else loss_curve_gap(j.loss_curve, b.loss_curve)
            return None if g is None else f"{g[0]:.4f} / {g[1]:.4f}"
        parts.append(pivot_table(jobs, f"Training loss against {baseline} (mean / max of the absolute difference "
                                       f"at the steps both logged)", gap))
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


def _series(jobs: list[Job], label: str, value_of) -> tuple[list[int], list[float]]:
    points = sorted((j.seq_len, value_of(j)) for j in jobs
                    if j.label == label and j.status == "ok" and value_of(j) is not None)
    return [n for n, _ in points], [v for _, v in points]


def _title(ax, what: str, jobs: list[Job]) -> None:
    ax.set_title(title(what, run_description(jobs)), fontsize=10)


def _mark_ooms(ax, jobs: list[Job], label: str, color) -> bool:
    """An x on the bottom edge of the axes at every seq_len where ``label`` ran out of memory."""
    ooms = [j.seq_len for j in jobs if j.label == label and j.status == "oom"]
    if ooms:
        # NOTE: x in data coordinates, y in axes coordinates: the edge holds on a log axis too.
        ax.scatter(ooms, [0.0] * len(ooms), marker="x", color=color, zorder=3, clip_on=False,
                   transform=ax.get_xaxis_transform())
    return bool(ooms)


def plot_tokens_per_sec(jobs: list[Job], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    values, any_oom = [], False
    for label in _ordered_labels(jobs):
        x, y = _series(jobs, label, lambda j: j.tokens_per_sec)
        values += y
        line, = ax.plot(x, y, marker="o", label=label)
        any_oom |= _mark_ooms(ax, jobs, label, line.get_color())
    seq_len_axis(ax, _seq_lens(jobs))
    if value_axis(ax, values) == "linear":
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(plain_numbers())
    ax.set_ylabel("training throughput (tokens/s)")
    _title(ax, "Training throughput" + (" (x on the axis: out of memory)" if any_oom else ""), jobs)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_guides(jobs: list[Job], value_of=lambda j: j.peak_allocated_gib,
                   powers=(1, 2)) -> tuple[tuple[float, float], dict[int, tuple[list[float], list[float]]]]:
    """The y range of the measured points (padded by 15% on a log scale) and, per power p, a guide
    y = y0 (N / N0)^p through the lowest point at the shortest seq_len, cut where it leaves that
    range: it shows the slope next to the data without stretching the axis to N^2's far end."""
    ok = [j for j in jobs if j.status == "ok" and value_of(j)]
    if not ok:
        return (0.0, 0.0), {}
    values = [value_of(j) for j in ok]
    low, high = min(values) / 1.15, max(values) * 1.15
    n_max = max(j.seq_len for j in ok)
    ref = min(ok, key=lambda j: (j.seq_len, value_of(j)))
    n0, y0 = ref.seq_len, value_of(ref)
    guides = {}
    if n_max > n0:
        for p in powers:
            n_end = min(n_max, n0 * (high / y0) ** (1 / p))  # where y0 (N / n0)^p reaches the top of the range
            xs = [n0 * (n_end / n0) ** (i / 20) for i in range(21)]
            guides[p] = (xs, [y0 * (n / n0) ** p for n in xs])
    return (low, high), guides


def plot_peak_memory(jobs: list[Job], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for label in _ordered_labels(jobs):
        x, y = _series(jobs, label, lambda j: j.peak_allocated_gib)
        ax.plot(x, y, marker="o", label=label)
    (low, high), guides = scaling_guides(jobs)
    for p, (xs, ys) in guides.items():
        ax.plot(xs, ys, color="gray", linestyle=":" if p == 1 else "--", linewidth=1,
                label=f"~N{'' if p == 1 else f'^{p}'} (guide)")
    seq_len_axis(ax, _seq_lens(jobs))
    log_axis(ax, "y")  # always log: a power of N is a straight line, its slope the power
    if high > 0:
        ax.set_ylim(low, high)
    ax.set_ylabel(MEMORY_AXIS_LABELS[memory_kind(jobs)])
    _title(ax, "Peak memory per training step (log-log)", jobs)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(jobs: list[Job], path: str) -> None:
    plt = pyplot()
    seq_lens = _seq_lens(jobs)
    cols = min(3, len(seq_lens))
    rows = math.ceil(len(seq_lens) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows + 0.4), squeeze=False)
    for ax, n in zip(axes.flat, seq_lens):
        losses_here = []
        for label in _ordered_labels(jobs):
            for j in jobs:
                if j.label == label and j.seq_len == n and j.loss_curve:
                    steps, losses = zip(*j.loss_curve)
                    losses_here += losses
                    ax.plot(steps, losses, label=label + (" (OOM)" if j.status == "oom" else ""), alpha=0.8)
        value_axis(ax, losses_here)
        ax.set_title(f"seq_len {n}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(seq_lens):]:
        ax.set_visible(False)
    where = run_description(jobs)
    fig.suptitle(title("Training loss: exact backends must coincide", where, width=40 * cols), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_max_context(rows: list[dict], path: str, where: str = "") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    names = [r["backend"] for r in rows]
    values = [r.get("max_seq_len") or 0 for r in rows]
    log = spans_decade(values)
    if log:
        log_axis(ax, "y")
        fitted = [v for v in values if v]
        ax.set_ylim(min(fitted) / 2, max(fitted) * 2)
    bars = ax.bar(names, [v or (ax.get_ylim()[0] if log else 0) for v in values])
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:,}" if v else "none fit", (bar.get_x() + bar.get_width() / 2, bar.get_height() if v else 0),
                    xycoords=("data", "data") if v else ("data", "axes fraction"),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("longest seq_len trained (tokens)")
    ax.set_title(title("Maximum context per backend", where), fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: Optional[str], out_dir: Optional[str] = None, *, warmup_steps: int = 10,
                 baseline: Optional[str] = None, max_context_path: Optional[str] = None,
                 device_name: Optional[str] = None, date: Optional[str] = None) -> list[str]:
    """Write the report files for ``sweep_dir`` into ``out_dir`` (default: the sweep dir); return their paths.

    A ``sweep_dir`` with a report.csv and no job folders is re-plotted from the CSV
    (``replot_report``); without a ``sweep_dir``, only ``max_context_path`` is plotted.
    ``device_name`` and ``date`` go into the titles of jobs that did not record them.
    """
    if sweep_dir is None:
        if not max_context_path:
            raise ValueError("fatrain-report: sweep_dir=<the folder a multirun wrote> or max_context=<file> "
                             "is required")
        out_dir = out_dir or os.path.dirname(os.path.abspath(max_context_path))
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(max_context_path))[0]  # max_context_h100.json -> max_context_h100.png
        return [write_max_context_plot(max_context_path, out_dir, stem + ".png")]
    committed_csv = os.path.join(sweep_dir, "report.csv")
    if os.path.isdir(sweep_dir) and not find_job_dirs(sweep_dir) and os.path.isfile(committed_csv):
        written = replot_report(committed_csv, out_dir or sweep_dir, device_name=device_name, date=date)
        if max_context_path:
            written.append(write_max_context_plot(max_context_path, out_dir or sweep_dir))
        return written
    jobs = load_sweep(sweep_dir, warmup_steps)  # before anything is written: a folder that is not a sweep
    fill_unrecorded(jobs, device_name, date)
    out_dir = out_dir or sweep_dir
    os.makedirs(out_dir, exist_ok=True)
    if max_context_path is None and os.path.exists(os.path.join(sweep_dir, "max_context.json")):
        max_context_path = os.path.join(sweep_dir, "max_context.json")
    max_context = load_max_context(max_context_path) if max_context_path else None

    plots = {"tokens_per_sec.png": lambda p: plot_tokens_per_sec(jobs, p),
             "peak_memory.png": lambda p: plot_peak_memory(jobs, p),
             "loss_curves.png": lambda p: plot_loss_curves(jobs, p)}
    written = [os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.csv")]
    with open(written[0], "w", encoding="utf-8") as f:
        f.write(markdown_report(jobs, sweep_dir, warmup_steps, baseline, max_context))
    write_csv(jobs, written[1])
    for name, plot in plots.items():
        written.append(os.path.join(out_dir, name))
        plot(written[-1])
    if max_context:
        written.append(write_max_context_plot(max_context_path, out_dir))
    return written


def replot_report(csv_path: str, out_dir: str, *, device_name: Optional[str] = None,
                  date: Optional[str] = None) -> list[str]:
    """tokens_per_sec.png and peak_memory.png again from a report.csv (a study's committed results);
    report.md and report.csv stay as they are, and the loss curves need the jobs' metrics.jsonl."""
    jobs = load_report_csv(csv_path)
    fill_unrecorded(jobs, device_name, date)
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "tokens_per_sec.png"), os.path.join(out_dir, "peak_memory.png")]
    plot_tokens_per_sec(jobs, written[0])
    plot_peak_memory(jobs, written[1])
    return written


def write_max_context_plot(max_context_path: str, out_dir: str, name: str = "max_context.png") -> str:
    rows, where = load_max_context_file(max_context_path)
    path = os.path.join(out_dir, name)
    plot_max_context(rows, path, where)
    return path
