"""ALiBi, soft-capping and sinks in flash_v2's other paths (the registry-driven cases of
tests/test_variants.py cover its plain call): dropout, the atomic-dQ backward and fixed
tiles, VARLEN mode (per-sequence slopes, sequences without keys), the decode kernel's
split-K and merge, flash-attn's ``alibi_slopes`` / ``softcap``, FlexAttention's score_mod;
against the float64 reference, gradients (d sink_logits too) bit-deterministic. GPU cases
in bfloat16 at head dims 64 and 128."""

from __future__ import annotations

import pytest
import torch

from attention_checks import check_attention, make_qkv, max_err, packed_doc_ids
from fatrain.kernels import flash_attn as fa
from fatrain.kernels import get_backend, reference_attention
from fatrain.kernels._common import alibi_slopes_for
from fatrain.kernels.decode import flash_decode
from fatrain.kernels.flash_v2 import flash_v2_varlen_attention

VARIANTS = ("alibi", "softcap", "sinks")


def variant_kwargs(variants, B, H, device="cpu", cap=2.5):
    kwargs = {}
    if "alibi" in variants:
        kwargs["alibi_slopes"] = alibi_slopes_for(H).to(device)
    if "alibi-batch" in variants:
        kwargs["alibi_slopes"] = (torch.rand(B, H) * 0.5).to(device)
    if "softcap" in variants:
        kwargs["softcap"] = cap
    if "sinks" in variants:
        kwargs["sink_logits"] = torch.randn(H, device=device).requires_grad_()
    return kwargs


# (id, shape (B, Nq, Nk, H, Hkv, D), dtype, variants, kwargs for both, kwargs for the kernel only)
DENSE = [
    ("dropout-all", (1, 19, 19, 2, 1, 16), torch.float32, ("alibi-batch", "softcap", "sinks"),
     dict(causal=True, dropout_p=0.2), dict(dropout_seed=7, return_dropout_mask=True)),
    ("atomic-dq-window", (1, 40, 40, 4, 1, 32), torch.float32, ("alibi", "softcap", "sinks"),
     dict(causal=True, window_size=(9, 0)), dict(deterministic=False)),
    ("fixed-tiles-fp16", (1, 37, 21, 2, 2, 16), torch.float16, ("softcap", "sinks"),
     dict(causal=False), dict(block_m=16, block_n=16)),
    # causal ALiBi's one-sided path (scores moved per row, statistics moved back) over many
    # query and key blocks, Nq != Nk, and the two-sided |.| path of a window right of the diagonal
    ("alibi-causal-many-blocks", (2, 70, 90, 2, 1, 16), torch.float32, ("alibi-batch", "sinks"),
     dict(causal=True), dict(block_m=16, block_n=16)),
    ("alibi-softcap-causal-many-blocks", (1, 53, 53, 2, 2, 16), torch.float32, ("alibi", "softcap"),
     dict(causal=True), dict(block_m=16, block_n=16)),
    ("alibi-window-both-sides", (1, 40, 40, 2, 2, 16), torch.float32, ("alibi", "softcap", "sinks"),
     dict(causal=False, window_size=(8, 5)), dict(block_m=16, block_n=16)),
]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("shape, dtype, variants, kw, kernel_kw", [c[1:] for c in DENSE], ids=[c[0] for c in DENSE])
def test_dense_paths_match_reference(shape, dtype, variants, kw, kernel_kw):
    B, Nq, Nk, H, Hkv, D = shape
    q, k, v = make_qkv(B, Nq, Nk, H, Hkv, D, dtype=dtype)
    check_attention(get_backend("flash_v2"), q, k, v, kernel_kwargs=kernel_kw, return_lse=True,
                    **variant_kwargs(variants, B, H), **kw)


