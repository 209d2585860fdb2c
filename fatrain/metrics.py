"""Throughput, memory and MFU measurement, and the sinks metrics go to.

A logger is anything with ``log(metrics: dict, step: int)`` and ``close()``. The trainer
holds one ``MultiLogger`` and never knows which sinks are behind it: W&B, a JSONL file in
the run directory, and the console.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch

from fatrain.files import RunWriteError, append_line

# Dense (no sparsity) peak tensor-core FLOP/s by GPU name and precision, from the vendors'
# datasheets. MFU divides achieved FLOP/s by these; trainer.peak_tflops overrides.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 418.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 83.0},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU, or None when the device is not in the table (MFU is then not logged)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # NOTE: fp32 training on Ampere/Hopper runs its matmuls in TF32 (see trainer), so its peak is TF32's.
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(precision, 0.0) * 1e12 or None
    return None


def peak_rss_gib() -> float:
    """Peak resident memory of this process in GiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def memory_metrics(device: torch.device) -> dict:
    if device.type == "cuda":
        # allocated: the blocks handed out (rounded up, and a cached block that is not split
        # counts whole); requested: the bytes the program asked for, whatever the cache held.
        return {
            "mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/peak_requested_gib": torch.cuda.memory_stats(device).get("requested_bytes.all.peak", 0) / 2**30,
            "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    rss = peak_rss_gib()
    return {"mem/peak_allocated_gib": rss, "mem/peak_requested_gib": rss, "mem/peak_reserved_gib": rss}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall time of training steps only; eval and checkpoint time are excluded by pausing.

    The device is synchronised at both ends, so queued GPU work is counted in the step
    that launched it and not in the next one.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.elapsed = 0.0
        self.tokens = 0
        self.steps = 0
        self._start = None

    def start(self):
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self, tokens: int):
        synchronize(self.device)
        self.elapsed += time.perf_counter() - self._start
        self.tokens += tokens
        self.steps += 1
        self._start = None

    def read_and_reset(self) -> dict:
        if self.steps == 0 or self.elapsed <= 0:
            return {}
        out = {"perf/tokens_per_sec": self.tokens / self.elapsed, "perf/step_time_s": self.elapsed / self.steps}
        self.elapsed, self.tokens, self.steps = 0.0, 0, 0
        return out


def _number(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def _jsonable(v):
    """A metric as a plain value: a tensor's number, and None (JSON null) for NaN and infinities."""
    v = _number(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def strict_json(obj):
    """``obj`` with every non-finite float (at any depth) made None, so ``json.dumps(allow_nan=False)``
    writes it: NaN and Infinity are not JSON, and strict parsers refuse them."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return _jsonable(obj)


class JsonlLogger:
    """One JSON object per log call, appended to ``path`` as one whole line (unbuffered, so a crash
    loses nothing; a write that fails part-way is cut back off and raises RunWriteError)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunWriteError(path, e) from None

    def log(self, metrics: dict, step: int):
        row = strict_json({"step": step, "time": time.time(), **metrics})
        append_line(self._fd, self.path, json.dumps(row, allow_nan=False) + "\n")

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_jsonl(path: str, keep_lines: bool = False) -> list:
    """The rows of a metrics.jsonl (with ``keep_lines``, (row, line) pairs). A line that is not whole
    JSON (a process killed mid-write, a disk that filled) is dropped with a warning on stderr naming
    the file and the line: not fatal."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "step" not in row:
                if line.strip():
                    sys.stderr.write(f"warning: {path}: line {number} is torn or not a metrics row; dropped\n")
                continue
            rows.append((row, line if line.endswith("\n") else line + "\n") if keep_lines else row)
    return rows


class ConsoleLogger:
    """Compact lines for the console; the trainer's progress bar shows progress between them."""

    KEYS = ("train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/mfu",
            "mem/peak_allocated_gib")

    def __init__(self, write=None):
        self.write = write or (lambda s: print(s, flush=True))

    def log(self, metrics: dict, step: int):
        """One line per kind of row: ``train step N | loss ... | lr ...`` and ``val   step N | loss ...``."""
        for kind in ("train", "val"):
            parts = []
            for key in self.KEYS:
                if key in metrics and (key.startswith(kind + "/") or (kind == "train" and not key.startswith("val/"))):
                    v = _number(metrics[key])  # NaN prints as nan
                    short = key.split("/")[-1]
                    parts.append(f"{short} {v:.4g}" if isinstance(v, float) else f"{short} {v}")
            if parts and any(key.startswith(kind + "/") for key in metrics):
                self.write(f"{kind:<5} step {step:>6} | " + " | ".join(parts))

    def close(self):
        pass


def wandb_setting_error(exc: BaseException, settings: dict) -> str:
    """One line for a W&B UsageError, naming the logger.wandb.* settings whose values its message
    quotes (else those it mentions by name)."""
    message = " ".join(str(exc).split())

    def quoted(value) -> bool:
        values = value if isinstance(value, list) else [value]
        return any(v not in (None, "") and (f"'{v}'" in message or f'"{v}"' in message) for v in values)

    keys = [key for key, value in settings.items() if quoted(value)]
    keys = keys or [key for key in settings if key.rstrip("s") in message.lower()]
    named = ", ".join(f"logger.wandb.{key}={settings[key]!r}" for key in keys) or "logger.wandb.*"
    return f"{named} refused by W&B: {message}"


class WandbLogger:
    """Weights & Biases run; offline by default (no account needed), synced later with ``wandb sync``."""

    def __init__(self, *, mode: str, project: str, run_dir: str, config: dict, name=None, group=None, tags=(),
                 entity=None, job_type="train", resume_id: str | None = None):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb
        settings = {"mode": mode, "project": project, "entity": entity, "name": name, "group": group,
                    "tags": list(tags)}
        try:
            self.run = wandb.init(mode=mode, project=project, entity=entity, name=name, group=group, tags=list(tags),
                                  dir=run_dir, config=config, job_type=job_type, id=resume_id,
                                  resume="allow" if resume_id else None, reinit="finish_previous")
        except wandb.errors.UsageError as exc:  # a setting W&B refuses (a project name with '/', ...)
            raise ValueError(wandb_setting_error(exc, settings)) from None

    @property
    def run_id(self):
        return self.run.id

    def log(self, metrics: dict, step: int):
        try:
            self.run.log({k: _number(v) for k, v in metrics.items()}, step=step)  # W&B takes NaN
        except OSError as e:  # its run folder's files are written from this process too
            raise RunWriteError(os.path.join(self.run.dir, ""), e) from None

    def close(self):
        self.run.finish()


class MultiLogger:
    def __init__(self, loggers):
        self.loggers = list(loggers)

    def log(self, metrics: dict, step: int):
        for lg in self.loggers:
            lg.log(metrics, step)

    def close(self):
        for lg in self.loggers:
            lg.close()
