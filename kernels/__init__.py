"""The attention registry: backend name -> one attention function, one signature for all.

    attention(q, k, v, *, causal, softmax_scale=None, dropout_p=0.0, window_size=(-1, -1),
              doc_ids=None, return_lse=False, dropout_seed=None, return_dropout_mask=False)

q is (batch, seqlen_q, nheads, headdim); k and v are (batch, seqlen_k, nheads_k, headdim)
with nheads % nheads_k == 0. Every backend gives the same answer to within
floating-point error, and one that lacks a feature raises an error naming itself and
the feature. Backends import lazily, so asking for ``naive`` never imports Triton (its
dropout does: the counter-based mask of ``_dropout.py`` is shared with the flash kernels).
Packed sequences in flash-attn's varlen layout go through ``varlen.varlen_attention``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

from ._common import MASKED_ROW_LSE
from .reference import reference_attention

# name -> (module, function, fixed keyword arguments)
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "naive": ("naive", "naive_attention", {}),
    "sdpa": ("sdpa", "sdpa_attention", {}),
    "sdpa_flash": ("sdpa", "sdpa_attention", {"kernel": "flash"}),
    "sdpa_cudnn": ("sdpa", "sdpa_attention", {"kernel": "cudnn"}),
    "sdpa_efficient": ("sdpa", "sdpa_attention", {"kernel": "efficient"}),
    "sdpa_math": ("sdpa", "sdpa_attention", {"kernel": "math"}),
    "flash_v1": ("flash_v1", "flash_v1_attention", {}),
    "flash_v2": ("flash_v2", "flash_v2_attention", {}),
}


def available_backends() -> list[str]:
    """Names accepted by :func:`get_backend`."""
    return sorted(_REGISTRY)


@functools.cache
def get_backend(name: str) -> Callable:
    """The attention function registered as ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend '{name}' (valid: {', '.join(available_backends())})")
    module, func, fixed = _REGISTRY[name]
    fn = getattr(importlib.import_module(f".{module}", __name__), func)
    return functools.partial(fn, **fixed) if fixed else fn


__all__ = ["MASKED_ROW_LSE", "available_backends", "get_backend", "reference_attention"]