def _varlen_reference(q, k, v, cu_q, cu_k, kwargs, upcast=True):
    """Each sequence alone through the reference (row b of (batch, nheads) slopes)."""
    outs, lses = [], []
    slopes = kwargs.get("alibi_slopes")
    for b in range(cu_q.numel() - 1):
        a, e, c, d = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
        if e == a:
            continue
        call = dict(kwargs)
        if slopes is not None and slopes.dim() == 2:
            call["alibi_slopes"] = slopes[b:b + 1]
        out, lse = reference_attention(q[None, a:e], k[None, c:d], v[None, c:d], return_lse=True, upcast=upcast,
                                       **call)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def test_varlen_variants_match_reference_and_are_deterministic():
    """Different q and k packings, an empty sequence, a sequence whose first rows see no key
    (Nq_b > Nk_b, causal: output 0, lse = sink), per-sequence slopes, GQA."""
    torch.manual_seed(0)
    cu_q = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 20, 37], dtype=torch.int32)
    H, Hkv, D = 2, 1, 16
    q = torch.randn(20, H, D, requires_grad=True)
    k = torch.randn(37, Hkv, D, requires_grad=True)
    v = torch.randn(37, Hkv, D, requires_grad=True)
    kwargs = dict(causal=True, softcap=3.0, alibi_slopes=torch.rand(4, H) * 0.5,
                  sink_logits=torch.randn(H, requires_grad=True))
    inputs = (q, k, v, kwargs["sink_logits"])
    out, lse = flash_v2_varlen_attention(q, k, v, cu_q, cu_k, 12, 17, return_lse=True, **kwargs)
    ref, ref_lse = _varlen_reference(q.double(), k.double(), v.double(), cu_q, cu_k, kwargs)
    assert max_err(out, ref) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    grads_ref = torch.autograd.grad(ref, inputs, dout.double())
    for name, g, r in zip(("dq", "dk", "dv", "d sink_logits"), grads, grads_ref):
        assert max_err(g, r) < 1e-4, name
    again = torch.autograd.grad(flash_v2_varlen_attention(q, k, v, cu_q, cu_k, 12, 17, **kwargs), inputs, dout)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)
    # rows 5..7 of sequence 2 (Nq_b = 12, Nk_b = 8) see no key: output 0, lse = the sink logit
    assert torch.equal(out[5:9], torch.zeros_like(out[5:9]))
    torch.testing.assert_close(lse[:, 5:9], kwargs["sink_logits"].detach()[:, None].expand(H, 4))


@pytest.mark.parametrize("variants, causal, window", [
    (("alibi-batch", "softcap", "sinks"), True, (-1, -1)),
    (("alibi", "sinks"), False, (17, -1)),
], ids=["all-causal", "alibi-sinks-window"])
def test_decode_variants_match_reference(variants, causal, window):
    """Split-K over per-sequence cache lengths (one with fewer keys than queries see), the sink
    added once in the merge: each split count gives the reference's output and logsumexp."""
    B, Nq, Nk, H, Hkv, D = 3, 3, 70, 4, 2, 16
    q, k, v = make_qkv(B, Nq, Nk, H, Hkv, D, dtype=torch.float32)
    seqlens = torch.tensor([70, 41, 2], dtype=torch.int32)
    kwargs = variant_kwargs(variants, B, H)
    kwargs.pop("sink_logits", None)
    if "sinks" in variants:
        kwargs["sink_logits"] = torch.randn(H)
    for splits in (1, 4):
        out, lse = flash_decode(q, k, v, cache_seqlens=seqlens, causal=causal, window_size=window,
                                num_splits=splits, return_lse=True, **kwargs)
        for b, n in enumerate(seqlens.tolist()):
            call = dict(kwargs)
            if call.get("alibi_slopes") is not None and call["alibi_slopes"].dim() == 2:
                call["alibi_slopes"] = call["alibi_slopes"][b:b + 1]
            ref, ref_lse = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal,
                                               window_size=window, return_lse=True, **call)
            assert max_err(out[b:b + 1], ref) < 1e-5 and max_err(lse[b:b + 1], ref_lse) < 1e-5, (splits, b)


def test_flash_attn_api_alibi_and_softcap():
    """flash-attn's alibi_slopes and softcap reach flash_v2 (dense, varlen and the KV cache's
    decode kernel); a backend without them names itself and the feature."""
    torch.manual_seed(1)
    q, k, v = make_qkv(2, 13, 21, 4, 2, 16, dtype=torch.float32)
    slopes = torch.rand(2, 4) * 0.5
    out = fa.flash_attn_func(q, k, v, causal=True, softcap=2.0, alibi_slopes=slopes)
    assert max_err(out, reference_attention(q, k, v, causal=True, softcap=2.0, alibi_slopes=slopes)) < 1e-5
    cu = torch.tensor([0, 8, 21], dtype=torch.int32)
    packed = torch.randn(21, 4, 16)
    out = fa.flash_attn_varlen_func(packed, packed, packed, cu, cu, 13, 13, causal=True, softcap=2.0,
                                    alibi_slopes=slopes)
    ref, _ = _varlen_reference(packed, packed, packed, cu, cu, dict(causal=True, softcap=2.0, alibi_slopes=slopes))
    assert max_err(out, ref) < 1e-5
    cache_k, cache_v = k.clone(), v.clone()
    lens = torch.tensor([21, 9], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q[:, :2], cache_k, cache_v, cache_seqlens=lens, causal=True, softcap=2.0,
                                     alibi_slopes=slopes[0])
    for b, n in enumerate(lens.tolist()):
        ref = reference_attention(q[b:b + 1, :2], k[b:b + 1, :n], v[b:b + 1, :n], causal=True, softcap=2.0,
                                  alibi_slopes=slopes[0])
        assert max_err(out[b:b + 1], ref) < 1e-5
    with pytest.raises(NotImplementedError, match="sdpa.*alibi"):
        fa.flash_attn_func(q, k, v, alibi_slopes=slopes, backend="sdpa")


