"""The nanoGPT-style reference model: fatrain's model math in plain PyTorch, step for step."""

import json

import pytest
import torch

from fatrain.model import GPT, GPTSpec
from fatrain.reference_gpt import ReferenceGPT

SHAPES = [dict(), dict(n_kv_head=2, mlp="swiglu", norm="rmsnorm", bias=False),
          dict(norm="layernorm", bias=True, tie_embeddings=False)]


def spec(**kw):
    base = dict(vocab_size=61, attention="sdpa", n_layer=2, n_head=4, n_embd=32, norm="layernorm", rope_theta=500.0)
    return GPTSpec(**{**base, **kw})


@pytest.mark.parametrize("kw", SHAPES, ids=["gpt2-like", "llama-like", "untied-with-biases"])
def test_one_seed_gives_both_the_same_weights_and_outputs_and_gradients(kw):
    torch.manual_seed(3)
    ours = GPT(spec(**kw)).double()
    torch.manual_seed(3)
    ref = ReferenceGPT(spec(**kw)).double()
    assert list(ours.state_dict()) == list(ref.state_dict())  # names and order: checkpoints interchange
    for name, value in ours.state_dict().items():
        assert torch.equal(value, ref.state_dict()[name]), name
    gen = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 61, (2, 45), generator=gen), torch.randint(0, 61, (2, 45), generator=gen)
    logits, loss = ours(idx, targets)
    ref_logits, ref_loss = ref(idx, targets)
    torch.testing.assert_close(ref_logits, logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref_loss, loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    # NOTE: both rotate Q and K in float32 (the tables are float32 in either), so float64 gradients
    # that reach the rotation in a different order of ops agree to float32's rounding there.
    for name, p in ours.named_parameters():
        torch.testing.assert_close(ref_grads[name].grad, p.grad, rtol=1e-6, atol=1e-9)


def test_settings_the_reference_lacks_are_refused():
    from hydra import compose, initialize_config_module

    from fatrain.config import register_configs, validate_train_config

    register_configs()
    cases = {"attention=flash_v2": "attention.backend must be one of sdpa",
             "model.rope_reset_per_document=true": "does not have model.rope_reset_per_document=true",
             "model.loss_chunk_tokens=64": "does not have model.loss_chunk_tokens=64",
             "trainer.activation_checkpointing=true": "does not have trainer.activation_checkpointing=true"}
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        for override, message in cases.items():
            cfg = compose(config_name="train", overrides=["model.implementation=reference", "attention=sdpa",
                                                           override])
            with pytest.raises(ValueError, match=message):
                validate_train_config(cfg)
        cfg = compose(config_name="train", overrides=["model.implementation=nanogpt"])
        with pytest.raises(ValueError, match="model.implementation"):
            validate_train_config(cfg)


@pytest.mark.slow
def test_trained_side_by_side_the_loss_curves_agree(tmp_path, monkeypatch):
    """Twenty steps of each through the trainer, one seed, the same batches: the same losses (float32)."""
    from hydra import compose, initialize_config_module

    from fatrain.config import register_configs
    from fatrain.trainer import run_training

    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    register_configs()
    curves = {}
    for implementation in ("fatrain", "reference"):
        with initialize_config_module(config_module="fatrain.configs", version_base=None):
            cfg = compose(config_name="train", overrides=[
                "model=tiny", "attention=sdpa", f"model.implementation={implementation}", "data.seq_len=64",
                "trainer.batch_size=4", "trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=0",
                "trainer.eval_batches=1", "trainer.device=cpu", "trainer.progress_bar=false",
                "logger.wandb.mode=disabled"])
        run = tmp_path / implementation
        assert run_training(cfg, str(run))["status"] == "ok"
        with open(run / "metrics.jsonl") as f:
            curves[implementation] = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert len(curves["fatrain"]) == 20
    assert curves["reference"] == pytest.approx(curves["fatrain"], rel=1e-4)
