"""flash-attn's variable-length interface on top of the per-token document-id path.

    varlen_attention(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)

takes sequences packed without padding, q (total_q, nheads, headdim) and k, v (total_k,
nheads_k, headdim), with cumulative lengths ``cu_seqlens`` (int32/int64, (batch + 1,),
cu_seqlens[0] = 0, cu_seqlens[-1] = total), as flash-attn's ``flash_attn_varlen_func``.
It turns cu_seqlens into per-token document ids on a batch of one,

    doc_ids[t] = the b with cu_seqlens[b] <= t < cu_seqlens[b + 1]

and calls the backend's ``doc_ids`` path, so sequence b attends only to itself. With
equal q and k packings the global causal mask and window restricted to one document are
that document's own causal mask and window, so the result equals running each sequence
alone.

Caution / known limits
    * cu_seqlens_q must equal cu_seqlens_k (self-attention over packed documents);
      anything else raises. Cross-attention with other k lengths is not implemented.
    * Validation reads cu_seqlens on the host (one device sync per call, skipped for the
      equality test when the same tensor is passed twice).
    * max_seqlen_q/k are checked against the lengths (flash-attn uses them to size its
      grid; the doc-id path does not need them).
    * How many blocks are skipped is the backend's business: flash_v1 (and flash_v2 where it
      does the same) skips blocks between different documents; naive and sdpa mask a full
      total x total matrix, so they are for checking, not for long packs.
"""

from __future__ import annotations

import torch

from . import get_backend


def _check_cu_seqlens(name: str, cu_seqlens, total: int, max_seqlen, max_name: str, device) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{name} must be a 1-D integer tensor of shape (batch + 1,), got {shape}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"{max_name} must be a positive int, got {max_seqlen!r}")
    values = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or values[-1] != total or min(lengths) < 0:
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length {total}, "
                         f"got {values if len(values) <= 8 else values[:4] + ['...'] + values[-2:]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence ({max(lengths)})")
    return cu_seqlens


def cu_seqlens_to_doc_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 ids: token t belongs to sequence b when cu_seqlens[b] <= t < cu_seqlens[b + 1]."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True).to(torch.int64)


def varlen_attention(backend_name: str, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     *, causal: bool = False, softmax_scale=None, dropout_p: float = 0.0, window_size=(-1, -1),
                     return_lse: bool = False, dropout_seed: int | None = None):
    """Attention over sequences packed without padding, through ``backend_name``'s doc_ids path.

    Arguments:
        backend_name: a registry name (``fatrain.kernels.available_backends()``)
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), nheads % nheads_k == 0
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32/int64 cumulative lengths, starting at 0
            and ending at total; must be equal (self-attention within each sequence)
        max_seqlen_q, max_seqlen_k: the longest sequence (checked, as flash-attn takes them)
        causal: each sequence's own causal mask (q and k have the same lengths here)
        softmax_scale, dropout_p, window_size, dropout_seed: as the backend takes them; the
            window counts positions within each sequence. Dropout offsets are those of the
            packed batch of one (row/column = packed token index).
        return_lse: also return the float32 logsumexp, (nheads, total_q), as flash-attn's
            varlen functions do
    Returns:
        out (total_q, nheads, headdim) [, lse (nheads, total_q)]
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have 3 dims (total_tokens, nheads, headdim) in the varlen layout, "
                             f"got {shape}")
    attn = get_backend(backend_name)
    total_q, total_k = q.shape[0], k.shape[0]
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q", q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k", q.device)
    if cu_seqlens_q is not cu_seqlens_k and not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError(
            "varlen_attention needs cu_seqlens_q == cu_seqlens_k (self-attention within each packed sequence); "
            "different query and key packings are not supported yet")
    doc_ids = cu_seqlens_to_doc_ids(cu_seqlens_q, total_q)[None]
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p, window_size=window_size,
                  doc_ids=doc_ids, return_lse=return_lse)
    if dropout_seed is not None:
        kwargs["dropout_seed"] = dropout_seed
    result = attn(q[None], k[None], v[None], **kwargs)
    if return_lse:
        out, lse = result
        return out[0], lse[0]
    return result[0]
