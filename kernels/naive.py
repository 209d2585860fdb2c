"""Standard attention, the baseline FlashAttention is measured against.

    S = softmax_scale * Q K^T     materialised, (B, Hkv, G, Nq, Nk) in the input dtype
    S = softcap * tanh(S / softcap) - slope * |i + Nk - Nq - j|   (soft-cap, ALiBi, when asked for)
    P = softmax(S)                materialised, computed in float32 (float64 for float64 inputs), stored in the input dtype
                                  (with sink_logits, exp(sink_h) joins each row's denominator)
    P = P * Z / (1 - p)           Z: the bool keep-mask, materialised when dropout_p > 0
    O = P V

Autograd keeps S's softmax output and P for the backward, so activation memory grows as
N^2 per head: this is the memory FlashAttention removes. GQA/MQA groups query heads as
(Hkv, G) and broadcasts K and V over G, so no copy of K or V is made.

Dropout uses the counter-based mask of ``_dropout.py`` (``dropout_mask``), the one the
flash kernels regenerate on chip, so ``naive`` and ``flash_v1`` give the same output for
the same ``dropout_seed``. With no seed, one is drawn from torch's default generator
(``torch.manual_seed`` reproduces it).

Caution / known limits: the N x N tensors make long sequences run out of memory by
design. Dropout imports Triton (the mask is made by a small Triton kernel; on a CPU it
runs through the interpreter).
"""

from __future__ import annotations

import torch

from ._common import (MASKED_ROW_LSE, alibi_bias, allowed_mask, check_alibi_slopes, check_doc_ids, check_dropout,
                      check_qkv, check_sink_logits, check_softcap, default_scale, needs_mask)


