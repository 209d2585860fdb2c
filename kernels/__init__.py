"""The attention registry: backend name -> one attention function, one signature for all,
and a description of what each backend accepts.

    attention(q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, window_size=(-1, -1),
              doc_ids=None, return_lse=False, dropout_seed=None, return_dropout_mask=False,
              alibi_slopes=None, softcap=0.0, sink_logits=None, **options)

Arguments:
    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with
        nheads % nheads_k == 0 (GQA/MQA read in place, no copy of K or V). Any strides.
    causal: the mask is aligned to the bottom-right corner when seqlen_q != seqlen_k:
            seqlen_q=2, seqlen_k=5         seqlen_q=5, seqlen_k=2
                1 1 1 1 0                      0 0
                1 1 1 1 1                      0 0
                                               0 0
                                               1 0
                                               1 1
        (a row of zeros attends to nothing and returns zeros)
    softmax_scale: a finite number > 0; defaults to 1 / sqrt(headdim). S is formed in
        float32 (or the input dtype), so a scale that takes |S| past float32's range overflows
        (NaN output) like any float32 softmax; see _common.default_scale
    dropout_p: dropout on P; kept entries are scaled by 1 / (1 - dropout_p). The backends
        with the ``dropout_seed`` feature draw the counter-based mask of ``_dropout.py``, so
        one seed gives one mask in all of them and the backward regenerates it.
    window_size: (left, right); -1 means infinite. Query i, at key position
        pos = i + seqlen_k - seqlen_q, sees keys in [pos - left, pos + right]; causal sets
        right = 0.
    doc_ids: optional (batch, seqlen_k) integers; a query sees only keys of its own
        document (query i has the document of key i + seqlen_k - seqlen_q, so
        seqlen_q <= seqlen_k). Any ids are correct; non-decreasing ids (packed documents)
        let the flash kernels skip the block pairs between documents.
    return_lse: also return the float32 logsumexp of each row, (batch, nheads, seqlen_q);
        rows that see no key get MASKED_ROW_LSE
    dropout_seed: seed of the dropout mask; None draws one from torch's default generator
    return_dropout_mask: also return the bool (batch, nheads, seqlen_q, seqlen_k) keep-mask
        that was used (all True when dropout_p = 0); materialised: small shapes only
    alibi_slopes: optional float32 (nheads,) or (batch, nheads): key j gets the bias
        -slope * |i + seqlen_k - seqlen_q - j| in query i's row (flash-attn's ALiBi), added
        to the scaled (and soft-capped) scores
    softcap: 0 (off) or a number > 0: the scaled scores become softcap * tanh(s / softcap)
        (Gemma 2's logit soft-capping), the gradients flow through the tanh
    sink_logits: optional float32 (nheads,), differentiable: exp(sink_h) joins each row's
        softmax denominator with no value (gpt-oss's learnable attention sinks); the
        logsumexp returned includes it, and a row that sees no key gets lse = sink_h
    options: the backend's own tuning keywords, listed in its ``BackendInfo.options``
        (block sizes, num_splits, deterministic, ...); see the backend's function.
Returns:
    out (batch, seqlen_q, nheads, headdim) in q's dtype [, lse] [, dropout_mask]

Every backend gives the same answer to within floating-point error, and one that lacks a
feature raises an error naming itself and the feature. ``backend_info(name)`` says what a
backend accepts, so the trainer, the entry points and the bench ask the registry instead of
naming backends: a new backend is one ``BackendInfo`` below plus its module. Backends import
lazily, so asking for ``naive`` never imports Triton (its dropout does: the counter-based
mask of ``_dropout.py`` is shared with the flash kernels). Packed sequences in flash-attn's
varlen layout go through ``varlen.varlen_attention``. Each backend's function documents only
its own options and limits; flash_v2's autotuned configs are listed and pinned through
``flash_v2.configs`` and ``flash_v2.pin``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping, Optional

from ._common import MASKED_ROW_LSE
from .reference import reference_attention

#: Features a backend may have (``BackendInfo.features``):
#:   window         window_size other than (-1, -1)
#:   doc_ids        per-token document ids (and so the varlen interface)
#:   gqa            nheads_k < nheads
#:   unaligned_causal  causal with seqlen_q != seqlen_k (bottom-right alignment)
#:   dropout        dropout_p > 0
#:   dropout_seed   the counter-based dropout mask: dropout_seed and return_dropout_mask
#:   return_lse     the logsumexp of each row
#:   alibi          alibi_slopes: the bias -slope * |i + seqlen_k - seqlen_q - j| (flash-attn's)
#:   softcap        softcap > 0: scores become softcap * tanh(scores / softcap) before the softmax
#:   sinks          sink_logits: one learnable logit per head in each row's softmax denominator
#:                  (gpt-oss's attention sinks), with its gradient
FEATURES = ("window", "doc_ids", "gqa", "unaligned_causal", "dropout", "dropout_seed", "return_lse", "alibi",
            "softcap", "sinks")

_ALL = frozenset(FEATURES)
_VARIANTS = frozenset({"alibi", "softcap", "sinks"})
_FLASH = _ALL - _VARIANTS
_SDPA = frozenset({"window", "doc_ids", "gqa", "unaligned_causal", "dropout"})
# NOTE: windows, documents and causal with seqlen_q != seqlen_k reach SDPA as an explicit mask,
# which PyTorch's flash and cuDNN kernels on CUDA do not take.
_SDPA_NO_MASK = frozenset({"gqa", "dropout"})
# NOTE: PyTorch's flash kernel takes dropout on CUDA, and there only float16 and bfloat16 and head
# dims up to 256; its CPU version takes every dtype and an explicit mask but no dropout (on_cpu).
_HALF = ("float16", "bfloat16")
# NOTE: FlexAttention has no dropout, and no backward on the CPU (its eager forward runs there,
# which tests/test_flex.py checks): registered for CUDA.
_FLEX = frozenset({"window", "doc_ids", "gqa", "unaligned_causal", "return_lse", "alibi", "softcap"})


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What one registered backend is and accepts."""

    name: str
    summary: str
    module: str  # the module under fatrain.kernels that holds the function
    function: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keywords every call gets
    options: tuple[str, ...] = ()  # the backend's own tuning keywords (attention.<option> in configs)
    triton: bool = False  # runs Triton kernels: on a CPU through the interpreter, where bf16 is wrong
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    head_dims: tuple[int, int] = (1, 1 << 30)
    features: frozenset = _ALL
    devices: tuple[str, ...] = ("cpu", "cuda")
    # Where the CPU differs from the fields above (which state CUDA's limits): "dtypes", "features".
    on_cpu: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    variant_of: Optional[str] = None  # a backend run with fixed options, for benchmarks and ablations
    run_info: Optional[str] = None  # function(seq_len) of the module: what a run records of it (autotune picks)
    # function of the module: (do, q, k, v, out, lse, *, causal, softmax_scale, window_size, doc_ids,
    # **options) -> (dq, dk, dv), the recompute backward with the forward's out and lse given
    # (get_backward; ring attention calls it with the merged out and lse); None: not exposed.
    backward: Optional[str] = None

    def supports(self, feature: str, device: str = "cuda") -> bool:
        if feature not in FEATURES:
            raise ValueError(f"unknown attention feature '{feature}' (valid: {', '.join(FEATURES)})")
        return feature in self.features_on(device)

    def features_on(self, device: str) -> frozenset:
        """The features this backend has on ``device`` ('cpu' or 'cuda')."""
        return frozenset(self.on_cpu.get("features", self.features)) if device == "cpu" else self.features

    def dtypes_on(self, device: str) -> tuple[str, ...]:
        """The input dtypes this backend takes on ``device`` ('cpu' or 'cuda'). Triton backends on
        the CPU list bfloat16 too, though the interpreter computes it wrongly (tests leave it out)."""
        return tuple(self.on_cpu.get("dtypes", self.dtypes)) if device == "cpu" else self.dtypes


