"""flash-attn's varlen interface (``fatrain.kernels.varlen``) over every backend with doc_ids:
sequences packed without padding equal each sequence run alone."""

import pytest
import torch

from attention_checks import GRAD_FACTOR, OUT_FACTOR, _FLOOR, features, make_qkv, max_err
from fatrain.kernels import MASKED_ROW_LSE, available_backends, get_backend, reference_attention
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
    with pytest.raises(ValueError, match="as many sequences as cu_seqlens_q"):
        varlen_attention("naive", q, q, q, cu, torch.tensor([0, 5, 7, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="as many sequences as cu_seqlens_q"):
        varlen_attention("flash_v2", q, q, q, cu, torch.tensor([0, 5, 7, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_k=4 is smaller"):
        varlen_attention("flash_v2", q, q, q, cu, torch.tensor([0, 5, 10], dtype=torch.int32), 6, 4)
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


# ---- different q and k packings: each sequence against the float64 reference run alone ----

def _packed(lengths_q, lengths_k, H, Hkv, D, dtype, device="cpu"):
    q, k, v = (t[0].detach().requires_grad_() for t in make_qkv(1, sum(lengths_q), sum(lengths_k), H, Hkv, D,
                                                                 dtype=dtype, device=device))
    cu_q = torch.tensor([0] + lengths_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k, device=device).cumsum(0).to(torch.int32)
    return q, k, v, cu_q, cu_k


def _per_sequence_reference(q, k, v, cu_q, cu_k, upcast, **kwargs):
    """Each sequence through reference_attention (float64 when upcast, else the input dtype),
    concatenated; sequences without keys give zeros and MASKED_ROW_LSE."""
    outs, lses = [], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    dtype = torch.float64 if upcast else q.dtype
    for q_lo, q_hi, k_lo, k_hi in zip(bq, bq[1:], bk, bk[1:]):
        if q_hi == q_lo:
            continue
        if k_hi == k_lo:
            outs.append(q[q_lo:q_hi].to(dtype) * 0)  # zeros that keep the graph connected
            lses.append(torch.full((q.shape[1], q_hi - q_lo), MASKED_ROW_LSE, dtype=torch.float64, device=q.device))
            continue
        out, lse = reference_attention(q[None, q_lo:q_hi], k[None, k_lo:k_hi], v[None, k_lo:k_hi], upcast=upcast,
                                       return_lse=True, **kwargs)
        outs.append(out[0])
        lses.append(lse[0].double())
    return torch.cat(outs), torch.cat(lses, dim=1)


def _check_packings(name, lengths_q, lengths_k, H, Hkv, dtype, causal, window):
    D = 16
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, H, Hkv, D, dtype)
    mask_kwargs = dict(causal=causal, window_size=window)
    out, lse = varlen_attention(name, q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True,
                                **mask_kwargs)
    assert out.shape == q.shape and lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32
    ref, ref_lse = _per_sequence_reference(q, k, v, cu_q, cu_k, True, **mask_kwargs)
    same, same_lse = _per_sequence_reference(q, k, v, cu_q, cu_k, False, **mask_kwargs)
    floor = _FLOOR[dtype]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double(), allow_unused=True)
    same_grads = torch.autograd.grad(same, (q, k, v), dout, allow_unused=True)
    # NaN anywhere makes an error NaN and fails the comparison: an unwritten element fails.
    assert max_err(out, ref) <= OUT_FACTOR * max_err(same, ref) + floor
    assert max_err(lse, ref_lse) <= OUT_FACTOR * max_err(same_lse, ref_lse) + 1e-5
    for label, g, r, s in zip("qkv", grads, ref_grads, same_grads):
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        s = torch.zeros_like(g) if s is None else s
        assert max_err(g, r) <= GRAD_FACTOR * max_err(s, r) + floor, f"d{label}"


# Odd lengths, empty sequences (no queries; no keys), Nq > Nk and Nq < Nk in one pack.
LENGTHS_Q = [5, 0, 37, 3, 20, 1]
LENGTHS_K = [19, 6, 11, 0, 20, 33]
MASKS = [(False, (-1, -1)), (True, (-1, -1)), (True, (7, 0)), (False, (4, 2))]


@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_v2_varlen_different_packings(dtype, causal, window):
    _check_packings("flash_v2", LENGTHS_Q, LENGTHS_K, 4, 2, dtype, causal, window)


@pytest.mark.parametrize("Hkv", [4, 1])
def test_flash_v2_varlen_gqa_ratios_and_atomic_dq(Hkv):
    _check_packings("flash_v2", LENGTHS_Q, LENGTHS_K, 4, Hkv, torch.float32, True, (-1, -1))
    _check_packings("flash_v2_atomic", LENGTHS_Q, LENGTHS_K, 4, Hkv, torch.float32, True, (5, 0))


def test_other_backends_loop_over_sequences():
    _check_packings("naive", LENGTHS_Q, LENGTHS_K, 4, 2, torch.float32, True, (7, 0))


def test_flash_v2_varlen_equal_packings_match_doc_ids():
    lengths = [9, 1, 26]
    q, k, v, cu, _ = _packed(lengths, lengths, 2, 2, 16, torch.float32)
    out = varlen_attention("flash_v2", q, k, v, cu, cu, 26, 26, causal=True)
    doc = get_backend("flash_v2")(q[None], k[None], v[None], causal=True,
                                  doc_ids=cu_seqlens_to_doc_ids(cu, q.shape[0])[None])[0]
    assert max_err(out, doc) < 1e-5


def test_flash_v2_varlen_rejects_bad_input():
    from fatrain.kernels.flash_v2 import flash_v2_varlen_attention

    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="3 dims"):
        flash_v2_varlen_attention(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="end at the packed length 10"):
        flash_v2_varlen_attention(q, q, q, cu, torch.tensor([0, 4, 9], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q must be a positive int"):
        flash_v2_varlen_attention(q, q, q, cu, cu, 0, 6)
    with pytest.raises(ValueError, match="head_dim"):
        flash_v2_varlen_attention(q[..., :8], q[..., :8], q[..., :8], cu, cu, 6, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (256, 0))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_v2_varlen_different_packings_gpu(dtype, causal, window):
    lengths_q = [300, 0, 1, 900, 77, 1024]
    lengths_k = [1500, 17, 1, 130, 0, 1024]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 8, 2, 128, dtype, device="cuda")
    out = varlen_attention("flash_v2", q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                           window_size=window)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = _per_sequence_reference(q, k, v, cu_q, cu_k, True, causal=causal, window_size=window)
    same, _ = _per_sequence_reference(q, k, v, cu_q, cu_k, False, causal=causal, window_size=window)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double(), allow_unused=True)
    same_grads = torch.autograd.grad(same, (q, k, v), dout, allow_unused=True)
    assert max_err(out, ref) <= OUT_FACTOR * max_err(same, ref) + _FLOOR[dtype]
    for g, r, s in zip(grads, ref_grads, same_grads):
        assert max_err(g, r) <= GRAD_FACTOR * max_err(s, r) + _FLOOR[dtype]


def test_flash_v2_varlen_traces_with_fullgraph():
    """torch.compile(fullgraph=True) traces the VARLEN ops (the host check of the offsets is
    skipped while tracing) and gives eager's outputs and gradients; int64 offsets are taken."""
    from fatrain.kernels.flash_v2 import flash_v2_varlen_attention

    q, k, v, cu_q, cu_k = _packed([5, 7], [2, 5], 2, 2, 16, torch.float32)
    cu_q, cu_k = cu_q.long(), cu_k.long()

    def call(q, k, v):
        return flash_v2_varlen_attention(q, k, v, cu_q, cu_k, 7, 5, causal=True)

    compiled = torch.compile(call, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(compiled.sum(), (q, k, v))
    eager = call(q, k, v)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    assert max_err(compiled, eager) == 0.0
    assert all(max_err(a, b) == 0.0 for a, b in zip(grads, eager_grads))
