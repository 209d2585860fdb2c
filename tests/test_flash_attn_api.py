"""fatrain.kernels.flash_attn against the float64 reference, called with flash-attn's conventions.

Each function is called as flash-attn code calls it (positional arguments in flash-attn's
order, its packed layouts, return_attn_probs) and compared with ``reference_attention`` on
the same tensors; gradients are checked for the training functions.
"""

import pytest
import torch

from attention_checks import _FLOOR, GRAD_FACTOR, OUT_FACTOR, max_err
from fatrain.kernels import flash_attn as fa
from fatrain.kernels import reference_attention


def _close(name, got, ref, same, factor=OUT_FACTOR, floor_scale=1.0):
    err, torch_err = max_err(got, ref), max_err(same, ref)
    floor = _FLOOR[got.dtype if got.dtype != torch.float32 or same.dtype == torch.float32 else torch.float32]
    assert err <= factor * torch_err + floor * floor_scale, f"{name}: error {err:.3e} vs torch's {torch_err:.3e}"


def _both(q, k, v, **kwargs):
    """The float64 reference and the same math in the input dtype."""
    return (reference_attention(q, k, v, upcast=True, **kwargs), reference_attention(q, k, v, upcast=False, **kwargs))


def _grads(out, tensors, ref, same):
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, tensors, dout)
    g_ref = torch.autograd.grad(ref, tensors, dout.double())
    g_same = torch.autograd.grad(same, tensors, dout)
    for i, (a, r, s) in enumerate(zip(got, g_ref, g_same)):
        _close(f"grad {i}", a, r, s, GRAD_FACTOR, 10.0)


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,window_size", [(False, (-1, -1)), (True, (-1, -1)), (False, (7, 2))])
def test_flash_attn_func_with_gqa_and_return_attn_probs(dtype, causal, window_size):
    q, k, v = _randn(2, 19, 4, 16, dtype=dtype, seed=1), _randn(2, 33, 2, 16, dtype=dtype, seed=2), \
        _randn(2, 33, 2, 16, dtype=dtype, seed=3)
    out, lse, probs = fa.flash_attn_func(q, k, v, 0.0, None, causal, window_size, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 19) and lse.dtype == torch.float32
    (ref, ref_lse), (same, same_lse) = _both(q, k, v, causal=causal, window_size=window_size, return_lse=True)
    _close("out", out, ref, same)
    _close("lse", lse, ref_lse, same_lse.float(), floor_scale=1.0)
    _grads(out, (q, k, v), ref, same)


def test_qkvpacked_and_kvpacked_read_views_of_the_packed_tensor():
    qkv = _randn(2, 21, 3, 2, 16, seed=4)
    out = fa.flash_attn_qkvpacked_func(qkv, 0.0, 0.5, True)
    ref, same = _both(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, softmax_scale=0.5)
    _close("qkvpacked", out, ref, same)
    _grads(out, (qkv,), ref, same)

    q, kv = _randn(1, 5, 4, 16, seed=5), _randn(1, 27, 2, 1, 16, seed=6)  # MQA, seqlen_q < seqlen_k
    out, lse, _ = fa.flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True)
    (ref, ref_lse), (same, same_lse) = _both(q, kv[:, :, 0], kv[:, :, 1], causal=True, return_lse=True)
    _close("kvpacked", out, ref, same)
    _close("kvpacked lse", lse, ref_lse, same_lse)
    _grads(out, (q, kv), ref, same)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _varlen_reference(q, k, v, cu_q, cu_k, **kwargs):
    """Each packed sequence through the reference alone, concatenated; lse (nheads, total_q)."""
    outs, lses = [[], []], [[], []]
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        for i, upcast in enumerate((True, False)):
            out, lse = reference_attention(q[None, a:b], k[None, c:d], v[None, c:d], upcast=upcast, return_lse=True,
                                           **kwargs)
            outs[i].append(out[0])
            lses[i].append(lse[0])
    return [torch.cat(o) for o in outs], [torch.cat(lv, dim=-1) for lv in lses]


