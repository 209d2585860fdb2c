"""Training end to end on the CPU: configs compose and run, bad input (stopping and resuming: test_interrupt)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from fatrain.config import register_configs
from fatrain.trainer import run_training

register_configs()

FAST = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32",
    "trainer.max_steps=3", "trainer.batch_size=2", "trainer.log_every=1", "trainer.eval_every=2",
    "trainer.eval_batches=2", "trainer.ckpt_every=2", "trainer.progress_bar=false",
    "logger.wandb.mode=disabled", "optim.warmup_steps=1",
]
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def compose_train(overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name="train", overrides=overrides)


def group_options(group):
    return sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(CONFIG_DIR, group)) if f.endswith(".yaml"))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.mark.parametrize("attention", ["naive", "sdpa", "flash_v1", "flash_v2"])
def test_backends_train_and_log(attention, tmp_path):
    cfg = compose_train([f"attention={attention}", *FAST])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "ok" and result["step"] == 3
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/step_time_s",
                "mem/peak_allocated_gib", "mem/peak_requested_gib", "mem/peak_reserved_gib"):
        assert key in train_rows[-1], key
    assert any("val/loss" in r for r in rows)
    assert os.path.exists(result["checkpoint"])
    if attention == "flash_v2" and torch.cuda.is_available():  # the autotuners' picks, for the record
        assert {row["kernel"] for row in result["attention_run_info"]} >= {"fwd", "dq", "dkdv"}
        assert {row["key"]["Nq"] for row in result["attention_run_info"]} == {str(cfg.data.seq_len)}
    else:
        assert "attention_run_info" not in result


def test_flash_v2_trains_with_atomic_dq(tmp_path):
    cfg = compose_train(["attention=flash_v2", "attention.deterministic=false", *FAST])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "ok" and result["step"] == 3


def test_result_records_what_the_backend_reports(monkeypatch, tmp_path):
    """result.json's attention_run_info is fatrain.kernels.run_info(backend), when there is any."""
    from fatrain import trainer
    picks = [dict(kernel="fwd", key={"Nq": "32"}, config="BLOCK_M: 64", rounds_ms={})]
    monkeypatch.setattr(trainer, "run_info", lambda backend, seq_len: picks if backend == "naive" else None)
    for backend, recorded in (("naive", picks), ("sdpa", None)):
        (tmp_path / backend).mkdir()
        cfg = compose_train([f"attention={backend}", *FAST, "trainer.ckpt_every=0", "trainer.save_final=false"])
        assert run_training(cfg, str(tmp_path / backend)).get("attention_run_info") == recorded


def test_every_backend_option_is_a_typed_attention_setting():
    """A tuning keyword of any backend can be set as attention.<option>, and a typo fails at composition."""
    from dataclasses import fields

    from fatrain.config import AttentionConfig
    from fatrain.kernels import all_options
    assert set(all_options()) <= {f.name for f in fields(AttentionConfig)}
    with pytest.raises(Exception, match="blok_m"):
        compose_train(["attention.blok_m=64"])


