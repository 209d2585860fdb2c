"""Starting a run from another run's weights (init_from) and extending a checkpoint's context at
evaluation (model.rope_scaling.* overrides), with a tiny model trained for a few steps on the CPU."""

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_module

from fatrain.checkpoint import CheckpointError, load_checkpoint
from fatrain.config import register_configs
from fatrain.eval import run_eval
from fatrain.trainer import Trainer, init_weights_from, run_training

register_configs()

TRAIN = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32",
    "trainer.max_steps=2", "trainer.batch_size=2", "trainer.log_every=1", "trainer.eval_every=0",
    "trainer.eval_batches=1", "trainer.ckpt_every=0", "trainer.progress_bar=false",
    "logger.wandb.mode=disabled", "optim.warmup_steps=1",
]
EXTEND = ["data.seq_len=64", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=2.0",
          "model.rope_scaling.original_seq_len=32", "optim.lr=3e-4", "optim.min_lr=3e-5"]


def compose_config(name, overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-step run at seq_len 32 with its one checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FATRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        run_dir = tmp_path_factory.mktemp("source")
        result = run_training(compose_config("train", TRAIN), str(run_dir))
        yield {"run_dir": str(run_dir), "ckpt": result["checkpoint"], "cache": os.environ["FATRAIN_CACHE"]}


@pytest.fixture(autouse=True)
def cache_dir(source, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", source["cache"])


def test_a_new_run_starts_from_the_weights_with_a_longer_context(source, tmp_path):
    cfg = compose_config("train", [*TRAIN, *EXTEND, f"init_from={source['run_dir']}", "trainer.max_steps=1"])
    trainer = Trainer(cfg, str(tmp_path / "probe"), logger=None)
    recorded = init_weights_from(trainer, cfg.init_from)
    saved = load_checkpoint(source["ckpt"])
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    assert trainer.step == 0 and not trainer.optimizer.state  # a fresh optimizer
    assert recorded["checkpoint"] == os.path.abspath(source["ckpt"]) and recorded["step"] == 2
    changed = recorded["changed"]
    assert changed["data.seq_len"] == [32, 64] and changed["model.rope_scaling.type"] == ["none", "yarn"]
    assert changed["optim.lr"][1] == pytest.approx(3e-4)

    run_dir = tmp_path / "extended"
    result = run_training(cfg, str(run_dir))
    assert result["status"] == "ok" and result["step"] == 1 and result["init_from"] == os.path.abspath(source["ckpt"])
    assert json.loads((run_dir / "init_from.json").read_text())["changed"]["data.seq_len"] == [32, 64]
    state = load_checkpoint(result["checkpoint"])
    assert state["config"]["init_from"] == source["run_dir"]  # recorded in the new run's config
    assert state["spec"]["rope_scaling"]["type"] == "yarn" and state["config"]["data"]["seq_len"] == 64


def test_init_from_refuses_other_shapes(source, tmp_path):
    cfg = compose_config("train", [*TRAIN, "model.n_embd=64", f"init_from={source['ckpt']}"])
    with pytest.raises(CheckpointError, match="the checkpoint has model.n_embd=32 but this run asks for 64"):
        run_training(cfg, str(tmp_path / "run"))
    cfg = compose_config("train", [*TRAIN, f"init_from={tmp_path / 'nothing'}"])
    with pytest.raises(CheckpointError, match="init_from=.*no such checkpoint file or run folder"):
        run_training(cfg, str(tmp_path / "run2"))


def test_eval_extends_a_checkpoint_with_rope_scaling_overrides(source, tmp_path):
    base = [f"ckpt_path={source['ckpt']}", "logger.wandb.mode=disabled", "eval.batches=1", "eval.plots=false",
            "eval.seq_lens=[96]"]
    plain = run_eval(compose_config("eval", base), str(tmp_path / "plain"))["results"][0]
    yarn = run_eval(compose_config("eval", [*base, "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4.0"]),
                    str(tmp_path / "yarn"))["results"][0]
    assert plain["rope_scaling"]["type"] == "none"
    assert yarn["rope_scaling"] == {**yarn["rope_scaling"], "type": "yarn", "factor": 4.0, "original_seq_len": 32}
    assert any("original_seq_len=32" in note for note in yarn["notes"])
    assert yarn["lengths"][0]["loss"] != plain["lengths"][0]["loss"]
    with pytest.raises(ValueError, match="model.rope_scaling.type='ntk2' is not allowed"):
        run_eval(compose_config("eval", [*base, "model.rope_scaling.type=ntk2"]), str(tmp_path / "bad"))


def test_context_extension_cpu_twin_end_to_end(tmp_path):
    """experiment=context_extension_cpu through fatrain-extend: train, fine-tune at 4x with init_from,
    evaluate both at 1x-16x with the tasks; the summary and its plots.
    (One scaling type, two lengths and three tasks of the twin's seven, to keep the test short.)"""
    from fatrain.cli.extend import run

    args = ["experiment=context_extension_cpu", "extension.types=[yarn]", "extension.eval_multiples=[1,16]",
            "extension.tasks=[passkey,variable_tracking,frequent_words]", f"out={tmp_path}"]
    summary = run(args)
    assert set(summary["models"]) == {"base", "extend-yarn"} and summary["eval_lengths"] == [32, 512]
    base, yarn = summary["models"]["base"], summary["models"]["extend-yarn"]
    assert base["rope_scaling"]["type"] == "none" and base["train_seq_len"] == 32
    assert yarn["rope_scaling"] == {**yarn["rope_scaling"], "type": "yarn", "factor": 4.0, "original_seq_len": 32}
    assert yarn["train_seq_len"] == 128 and set(yarn["loss"]) == {"32", "512"}
    assert yarn["task_accuracy"]["32"] is None and 0.0 <= yarn["task_accuracy"]["512"] <= 1.0  # 32 tokens hold no task
    assert yarn["bucket_seq_len"] == 512
    assert json.loads((tmp_path / "extend-yarn" / "init_from.json").read_text())["changed"]["data.seq_len"] == [32, 128]
    for name in ("summary.md", "summary.json", "extension_loss.png", "extension_tasks.png", "extension_position.png",
                 "eval/base/task_passkey.png", "eval/extend-yarn/tasks_summary.png"):
        assert (tmp_path / name).is_file(), name
    assert "| extend-yarn | yarn x4 |" in (tmp_path / "summary.md").read_text()