@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (3, 5))])
def test_varlen_func_with_one_packing(causal, window_size):
    lengths = [7, 1, 12]
    cu = _cu(lengths)
    q, k, v = _randn(20, 4, 16, seed=7), _randn(20, 2, 16, seed=8), _randn(20, 2, 16, seed=9)
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, 0.0, None, causal, window_size,
                                                return_attn_probs=True)
    assert probs is None and lse.shape == (4, 20)
    (ref, same), (ref_lse, same_lse) = _varlen_reference(q, k, v, cu, cu, causal=causal, window_size=window_size)
    _close("varlen out", out, ref, same)
    _close("varlen lse", lse, ref_lse, same_lse)
    _grads(out, (q, k, v), ref, same)


def test_varlen_qkvpacked_func():
    cu = _cu([5, 11])
    qkv = _randn(16, 3, 2, 16, seed=10)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 11, 0.0, None, True)
    (ref, same), _ = _varlen_reference(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, causal=True)
    _close("varlen qkvpacked", out, ref, same)
    _grads(out, (qkv,), ref, same)


@pytest.mark.parametrize("packed", [False, True])
def test_varlen_with_different_q_and_k_packings(packed):
    cu_q, cu_k = _cu([2, 1, 4]), _cu([9, 5, 4])  # chunked prefill: each sequence's queries are its last keys
    q = _randn(7, 4, 16, seed=11)
    kv = _randn(18, 2, 2, 16, seed=12)
    if packed:
        out = fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 4, 9, causal=True)
    else:
        out = fa.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_q, cu_k, 4, 9, causal=True)
    (ref, same), _ = _varlen_reference(q, kv[:, 0], kv[:, 1], cu_q, cu_k, causal=True)
    _close("varlen q != k packing", out, ref, same)
    _grads(out, (q, kv), ref, same)


def test_varlen_kvpacked_func_with_one_packing():
    cu = _cu([6, 3])
    q, kv = _randn(9, 2, 16, seed=13), _randn(9, 2, 1, 16, seed=14)
    out = fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 6, 6, causal=True)
    (ref, same), _ = _varlen_reference(q, kv[:, 0], kv[:, 1], cu, cu, causal=True)
    _close("varlen kvpacked", out, ref, same)


@pytest.mark.parametrize("backend", ["flash_v2", "naive"])
@pytest.mark.parametrize("as_int", [False, True])
def test_with_kvcache_appends_in_place_then_attends_to_the_valid_prefix(backend, as_int):
    B, Nmax, H, Hkv, D, Nnew = 3, 40, 4, 2, 16, 2
    gen = torch.Generator().manual_seed(15)
    k_cache, v_cache = torch.randn(B, Nmax, Hkv, D, generator=gen), torch.randn(B, Nmax, Hkv, D, generator=gen)
    before = (k_cache.clone(), v_cache.clone())
    k_new, v_new = torch.randn(B, Nnew, Hkv, D, generator=gen), torch.randn(B, Nnew, Hkv, D, generator=gen)
    q = torch.randn(B, Nnew, H, D, generator=gen)
    lengths = [17, 17, 17] if as_int else [17, 0, 31]
    seqlens = 17 if as_int else torch.tensor(lengths, dtype=torch.int32)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True,
                                          return_softmax_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (B, H, Nnew)
    for b, n in enumerate(lengths):
        # the new keys sit at n, n + 1; everything else in the cache is untouched
        assert torch.equal(k_cache[b, n:n + Nnew], k_new[b]) and torch.equal(v_cache[b, n:n + Nnew], v_new[b])
        for cache, old in zip((k_cache, v_cache), before):
            assert torch.equal(cache[b, :n], old[b, :n]) and torch.equal(cache[b, n + Nnew:], old[b, n + Nnew:])
        valid = n + Nnew
        (ref, ref_lse), (same, same_lse) = _both(q[b:b + 1], k_cache[b:b + 1, :valid], v_cache[b:b + 1, :valid],
                                                 causal=True, return_lse=True)
        _close(f"kvcache row {b}", out[b:b + 1], ref, same)
        _close(f"kvcache lse row {b}", lse[b:b + 1], ref_lse, same_lse)


