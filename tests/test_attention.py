"""The kernel test matrix: every registered backend against the float64 reference.

One parametrised test over backend x dtype x causal x (B, Nq, Nk, H, Hkv, D) x feature,
outputs and gradients, with flash-attention's rule (``attention_checks``): the backend's
error is at most 2x (3x for gradients) PyTorch's own error at the same dtype. Which cases a
backend gets comes only from its registry entry (``backend_info(name)``: ``features``,
``dtypes``, ``head_dims``, ``devices``, ``triton``), so a new backend is tested by adding its
registry line. On the CPU the Triton backends run through the interpreter: float32 and
float16 only (bfloat16 is wrong there) and small shapes; the GPU-marked cases add bfloat16
and long sequences. Inputs are fresh random numbers per case, and ``torch.empty`` (which
the flash kernels allocate their outputs with) returns NaN-filled memory, so an element a
kernel forgets to write fails the comparison.

Beside the matrix: a backend lacking a feature raises NotImplementedError naming itself and
the feature; packed documents equal each document alone; non-contiguous inputs; the
variants' smoke slice; the registry and the argument checks every backend shares.
Dropout's stream and the varlen interface have their own files (test_dropout.py,
test_varlen.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attention_checks import (check_attention, dtypes, features, make_qkv, max_err,
                              packed_doc_ids, unsorted_doc_ids)
from fatrain.kernels import (FEATURES, MASKED_ROW_LSE, available_backends, backend_info, check_options,
                             get_backend)
from fatrain.kernels._common import allowed_mask
from fatrain.kernels._dropout import dropout_mask

SEED = 1234
DROPOUT_P = 0.3


@dataclasses.dataclass(frozen=True)
class Case:
    """One feature on one shape; ``needs`` comes from the case itself (see ``needs``)."""

    feature: str
    shape: tuple[int, int, int, int, int, int]  # (B, Nq, Nk, H, Hkv, D)
    window: tuple[int, int] = (-1, -1)
    docs: str | None = None  # "packed" (non-decreasing ids) or "unsorted"
    dropout: bool = False
    lse: bool = False
    causal: tuple[bool, ...] = (False, True)

    def needs(self, causal: bool) -> set[str]:
        B, Nq, Nk, H, Hkv, D = self.shape
        need = set()
        if Hkv < H:
            need.add("gqa")
        if causal and Nq != Nk:
            need.add("unaligned_causal")
        if self.window != (-1, -1):
            need.add("window")
        if self.docs:
            need.add("doc_ids")
        if self.dropout:
            need.add("dropout")
        if self.lse:
            need.add("return_lse")
        return need


# Awkward sizes: 1, 17, 97, Nq != Nk both ways (with causal: rows that see no key), head dims
# 16 / 64 / 80, GQA and MQA. At most 97 tokens: the interpreter runs the Triton backends.
CPU_CASES = [
    *(Case("plain", s) for s in [(1, 1, 1, 2, 2, 16), (2, 17, 17, 2, 2, 16), (1, 97, 97, 1, 1, 64),
                                 (1, 33, 70, 1, 1, 80), (1, 70, 33, 1, 1, 64), (2, 1, 40, 2, 2, 16)]),
    Case("gqa", (1, 45, 45, 4, 1, 16)),
    Case("gqa", (1, 37, 51, 4, 2, 64)),
    Case("gqa", (1, 33, 7, 6, 3, 8)),  # head dim 8: only backends whose head_dims allow it
    Case("unaligned_causal", (1, 53, 29, 2, 2, 16), causal=(True,)),
    Case("unaligned_causal", (1, 29, 53, 2, 2, 80), causal=(True,)),
    Case("unaligned_causal", (2, 1, 37, 4, 2, 16), causal=(True,)),  # one decoding step: sees every key
    Case("window", (1, 37, 37, 2, 2, 16), window=(7, 3)),
    Case("window", (1, 45, 61, 1, 1, 64), window=(4, -1)),
    Case("window", (1, 53, 29, 2, 2, 16), window=(3, 12), causal=(True,)),
    Case("doc_ids", (2, 40, 40, 2, 2, 16), docs="packed"),
    Case("doc_ids", (1, 41, 57, 1, 1, 80), docs="packed"),
    Case("doc_ids_unsorted", (1, 45, 70, 2, 1, 16), docs="unsorted"),
    Case("return_lse", (1, 9, 4, 2, 2, 16), lse=True),
    Case("return_lse", (1, 70, 33, 1, 1, 64), lse=True),
    Case("return_lse", (1, 33, 70, 2, 2, 16), lse=True, causal=(True,)),
    Case("docs+window", (1, 41, 57, 2, 2, 16), window=(6, 0), docs="packed"),
    Case("docs+window", (1, 40, 40, 2, 2, 16), window=(3, 3), docs="packed", causal=(False,)),
    Case("dropout", (2, 24, 24, 2, 2, 16), dropout=True),
    Case("dropout", (1, 37, 51, 1, 1, 64), dropout=True, causal=(True,)),
    Case("dropout", (1, 41, 23, 2, 2, 16), dropout=True, causal=(True,)),
    Case("dropout+docs+window", (1, 43, 43, 2, 1, 16), window=(6, 4), docs="packed", dropout=True),
    Case("dropout+window+lse", (1, 40, 20, 2, 1, 16), window=(3, 0), dropout=True, lse=True, causal=(True,)),
    Case("dropout+docs+window+lse", (1, 29, 40, 2, 1, 16), window=(9, 0), docs="packed", dropout=True, lse=True,
         causal=(True,)),
]

GPU_CASES = [
    *(Case("plain", s) for s in [(2, 1025, 1025, 4, 1, 64), (1, 2048, 2048, 4, 4, 128), (1, 513, 1500, 8, 2, 96),
                                 (1, 1500, 513, 4, 2, 80), (1, 300, 300, 2, 1, 256), (3, 77, 77, 4, 4, 32),
                                 (1, 1, 1000, 4, 4, 64)]),
    Case("window", (2, 1000, 1100, 4, 2, 64), window=(256, 0)),
    Case("window", (1, 1000, 1100, 4, 2, 64), window=(100, 50), causal=(False,)),
    Case("doc_ids", (2, 1024, 1100, 4, 2, 64), docs="packed"),
    Case("doc_ids_unsorted", (1, 300, 400, 2, 1, 64), docs="unsorted"),
    Case("return_lse", (1, 2049, 1000, 2, 2, 128), lse=True),
    Case("docs+window", (2, 2048, 2048, 4, 2, 128), window=(256, 0), docs="packed", causal=(True,)),
    Case("dropout", (2, 1024, 1100, 4, 2, 64), dropout=True),
    Case("dropout+docs+window", (2, 1000, 1000, 4, 2, 64), window=(256, 0), docs="packed", dropout=True,
         causal=(True,)),
]


def _short(dtype):
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def _gpu_dtypes(name):
    have = dtypes(name, "cuda")
    return [torch.bfloat16] if torch.bfloat16 in have else have[:1]


def matrix(cases, device, names):
    """pytest params (name, device, dtype, causal, case) for every case the registry allows. On
    CUDA only the backend's lowest-precision dtype (bfloat16 where it has it): float16 and
    float32 go through the same kernels exactly on the CPU, bfloat16 only on a GPU."""
    params = []
    for name in names:
        info = backend_info(name)
        if device not in info.devices:
            continue
        have = features(name, device)
        lo, hi = info.head_dims
        for case in cases:
            if not lo <= case.shape[-1] <= hi:
                continue
            for causal in case.causal:
                if not case.needs(causal) <= have:
                    continue
                for dtype in (dtypes(name, device) if device == "cpu" else _gpu_dtypes(name)):
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    shape = "x".join(map(str, case.shape))
                    params.append(pytest.param(name, device, dtype, causal, case, marks=marks, id=(
                        f"{name}-{device}-{_short(dtype)}-{'causal' if causal else 'full'}-{case.feature}-{shape}")))
    return params


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty and torch.empty_like (which the flash kernels' outputs come from) return
    NaN-filled memory, so an element left unwritten is NaN and fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def case_kwargs(case, causal, B, Nk, device):
    kwargs = dict(causal=causal, window_size=case.window)
    if case.docs == "packed":
        # Short rows: about five documents, the last of one token; long rows: one per ~250 tokens.
        kwargs["doc_ids"] = packed_doc_ids(B, Nk, device=device) if Nk < 200 else \
            torch.cumsum(torch.rand(B, Nk, device=device) < 0.004, dim=1)
    elif case.docs == "unsorted":
        kwargs["doc_ids"] = unsorted_doc_ids(B, Nk, device=device)
    if case.lse:
        kwargs["return_lse"] = True
    return kwargs


def empty_rows(Nq, Nk, kwargs, device):
    """Bool (Nq,) or (B, Nq): the rows that see no key."""
    return ~allowed_mask(Nq, Nk, causal=kwargs["causal"], window_size=kwargs["window_size"],
                         doc_ids=kwargs.get("doc_ids"), device=device).any(-1)


def _rows(x, rows):
    """x (B, Nq, ...) at the rows ``rows`` marks, (Nq,) or (B, Nq)."""
    return x[:, rows] if rows.dim() == 1 else x[rows]


def check_case(name, device, dtype, causal, case):
    B, Nq, Nk, H, Hkv, D = case.shape
    q, k, v = make_qkv(B, Nq, Nk, H, Hkv, D, dtype=dtype, device=device)
    kwargs = case_kwargs(case, causal, B, Nk, device)
    attn = get_backend(name)
    if case.dropout and "dropout_seed" not in features(name, device):
        check_dropout_without_mask(attn, q, k, v, kwargs)
        return
    kernel_kwargs = {}
    if case.dropout:
        kwargs["dropout_p"] = DROPOUT_P
        kernel_kwargs = dict(dropout_seed=SEED, return_dropout_mask=True)
    out, lse, mask = check_attention(attn, q, k, v, kernel_kwargs=kernel_kwargs, **kwargs)
    if case.dropout:
        # The counter-based mask: the one fatrain.kernels._dropout documents, whatever the backend.
        assert mask.dtype == torch.bool and torch.equal(mask, dropout_mask(SEED, B, H, Nq, Nk, DROPOUT_P, device))
    rows = empty_rows(Nq, Nk, kwargs, device)
    assert torch.equal(_rows(out, rows), torch.zeros_like(_rows(out, rows))), "rows that see no key must be zeros"
    if lse is not None:
        assert (_rows(lse.transpose(1, 2), rows) == MASKED_ROW_LSE).all()


def check_dropout_without_mask(attn, q, k, v, kwargs):
    """Dropout drawn from torch's generator (no dropout_seed): reproducible under
    torch.manual_seed, different from no dropout, finite with finite gradients. (Its keep
    rate and scaling: test_dropout.py.)"""
    torch.manual_seed(SEED)
    out = attn(q, k, v, dropout_p=DROPOUT_P, **kwargs)
    torch.manual_seed(SEED)
    again = attn(q, k, v, dropout_p=DROPOUT_P, **kwargs)
    assert torch.equal(out, again)
    assert torch.isfinite(out).all() and max_err(out, attn(q, k, v, **kwargs)) > 1e-3
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over poisoned memory
@pytest.mark.parametrize("name, device, dtype, causal, case",
                         matrix(CPU_CASES, "cpu", available_backends())
                         + matrix(GPU_CASES, "cuda", available_backends()))
def test_matches_reference(poisoned_empty, name, device, dtype, causal, case):
    check_case(name, device, dtype, causal, case)


# The variants (a backend run with fixed options) share their base's kernels: a smoke slice.
VARIANT_CASES = [Case("plain", (1, 33, 45, 2, 2, 16)), Case("gqa", (1, 37, 37, 4, 1, 64), causal=(True,)),
                 Case("dropout+docs+window", (1, 43, 43, 4, 2, 16), window=(6, 4), docs="packed", dropout=True,
                      causal=(True,))]
VARIANTS = [b for b in available_backends(variants=True) if backend_info(b).variant_of is not None]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("name, device, dtype, causal, case",
                         [p for p in matrix(VARIANT_CASES, "cpu", VARIANTS) if p.values[2] == torch.float32])
def test_variants_match_reference(poisoned_empty, name, device, dtype, causal, case):
    check_case(name, device, dtype, causal, case)


def test_every_backend_gets_cases():
    """A registered backend that runs on the CPU is in the matrix, with plain cases in every
    dtype the registry gives it there."""
    params = matrix(CPU_CASES, "cpu", available_backends())
    for name in available_backends(device="cpu"):
        mine = [p.values for p in params if p.values[0] == name]
        assert {v[2] for v in mine if v[4].feature == "plain"} == set(dtypes(name, "cpu")), name


# ------------------------------------------------------------------------- missing features


def _feature_calls(feature):
    """Calls that use ``feature`` and nothing else the registry names: (kwargs, match)."""
    q = torch.randn(1, 8, 4, 16)
    small = torch.randn(1, 5, 4, 16)
    plain = dict(q=q, k=q, v=q)
    calls = {
        "window": [(dict(plain, window_size=(2, 0)), "window")],
        "doc_ids": [(dict(plain, doc_ids=torch.zeros(1, 8, dtype=torch.long)), "doc_ids")],
        "gqa": [(dict(plain, k=q[:, :, :2], v=q[:, :, :2]), "gqa|key/value heads")],
        "unaligned_causal": [(dict(plain, k=small, v=small, causal=True), "causal")],
        "dropout": [(dict(plain, dropout_p=0.1), "dropout")],
        "dropout_seed": [(dict(plain, dropout_p=0.1, dropout_seed=3), "dropout_seed"),
                         (dict(plain, return_dropout_mask=True), "return_dropout_mask")],
        "return_lse": [(dict(plain, return_lse=True), "return_lse")],
        "alibi": [(dict(plain, alibi_slopes=torch.full((4,), 0.5)), "alibi")],
        "softcap": [(dict(plain, softcap=5.0), "softcap")],
        "sinks": [(dict(plain, sink_logits=torch.zeros(4)), "sink")],
    }
    return calls[feature]


MISSING = [(name, feature) for name in available_backends(variants=True, device="cpu")
           for feature in FEATURES if feature not in features(name, "cpu")]


@pytest.mark.parametrize("name, feature", MISSING, ids=[f"{n}-{f}" for n, f in MISSING])
def test_missing_feature_raises_naming_backend_and_feature(name, feature):
    attn = get_backend(name)
    named = backend_info(name).variant_of or name  # a variant's kernels name their base backend
    for kwargs, match in _feature_calls(feature):
        kwargs = dict(kwargs)
        q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
        with pytest.raises(NotImplementedError, match=f"'({name}|{named})'.*({match})"):
            attn(q, k, v, **kwargs)


def test_features_are_known_names():
    for name in available_backends(variants=True):
        assert backend_info(name).features <= set(FEATURES), name
    with pytest.raises(ValueError, match="unknown attention feature 'windows'"):
        backend_info("naive").supports("windows")


# ------------------------------------------------------------------------ documents, strides


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 0))],
                         ids=["causal", "full", "causal-window"])
@pytest.mark.parametrize("name", [b for b in available_backends(device="cpu") if "doc_ids" in features(b, "cpu")])
def test_packed_documents_equal_each_document_alone(name, causal, window):
    lengths = [5, 23, 1, 17]
    N = sum(lengths)
    q, k, v = make_qkv(1, N, N, 4, 2 if "gqa" in features(name, "cpu") else 4, 16, dtype=torch.float32)
    if window != (-1, -1) and "window" not in features(name, "cpu"):
        pytest.skip(f"{name} has no window")
    attn = get_backend(name)
    packed = attn(q, k, v, causal=causal, window_size=window, doc_ids=packed_doc_ids(1, N, lengths))
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = attn(q[:, s], k[:, s], v[:, s], causal=causal, window_size=window)
        assert max_err(packed[:, s], alone) < 1e-5, f"document at {start}:{start + length}"
        start += length


STRIDED = [Case("strided", (2, 17, 33, 4, 2, 16)), Case("strided", (1, 70, 50, 2, 1, 80))]


def _strided_params():
    return [p for p in matrix(STRIDED, "cpu", available_backends()) if p.values[2] == torch.float32]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("name, device, dtype, causal, case", _strided_params())
def test_non_contiguous_inputs(poisoned_empty, name, device, dtype, causal, case):
    q, k, v = make_qkv(*case.shape, dtype=dtype, strided=True)
    assert not (q.is_contiguous() or v.is_contiguous())  # k too, where nheads_k > 1
    check_attention(get_backend(name), q, k, v, causal=causal, softmax_scale=0.3)


# ------------------------------------------------------------------- registry and arguments


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="unknown attention backend 'flash_v3' .*valid: .*flash_v2.*naive"):
        get_backend("flash_v3")
    with pytest.raises(ValueError, match="valid: .*flash_v2_atomic"):
        backend_info("flash_v3")
    assert {"naive", "sdpa", "flash_v1", "flash_v2"} <= set(available_backends())
    assert not set(VARIANTS) & set(available_backends())
    assert set(available_backends(device="cpu")) <= set(available_backends())


def test_options_are_checked_against_the_registry():
    first = next(b for b in available_backends() if backend_info(b).options)
    option = backend_info(first).options[0]
    assert check_options(first, {option: None}) == {}
    lacking = next(b for b in available_backends() if option not in backend_info(b).options)
    with pytest.raises(ValueError, match=f"attention.{option} is used only by .*{first}.*not by attention.backend="
                                         f"{lacking}"):
        check_options(lacking, {option: 1})
    with pytest.raises(ValueError, match="is not an option of any backend"):
        check_options(first, {"no_such_option": 1})


CPU_BACKENDS = available_backends(device="cpu")


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)), "multiple of the number of key/value heads"),
    (dict(q=torch.randn(2, 8, 4)), "q must have 4 dims"),
    (dict(v=torch.randn(2, 8, 2, 16, dtype=torch.float16)), "share one dtype"),
    (dict(k=torch.randn(3, 8, 2, 16), v=torch.randn(3, 8, 2, 16)), "same batch size"),
    (dict(k=torch.randn(2, 9, 2, 16)), "k and v must have the same shape"),
    (dict(dropout_p=1.5), "dropout_p"),
    (dict(window_size=(-3, 0)), "window_size"),
    (dict(window_size=(4,)), "window_size"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(doc_ids=torch.zeros(2, 8)), "doc_ids must hold integers"),
    (dict(doc_ids=torch.zeros(2, 7, dtype=torch.long)), "doc_ids must be an integer tensor of shape"),
    (dict(q=torch.randn(2, 9, 4, 16), doc_ids=torch.zeros(2, 8, dtype=torch.long)),
     "doc_ids need seqlen_q <= seqlen_k"),
    (dict(dropout_p=0.1, dropout_seed=-2), "dropout_seed"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_names_the_argument(name, bad, match):
    """Every backend validates through the same checks: one message whatever the backend."""
    args = dict(q=torch.randn(2, 8, 4, 16), k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    have = features(name, "cpu")
    if "doc_ids" in args and "doc_ids" not in have or "dropout_seed" in args and "dropout_seed" not in have:
        pytest.skip(f"{name} has no {'doc_ids' if 'doc_ids' in args else 'dropout_seed'}")
    with pytest.raises(ValueError, match=match):
        get_backend(name)(q, k, v, **args)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_head_dims_and_dtypes_outside_the_registry_are_refused(name):
    info = backend_info(name)
    lo, hi = info.head_dims
    for d in (lo // 2, hi * 2):
        if d < 1 or d > 1024:
            continue
        x = torch.randn(1, 4, 2, d)
        with pytest.raises(ValueError, match=rf"head_dim {d} is not supported by {name} \(supported: {lo}..{hi}\)"):
            get_backend(name)(x, x, x)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        if str(dtype).replace("torch.", "") in info.dtypes_on("cpu"):
            continue
        x = torch.randn(1, 4, 2, max(lo, 16), dtype=dtype)
        with pytest.raises(ValueError, match=f"dtype {str(dtype).replace('torch.', '')} is not supported by {name}"):
            get_backend(name)(x, x, x)
