"""The Triton cross-entropy (fatrain.kernels.cross_entropy): loss and dlogits against a float64
reference, relative to PyTorch's own error at the same precision; padding columns, ignored
rows, a scaled upstream gradient; the model's loss is the same with it; bad arguments name
themselves."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import max_err
from fatrain.kernels.cross_entropy import cross_entropy
from fatrain.model import GPT, GPTSpec

_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def torch_loss(logits, targets, V, upcast=torch.float32):
    """The model's PyTorch path (float32 after a cast), or the float64 reference (upcast=float64)."""
    return F.cross_entropy(logits[..., :V].to(upcast).reshape(-1, V), targets.reshape(-1))


CASES = [  # (leading shape, P, V, dtype, ignored rows)
    ((2, 7), 200, 190, torch.float32, 1),   # padded head: 10 columns outside the softmax
    ((3, 5), 129, 129, torch.float16, 0),   # a vocabulary one past two loop steps
    ((11,), 64, 1, torch.float32, 2),       # one class: loss 0, gradient 0
    ((1, 1, 4), 300, 257, torch.float16, 3),  # 3-D leading shape, most rows ignored
]


@pytest.mark.parametrize("lead, P, V, dtype, ignored", CASES)
def test_cross_entropy_matches_reference(lead, P, V, dtype, ignored):
    logits = (torch.randn(*lead, P) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, V, lead)
    targets.view(-1)[:ignored] = -100
    loss = cross_entropy(logits, targets, V)
    ref = torch_loss(logits, targets, V, torch.float64)
    plain = torch_loss(logits, targets, V)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= 2 * abs(plain.item() - ref.item()) + _FLOOR[dtype]
    (grad,) = torch.autograd.grad(loss * 2.5, logits)  # the upstream gradient scales dlogits
    (want,) = torch.autograd.grad(ref * 2.5, logits)
    (got_plain,) = torch.autograd.grad(plain * 2.5, logits)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert max_err(grad, want) <= 3 * max_err(got_plain, want) + _FLOOR[dtype]
    assert grad[..., V:].abs().max() == 0 if V < P else True
    rows = grad.reshape(-1, P)
    assert rows[:ignored].abs().max() == 0 if ignored else True


def test_every_row_ignored_gives_zero_and_no_gradient():
    logits = torch.randn(3, 50, requires_grad=True)
    targets = torch.full((3,), -100)
    loss = cross_entropy(logits, targets)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() == 0


def test_strided_logits_are_read_or_copied():
    # rows evenly spaced (a slice along the vocabulary of a wider buffer) and a transposed view
    base = torch.randn(4, 6, 80)
    targets = torch.randint(0, 70, (4, 6))
    for logits, tg in ((base[..., :70], targets), (base[..., :70].transpose(0, 1), targets.t())):
        logits = logits.detach().requires_grad_()
        loss = cross_entropy(logits, tg)
        ref = torch_loss(logits, tg, 70)
        assert abs(loss.item() - ref.item()) < 1e-5
        g1, g2 = (torch.autograd.grad(x, logits)[0] for x in (loss, ref))
        assert max_err(g1, g2) < 1e-6


def test_model_loss_is_the_same_with_the_kernel():
    spec = dict(vocab_size=300, attention="naive", n_layer=2, n_head=4, n_embd=64)  # head padded to 320 columns
    torch.manual_seed(0)
    ops = GPT(GPTSpec(**spec, loss_kernel="torch"))
    fused = GPT(GPTSpec(**spec, loss_kernel="triton"))
    fused.load_state_dict(ops.state_dict())
    idx, targets = torch.randint(0, 300, (2, 17)), torch.randint(0, 300, (2, 17))
    (logits_a, loss_a), (logits_b, loss_b) = ops(idx, targets), fused(idx, targets)
    assert torch.equal(logits_a, logits_b) and logits_b.shape == (2, 17, 300)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    loss_a.backward()
    loss_b.backward()
    for a, b in zip(ops.parameters(), fused.parameters()):
        assert max_err(a.grad, b.grad) < 1e-6
    # per-token losses (evaluation) take PyTorch's path whatever the setting
    per_token = fused(idx, targets, reduction="none")[1]
    assert per_token.shape == (2, 17) and abs(per_token.mean().item() - loss_b.item()) < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=0), "vocab_size must be in 1..10"),
    (dict(vocab_size=11), "vocab_size must be in 1..10"),
    (dict(targets=torch.zeros(3, dtype=torch.long)), r"targets must have the logits' leading shape \(4,\)"),
    (dict(targets=torch.zeros(4)), "targets must be int64 or int32"),
    (dict(logits=torch.zeros(4, 10, dtype=torch.float64)), "logits must be float16, bfloat16 or float32"),
])
def test_cross_entropy_bad_arguments(kwargs, match):
    args = dict(logits=torch.zeros(4, 10), targets=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cross_entropy(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_cross_entropy_matches_reference(dtype):
    P, V = 50304, 50257  # GPT-2's vocabulary in a head padded to a multiple of 64
    logits = (torch.randn(3, 1000, P, device="cuda") * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (3, 1000), device="cuda")
    targets[0, :10] = -100
    loss = cross_entropy(logits, targets, V)
    ref = torch_loss(logits, targets, V, torch.float64)
    plain = torch_loss(logits, targets, V)
    assert abs(loss.item() - ref.item()) <= 2 * abs(plain.item() - ref.item()) + _FLOOR[dtype]
    (grad,) = torch.autograd.grad(loss, logits)
    (want,) = torch.autograd.grad(ref, logits)
    (got_plain,) = torch.autograd.grad(plain, logits)
    assert max_err(grad, want) <= 3 * max_err(got_plain, want) + _FLOOR[dtype]
    assert grad[..., V:].abs().max() == 0
