"""Atomic checkpoints: an interrupted write never damages the last good checkpoint."""

import os

import pytest
import torch

from fatrain import checkpoint as ckpt
from fatrain.checkpoint import CheckpointError, CheckpointManager, load_checkpoint


def state(step):
    return {"model": {"w": torch.full((4,), float(step))}, "spec": {}, "step": step, "config": {}}


def test_save_keeps_last_k_and_finds_latest(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (10, 20, 30):
        mgr.save(state(step), step)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt_00000020.pt", "ckpt_00000030.pt"]
    assert load_checkpoint(mgr.latest())["step"] == 30


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    good = mgr.save(state(1), 1)
    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial bytes")  # the start of a zip, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(state(2), 2)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert mgr.latest() == good
    assert load_checkpoint(good)["step"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(state(5), 5)
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fatrain checkpoint"):
        load_checkpoint(str(foreign))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
