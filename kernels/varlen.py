"""flash-attn's variable-length interface over every backend.

    varlen_attention(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)

takes sequences packed without padding, q (total_q, nheads, headdim) and k, v (total_k,
nheads_k, headdim), with cumulative lengths ``cu_seqlens`` (int32/int64, (batch + 1,),
cu_seqlens[0] = 0, cu_seqlens[-1] = total), as flash-attn's ``flash_attn_varlen_func``.
Sequence b's queries attend only to sequence b's keys; its causal mask and window are
aligned bottom-right within the sequence (query i at key position i + Nk_b - Nq_b), so the
result equals running each sequence alone. Three routes:

    * flash_v2 (and its variants) without dropout: its VARLEN mode,
      ``flash_v2.flash_v2_varlen_attention``, one launch for the pack, any q and k packings.
    * equal packings (cu_seqlens_q == cu_seqlens_k) otherwise: cu_seqlens become per-token
      document ids on a batch of one, doc_ids[t] = the b with cu_seqlens[b] <= t < cu_seqlens[b + 1],
      and the backend's ``doc_ids`` path runs (within one document the global causal mask and
      window are the document's own).
    * different packings otherwise: one ordinary backend call per sequence (correct, slower).

Caution / known limits
    * Validation reads cu_seqlens on the host (one device sync per call).
    * max_seqlen_q/k are checked against the lengths (flash_v2 sizes its grid by them).
    * Dropout: on the doc-id path its offsets are those of the packed batch of one (row/column =
      packed token index); on the per-sequence path each sequence is its own call, so with a
      fixed dropout_seed every sequence draws the same mask pattern for its own positions.
    * How many blocks are skipped is the backend's business: flash_v2's VARLEN mode never
      visits another sequence's blocks and flash_v1 skips blocks between documents; naive and
      sdpa on the doc-id path mask a full total x total matrix, so they are for checking, not
      for long packs.
    * A sequence with queries but no keys gives output 0 and logsumexp 0 (MASKED_ROW_LSE), as
      a fully masked row does everywhere in fatrain.
"""

from __future__ import annotations

import torch

from . import MASKED_ROW_LSE, backend_info, get_backend


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
                     return_lse: bool = False, dropout_seed: int | None = None, alibi_slopes=None,
                     softcap: float = 0.0, sink_logits=None):
    """Attention over sequences packed without padding, through ``backend_name``'s doc_ids path.

    Arguments:
        backend_name: a registry name (``fatrain.kernels.available_backends()``)
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), nheads % nheads_k == 0
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32/int64 cumulative lengths, starting at 0
            and ending at total_q / total_k; sequences may be empty and Nq_b != Nk_b
        max_seqlen_q, max_seqlen_k: the longest sequence (checked, as flash-attn takes them)
        causal: each sequence's own causal mask, aligned bottom-right when Nq_b != Nk_b:
            Nq_b = 2, Nk_b = 4 (1 = kept)    1 1 1 0
                                             1 1 1 1
        softmax_scale, dropout_p, window_size, dropout_seed: as the backend takes them; the
            window counts positions within each sequence. Dropout offsets are those of the
            packed batch of one (row/column = packed token index).
        return_lse: also return the float32 logsumexp, (nheads, total_q), as flash-attn's
            varlen functions do
        alibi_slopes: optional float32 (nheads,) or (batch, nheads) (one row per sequence), the
            bias -slope * |i + Nk_b - Nq_b - j| within each sequence; softcap, sink_logits: as the
            backend takes them (registry features ``alibi``, ``softcap``, ``sinks``). Per-sequence
            slopes take the per-sequence route unless the backend is flash_v2.
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
    info = backend_info(backend_name)
    if info.module == "flash_v2" and dropout_p == 0.0:
        from .flash_v2 import flash_v2_varlen_attention

        return flash_v2_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                         return_lse=return_lse, alibi_slopes=alibi_slopes, softcap=softcap,
                                         sink_logits=sink_logits, **info.fixed)
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p, window_size=window_size,
                  return_lse=return_lse)
    if dropout_seed is not None:
        kwargs["dropout_seed"] = dropout_seed
    if softcap:
        kwargs["softcap"] = softcap
    if sink_logits is not None:
        kwargs["sink_logits"] = sink_logits
    per_sequence_slopes = isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.dim() == 2
    if alibi_slopes is not None and not per_sequence_slopes:
        kwargs["alibi_slopes"] = alibi_slopes
    if per_sequence_slopes:
        # NOTE: checked here, since each call below sees one row of the slopes.
        if tuple(alibi_slopes.shape) != (cu_seqlens_q.numel() - 1, q.shape[1]):
            raise ValueError(f"alibi_slopes must have shape (nheads,) = ({q.shape[1]},) or (batch, nheads) = "
                             f"{(cu_seqlens_q.numel() - 1, q.shape[1])}, got {tuple(alibi_slopes.shape)}")
        return _per_sequence(attn, q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), return_lse, kwargs,
                             alibi_slopes)
    if cu_seqlens_q is cu_seqlens_k or torch.equal(cu_seqlens_q, cu_seqlens_k):
        doc_ids = cu_seqlens_to_doc_ids(cu_seqlens_q, total_q)[None]
        result = attn(q[None], k[None], v[None], doc_ids=doc_ids, **kwargs)
        if return_lse:
            out, lse = result
            return out[0], lse[0]
        return result[0]
    return _per_sequence(attn, q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), return_lse, kwargs)


def _per_sequence(attn, q, k, v, offsets_q: list[int], offsets_k: list[int], return_lse: bool, kwargs: dict,
                  alibi_slopes=None):
    """One ordinary call per sequence, outputs (and logsumexps) concatenated in packed order
    (with (batch, nheads) alibi_slopes, sequence b's call gets row b). A sequence without keys
    gives zeros and MASKED_ROW_LSE (a fully masked row's values; its sink logits with sinks)."""
    if len(offsets_q) != len(offsets_k):
        raise ValueError(f"cu_seqlens_k must have as many sequences as cu_seqlens_q ({len(offsets_q)} entries), "
                         f"got {len(offsets_k)}")
    H = q.shape[1]
    outs, lses = [], []
    bounds = zip(offsets_q, offsets_q[1:], offsets_k, offsets_k[1:])
    sinks = kwargs.get("sink_logits")
    for b, (q_lo, q_hi, k_lo, k_hi) in enumerate(bounds):
        if q_hi == q_lo:
            continue
        if k_hi == k_lo:
            outs.append(q.new_zeros((q_hi - q_lo, H, v.shape[-1])))
            empty = torch.full((H, q_hi - q_lo), MASKED_ROW_LSE, dtype=torch.float32, device=q.device)
            lses.append(empty if sinks is None else sinks.detach()[:, None].expand(H, q_hi - q_lo).clone())
            continue
        call = kwargs if alibi_slopes is None else dict(kwargs, alibi_slopes=alibi_slopes[b:b + 1])
        result = attn(q[None, q_lo:q_hi], k[None, k_lo:k_hi], v[None, k_lo:k_hi], **call)
        out, lse = result if return_lse else (result, None)
        outs.append(out[0])
        if return_lse:
            lses.append(lse[0].float())
    out = torch.cat(outs) if outs else q.new_zeros((0, H, v.shape[-1]))
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=1) if lses else torch.zeros((H, 0), dtype=torch.float32, device=q.device)
