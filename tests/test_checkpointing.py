"""Activation checkpointing and host offload: the same loss and gradients as keeping everything."""

import pytest
import torch

from fatrain.model import GPT, GPTSpec

SETTINGS = {"plain": {}, "checkpointing": {"activation_checkpointing": True},
            "offload": {"activation_checkpointing": True, "activation_offload": True}}


def loss_and_grads(device, dtype=torch.float32, **settings):
    spec = GPTSpec(vocab_size=61, attention="sdpa", n_layer=3, n_head=2, n_embd=32, dropout=0.1, **settings)
    torch.manual_seed(1)
    model = GPT(spec).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 61, (2, 37), generator=gen).to(device)
    targets = torch.randint(0, 61, (2, 37), generator=gen).to(device)
    torch.manual_seed(2)  # dropout masks: the recomputed forward must draw the same ones
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("setting", ["checkpointing", "offload"])
def test_checkpointed_and_offloaded_steps_match_the_plain_one(device, setting):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ref_loss, ref_grads = loss_and_grads(device, torch.float64)
    loss, grads = loss_and_grads(device, torch.float64, **SETTINGS[setting])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_offload_pack_hook_does_not_hold_the_block_input():
    """Autograd keeps a saved tensor's pack hook until the backward: a hook that closed over the
    block input would keep its device copy alive beside the host one (nothing offloaded). The
    GPU test below measures it; this one keeps the closure from coming back on any machine."""
    from fatrain.model import offloaded_checkpoint

    assert "x" not in offloaded_checkpoint.__code__.co_cellvars


@pytest.mark.gpu
def test_offload_moves_every_block_input_off_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device, T, d, L = torch.device("cuda"), 65536, 768, 12
    peaks = {}
    for setting in ("checkpointing", "offload"):
        spec = GPTSpec(vocab_size=50304, attention="flash_v2", n_layer=L, n_head=12, n_embd=d,
                       loss_chunk_tokens=8192, **SETTINGS[setting])
        model = GPT(spec).to(device)
        idx = torch.randint(0, 50304, (1, T), device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        torch.cuda.synchronize()
        peaks[setting] = torch.cuda.max_memory_allocated() - base
        del model, loss
        torch.cuda.empty_cache()
    # (L - 1) float32 block inputs of T x d leave the GPU (the one the backward is in comes back)
    assert peaks["checkpointing"] - peaks["offload"] >= 0.8 * (L - 1) * T * d * 4


def test_offload_without_checkpointing_is_refused():
    from hydra import compose, initialize_config_module

    from fatrain.config import register_configs, validate_train_config

    register_configs()
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name="train", overrides=["trainer.activation_offload=true"])
    with pytest.raises(ValueError, match="trainer.activation_offload=true needs trainer.activation_checkpointing=true"):
        validate_train_config(cfg)
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name="train", overrides=["trainer.activation_offload=true",
                                                      "trainer.activation_checkpointing=true", "trainer.strategy=ddp"])
    with pytest.raises(ValueError, match="trainer.activation_offload=true runs with trainer.strategy=single"):
        validate_train_config(cfg)