def test_flex_score_mod_forward():
    """FlexAttention's eager forward (the CPU has no flex backward) with ALiBi and the soft-cap."""
    from fatrain.kernels.flex import flex_attention_backend

    q, k, v = (t.detach() for t in make_qkv(1, 20, 24, 4, 2, 16, dtype=torch.float32))
    kwargs = dict(causal=True, softcap=2.0, alibi_slopes=torch.rand(1, 4))
    out, lse = flex_attention_backend(q, k, v, return_lse=True, **kwargs)
    ref, ref_lse = reference_attention(q, k, v, return_lse=True, **kwargs)
    assert max_err(out, ref) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    with pytest.raises(NotImplementedError, match="flex.*sinks"):
        flex_attention_backend(q, k, v, sink_logits=torch.zeros(4))


@pytest.mark.parametrize("call, match", [
    (lambda q, c: flash_v2_varlen_attention(q[0], q[0], q[0], c, c, 8, 8, alibi_slopes=torch.ones(3, 4)),
     r"alibi_slopes must have shape \(nheads,\) = \(4,\) or \(batch, nheads\) = \(1, 4\)"),
    (lambda q, c: flash_v2_varlen_attention(q[0], q[0], q[0], c, c, 8, 8, softcap=-2.0),
     "softcap must be a finite number >= 0"),
    (lambda q, c: flash_decode(q, q, q, sink_logits=torch.zeros(4, dtype=torch.float64)),
     "sink_logits must be float32"),
    (lambda q, c: flash_decode(q, q, q, alibi_slopes=torch.ones(2)), r"alibi_slopes must have shape"),
])
def test_bad_variant_arguments_in_varlen_and_decode(call, match):
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match=match):
        call(q, torch.tensor([0, 8], dtype=torch.int32))


