"""A run whose loss or gradient norm turns non-finite: stopped at that step with the last good
checkpoints intact, or (trainer.on_nonfinite=skip_step) its update left out; JSON outputs stay strict."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fatrain.checkpoint import load_checkpoint
from fatrain.cli.train import write_result
from fatrain.metrics import JsonlLogger
from fatrain.model import GPT
from fatrain.trainer import run_training
from test_train import FAST, compose_train

DIVERGE = [*FAST, "optim.lr=1e6", "trainer.max_steps=30", "trainer.ckpt_every=1", "trainer.eval_every=0",
           "trainer.keep_last=50"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))


def _refuse(name):
    raise ValueError(f"non-strict JSON constant {name}")


def strict_load(text):
    return json.loads(text, parse_constant=_refuse)


def strict_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [strict_load(line) for line in f]


def checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "ckpt_*.pt")))


def assert_finite_checkpoints(run_dir):
    paths = checkpoints(run_dir)
    assert paths
    for path in paths:
        state = load_checkpoint(path)
        for name, tensor in state["model"].items():
            assert torch.isfinite(tensor).all(), f"{path}: {name}"
    return paths


def poison_training_forward(monkeypatch, bad_calls):
    """The loss of the given training forwards (1-based) becomes NaN, so their gradients are NaN too."""
    original, calls = GPT.forward, []

    def forward(self, *args, **kwargs):
        logits, loss = original(self, *args, **kwargs)
        if self.training:
            calls.append(None)
            if len(calls) in bad_calls:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_diverging_lr_stops_through_the_cli_with_the_good_checkpoints_kept(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *DIVERGE,
                           "logger.console=false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    result = strict_load((run_dir / "result.json").read_text())
    assert result["status"] == "nonfinite" and f"at step {result['step']}" in lines[0]
    assert result["step"] < 30
    # Nothing of the bad step was saved: the newest checkpoint is the step before it, and it loads.
    paths = assert_finite_checkpoints(run_dir)
    assert paths[-1].endswith(f"ckpt_{result['step'] - 1:08d}.pt") and result["checkpoint"] == paths[-1]
    assert len(paths) == result["step"] - 1  # no good checkpoint pruned
    rows = strict_rows(run_dir)
    assert rows[-1]["step"] == result["step"] and rows[-1]["train/grad_norm"] is None


@pytest.mark.parametrize("fused", ["true", "false"])
def test_stop_leaves_the_weights_of_the_step_before(monkeypatch, tmp_path, fused):
    poison_training_forward(monkeypatch, {3})
    cfg = compose_train([*DIVERGE, "optim.lr=1e-3", f"optim.fused={fused}"])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "nonfinite" and result["step"] == 3
    assert result["nonfinite"] == ["loss", "grad_norm"] and "final_val_loss" not in result
    assert [os.path.basename(p) for p in assert_finite_checkpoints(tmp_path)] == ["ckpt_00000001.pt",
                                                                                 "ckpt_00000002.pt"]


@pytest.mark.parametrize("fused", ["true", "false"])
def test_skip_step_leaves_out_the_bad_update_and_goes_on(monkeypatch, tmp_path, fused):
    poison_training_forward(monkeypatch, {3, 5})
    cfg = compose_train([*DIVERGE, "optim.lr=1e-3", f"optim.fused={fused}", "trainer.max_steps=6",
                         "trainer.on_nonfinite=skip_step"])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "ok" and result["step"] == 6 and result["skipped_steps"] == 2
    assert math.isfinite(result["final_val_loss"])
    assert_finite_checkpoints(tmp_path)
    # Step 3 was left out: after it the model and the optimizer state are those of step 2, bit for bit.
    before, after = (load_checkpoint(str(tmp_path / "checkpoints" / f"ckpt_{s:08d}.pt")) for s in (2, 3))
    for name in before["model"]:
        assert torch.equal(before["model"][name], after["model"][name]), name
    for key, state in before["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, after["optimizer"]["state"][key][field]), (key, field)
    # ...and step 4 trained again.
    step4 = load_checkpoint(str(tmp_path / "checkpoints" / f"ckpt_{4:08d}.pt"))
    assert any(not torch.equal(before["model"][n], step4["model"][n]) for n in before["model"])
    rows = {r["step"]: r for r in strict_rows(tmp_path) if "train/loss" in r}
    assert rows[3]["train/loss"] is None and rows[3]["train/skipped_steps"] == 1
    assert rows[6]["train/skipped_steps"] == 2 and math.isfinite(rows[6]["train/loss"])


def test_skip_step_with_a_diverging_lr_keeps_the_weights_finite(tmp_path):
    cfg = compose_train([*DIVERGE, "trainer.max_steps=10", "trainer.on_nonfinite=skip_step"])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "ok" and result["step"] == 10
    assert result["skipped_steps"] > 0
    assert_finite_checkpoints(tmp_path)
    rows = strict_rows(tmp_path)
    assert max(r.get("train/skipped_steps", 0) for r in rows) == result["skipped_steps"]
    write_result(str(tmp_path), result)
    assert strict_load((tmp_path / "result.json").read_text())["skipped_steps"] == result["skipped_steps"]


@pytest.mark.parametrize("mode", ["stop", "skip_step"])
@pytest.mark.parametrize("ckpt_every", [1, 0])
def test_weights_overflowed_by_a_finite_update_are_never_saved(monkeypatch, tmp_path, mode, ckpt_every):
    """lr x weight decay > 1 grows the weights with finite gradients until they overflow: such weights
    are never saved, and skipping steps does not go on forever with them."""
    from fatrain.trainer import Trainer

    original, calls = Trainer.optimizer_step, []

    def optimizer_step(self, flags):
        original(self, flags)
        calls.append(None)
        if len(calls) == 2:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))  # what the overflowing update leaves

    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)
    cfg = compose_train([*DIVERGE, "optim.lr=1e-3", f"trainer.on_nonfinite={mode}", f"trainer.ckpt_every={ckpt_every}"])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "nonfinite"
    if ckpt_every:  # refused at the save of step 2
        assert result["nonfinite"] == ["parameters"] and result["step"] == 2
        assert [os.path.basename(p) for p in assert_finite_checkpoints(tmp_path)] == ["ckpt_00000001.pt"]
    else:  # caught by the forward of step 3
        assert result["step"] == 3 and result["nonfinite"] == (["loss", "grad_norm"] if mode == "stop"
                                                               else ["parameters"])
        assert checkpoints(tmp_path) == []


def test_unknown_on_nonfinite_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="trainer.on_nonfinite='ignore' is not allowed"):
        run_training(compose_train([*FAST, "trainer.on_nonfinite=ignore"]), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_non_finite_numbers_are_written_as_null(tmp_path):
    logger = JsonlLogger(str(tmp_path / "metrics.jsonl"))
    logger.log({"a": float("nan"), "b": torch.tensor(float("inf")), "c": -float("inf"), "d": 1.5}, 3)
    logger.close()
    row = strict_rows(tmp_path)[0]
    assert (row["a"], row["b"], row["c"], row["d"]) == (None, None, None, 1.5)
    write_result(str(tmp_path), {"status": "ok", "final_val_loss": float("nan"), "info": [{"x": float("inf")}]})
    result = strict_load((tmp_path / "result.json").read_text())
    assert result["final_val_loss"] is None and result["info"] == [{"x": None}]


LOSS_INF_ON_RANK_1 = """
import os

import torch

from fatrain.model import GPT

original, calls = GPT.forward, []


def forward(self, *args, **kwargs):
    logits, loss = original(self, *args, **kwargs)
    if self.training:
        calls.append(None)
        if len(calls) == 3:
            loss = loss + float("inf")  # the gradients stay finite: only this rank can tell
    return logits, loss


if os.environ["RANK"] == "1":
    GPT.forward = forward
from fatrain.cli.train import main

main()
"""


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    script = tmp_path / "loss_inf_on_rank_1.py"
    script.write_text(LOSS_INF_ON_RANK_1)
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           f"hydra.run.dir={run_dir}", *DIVERGE, "optim.lr=1e-3", "model.dropout=0", "trainer.strategy=ddp",
           "++trainer.dist_timeout_s=120", "logger.console=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stderr[-4000:]
    result = strict_load((run_dir / "result.json").read_text())
    assert result["status"] == "nonfinite" and result["step"] == 3 and result["nonfinite"] == ["loss"]
    assert len([line for line in proc.stderr.splitlines() if "error: non-finite loss at step 3" in line]) == 1
    assert [os.path.basename(p) for p in assert_finite_checkpoints(run_dir)] == ["ckpt_00000001.pt",
                                                                                "ckpt_00000002.pt"]
