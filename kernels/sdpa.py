"""PyTorch's own ``scaled_dot_product_attention``, registered as the outside reference.

``sdpa`` lets PyTorch choose its kernel; ``sdpa_flash``, ``sdpa_cudnn``,
``sdpa_efficient`` and ``sdpa_math`` pin one, so a sweep can compare against each.

Caution / known limits: PyTorch's ``is_causal`` aligns the mask to the top-left corner,
so ``seqlen_q != seqlen_k`` with ``causal=True`` passes an explicit bottom-right mask
(which only the math and efficient kernels accept). Windows and documents also go as an
explicit mask. The logsumexp is not returned by the public API: ``return_lse`` raises.
Dropout is PyTorch's own (drawn from torch's generator inside SDPA): it cannot reproduce
the counter-based mask of ``_dropout.py`` that ``naive`` and the flash kernels share, so a
``dropout_seed`` with ``dropout_p > 0`` and ``return_dropout_mask`` raise rather than being
ignored (torch.manual_seed still makes SDPA's dropout reproducible).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import backend_info
from ._common import (allowed_mask, check_doc_ids, check_dropout, check_qkv, default_scale, refuse_variants,
                      unsupported)

_PINNED = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def _kernel_context(kernel: str | None):
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _PINNED[kernel])])


def sdpa_attention(q, k, v, *, causal: bool = False, softmax_scale=None, dropout_p: float = 0.0,
                   window_size=(-1, -1), doc_ids=None, return_lse: bool = False, dropout_seed: int | None = None,
                   return_dropout_mask: bool = False, kernel: str | None = None, alibi_slopes=None,
                   softcap: float = 0.0, sink_logits=None):
    """The attention contract on top of ``torch.nn.functional.scaled_dot_product_attention``.

    Arguments as in fatrain.kernels (the registry). Its own option:
        kernel: pins one of PyTorch's implementations: None (PyTorch chooses), 'flash',
            'cudnn', 'efficient' or 'math' (the registry's sdpa_* entries fix it).
    Limits: return_lse raises NotImplementedError; dropout is PyTorch's, so dropout_seed
    (with dropout_p > 0) and return_dropout_mask raise too. Windows, documents and causal
    with seqlen_q != seqlen_k go as an explicit mask, which the flash and cuDNN kernels do
    not take. GQA expands K and V to full heads (a copy). sdpa_flash has no dropout on the CPU.
    """
    name = "sdpa" if kernel is None else f"sdpa_{kernel}"
    info = backend_info(name)  # the limits of the pinned kernel on this device
    if isinstance(q, torch.Tensor) and q.device.type not in info.devices:
        # NOTE: worded "is not supported by" so that a benchmark records the case as unsupported.
        raise ValueError(f"device {q.device.type} is not supported by {name} (supported: {', '.join(info.devices)}): "
                         f"q, k and v must be CUDA tensors")
    B, Nq, Nk, H, Hkv, D = check_qkv(q, k, v, backend=name, head_dims=info.head_dims,
                                     dtypes=tuple(getattr(torch, d) for d in info.dtypes_on(q.device.type)))
    check_doc_ids(doc_ids, B, Nk, q.device)
    scale = default_scale(softmax_scale, D)
    p = check_dropout(dropout_p)
    refuse_variants(name, alibi_slopes, softcap, sink_logits)
    if return_lse:
        raise unsupported(name, "return_lse", "PyTorch's public SDPA does not return the logsumexp")
    if return_dropout_mask:
        raise unsupported(name, "return_dropout_mask", "PyTorch's SDPA does not expose its dropout mask")
    if dropout_seed is not None and p > 0.0:
        raise unsupported(name, "dropout_seed", "SDPA draws dropout from torch's generator; "
                          "use torch.manual_seed, or naive/flash_v1 for the counter-based mask")
    if kernel == "flash" and p > 0.0 and q.device.type == "cpu":
        raise unsupported(name, "dropout_p > 0 on the CPU", "PyTorch's CPU flash kernel has no dropout")
    # NOTE: PyTorch's fused kernels need the head dim contiguous; other strides are read in place.
    qh, kh, vh = (t.transpose(1, 2) if t.stride(-1) == 1 else t.contiguous().transpose(1, 2) for t in (q, k, v))
    if Hkv != H:
        # NOTE: expanded to full heads (a copy) because not every SDPA kernel takes enable_gqa.
        kh = kh.repeat_interleave(H // Hkv, dim=1)
        vh = vh.repeat_interleave(H // Hkv, dim=1)
    plain = tuple(window_size) == (-1, -1) and doc_ids is None
    mask, is_causal = None, False
    if plain and (not causal or Nq == Nk):
        is_causal = causal
    elif plain and Nq == 1:
        # One query at the bottom-right corner sees every key: no mask (one decoding step).
        is_causal = False
    else:
        mask = allowed_mask(Nq, Nk, causal=causal, window_size=window_size, doc_ids=doc_ids, device=q.device)
        mask = mask[:, None] if mask.dim() == 3 else mask
    with _kernel_context(kernel):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=p, is_causal=is_causal,
                                             scale=scale)
    if mask is not None:
        # A fully masked row gives NaN in PyTorch's math kernel; the contract says zeros.
        out = torch.nan_to_num(out, nan=0.0)
    return out.transpose(1, 2)