_BACKENDS: tuple[BackendInfo, ...] = (
    BackendInfo("naive", "standard attention, S and P held in memory (the baseline)", "naive", "naive_attention",
                backward="naive_attention_backward"),
    BackendInfo("flash_v1", "FlashAttention-1 (Algorithms 1, 2 and 4): K/V-block outer loop, O, l, m in HBM",
                "flash_v1", "flash_v1_attention", options=("sram_bytes", "num_splits", "deterministic"),
                triton=True, dtypes=("float16", "bfloat16", "float32"), head_dims=(16, 256), features=_ALL,
                backward="flash_v1_attention_backward"),
    BackendInfo("flash_v2", "FlashAttention-2: one program per query block, logsumexp, split backward",
                "flash_v2", "flash_v2_attention", options=("block_m", "block_n", "deterministic"),
                triton=True, dtypes=("float16", "bfloat16", "float32"), head_dims=(16, 256),
                features=_ALL, run_info="autotune_picks", backward="flash_v2_attention_backward"),
    BackendInfo("sdpa", "PyTorch's scaled_dot_product_attention, kernel chosen by PyTorch", "sdpa",
                "sdpa_attention", features=_SDPA),
    BackendInfo("sdpa_flash", "PyTorch's SDPA pinned to its FlashAttention-2 kernel", "sdpa", "sdpa_attention",
                fixed={"kernel": "flash"}, dtypes=_HALF, head_dims=(1, 256), features=_SDPA_NO_MASK,
                on_cpu={"dtypes": ("float16", "bfloat16", "float32", "float64"), "features": _SDPA - {"dropout"}}),
    BackendInfo("sdpa_cudnn", "PyTorch's SDPA pinned to cuDNN's fused attention", "sdpa", "sdpa_attention",
                fixed={"kernel": "cudnn"}, dtypes=_HALF, features=_SDPA_NO_MASK, devices=("cuda",)),
    BackendInfo("sdpa_efficient", "PyTorch's SDPA pinned to its memory-efficient kernel", "sdpa",
                "sdpa_attention", fixed={"kernel": "efficient"}, dtypes=("float16", "bfloat16", "float32"),
                features=_SDPA, devices=("cuda",)),
    BackendInfo("sdpa_math", "PyTorch's SDPA pinned to its math kernel", "sdpa", "sdpa_attention",
                fixed={"kernel": "math"}, features=_SDPA),
    BackendInfo("flex", "PyTorch's FlexAttention, a fused kernel generated from the mask (compiled on CUDA)", "flex",
                "flex_attention_backend", dtypes=("float16", "bfloat16", "float32"), head_dims=(16, 256),
                features=_FLEX, devices=("cuda",)),
    BackendInfo("flash_v2_atomic", "flash_v2 with dQ added by atomics (deterministic=False)", "flash_v2",
                "flash_v2_attention", fixed={"deterministic": False}, options=("block_m", "block_n"), triton=True,
                dtypes=("float16", "bfloat16", "float32"), head_dims=(16, 256), variant_of="flash_v2",
                features=_ALL, run_info="autotune_picks", backward="flash_v2_attention_backward"),
    BackendInfo("flash_v1_bh", "flash_v1 on the paper's grid, one program per (batch, head) (num_splits=1)",
                "flash_v1", "flash_v1_attention", fixed={"num_splits": 1}, options=("sram_bytes", "deterministic"),
                triton=True, dtypes=("float16", "bfloat16", "float32"), head_dims=(16, 256), variant_of="flash_v1",
                features=_ALL, backward="flash_v1_attention_backward"),
)
_REGISTRY: dict[str, BackendInfo] = {b.name: b for b in _BACKENDS}


