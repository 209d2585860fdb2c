"""The model's attention variants: model.position=rope|alibi|none, model.attn_softcap and
model.attn_sinks train, sample and evaluate on the CPU; sinks are learnable, float32 and out
of weight decay; checkpoints carry the settings (old ones load as rope / 0 / false); a backend
without a variant is refused before any work, naming the setting and the backend."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fatrain.checkpoint import CheckpointError
from fatrain.config import OptimConfig, register_configs, validate_train_config
from fatrain.eval.loading import load_model
from fatrain.kernels._common import alibi_slopes_for
from fatrain.model import GPT, GPTSpec
from fatrain.trainer import check_spec_compatible, make_optimizer, run_training

register_configs()

FAST = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32",
    "trainer.max_steps=3", "trainer.batch_size=2", "trainer.log_every=1", "trainer.eval_every=0",
    "trainer.eval_batches=1", "trainer.ckpt_every=0", "trainer.progress_bar=false",
    "logger.wandb.mode=disabled", "optim.warmup_steps=1",
]
OPTIONS = {
    "alibi": dict(position="alibi"),
    "none": dict(position="none"),
    "softcap": dict(attn_softcap=2.0),
    "sinks": dict(attn_sinks=True),
    "combined": dict(position="alibi", attn_softcap=2.0, attn_sinks=True, n_kv_head=1),
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))


def compose_train(overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name="train", overrides=overrides)


def tiny(**kw):
    return GPTSpec(**dict(dict(vocab_size=61, attention="naive", n_layer=1, n_head=4, n_embd=32), **kw))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_and_samples(option):
    torch.manual_seed(0)
    model = GPT(tiny(**OPTIONS[option]))
    sinks = [b.attn.sinks for b in model.blocks if b.attn.sinks is not None]
    assert len(sinks) == (model.spec.n_layer if model.spec.attn_sinks else 0)
    optimizer = make_optimizer(model, OmegaConf.structured(OptimConfig(lr=3e-3, fused=False)), torch.device("cpu"))
    no_decay = next(g["params"] for g in optimizer.param_groups if g["weight_decay"] == 0.0)
    assert all(any(s is p for p in no_decay) for s in sinks)
    assert all(s.dtype == torch.float32 and 0 < s.abs().max() < 0.2 for s in sinks)  # normal(0, init_std)
    idx = torch.randint(0, 61, (2, 17))
    losses = []
    for _ in range(5):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if sinks:
            assert all(s.grad.abs().sum() > 0 for s in sinks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    # The KV cache (one query against every cached key, ALiBi's distances aligned bottom-right)
    # decodes what the whole-sequence recompute decodes.
    model.eval()
    prompt = idx[:, :5]
    cached = model.generate(prompt, 6, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, 6, temperature=0, use_cache=False)
    assert cached.shape == (2, 11) and torch.equal(cached, recomputed)


def test_variants_reach_the_attention_call():
    """The layer's call gets the paper's slopes, the cap and its own float32 sinks (and nothing
    for position=none)."""
    spec = tiny(position="alibi", attn_softcap=2.0, attn_sinks=True, n_head=12, n_embd=96, n_layer=2)
    attn = GPT(spec).blocks[0].attn
    kwargs = attn.variant_kwargs()
    assert torch.equal(kwargs["alibi_slopes"], alibi_slopes_for(12)) and kwargs["softcap"] == 2.0
    assert kwargs["sink_logits"] is attn.sinks
    assert "blocks.0.attn.sinks" in GPT(spec).state_dict()
    assert not any("alibi" in key for key in GPT(spec).state_dict())  # derived from n_head, not saved
    assert GPT(tiny(position="none")).blocks[0].attn.variant_kwargs() == {}


def test_flash_v1_trains_the_combined_model_and_the_checkpoint_round_trips(tmp_path):
    overrides = ["attention=flash_v1", "model.position=alibi", "model.attn_softcap=5.0", "model.attn_sinks=true",
                 *FAST]
    result = run_training(compose_train(overrides), str(tmp_path))
    assert result["status"] == "ok"
    state = torch.load(result["checkpoint"], weights_only=True)
    assert (state["spec"]["position"], state["spec"]["attn_softcap"], state["spec"]["attn_sinks"]) == \
        ("alibi", 5.0, True)
    assert state["model"]["blocks.0.attn.sinks"].dtype == torch.float32
    loaded = load_model(result["checkpoint"], attention_overrides={"backend": "naive"})
    assert loaded.spec.position == "alibi" and loaded.spec.attn_sinks
    torch.testing.assert_close(loaded.model.blocks[0].attn.sinks, state["model"]["blocks.0.attn.sinks"])
    idx = torch.randint(0, 60, (1, 40))  # past the training length: ALiBi extrapolates
    _, loss = loaded.model(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="model.position=alibi needs an attention backend with alibi: "
                                         "attention.backend=sdpa"):
        load_model(result["checkpoint"], attention_overrides={"backend": "sdpa"})


def test_a_checkpoint_from_before_the_variants_loads_as_rope(tmp_path):
    result = run_training(compose_train(["attention=naive", *FAST]), str(tmp_path))
    state = torch.load(result["checkpoint"], weights_only=True)
    for key in ("position", "attn_softcap", "attn_sinks"):
        del state["spec"][key], state["config"]["model"][key]
    old = os.path.join(tmp_path, "old.pt")
    torch.save(state, old)
    loaded = load_model(old)
    assert (loaded.spec.position, loaded.spec.attn_softcap, loaded.spec.attn_sinks) == ("rope", 0.0, False)
    check_spec_compatible(state["spec"], loaded.spec, "resume")
    with pytest.raises(CheckpointError, match="the checkpoint has model.position='rope' but this run asks for 'alibi'"):
        check_spec_compatible(state["spec"], GPTSpec(**dict(state["spec"], position="alibi")), "resume")


@pytest.mark.parametrize("overrides, match", [
    (["attention=sdpa", "model.position=alibi"],
     r"model.position=alibi needs an attention backend with alibi: attention.backend=sdpa does not have it "
     r"\(backends with it: flash_v1, flash_v2, flex \(CUDA only\), naive\)"),
    (["attention=sdpa", "model.attn_softcap=30"], "model.attn_softcap=30.0 needs an attention backend with softcap"),
    (["attention=sdpa_math", "model.attn_sinks=true"], "model.attn_sinks=true needs an attention backend with sinks: "
                                                       "attention.backend=sdpa_math"),
    (["attention=naive", "model.position=learned"], "model.position='learned' is not allowed"),
    (["attention=naive", "model.attn_softcap=-1"], "model.attn_softcap"),
    (["attention=naive", "model.position=alibi", "model.rope_reset_per_document=true"],
     "model.rope_reset_per_document=true needs model.position=rope"),
])
def test_bad_variant_settings_are_refused_before_work(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate_train_config(compose_train([*FAST, *overrides]))


def test_the_model_refuses_a_backend_without_the_variant():
    with pytest.raises(ValueError, match="model.attn_sinks=true needs an attention backend with sinks"):
        GPT(tiny(attention="sdpa", attn_sinks=True))
