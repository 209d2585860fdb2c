"""The fused RoPE kernel (fatrain.kernels.rope): outputs and the gradient of qkv against a float64
reference, relative to PyTorch's own error at the same precision; the model gives the same
numbers with the kernel and with PyTorch ops; bad arguments name themselves."""

import pytest
import torch

from attention_checks import max_err
from fatrain.kernels.rope import rope_qkv
from fatrain.model import GPT, GPTSpec, apply_rope, positions_from_doc_ids, rope_tables, uses_kernel

_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def split_rotate(qkv, cos, sin, H, Hkv):
    """The model's PyTorch path: split, view, apply_rope on Q and K (cos, sin with the head axis)."""
    B, T, width = qkv.shape
    D = width // (H + 2 * Hkv)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def reference(qkv, cos, sin, H, Hkv):
    """Float64 rotation of the float64 copy of qkv (apply_rope computes in float32)."""
    B, T, width = qkv.shape
    D = width // (H + 2 * Hkv)
    x = qkv.double()
    q, k, v = x.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
    c, s = cos.double(), sin.double()

    def rot(t):
        a, b = t.chunk(2, dim=-1)
        return torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return rot(q), rot(k), v


CASES = [  # (B, T, H, Hkv, D, dtype, per_batch_positions)
    (2, 37, 4, 4, 16, torch.float32, False),   # MHA, a tail of 37 tokens
    (1, 97, 4, 1, 24, torch.float16, False),   # MQA, head_dim 24: half 12 padded to 16 lanes
    (3, 20, 6, 2, 32, torch.float32, True),    # GQA, positions restarting per document
    (1, 1, 2, 2, 8, torch.float16, False),     # one token
]


@pytest.mark.parametrize("B, T, H, Hkv, D, dtype, per_batch", CASES)
def test_rope_qkv_matches_reference(B, T, H, Hkv, D, dtype, per_batch):
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=dtype, requires_grad=True)
    if per_batch:
        doc_ids = torch.cumsum(torch.rand(B, T) < 0.2, dim=1)
        positions = positions_from_doc_ids(doc_ids)
    else:
        positions = torch.arange(T) + 1000  # far positions: large angles
    cos, sin = rope_tables(positions, D, 10000.0)  # (..., T, 1, D/2)
    q, k, v = rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, Hkv)
    assert (q.shape, k.shape, v.shape) == ((B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D))
    assert q.dtype == k.dtype == v.dtype == dtype
    ref = reference(qkv, cos, sin, H, Hkv)
    torch_path = split_rotate(qkv, cos, sin, H, Hkv)
    floor = _FLOOR[dtype]
    for got, want, plain in zip((q, k, v), ref, torch_path):
        assert max_err(got, want) <= 2 * max_err(plain, want) + floor
    assert torch.equal(v, torch_path[2])  # V is copied, not rounded
    grads = [torch.randn_like(t) for t in (q, k, v)]
    (dqkv,) = torch.autograd.grad((q, k, v), qkv, grads)
    (want,) = torch.autograd.grad(ref, qkv, [g.double() for g in grads])
    (plain,) = torch.autograd.grad(torch_path, qkv, grads)
    assert dqkv.dtype == dtype and dqkv.shape == qkv.shape
    assert max_err(dqkv, want) <= 3 * max_err(plain, want) + floor


def test_rope_qkv_takes_strided_projections_and_unused_outputs():
    # qkv as a slice of a wider buffer (row stride > width), and a loss that ignores V.
    H, Hkv, D, T = 2, 1, 16, 9
    base = torch.randn(2, T, (H + 2 * Hkv) * D + 8, dtype=torch.float32)
    qkv = base[..., 8:].requires_grad_()
    cos, sin = rope_tables(torch.arange(T), D, 500.0)
    q, k, v = rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, Hkv)
    want = split_rotate(qkv, cos, sin, H, Hkv)
    assert all(max_err(a, b) < 1e-6 for a, b in zip((q, k, v), want))
    (got,) = torch.autograd.grad((q * 2).sum() + k.sum(), qkv)
    (ref,) = torch.autograd.grad((want[0] * 2).sum() + want[1].sum(), qkv)
    assert max_err(got, ref) < 1e-6
    assert got[..., (H + Hkv) * D:].abs().max() == 0  # V's slice gets zero gradient


@pytest.mark.parametrize("kw", [dict(n_kv_head=2), dict(n_kv_head=1, rope_reset_per_document=True,
                                                        document_masking=True)])
