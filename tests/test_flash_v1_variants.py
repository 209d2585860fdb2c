"""flash_v1's own paths with ALiBi, soft-capping and sinks that the registry-driven matrix of
tests/test_variants.py leaves out: the split grid (forward Q blocks over several programs,
dQ added with atomics), dropout, float16, and block skipping by documents, against the
float64 reference (outputs, logsumexp, dq/dk/dv, d sink_logits)."""

from __future__ import annotations

import pytest
import torch

from attention_checks import check_attention, make_qkv, packed_doc_ids
from fatrain.kernels import get_backend
from fatrain.kernels._common import alibi_slopes_for


@pytest.mark.parametrize("dtype, num_splits, kw", [
    (torch.float32, 3, dict(causal=True, window_size=(7, 0), dropout_p=0.2)),
    (torch.float16, 1, dict(causal=True, docs=True)),
], ids=["fp32-splits3-window-dropout", "fp16-docs"])
def test_flash_v1_variants_on_its_own_paths(dtype, num_splits, kw):
    B, N, H, Hkv, D = 2, 45, 4, 2, 16  # 3 blocks of 16 under the interpreter, the last one partial
    q, k, v = make_qkv(B, N, N, H, Hkv, D, dtype=dtype)
    kwargs = dict(kw, alibi_slopes=alibi_slopes_for(H), softcap=3.0, return_lse=True,
                  sink_logits=torch.randn(H).requires_grad_())
    if kwargs.pop("docs", False):
        kwargs["doc_ids"] = packed_doc_ids(B, N)
    kernel_kwargs = dict(num_splits=num_splits)
    if kwargs.get("dropout_p"):
        kernel_kwargs.update(dropout_seed=11, return_dropout_mask=True)
    check_attention(get_backend("flash_v1"), q, k, v, kernel_kwargs=kernel_kwargs, **kwargs)



# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_v1_gpu_variants_bf16_default_splits(head_dim):
    """The compiled kernels, bf16, the default split grid (dQ by atomics) and the deterministic one;
    d sink_logits bit-identical across runs either way."""
    B, N, H, Hkv = 1, 2049, 4, 2
    q, k, v = make_qkv(B, N, N, H, Hkv, head_dim, dtype=torch.bfloat16, device="cuda")
    sinks = torch.randn(H, device="cuda").requires_grad_()
    kwargs = dict(causal=True, alibi_slopes=alibi_slopes_for(H).cuda(), softcap=20.0, sink_logits=sinks,
                  return_lse=True)
    attn = get_backend("flash_v1")
    check_attention(attn, q, k, v, **kwargs)
    check_attention(attn, q, k, v, kernel_kwargs=dict(deterministic=True), **kwargs)
    kwargs.pop("return_lse")
    dout = torch.randn_like(q)
    runs = [torch.autograd.grad(attn(q, k, v, deterministic=True, **kwargs), (q, k, v, sinks), dout)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
def test_flash_v1_gpu_variants_torch_compile():
    q, k, v = make_qkv(2, 300, 300, 4, 2, 64, dtype=torch.float16, device="cuda")
    sinks = torch.randn(4, device="cuda").requires_grad_()
    kwargs = dict(causal=True, alibi_slopes=alibi_slopes_for(4).cuda(), softcap=5.0, sink_logits=sinks)
    attn = get_backend("flash_v1")
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, **kwargs), fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, sinks))
    eager = attn(q, k, v, **kwargs)
    eager_grads = torch.autograd.grad(eager.float().square().sum(), (q, k, v, sinks))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