def naive_attention(q, k, v, *, causal: bool = False, softmax_scale=None, dropout_p: float = 0.0,
                    window_size=(-1, -1), doc_ids=None, return_lse: bool = False, dropout_seed: int | None = None,
                    return_dropout_mask: bool = False, alibi_slopes=None, softcap: float = 0.0, sink_logits=None):
    """softmax(Q K^T * softmax_scale) V with S and P held in memory.

    Arguments as in fatrain.kernels (the registry); float16, bfloat16, float32 or float64,
    any head dim, CPU or CUDA, every feature (ALiBi, soft-cap and sink logits included; autograd
    gives d sink_logits); no options of its own. Limits: memory grows as seqlen_q x seqlen_k
    per head (by design); dropout imports Triton for the mask.
    """
    B, Nq, Nk, H, Hkv, D = check_qkv(q, k, v, backend="naive")
    check_doc_ids(doc_ids, B, Nk, q.device)
    scale = default_scale(softmax_scale, D)
    p = check_dropout(dropout_p)
    slopes = check_alibi_slopes(alibi_slopes, B, H, q.device)
    cap = check_softcap(softcap)
    sinks = check_sink_logits(sink_logits, H, q.device)
    keep = None  # the bool (B, H, Nq, Nk) keep-mask
    if p > 0.0 or dropout_seed is not None:
        from . import _dropout  # imports Triton, so only when dropout is asked for

        if dropout_seed is not None:
            _dropout.check_seed(dropout_seed)
        if p > 0.0:
            keep = _dropout.dropout_mask(_dropout.resolve_seed(dropout_seed), B, H, Nq, Nk, p, q.device)
    if keep is None and return_dropout_mask:
        keep = torch.ones(B, H, Nq, Nk, dtype=torch.bool, device=q.device)
    group = H // Hkv
    # (B, N, H, D) -> (B, Hkv, G, N, D): views only; K and V broadcast over the group.
    qh = q.view(B, Nq, Hkv, group, D).permute(0, 2, 3, 1, 4)
    kh = k.permute(0, 2, 1, 3)[:, :, None]
    vh = v.permute(0, 2, 1, 3)[:, :, None]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if cap > 0.0 or slopes is not None:
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if cap > 0.0:
        scores = cap * torch.tanh(scores / cap)
    if slopes is not None:
        scores = scores + alibi_bias(slopes, Nq, Nk, dtype=scores.dtype).view(B, Hkv, group, Nq, Nk)
    if needs_mask(Nq, Nk, causal, window_size, doc_ids):
        mask = allowed_mask(Nq, Nk, causal=causal, window_size=window_size, doc_ids=doc_ids, device=q.device)
        mask = mask[:, None, None] if mask.dim() == 3 else mask
        scores = scores.masked_fill(~mask, float("-inf"))
    # NOTE: the softmax in float32 at least (float64 inputs keep float64).
    scores32 = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if sinks is not None:
        sink_col = sinks.to(scores32.dtype).view(1, Hkv, group, 1, 1).expand(B, Hkv, group, Nq, 1)
        lse = torch.logsumexp(torch.cat([scores32, sink_col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(scores32, dim=-1)
    row_empty = torch.isneginf(lse)
    probs = torch.exp(scores32 - torch.where(row_empty, 0.0, lse)[..., None])
    if p > 0.0:
        # Query head h = hk * G + g, so (B, H, ...) views as (B, Hkv, G, ...).
        probs = probs * keep.view(B, Hkv, group, Nq, Nk) * (1.0 / (1.0 - p))
    out = torch.matmul(probs.to(q.dtype), vh)  # (B, Hkv, G, Nq, D)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, Nq, H, D)
    results = [out]
    if return_lse:
        lse = torch.where(row_empty, torch.full_like(lse, MASKED_ROW_LSE), lse).float()  # float32, as every backend
        results.append(lse.reshape(B, H, Nq))
    if return_dropout_mask:
        results.append(keep)
    return results[0] if len(results) == 1 else tuple(results)


def naive_attention_backward(do, q, k, v, out, lse, *, causal: bool = False, softmax_scale=None,
                             window_size=(-1, -1), doc_ids=None):
    """dQ, dK, dV of :func:`naive_attention` (no dropout) from dO and the forward's out and lse.

    ``out`` and ``lse`` ((B, H, Nq), float32) may come from a larger computation than this call:
    ring attention passes the output and logsumexp merged over every key block, and gets this
    block's share of dQ and its dK, dV. The recompute, with P materialised:
        P = exp(S - lse)    Delta = rowsum(dO o O)    dS = P o (dO V^T - Delta)
        dV = P^T dO         dQ = scale dS K           dK = scale dS^T Q
    Returns dq, dk, dv in the input dtype.
    """
    B, Nq, Nk, H, Hkv, D = check_qkv(q, k, v, backend="naive")
    check_doc_ids(doc_ids, B, Nk, q.device)
    scale = default_scale(softmax_scale, D)
    group = H // Hkv
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(dtype).view(B, Nq, Hkv, group, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Nq, D)
    doh = do.to(dtype).view(B, Nq, Hkv, group, D).permute(0, 2, 3, 1, 4)
    oh = out.to(dtype).view(B, Nq, Hkv, group, D).permute(0, 2, 3, 1, 4)
    kh = k.to(dtype).permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, Nk, D)
    vh = v.to(dtype).permute(0, 2, 1, 3)[:, :, None]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if needs_mask(Nq, Nk, causal, window_size, doc_ids):
        mask = allowed_mask(Nq, Nk, causal=causal, window_size=window_size, doc_ids=doc_ids, device=q.device)
        mask = mask[:, None, None] if mask.dim() == 3 else mask
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.exp(scores - lse.to(dtype).view(B, Hkv, group, Nq)[..., None])
    delta = (doh * oh).sum(-1, keepdim=True)
    dprobs = torch.matmul(doh, vh.transpose(-1, -2))
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, kh)  # (B, Hkv, G, Nq, D)
    dk = torch.matmul(dscores.transpose(-1, -2), qh).sum(2)  # (B, Hkv, Nk, D): the group's heads summed
    dv = torch.matmul(probs.transpose(-1, -2), doh).sum(2)
    dq = dq.permute(0, 3, 1, 2, 4).reshape(B, Nq, H, D)
    return dq.to(q.dtype), dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype)