# ----------------------------------------------------------------------------------------
# GPU: bfloat16 at the head dims of the benchmarks, TMA and pointer paths
# ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("variants, kw", [
    (("alibi",), dict(causal=True)),
    (("softcap",), dict(causal=True)),
    (("sinks",), dict(causal=True)),
    (VARIANTS, dict(causal=True, docs=True)),
    (("alibi-batch", "softcap", "sinks"), dict(causal=False, window_size=(300, 200))),
], ids=["alibi", "softcap", "sinks", "all-docs", "all-window"])
def test_gpu_bf16_variants(D, variants, kw):
    B, N, H, Hkv = 2, 1000, 8, 2
    q, k, v = make_qkv(B, N, N, H, Hkv, D, dtype=torch.bfloat16, device="cuda")
    kw = dict(kw)
    if kw.pop("docs", False):
        kw["doc_ids"] = packed_doc_ids(B, N, device="cuda")
    check_attention(get_backend("flash_v2"), q, k, v, return_lse=True,
                    **variant_kwargs(variants, B, H, device="cuda", cap=20.0), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_variants_atomic_strided_and_deterministic(D):
    """deterministic=False (the copy engine's dQ reduce-add) and strided inputs (the pointer
    path); the default backward bit-identical on two runs, d sink_logits included."""
    B, N, H, Hkv = 1, 2048, 4, 4
    q, k, v = make_qkv(B, N, N, H, Hkv, D, dtype=torch.bfloat16, device="cuda", strided=True)
    kwargs = variant_kwargs(VARIANTS, B, H, device="cuda", cap=20.0)
    attn = get_backend("flash_v2")
    check_attention(attn, q, k, v, kernel_kwargs=dict(deterministic=False), causal=True, **kwargs)
    dout = torch.randn(B, N, H, D, dtype=torch.bfloat16, device="cuda")
    inputs = (q, k, v, kwargs["sink_logits"])
    runs = [torch.autograd.grad(attn(q, k, v, causal=True, **kwargs), inputs, dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_decode_and_varlen_variants():
    q, k, v = make_qkv(4, 1, 8192, 16, 2, 128, dtype=torch.bfloat16, device="cuda")
    kwargs = dict(alibi_slopes=alibi_slopes_for(16).cuda(), softcap=20.0, sink_logits=torch.randn(16, device="cuda"))
    lens = torch.tensor([8192, 5000, 17, 1], dtype=torch.int32, device="cuda")
    out = flash_decode(q, k, v, cache_seqlens=lens, causal=True, **kwargs)
    for b, n in enumerate(lens.tolist()):
        ref = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True, **kwargs)
        same = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True, upcast=False, **kwargs)
        assert max_err(out[b:b + 1], ref) <= 2 * max_err(same, ref) + 2 * 2.0 ** -7
    cu = torch.tensor([0, 700, 2000, 2001], dtype=torch.int32, device="cuda")
    qv, kv, vv = (t[0, :2001].contiguous() for t in make_qkv(1, 2001, 2001, 8, 2, 64, dtype=torch.bfloat16,
                                                              device="cuda"))
    vkw = dict(causal=True, alibi_slopes=alibi_slopes_for(8).cuda(), softcap=20.0,
               sink_logits=torch.randn(8, device="cuda"))
    out = flash_v2_varlen_attention(qv, kv, vv, cu, cu, 1300, 1300, **vkw)
    ref, _ = _varlen_reference(qv.double(), kv.double(), vv.double(), cu, cu, vkw)
    same, _ = _varlen_reference(qv, kv, vv, cu, cu, vkw, upcast=False)
    assert max_err(out, ref) <= 2 * max_err(same, ref) + 2 * 2.0 ** -7


def test_bench_variant_cases_and_sdpa_bias():
    """bench's variant axis adds one case per variant on the sweep's baseline features, and the
    SDPA-with-bias call it times for ALiBi computes ALiBi."""
    from omegaconf import OmegaConf

    from fatrain.bench.cases import make_cases, sdpa_alibi_bias_call
    from fatrain.bench.sweep import make_call

    cfg = OmegaConf.create(dict(dtypes=["fp32"], headdims=[16], causal=[True], windows=[-1, 8], doc_lens=[0],
                                dropout_ps=[0.0, 0.1], variants=["none", "alibi", "sinks"], seqlens=[32],
                                tokens_per_batch=64, hidden=32))
    cases = make_cases(cfg)
    assert sorted((c.window, c.dropout_p, c.variant) for c in cases) == sorted(
        [(-1, 0.0, "none"), (-1, 0.1, "none"), (8, 0.0, "none"), (8, 0.1, "none"), (-1, 0.0, "alibi"),
         (-1, 0.0, "sinks")])
    alibi = next(c for c in cases if c.variant == "alibi")
    q, k, v = (t.detach() for t in make_qkv(alibi.batch, 32, 32, alibi.nheads, alibi.nheads, 16, dtype=torch.float32))
    ref = reference_attention(q, k, v, causal=True, alibi_slopes=alibi_slopes_for(alibi.nheads))
    assert max_err(sdpa_alibi_bias_call(q, k, v, alibi)(), ref) < 1e-5
    assert max_err(make_call(get_backend("flash_v2"), q, k, v, alibi, None, "flash_v2")(), ref) < 1e-5


def test_variant_kernels_compile_for_sm90(tmp_path):
    """The variants' kernels (ALiBi, soft-cap with tanh.approx, sinks, all on; tensor-descriptor
    tiles) compile for an H100, and each loaded step still waits once for its two tiles."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton install has no NVIDIA backend (ptxas)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tag = "d=128 MASK_RIGHT+HAS_ALIBI+HAS_SOFTCAP+HAS_SINKS+FAST_TANH tma"
    only = [f"v2 fwd {tag} 128x64 w8", f"v2 dq {tag} 128x32 w4", f"v2 dkdv {tag} 32x128 w8"]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "compile_check.py"), "--only", *only],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    waits = {line.split()[2]: int(line.split("tma_waits=")[1].split()[0])
             for line in res.stdout.splitlines() if line.startswith("ok ") and "tma_waits=" in line}
    assert waits.pop("dkdv", None) in (2, 3, 4) and waits == {"fwd": 2, "dq": 2}, out[-4000:]
