"""Checkpoint evaluation on the CPU: a tiny model trained for a few steps, then evaluated.

Covers the JSON's keys, several context lengths (one longer than training, one longer than
the split), position buckets, backend agreement in fp32, sweep folders, the W&B eval job,
and the errors for missing, truncated, foreign or ill-fitting checkpoints.
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

from fatrain.checkpoint import CheckpointError
from fatrain.data import PackedBlocks
from fatrain.config import register_configs
from fatrain.eval import backend_agreement, find_checkpoints, load_model, run_eval, split_stream
from fatrain.eval.report import comparison_labels
from fatrain.trainer import run_training as run

register_configs()

TRAIN = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32",
    "trainer.max_steps=3", "trainer.batch_size=2", "trainer.log_every=1", "trainer.eval_every=0",
    "trainer.eval_batches=1", "trainer.ckpt_every=0", "trainer.progress_bar=false",
    "logger.wandb.mode=disabled", "logger.wandb.group=eval-tests", "optim.warmup_steps=1",
]
# Evaluation settings kept small for the CPU: few batches, a short passkey grid.
QUICK = ["logger.wandb.mode=disabled", "eval.batches=2", "passkey.enabled=true", "passkey.trials=2", "passkey.depths=[0.0,1.0]",
         "passkey.context_lens=[96]"]


def compose_config(name, overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training run folder with one checkpoint of a 1-layer model trained for 3 steps (seq_len 32)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FATRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        run_dir = tmp_path_factory.mktemp("run")
        result = run(compose_config("train", TRAIN), str(run_dir))
        yield {"run_dir": str(run_dir), "ckpt": result["checkpoint"]}


@pytest.fixture(autouse=True)
def cache_dir(trained, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", os.path.join(os.path.dirname(trained["run_dir"]), "cache0"))


def test_json_lengths_buckets_and_files(trained, tmp_path):
    cfg = compose_config("eval", [f"ckpt_path={trained['run_dir']}", *QUICK,
                                  "eval.seq_lens=[32,80,100000000]", "eval.bucket_size=16"])
    summary = run_eval(cfg, str(tmp_path))
    (result,) = summary["results"]
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in ("checkpoint", "step", "tokens_seen", "train", "attention", "data", "tokenizer", "bits_unit",
                "lengths", "passkey", "environment", "files"):
        assert key in result, key
    assert result["step"] == 3 and result["train"]["seq_len"] == 32 and result["train"]["group"] == "eval-tests"
    assert result["bits_unit"] == "byte"

    at32, at80, too_long = result["lengths"]
    assert [at32["seq_len"], at80["seq_len"]] == [32, 80]
    assert not at32["beyond_training_length"] and at80["beyond_training_length"]
    assert "fewer than one block" in too_long["skipped"]
    for r in (at32, at80):
        assert r["batches"] == 2 and r["tokens"] == 2 * 2 * r["seq_len"]
        assert math.isfinite(r["loss"]) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_token"] == pytest.approx(r["loss"] / math.log(2))
        # tinyshakespeare's validation text has no end-of-text token in its first blocks: one byte per token.
        assert r["bytes"] == r["tokens"] and r["bits_per_byte"] == pytest.approx(r["bits_per_token"])
    assert [(b["start"], b["end"]) for b in at80["buckets"]] == [(0, 15), (16, 31), (32, 47), (48, 63), (64, 79)]
    assert sum(b["loss"] for b in at80["buckets"]) / 5 == pytest.approx(at80["loss"])

    passkey = result["passkey"]
    assert passkey["context_lens"] == [96] and passkey["depths"] == [0.0, 1.0]
    assert all(0.0 <= v <= 1.0 for row in passkey["accuracy"] for v in row)
    for name in ("eval.json", "loss_vs_position.png", "passkey.png", "table.csv", "table.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "table.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["loss@80"]) == pytest.approx(at80["loss"]) and row["loss@100000000"] == ""


@pytest.mark.parametrize("backend", ["sdpa", "flash_v2", "flash_v1"])
def test_backends_agree_with_naive_in_fp32(trained, backend):
    loaded = load_model(trained["ckpt"], device="cpu")
    tokens, doc_ids, _ = split_stream(loaded.config.data, "val")
    blocks = PackedBlocks(tokens, doc_ids, 24)  # an awkward length, not the training one
    out = backend_agreement(loaded, ["naive", backend], blocks, batch_size=2, batches=1, tolerance=1e-4)
    assert out["errors"] == {}
    assert set(out["losses"]) == {"naive", backend}
    assert out["max_abs_diff"] <= 1e-4 and out["agree"]
    assert out["max_token_abs_diff"] <= 1e-4


def test_attention_override_and_agreement_in_the_json(trained, tmp_path):
    cfg = compose_config("eval", [f"ckpt_path={trained['ckpt']}", *QUICK, "passkey.enabled=false",
                                  "attention.backend=sdpa", "eval.backends=[naive,sdpa]", "eval.plots=false"])
    (result,) = run_eval(cfg, str(tmp_path))["results"]
    assert result["attention"] == "sdpa" and result["train"]["attention"] == "naive"
    assert result["backend_agreement"]["agree"] and "passkey" not in result


def test_attention_group_selects_a_backend(trained, tmp_path):
    cfg = compose_config("eval", [f"ckpt_path={trained['ckpt']}", *QUICK, "passkey.enabled=false",
                                  "attention=flash_v2", "eval.batches=1", "eval.plots=false"])
    (result,) = run_eval(cfg, str(tmp_path))["results"]
    assert result["attention"] == "flash_v2" and math.isfinite(result["lengths"][0]["loss"])


def test_old_checkpoint_config_still_loads(trained, tmp_path):
    state = torch.load(trained["ckpt"], weights_only=False)
    state["config"]["data"]["a_removed_setting"] = 4  # a key today's DataConfig does not have
    del state["config"]["model"]["init_std"]  # a key added after the checkpoint was written
    old = tmp_path / "ckpt_00000003.pt"
    torch.save(state, old)
    loaded = load_model(str(old), device="cpu")
    assert loaded.spec.n_head == 2 and "a_removed_setting" not in loaded.config.data


def test_data_override_and_tokenizer_stays_the_checkpoints(trained, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    cfg = compose_config("eval", [f"ckpt_path={trained['ckpt']}", *QUICK, "passkey.enabled=false",
                                  f"data.path={text}", "data.tokenizer=gpt2", "data.seq_len=48", "data.name=other"])
    (result,) = run_eval(cfg, str(tmp_path / "out"))["results"]
    assert result["data"]["path"] == str(text) and result["tokenizer"] == "byte"
    assert [r["seq_len"] for r in result["lengths"]] == [48]
    assert any("data.tokenizer='gpt2' ignored" in note for note in result["notes"])


def test_sweep_folder_gives_one_table(trained, tmp_path):
    sweep = tmp_path / "multirun"
    for job in ("0_optim.lr=0.001", "1_optim.lr=0.003"):
        os.makedirs(sweep / job / "checkpoints")
        os.makedirs(sweep / job / ".hydra")
        shutil.copy(trained["ckpt"], sweep / job / "checkpoints")
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- {job.split('_', 1)[1]}\n")
    cfg = compose_config("eval", [f"ckpt_path={sweep}", *QUICK, "passkey.enabled=false", "eval.plots=false"])
    summary = run_eval(cfg, str(tmp_path / "out"))
    with open(summary["table_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0_optim.lr=0.001", "1_optim.lr=0.003"]
    assert [r["overrides"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert rows[0]["loss@32"] == rows[1]["loss@32"]  # the same checkpoint twice
    assert (tmp_path / "out" / "0_optim.lr=0.001" / "ckpt_00000003" / "eval.json").exists()
    assert "| run |" in open(summary["table_md"]).read()


def test_sweep_folder_gets_comparison_plots(trained, tmp_path):
    sweep = tmp_path / "multirun"
    for job, overrides in (("0", ["experiment=x", "model.position=rope"]), ("1", ["experiment=x", "model.position=alibi"])):
        os.makedirs(sweep / job / "checkpoints")
        os.makedirs(sweep / job / ".hydra")
        shutil.copy(trained["ckpt"], sweep / job / "checkpoints")
        (sweep / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    cfg = compose_config("eval", [f"ckpt_path={sweep}", *QUICK, "passkey.enabled=false", "eval.seq_lens=[16,32]"])
    summary = run_eval(cfg, str(tmp_path / "out"))
    files = summary["comparison_plots"]
    assert set(files) == {"loss", "position"}  # no tasks ran: no tasks plot
    for path in files.values():
        assert os.path.getsize(path) > 10_000 and path.startswith(str(tmp_path / "out" / "compare_"))
    results = [("0", summary["results"][0]), ("1", summary["results"][1])]
    # The label is what differs between the jobs; one run's checkpoints are told apart by step.
    assert comparison_labels(results, str(sweep)) == ["model.position=rope", "model.position=alibi"]
    assert comparison_labels([("", summary["results"][0])] * 2, str(sweep)) == ["step 3", "step 3"]


def test_find_checkpoints_newest_or_all(tmp_path):
    for job in ("10_b", "2_a"):
        os.makedirs(tmp_path / job / "checkpoints")
        for step in (5, 40):
            (tmp_path / job / "checkpoints" / f"ckpt_{step:08d}.pt").write_bytes(b"")
    newest = find_checkpoints(str(tmp_path))
    assert [(name, os.path.basename(p)) for name, p in newest] == [("2_a", "ckpt_00000040.pt"),
                                                                   ("10_b", "ckpt_00000040.pt")]
    assert len(find_checkpoints(str(tmp_path), all_checkpoints=True)) == 4
    assert find_checkpoints(str(tmp_path / "2_a")) == [("", str(tmp_path / "2_a" / "checkpoints" / "ckpt_00000040.pt"))]


def test_wandb_eval_job_joins_the_training_group(trained, tmp_path, monkeypatch):
    created = {}

    class RecordingLogger:
        def __init__(self, **kwargs):
            created.update(kwargs)
            self.logged = created.setdefault("logged", {})
            self.run_id = "rec"

        def log(self, metrics, step):
            self.logged.update(metrics, step=step)

        def close(self):
            pass

    monkeypatch.setattr("fatrain.metrics.WandbLogger", RecordingLogger)
    cfg = compose_config("eval", [f"ckpt_path={trained['ckpt']}", *QUICK, "logger.wandb.mode=offline",
                                  "passkey.enabled=false", "eval.plots=false"])
    (result,) = run_eval(cfg, str(tmp_path))["results"]
    assert created["job_type"] == "eval" and created["group"] == "eval-tests" and created["mode"] == "offline"
    assert created["logged"]["step"] == 3 and created["logged"]["eval/loss@32"] == result["lengths"][0]["loss"]
    assert result["wandb_id"] == "rec"


def test_bad_checkpoints_raise_clear_errors(trained, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nope.pt"))
    truncated = tmp_path / "truncated.pt"
    data = open(trained["ckpt"], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a fatrain checkpoint"):
        load_model(str(foreign))
    with pytest.raises(CheckpointError, match=r"model.n_head=2 but this run asks for 4"):
        load_model(trained["ckpt"], model_overrides={"n_head": 4})
    with pytest.raises(ValueError, match="attention.backend='flash_v9' is not allowed"):
        load_model(trained["ckpt"], attention_overrides={"backend": "flash_v9"})
    with pytest.raises(CheckpointError, match="no checkpoints"):
        run_eval(compose_config("eval", [f"ckpt_path={tmp_path}", *QUICK]), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="ckpt_path is required"):
        run_eval(compose_config("eval", QUICK), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="eval.split='test' is not allowed"):
        run_eval(compose_config("eval", [f"ckpt_path={trained['ckpt']}", "eval.split=test"]), str(tmp_path))


def _cli(out_dir, *overrides):
    cmd = [sys.executable, "-m", "fatrain.cli.eval", f"hydra.run.dir={out_dir}", *QUICK, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_runs_and_bad_input_exits_2_with_one_line(trained, tmp_path):
    ok = _cli(tmp_path / "ok", f"ckpt_path={trained['ckpt']}", "passkey.enabled=false", "eval.plots=false")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ok" / "eval.json").exists() and "loss" in ok.stdout

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(trained["ckpt"], "rb").read()[:1000])
    for overrides, expected in [((f"ckpt_path={truncated}",), "unreadable"),
                                ((f"ckpt_path={trained['ckpt']}", "model.n_head=4"), "model.n_head=2")]:
        proc = _cli(tmp_path / "bad", *overrides)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], proc.stderr