@pytest.mark.parametrize("group", ["model", "data", "optim", "trainer", "logger", "attention"])
def test_every_group_option_composes(group):
    for option in group_options(group):
        if option == "schema":
            continue
        overrides = [f"{group}={option}"]
        if group == "data" and option == "text":
            overrides.append("data.path=somewhere.txt")
        if group == "data" and option == "hf":
            overrides.append("data.hf_name=some/dataset")
        cfg = compose_train(overrides)
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_and_runs(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"])
    if cfg.attention.backend.startswith("sdpa_") or cfg.trainer.precision != "fp32":
        pytest.skip(f"{experiment} needs a GPU to run; it composed")
    cfg = compose_train([f"experiment={experiment}", *FAST])
    assert run_training(cfg, str(tmp_path))["status"] == "ok"


def test_save_final_false_leaves_no_checkpoint(tmp_path):
    cfg = compose_train([*FAST, "trainer.ckpt_every=0", "trainer.save_final=false"])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "ok" and result["checkpoint"] is None
    assert not glob.glob(str(tmp_path / "checkpoints" / "*"))


def test_typo_and_wrong_type_fail_before_work():
    with pytest.raises(Exception, match="lerning_rate"):
        compose_train(["optim.lerning_rate=1e-3"])
    with pytest.raises(Exception, match="max_steps"):
        compose_train(["trainer.max_steps=many"])
    with pytest.raises(Exception, match="no_such_model"):
        compose_train(["model=no_such_model"])


@pytest.mark.parametrize("override, match", [
    ("attention.backend=flash_v9", "attention.backend='flash_v9' is not allowed"),
    ("trainer.precision=fp16", "fp16 needs a CUDA GPU"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not allowed"),
    ("data.seq_len=100000000", "data.seq_len"),
    ("data.path=/no/such/file.txt", "/no/such/file.txt"),
    ("model.n_kv_head=3", "model.n_kv_head=3"),
    ("model.rope_kernel=fast", "model.rope_kernel='fast' is not allowed"),
    ("attention.deterministic=false", "attention.deterministic is used only by flash_v1, flash_v2"),
    ("attention.num_splits=2", "attention.num_splits is used only by flash_v1"),
])
def test_bad_settings_name_the_setting(override, match, tmp_path):
    if override == "trainer.precision=fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a CUDA machine")
    cfg = compose_train([*FAST, override])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_training(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_fresh_run_without_checkpoints_sets_old_metrics_aside(tmp_path):
    # A sweep rerun into the same folders (no checkpoints saved) must not append a second
    # series to metrics.jsonl: the report would take medians over both runs.
    cfg = compose_train([*FAST, "trainer.ckpt_every=0", "trainer.save_final=false"])
    for _ in range(2):
        run_training(cfg, str(tmp_path))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps.count(0) == 1 and steps == sorted(steps)
    old = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl.previous-1")]
    assert old == steps
    assert not os.path.exists(tmp_path / "metrics.jsonl.previous-2")


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    run_training(compose_train(FAST), str(tmp_path))
    before = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "checkpoints" / "*"))}
    with pytest.raises(ValueError, match="resume=auto"):
        run_training(compose_train(FAST), str(tmp_path))
    assert before == {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "checkpoints" / "*"))}


def test_incompatible_or_corrupt_checkpoint_on_resume(tmp_path):
    run_training(compose_train(FAST), str(tmp_path))
    cfg = compose_train([*FAST, "model.n_embd=64", "resume=auto", "trainer.max_steps=5"])
    with pytest.raises(Exception, match="model.n_embd=32 but this run asks for 64"):
        run_training(cfg, str(tmp_path))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="unreadable"):
        run_training(compose_train([*FAST, f"resume={bad}", "trainer.max_steps=5"]), str(tmp_path / "other"))


def _cli(run_dir, *overrides):
    return [sys.executable, "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *FAST, *overrides]


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run(_cli(tmp_path / "r", "data.seq_len=100000000"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "data.seq_len" in lines[0]


def test_profile_of_chosen_steps(tmp_path):
    cfg = compose_train([*FAST, "trainer.max_steps=5", "trainer.profile_start=2", "trainer.profile_steps=2",
                         "trainer.eval_every=0", "trainer.ckpt_every=0"])
    assert run_training(cfg, str(tmp_path))["status"] == "ok"
    folder = tmp_path / "profile"
    assert sorted(os.listdir(folder)) == ["kernels.csv", "kernels.txt", "trace.json"]
    with open(folder / "trace.json") as f:
        assert json.load(f)["traceEvents"]
    import csv

    with open(folder / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    assert "aten::mm" in names or "aten::addmm" in names
    # the profiled steps only: 2 forwards of one block (qkv, proj, fc, proj) and the head
    assert sum(int(r["calls"]) for r in rows if r["name"] == "aten::linear") == 2 * 5
    assert (folder / "kernels.txt").read_text().startswith("steps 2-3")


def test_profile_settings_are_range_checked():
    from fatrain.config import validate_train_config

    with pytest.raises(ValueError, match="trainer.profile_steps"):
        validate_train_config(compose_train([*FAST, "trainer.profile_start=2", "trainer.profile_steps=0"]))
