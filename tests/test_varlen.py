"""flash-attn's varlen interface (``fatrain.kernels.varlen``) over every backend with doc_ids:
sequences packed without padding equal each sequence run alone."""

import pytest
import torch

from attention_checks import features, make_qkv, max_err
from fatrain.kernels import available_backends, get_backend
from fatrain.kernels.varlen import cu_seqlens_to_doc_ids, varlen_attention

DOC_BACKENDS = [b for b in available_backends(device="cpu") if "doc_ids" in features(b, "cpu")]


@pytest.mark.parametrize("name", DOC_BACKENDS)
def test_varlen_equals_per_document_calls(name):
    lengths = [7, 1, 30, 12]
    total = sum(lengths)
    have = features(name, "cpu")
    lse = "return_lse" in have
    window = (8, 0) if "window" in have else (-1, -1)
    q, k, v = (t[0].detach().requires_grad_()
               for t in make_qkv(1, total, total, 4, 2 if "gqa" in have else 4, 16, dtype=torch.float32))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    result = varlen_attention(name, q, k, v, cu, cu, max(lengths), max(lengths), causal=True, window_size=window,
                              return_lse=lse)
    out, out_lse = result if lse else (result, None)
    assert out.shape == q.shape
    if lse:
        assert out_lse.shape == (4, total) and out_lse.dtype == torch.float32
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = get_backend(name)(q[None, s], k[None, s], v[None, s], causal=True, window_size=window,
                                  return_lse=lse)
        if lse:
            alone, alone_lse = alone
            assert max_err(out_lse[:, s], alone_lse[0]) < 1e-5
        assert max_err(out[s], alone[0]) < 1e-5, f"sequence at {start}:{start + length}"
        start += length
    out.sum().backward()  # gradients flow through the packed call
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_varlen_rejects_bad_cu_seqlens():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cu_seqlens_q == cu_seqlens_k"):
        varlen_attention("naive", q, q, q, cu, torch.tensor([0, 5, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="end at the packed length 10"):
        varlen_attention("naive", q, q, q, cu[:2], cu[:2], 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q=5 is smaller"):
        varlen_attention("naive", q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="int32 or int64"):
        varlen_attention("naive", q, q, q, cu.float(), cu.float(), 6, 6)
    with pytest.raises(ValueError, match="3 dims"):
        varlen_attention("naive", q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        varlen_attention("flash_v3", q, q, q, cu, cu, 6, 6)
    assert cu_seqlens_to_doc_ids(cu, 10).tolist() == [0] * 4 + [1] * 6


@pytest.mark.gpu
@pytest.mark.parametrize("name", [b for b in available_backends(device="cuda") if "doc_ids" in features(b, "cuda")])
def test_varlen_equals_per_document_calls_gpu(name):
    lengths = [300, 17, 1, 900, 830]
    total = sum(lengths)
    q, k, v = (t[0] for t in make_qkv(1, total, total, 4, 4, 64, dtype=torch.bfloat16, device="cuda"))
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    out = varlen_attention(name, q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = get_backend(name)(q[None, s], k[None, s], v[None, s], causal=True)[0]
        assert max_err(out[s], alone) < 2e-2
        start += length
