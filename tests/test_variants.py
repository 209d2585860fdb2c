"""ALiBi, logit soft-capping and learnable attention sinks: every backend that has them
(registry features ``alibi``, ``softcap``, ``sinks``) against the float64 reference, alone
and combined with causal masks, windows, documents, GQA and Nq != Nk; outputs, logsumexp,
dq/dk/dv and d sink_logits; gradients deterministic; bad arguments named in one line."""

from __future__ import annotations

import pytest
import torch

from attention_checks import check_attention, features, make_qkv, packed_doc_ids
from fatrain.kernels import available_backends, backend_info, get_backend, reference_attention
from fatrain.kernels._common import alibi_slopes_for

VARIANTS = ("alibi", "softcap", "sinks")
# (name, shape (B, Nq, Nk, H, Hkv, D), variants, extra attention kwargs)
CASES = [
    ("alibi-causal", (2, 19, 19, 4, 4, 16), ("alibi",), dict(causal=True)),
    ("alibi-per-batch-unaligned", (2, 11, 23, 4, 2, 16), ("alibi-batch",), dict(causal=True)),
    ("softcap", (1, 21, 17, 2, 2, 32), ("softcap",), dict(causal=False)),
    ("sinks-gqa-window", (2, 25, 25, 4, 1, 16), ("sinks",), dict(causal=True, window_size=(6, 0))),
    ("all-docs", (2, 29, 29, 4, 2, 16), VARIANTS, dict(causal=True, docs=True)),
    ("all-empty-rows", (1, 13, 6, 2, 2, 16), VARIANTS, dict(causal=True)),
]


def variant_kwargs(variants, B, H, Nk, kw, device="cpu"):
    kwargs = dict(kw)
    if kwargs.pop("docs", False):
        kwargs["doc_ids"] = packed_doc_ids(B, Nk, device=device)
    if "alibi" in variants:
        kwargs["alibi_slopes"] = alibi_slopes_for(H).to(device)
    if "alibi-batch" in variants:
        kwargs["alibi_slopes"] = (torch.rand(B, H) * 0.5).to(device)
    if "softcap" in variants:
        kwargs["softcap"] = 2.5  # small enough that tanh bends the scores of unit-size inputs
    if "sinks" in variants:
        kwargs["sink_logits"] = torch.randn(H, device=device).requires_grad_()
    return kwargs


def _needs(variants):
    return {"alibi" if v.startswith("alibi") else v for v in variants}


def backends_with(variants, device="cpu"):
    return [b for b in available_backends(device=device) if _needs(variants) <= features(b, device)]


PARAMS = [pytest.param(name, case, shape, variants, kw, id=f"{name}-{case}")
          for case, shape, variants, kw in CASES for name in backends_with(variants)]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("name, case, shape, variants, kw", PARAMS)
def test_variant_matches_reference(name, case, shape, variants, kw):
    B, Nq, Nk, H, Hkv, D = shape
    dtype = torch.float32
    q, k, v = make_qkv(B, Nq, Nk, H, Hkv, D, dtype=dtype)
    kwargs = variant_kwargs(variants, B, H, Nk, kw)
    kwargs["return_lse"] = "return_lse" in features(name, "cpu")
    check_attention(get_backend(name), q, k, v, **kwargs)


def test_reference_variants_are_the_formulas():
    """The reference itself, on one row written out by hand."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 2, 8).double(), torch.randn(1, 5, 2, 8).double(), torch.randn(1, 5, 2, 8).double()
    slopes, sinks, cap = torch.tensor([0.5, 0.25]), torch.tensor([0.3, -1.0]), 2.0
    out, lse = reference_attention(q, k, v, causal=True, alibi_slopes=slopes, softcap=cap, sink_logits=sinks,
                                   return_lse=True)
    i, h = 1, 1  # query 1 sits at key position 1 + 5 - 3 = 3: sees keys 0..3
    s = (q[0, i, h] @ k[0, :4, h].T) * 8 ** -0.5
    s = cap * torch.tanh(s / cap) - 0.25 * (3 - torch.arange(4)).double()
    denom = s.exp().sum() + torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    torch.testing.assert_close(out[0, i, h], (s.exp() / denom) @ v[0, :4, h])
    torch.testing.assert_close(lse[0, h, i], denom.log())


def test_alibi_slopes_are_the_papers():
    torch.testing.assert_close(alibi_slopes_for(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8 of 2^-1..2^-8, then the odd terms of the 16-head sequence 2^-0.5, 2^-1.5, ...
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    torch.testing.assert_close(alibi_slopes_for(12), torch.tensor(expected))


@pytest.mark.parametrize("name", [b for b in backends_with(VARIANTS)])
def test_variant_gradients_are_deterministic(name):
    B, N, H, D = 2, 37, 4, 16
    q, k, v = make_qkv(B, N, N, H, 2, D, dtype=torch.float32, seed=3)
    kwargs = variant_kwargs(VARIANTS, B, H, N, dict(causal=True))
    attn = get_backend(name)
    dout = torch.randn(B, N, H, D)
    runs = [torch.autograd.grad(attn(q, k, v, **kwargs), (q, k, v, kwargs["sink_logits"]), dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must have shape \(nheads,\) = \(4,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), "alibi_slopes must be float32"),
    (dict(alibi_slopes=[0.5] * 4), "alibi_slopes must be a float32 tensor"),
    (dict(softcap=-1.0), "softcap must be a finite number >= 0"),
    (dict(softcap=float("inf")), "softcap must be a finite number >= 0"),
    (dict(sink_logits=torch.zeros(2, 4)), r"sink_logits must have shape \(nheads,\) = \(4,\)"),
    (dict(sink_logits=torch.zeros(4, dtype=torch.float16)), "sink_logits must be float32"),
])
@pytest.mark.parametrize("name", ["reference"] + backends_with(VARIANTS))
def test_bad_variant_arguments_name_the_argument(name, bad, match):
    q = torch.randn(2, 8, 4, 16)
    attn = reference_attention if name == "reference" else get_backend(name)
    with pytest.raises((ValueError, TypeError), match=match):
        attn(q, q, q, causal=True, **bad)


def test_every_variant_has_a_backend():
    for variant in VARIANTS:
        assert any(backend_info(b).supports(variant, "cpu") for b in available_backends()), variant