def test_model_is_the_same_with_the_kernel_and_with_pytorch_ops(kw):
    spec = dict(vocab_size=300, attention="naive", n_layer=2, n_head=4, n_embd=64, **kw)
    torch.manual_seed(0)
    ops = GPT(GPTSpec(**spec, rope_kernel="torch"))
    fused = GPT(GPTSpec(**spec, rope_kernel="triton"))
    fused.load_state_dict(ops.state_dict())
    idx = torch.randint(0, 300, (2, 33))
    doc_ids = torch.cumsum(torch.rand(2, 33) < 0.1, dim=1) if kw.get("document_masking") else None
    losses = [m(idx, idx, doc_ids=doc_ids)[1] for m in (ops, fused)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(ops.parameters(), fused.parameters()):
        assert max_err(a.grad, b.grad) < 1e-6


def test_compiled_model_takes_the_kernels():
    # fullgraph: both kernels are torch.library ops torch.compile traces (opaque custom ops under
    # the interpreter, triton ops on CUDA); the compiled model gives the eager model's numbers.
    spec = GPTSpec(vocab_size=300, attention="naive", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, rope_kernel="triton",
                   loss_kernel="triton")
    torch.manual_seed(0)
    model = GPT(spec)
    idx, targets = torch.randint(0, 300, (2, 17)), torch.randint(0, 300, (2, 17))
    eager_loss = model(idx, targets)[1]
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(idx, targets)[1]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    assert max(max_err(a, b) for a, b in zip(grads, eager_grads)) < 1e-5


def test_rope_kernel_choice():
    cpu = torch.zeros(1)
    assert not uses_kernel("auto", cpu) and not uses_kernel("torch", cpu)  # auto: CUDA only
    assert uses_kernel("triton", cpu)
    with pytest.raises(ValueError, match="rope_kernel must be auto, triton or torch, got 'fast'"):
        uses_kernel("fast", cpu)
    with pytest.raises(ValueError, match="loss_kernel must be auto, triton or torch"):
        uses_kernel("fast", cpu, "loss_kernel")


@pytest.mark.parametrize("args, match", [
    (((2, 5, 32), (5, 4), 2, 1), None),  # valid (4 heads of 8): the call the others break
    (((2, 5, 4, 8), (5, 4), 2, 1), r"qkv must be \(batch, seqlen"),
    (((2, 5, 32), (5, 4), 3, 2), "n_head must be a positive multiple of n_kv_head"),
    (((2, 5, 42), (5, 4), 2, 1), r"qkv's last dim \(42\) must be"),
    (((2, 5, 36), (5, 4), 2, 1), "even head_dim"),
    (((2, 5, 32), (6, 4), 2, 1), r"cos and sin must both be \(seqlen, head_dim / 2\) = \(5, 4\)"),
])
def test_rope_qkv_bad_arguments(args, match):
    qkv_shape, cos_shape, H, Hkv = args
    qkv, cos = torch.randn(qkv_shape), torch.randn(cos_shape)
    if match is None:
        rope_qkv(qkv, cos, cos, H, Hkv)
        return
    with pytest.raises(ValueError, match=match):
        rope_qkv(qkv, cos, cos, H, Hkv)


@pytest.mark.gpu
def test_gpu_compiled_model_with_the_kernels_matches_eager():
    # On CUDA "auto" runs both kernels under torch.compile too: triton ops whose stores Inductor
    # must see (a missed one leaves an output unwritten), checked against the PyTorch ops.
    spec = dict(vocab_size=300, attention="naive", n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    ops = GPT(GPTSpec(**spec, rope_kernel="torch", loss_kernel="torch")).cuda()
    fused = GPT(GPTSpec(**spec)).cuda()
    fused.load_state_dict(ops.state_dict())
    idx, targets = (torch.randint(0, 300, (2, 65), device="cuda") for _ in range(2))
    want = ops(idx, targets)[1]
    want_grads = torch.autograd.grad(want, list(ops.parameters()))
    compiled = torch.compile(fused, fullgraph=True)
    loss = compiled(idx, targets)[1]
    grads = torch.autograd.grad(loss, list(fused.parameters()))
    assert abs(loss.item() - want.item()) < 1e-4
    assert max(max_err(a, b) for a, b in zip(grads, want_grads)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rope_qkv_matches_reference(dtype):
    B, T, H, Hkv, D = 2, 1027, 12, 4, 64
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=dtype, device="cuda", requires_grad=True)
    cos, sin = rope_tables(torch.arange(T, device="cuda"), D, 10000.0)
    q, k, v = rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, Hkv)
    ref = reference(qkv, cos, sin, H, Hkv)
    torch_path = split_rotate(qkv, cos, sin, H, Hkv)
    for got, want, plain in zip((q, k, v), ref, torch_path):
        assert max_err(got, want) <= 2 * max_err(plain, want) + _FLOOR[dtype]
    grads = [torch.randn_like(t) for t in (q, k, v)]
    (dqkv,) = torch.autograd.grad((q, k, v), qkv, grads)
    (want,) = torch.autograd.grad(ref, qkv, [g.double() for g in grads])
    (plain,) = torch.autograd.grad(torch_path, qkv, grads)
    assert max_err(dqkv, want) <= 3 * max_err(plain, want) + _FLOOR[dtype]


@pytest.mark.gpu
def test_gpu_rope_qkv_past_two_to_the_31_elements():
    # A token's offset in the packed QKV rows passes 2^31 (GPT-2 small's 2304 columns do at 932k
    # tokens); with one head of 64 per Q, K, V (192 columns) that is 11.2M tokens, about 12 GB.
    # The tail rows, where an int32 offset wraps, against the PyTorch rotation of the same rows.
    H = Hkv = 1
    D = 64
    T = 2**31 // ((H + 2 * Hkv) * D) + 1000
    torch.manual_seed(0)
    qkv = torch.randn(1, T, (H + 2 * Hkv) * D, dtype=torch.bfloat16, device="cuda")
    cos, sin = rope_tables(torch.arange(T, device="cuda"), D, 10000.0)
    q, k, v = rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, Hkv)
    tail = slice(T - 2048, T)
    want = split_rotate(qkv[:, tail], cos[tail], sin[tail], H, Hkv)
    for got, ref in zip((q, k, v), want):
        assert max_err(got[:, tail], ref) <= 2e-2
