"""The chunked output head + cross-entropy (fatrain.kernels.chunked_loss) against the full logits:
loss and gradients in float64 and float32, chunks that do not divide the tokens, ignored targets,
padding rows of the head, the tied embedding of the model, and the settings it refuses."""

import pytest
import torch
import torch.nn.functional as F

from fatrain.kernels.chunked_loss import linear_cross_entropy
from fatrain.model import GPT, GPTSpec


def _inputs(dtype, tokens=37, width=24, rows=70, vocab=61, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=gen, dtype=dtype).requires_grad_()
    weight = (0.3 * torch.randn(rows, width, generator=gen, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[[3, 17, 18]] = -100  # ignored: not in the loss, not in the mean
    return hidden, weight, targets, vocab


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_chunked_loss_and_gradients_equal_the_full_logits(dtype, tol, chunk):
    hidden, weight, targets, vocab = _inputs(dtype)
    loss = linear_cross_entropy(hidden, weight, targets, vocab, chunk)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    ref = F.cross_entropy((hidden @ weight[:vocab].T).double(), targets)  # ignore_index=-100, mean over the rest
    rdh, rdw = torch.autograd.grad(ref, (hidden, weight))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(loss.double().item() - ref.item()) <= max(tol, 1e-6) * abs(ref.item())
    assert (dh.double() - rdh.double()).abs().max().item() <= tol * 10
    assert (dw.double() - rdw.double()).abs().max().item() <= tol * 10
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert torch.count_nonzero(dw[vocab:]) == 0  # padding rows: outside the softmax


def test_chunked_loss_under_bf16_autocast_matches_the_models_full_path():
    hidden, weight, targets, vocab = _inputs(torch.float32, tokens=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, vocab, 16)
        full = F.cross_entropy((hidden @ weight[:vocab].T).float(), targets)  # bf16 logits, float32 softmax
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    rdh, rdw = torch.autograd.grad(full, (hidden, weight))
    assert abs(loss.item() - full.item()) < 1e-4
    assert (dh - rdh).abs().max().item() < 2e-3 and (dw - rdw).abs().max().item() < 2e-3


def test_model_with_chunked_loss_equals_the_full_loss_with_tied_embeddings():
    torch.manual_seed(0)
    spec = GPTSpec(vocab_size=45, attention="naive", n_layer=2, n_head=2, n_embd=32)  # padded to 64 rows
    full = GPT(spec)
    chunked = GPT(GPTSpec(**{**spec.__dict__, "loss_chunk_tokens": 7}))
    chunked.load_state_dict(full.state_dict())
    assert chunked.lm_head.weight is chunked.wte.weight
    idx = torch.randint(0, 45, (3, 20))
    targets = torch.randint(0, 45, (3, 20))
    logits_full, loss_full = full(idx, targets)
    logits_chunked, loss_chunked = chunked(idx, targets)
    assert logits_chunked is None and logits_full.shape == (3, 20, 45)
    assert loss_chunked.item() == pytest.approx(loss_full.item(), abs=1e-6)
    loss_full.backward()
    loss_chunked.backward()
    for (name, a), b in zip(full.named_parameters(), chunked.parameters()):
        assert (a.grad - b.grad).abs().max().item() < 1e-6, name
    # Evaluation by position keeps the full path (reduction='none' needs each token's loss).
    _, per_token = chunked(idx, targets, reduction="none")
    assert per_token.shape == (3, 20)


def test_bad_chunk_settings_are_refused():
    hidden, weight, targets, vocab = _inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        linear_cross_entropy(hidden, weight, targets, vocab, 0)
    with pytest.raises(ValueError, match="vocab_size must be in 1..70"):
        linear_cross_entropy(hidden, weight, targets, 71, 8)
    from hydra import compose, initialize_config_module

    from fatrain.config import register_configs, validate_train_config

    register_configs()
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name="train", overrides=["model.loss_chunk_tokens=-1"])
    with pytest.raises(ValueError, match="model.loss_chunk_tokens"):
        validate_train_config(cfg)
