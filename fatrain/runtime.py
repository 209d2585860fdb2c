"""What every entry point shares: device, precision and autocast, seeding, run information,
memory reset, the user-error policy, and how a measured case failed (``classify``).

User errors (a bad setting, a checkpoint that does not fit, a backend that lacks a feature)
print one line ``error: <what is wrong and what is allowed>`` on stderr and exit with
``USER_ERROR_EXIT`` (2); nothing else is written. Everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import random
import subprocess
import sys
from typing import Callable, Optional

import numpy as np
import torch

from fatrain.checkpoint import CheckpointError
from fatrain.kernels import backend_info

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(PRECISION_DTYPES)


#: Exceptions reported as one line and exit code 2 (their message says what to change).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, CheckpointError, FileNotFoundError, NotImplementedError)
USER_ERROR_EXIT = 2


def report_user_error(exc: BaseException, rank: int = 0) -> None:
    """The one line a user error prints (ranks other than 0 say which rank they are)."""
    # NOTE: one write of the whole line, so the lines of several ranks sharing stderr do not interleave.
    sys.stderr.write((f"error: {exc}" if rank == 0 else f"error: [rank {rank}] {exc}") + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def user_errors(rank: int = 0):
    """Turn a user error inside the block into one line on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as exc:
        report_user_error(exc, rank)
        sys.exit(USER_ERROR_EXIT)


# Messages of PyTorch's scaled_dot_product_attention when the kernel it is pinned to cannot take
# the inputs (dtype, mask, device): the backend does not support the case, nothing ran out.
_NO_KERNEL_MESSAGES = ("No available kernel", "No viable backend")


def classify(exc: BaseException) -> str:
    """How a measured case (a benchmark case, a tried length) failed: ``oom``, ``unavailable``
    (a backend's module cannot be imported), ``unsupported`` (the backend lacks the case) or
    ``error``. The caller records it and goes on to the next case."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    if isinstance(exc, ImportError):
        return "unavailable"
    if isinstance(exc, NotImplementedError) or any(m in str(exc) for m in _NO_KERNEL_MESSAGES):
        return "unsupported"
    if isinstance(exc, ValueError) and "is not supported by" in str(exc):  # a dtype or head dim (check_qkv)
        return "unsupported"
    return "error"


def short(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for a table cell or a log line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


# ----- device and precision ----------------------------------------------------------------------


def select_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto`` (a CUDA GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}={name} is not a device (allowed: auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name} but no CUDA GPU is available (allowed here: auto, cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={name} is not supported (allowed: auto, cpu, cuda, cuda:N)")
    return device


def check_precision(precision: str, device: torch.device, backend: str, key: str = "trainer.precision") -> None:
    """Refuse precisions the device, or the backend on it, cannot run, before any work starts."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"{key}={precision} is not a precision (allowed: {', '.join(PRECISIONS)})")
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError(f"{key}=fp16 needs a CUDA GPU (allowed on the CPU: fp32, bf16)")
        if precision == "bf16" and backend_info(backend).triton:
            raise ValueError(f"{key}=bf16 with attention.backend={backend} is not supported on the CPU: "
                             "the Triton interpreter computes bfloat16 wrongly (use fp32 on the CPU)")
    elif precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{key}=bf16 is not supported by {torch.cuda.get_device_name(device)} "
                         "(allowed: fp32, fp16)")


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for ``precision`` (a no-op context for fp32)."""
    dtype = PRECISION_DTYPES[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def free_memory(device: torch.device, reset_peak: bool = False) -> None:
    """Release what a finished or failed job left behind; ``reset_peak`` also restarts the peak
    counters, so the next measurement starts from an empty allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)


# ----- run information ---------------------------------------------------------------------------


def git_sha() -> Optional[str]:
    """HEAD of the checkout this package runs from, '+dirty' with uncommitted changes to tracked
    files, or None outside a git checkout. ``FATRAIN_GIT_SHA`` overrides it, for a copy of the tree
    whose ``.git`` is missing or stale."""
    if os.environ.get("FATRAIN_GIT_SHA"):
        return os.environ["FATRAIN_GIT_SHA"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows of it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(device: torch.device) -> dict:
    """Where and with what a measurement ran: device, GPU, versions, commit, date (UTC)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "git_sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