def available_backends(*, variants: bool = False, device: Optional[str] = None) -> list[str]:
    """Names accepted by :func:`get_backend`: the backends, and with ``variants=True`` also the
    backends run with fixed options (``flash_v2_atomic``, ...); with ``device`` ('cpu' or 'cuda')
    only those that run there."""
    return sorted(b.name for b in _BACKENDS
                  if (variants or b.variant_of is None) and (device is None or device in b.devices))


def backend_info(name: str) -> BackendInfo:
    """The registry entry of ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend '{name}' "
                         f"(valid: {', '.join(available_backends(variants=True))})")
    return _REGISTRY[name]


@functools.cache
def get_backend(name: str) -> Callable:
    """The attention function registered as ``name``; an unknown name lists the valid ones."""
    info = backend_info(name)
    fn = getattr(importlib.import_module(f".{info.module}", __name__), info.function)
    return functools.partial(fn, **info.fixed) if info.fixed else fn


@functools.cache
def get_backward(name: str) -> Callable:
    """The recompute backward of backend ``name`` with the forward's out and lse given
    (``BackendInfo.backward``); a backend without one raises an error naming it and those that have one."""
    info = backend_info(name)
    if info.backward is None:
        have = ", ".join(b.name for b in _BACKENDS if b.backward is not None and b.variant_of is None)
        raise ValueError(f"attention backend '{name}' exposes no backward with a given logsumexp (backends that "
                         f"do: {have})")
    fn = getattr(importlib.import_module(f".{info.module}", __name__), info.backward)
    return functools.partial(fn, **info.fixed) if info.fixed else fn


def check_options(name: str, options: Mapping[str, Any], prefix: str = "attention.") -> dict:
    """The options that are set (not None), after checking that backend ``name`` takes each one;
    an option it does not take raises ValueError naming the backends that do."""
    info = backend_info(name)
    chosen = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in info.options:
            takers = [b.name for b in _BACKENDS if key in b.options and b.variant_of is None]
            used_by = f"is used only by {', '.join(takers)}" if takers else "is not an option of any backend"
            raise ValueError(f"{prefix}{key} {used_by}, not by attention.backend={name}")
        chosen[key] = value
    return chosen


def all_options() -> tuple[str, ...]:
    """Every tuning keyword some backend takes (the attention config's optional fields)."""
    return tuple(dict.fromkeys(o for b in _BACKENDS for o in b.options))


def run_info(name: str, seq_len: Optional[int] = None) -> Any:
    """What the backend reports of this process for a run's record (flash_v2: the configs its
    autotuners picked, for queries of ``seq_len`` tokens when given), or None for a backend with
    nothing to report. The module's function takes ``seq_len`` as its one argument."""
    info = backend_info(name)
    if info.run_info is None:
        return None
    return getattr(importlib.import_module(f".{info.module}", __name__), info.run_info)(seq_len)


def autotune_seconds() -> float:
    """Seconds this process spent timing kernel configs in shape-class autotuners (0 when every
    pick came from the cache folder, or no Triton kernel was tuned)."""
    import sys

    tuning = sys.modules.get(f"{__name__}._autotune")  # never imports Triton itself
    return round(tuning.autotune_seconds(), 3) if tuning is not None else 0.0


__all__ = ["autotune_seconds", "FEATURES", "MASKED_ROW_LSE", "BackendInfo", "all_options", "available_backends", "backend_info",
           "check_options", "get_backend", "get_backward", "reference_attention", "run_info"]
