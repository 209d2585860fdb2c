"""The exact attention math, written plainly: the float64 reference for every test.

    S = softmax_scale * Q K^T            (masked entries set to -inf)
    S = softcap * tanh(S / softcap)       (when softcap > 0)
    S = S - slope_h * |i + Nk - Nq - j|   (when alibi_slopes are given)
    P = softmax(S)                        (rows with every entry masked give P = 0)
        with sink_logits, each row's denominator gets exp(sink_h) too:
        P_ij = exp(S_ij) / (sum_j exp(S_ij) + exp(sink_h)), and LSE includes the sink
    P_dropped = P * mask / (1 - p)        (when a dropout mask is given)
    O = P_dropped V
    LSE = logsumexp(S) per row            (MASKED_ROW_LSE for fully masked rows)

Layout is flash-attention's: q (B, Nq, H, D), k and v (B, Nk, Hkv, D). GQA/MQA repeats
each key/value head over H / Hkv query heads. The mask geometry (causal aligned
bottom-right, windows, documents) comes from ``_common.allowed_mask``, shared with the
other backends. Autograd through this function gives the reference gradients.
"""

from __future__ import annotations

import torch

from ._common import (MASKED_ROW_LSE, alibi_bias, allowed_mask, check_alibi_slopes, check_qkv, check_sink_logits,
                      check_softcap, default_scale, needs_mask)


def reference_attention(q, k, v, *, causal: bool = False, softmax_scale=None, window_size=(-1, -1),
                        doc_ids=None, dropout_p: float = 0.0, dropout_mask=None, upcast: bool = True,
                        return_lse: bool = False, alibi_slopes=None, softcap: float = 0.0, sink_logits=None):
    """Attention computed step by step.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
        dropout_mask: optional bool (batch, nheads, seqlen_q, seqlen_k); True keeps an entry.
            The reference never draws random numbers: give it the mask a kernel used.
        upcast: compute in float64 and return float64 (True), or compute in q.dtype.
        alibi_slopes: float32 (nheads,) or (batch, nheads); softcap: float >= 0 (0: off);
            sink_logits: float32 (nheads,), differentiable (see the module docstring).
    Returns:
        out (batch, seqlen_q, nheads, headdim), and lse (batch, nheads, seqlen_q) in
        float32/float64 when return_lse. With sink_logits a row that sees no key has
        lse = its sink logit (output zero); without, MASKED_ROW_LSE.
    """
    B, Nq, Nk, H, Hkv, D = check_qkv(q, k, v, backend="reference")
    scale = default_scale(softmax_scale, D)
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    group = H // Hkv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    slopes = check_alibi_slopes(alibi_slopes, B, H, q.device)
    cap = check_softcap(softcap)
    sinks = check_sink_logits(sink_logits, H, q.device)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if cap > 0.0:
        scores = cap * torch.tanh(scores / cap)
    if slopes is not None:
        scores = scores + alibi_bias(slopes, Nq, Nk, dtype=scores.dtype)
    if needs_mask(Nq, Nk, causal, window_size, doc_ids):
        mask = allowed_mask(Nq, Nk, causal=causal, window_size=window_size, doc_ids=doc_ids, device=q.device)
        mask = mask[:, None] if mask.dim() == 3 else mask[None, None]
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(scores.dtype)[None, :, None, None].expand(B, H, Nq, 1)
        lse = torch.logsumexp(torch.cat([scores, sink_col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(scores, dim=-1)
    row_empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(row_empty, 0.0, lse)[..., None])
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    if return_lse:
        return out, torch.where(row_empty, torch.full_like(lse, MASKED_ROW_LSE), lse)
    return out