def test_with_kvcache_long_query_chunk_and_whole_cache():
    # 20 queries > DECODE_MAX_SEQLEN_Q against one common length: flash_v2 on the prefix view.
    gen = torch.Generator().manual_seed(16)
    k_cache, v_cache = torch.randn(1, 64, 2, 16, generator=gen), torch.randn(1, 64, 2, 16, generator=gen)
    q = torch.randn(1, 20, 2, 16, generator=gen)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=45, causal=True, window_size=(8, 0))
    ref, same = _both(q, k_cache[:, :45], v_cache[:, :45], causal=True, window_size=(8, 0))
    _close("chunk", out, ref, same)
    out = fa.flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, num_splits=3)  # no lengths: the whole cache
    ref, same = _both(q[:, :1], k_cache, v_cache)
    _close("whole cache", out, ref, same)


def test_backend_selection():
    q, k, v = (_randn(1, 9, 2, 16, seed=s).detach() for s in (17, 18, 19))
    assert fa.current_backend() == fa.DEFAULT_BACKEND == "flash_v2"
    with fa.use_backend("naive"):
        assert fa.current_backend() == "naive"
        via_context = fa.flash_attn_func(q, k, v, causal=True)
    assert fa.current_backend() == "flash_v2"
    fa.set_backend("sdpa")
    try:
        via_setter = fa.flash_attn_func(q, k, v, causal=True)
    finally:
        fa.set_backend("flash_v2")
    via_keyword = fa.flash_attn_func(q, k, v, causal=True, backend="naive")
    ref, same = _both(q, k, v, causal=True)
    for out in (via_context, via_setter, via_keyword):
        _close("backend", out, ref, same)
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        fa.set_backend("flash3")


@pytest.mark.parametrize("call,name", [
    (lambda q, c: fa.flash_attn_varlen_func(q[0], q[0], q[0], c, c, 4, 4, block_table=c), "block_table"),
    (lambda q, c: fa.flash_attn_with_kvcache(q, q, q, rotary_cos=torch.ones(4, 8), rotary_sin=torch.ones(4, 8)),
     "rotary_cos, rotary_sin"),
    (lambda q, c: fa.flash_attn_with_kvcache(q, q, q, cache_batch_idx=torch.zeros(1, dtype=torch.int32)),
     "cache_batch_idx"),
    (lambda q, c: fa.flash_attn_with_kvcache(q, q, q, cache_leftpad=torch.zeros(1, dtype=torch.int32)),
     "cache_leftpad"),
    (lambda q, c: fa.flash_attn_with_kvcache(q, q, q, rotary_interleaved=False), "rotary_interleaved"),
])
def test_unimplemented_arguments_are_named(call, name):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(NotImplementedError, match=f"does not implement {name}"):
        call(q, torch.tensor([0, 4], dtype=torch.int32))


def test_kvcache_argument_errors():
    q, cache = torch.randn(1, 1, 2, 16), torch.zeros(1, 8, 2, 16)
    new = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="give cache_seqlens"):
        fa.flash_attn_with_kvcache(q, cache, cache.clone(), new, new)
    with pytest.raises(ValueError, match="exceed the cache's 8 positions"):
        fa.flash_attn_with_kvcache(q, cache, cache.clone(), new, new, cache_seqlens=8)
    with pytest.raises(ValueError, match="k and v must be given together"):
        fa.flash_attn_with_kvcache(q, cache, cache.clone(), new, None, cache_seqlens=0)
