"""Atomic checkpoints: save, keep the last k, find the latest, load with clear errors.

A checkpoint is one ``torch.save`` file, ``ckpt_<step>.pt``, written to a temporary file
in the same folder, flushed and fsynced, then renamed over its final name. A rename
within a folder is atomic, so a crash mid-write leaves the previous checkpoints intact
and at worst a stray ``*.tmp`` file, which is ignored and cleaned up on the next save.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, foreign or does not fit the run."""


def atomic_save(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoint files in ``folder``, oldest step first."""
    found = []
    for path in glob.glob(os.path.join(folder, "ckpt_*.pt")):
        m = _NAME.search(path)
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and sanity-check a checkpoint; raise CheckpointError with the reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a fatrain checkpoint): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != "fatrain-checkpoint":
        raise CheckpointError(f"checkpoint {path} is not a fatrain checkpoint (no 'format' marker)")
    for key in ("model", "spec", "step", "config"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'")
    return state


class CheckpointManager:
    """Saves ``ckpt_<step>.pt`` files in ``folder`` and keeps the newest ``keep_last``."""

    def __init__(self, folder: str, keep_last: int = 3):
        self.folder = folder
        self.keep_last = keep_last

    def path_for(self, step: int) -> str:
        return os.path.join(self.folder, f"ckpt_{step:08d}.pt")

    def save(self, state: dict, step: int) -> str:
        path = self.path_for(step)
        atomic_save({"format": "fatrain-checkpoint", **state}, path)
        for old in list_checkpoints(self.folder)[: -self.keep_last]:
            os.unlink(old)
        for stray in glob.glob(os.path.join(self.folder, "*.tmp")):
            os.unlink(stray)
        return path

    def latest(self) -> str | None:
        found = list_checkpoints(self.folder)
        return found[-1] if found else None
