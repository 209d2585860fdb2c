"""fatrain-export: a checkpoint's weights as safetensors, loaded back into the same model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fatrain.checkpoint import list_checkpoints, load_checkpoint
from fatrain.cli.export import main
from fatrain.model import GPT, GPTSpec
from fatrain.trainer import run_training
from test_train import FAST, compose_train


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_exported_weights_rebuild_the_model(tmp_path, capsys):
    run_training(compose_train([*FAST, "trainer.max_steps=2"]), str(tmp_path / "run"))
    capsys.readouterr()
    assert main([f"ckpt_path={tmp_path / 'run'}"]) == 0
    out = tmp_path / "run" / "model.safetensors"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)

    state = load_checkpoint(list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1])
    tensors = load_file(str(out))
    assert tensors.keys() == state["model"].keys()
    assert all(torch.equal(tensors[k], state["model"][k]) for k in tensors)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "2" and meta["format"] == "fatrain-weights"

    model = GPT(GPTSpec(**json.loads(meta["fatrain_spec"])))
    model.load_state_dict(tensors)
    reference = GPT(GPTSpec(**state["spec"]))
    reference.load_state_dict(state["model"])
    idx = torch.randint(0, model.spec.vocab_size, (2, 16))
    model.eval(), reference.eval()
    with torch.no_grad():
        got, want = model(idx), reference(idx)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    assert torch.equal(got, want)


def test_bad_input_is_one_line_and_nothing_written(tmp_path, capsys):
    run_training(compose_train([*FAST, "trainer.max_steps=2"]), str(tmp_path / "run"))
    assert main([f"ckpt_path={tmp_path / 'run'}", f"out={tmp_path / 'weights.bin'}"]) == 2
    assert main([f"ckpt_path={tmp_path / 'missing'}"]) == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main([f"ckpt_path={bad}", f"out={tmp_path / 'w.safetensors'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 3 and "out=" in err[0] and "missing" in err[1] and "unreadable" in err[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "cache", "run"]
