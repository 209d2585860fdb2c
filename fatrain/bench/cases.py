"""The cases of a benchmark sweep, their inputs, and the FLOPs each call does.

A sweep is the product dtype x head dim x causal x window x documents x dropout x seqlen;
each attention variant other than ``none`` (``alibi``: the ALiBi paper's slopes for the head
count; ``softcap``: SOFTCAP; ``sinks``: one sink logit per head, learnable) is added on the
sweep's first window, document length and dropout only (its baseline case), so a variant
costs one more case per (dtype, head dim, causal, seqlen), not a product;
each case has batch = tokens_per_batch // seqlen (at least 1) and nheads = hidden // headdim,
as in the FlashAttention papers (16k tokens, hidden 2048).

FLOPs, as in STYLE.md: forward 4 * B * H * Nq * Nk * D, halved when causal; backward 2.5x
forward (the recompute of S and P); forward+backward 3.5x. With a window or documents the
count is of the (query, key) pairs actually attended, so TFLOP/s stays a measure of
useful work; compare such rows by ``ms``.

The window is symmetric, (w, w), without causal and (w, 0) with it. Documents have lengths
drawn uniformly from [doc_len / 2, 3 doc_len / 2] with a fixed seed, the last one cut at seqlen.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fatrain.config import BENCH_MODES
from fatrain.runtime import PRECISION_DTYPES

MODES = BENCH_MODES
#: FLOPs of a mode relative to the forward: the backward recomputes S and P (2.5x).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
DTYPES = PRECISION_DTYPES


@dataclass(frozen=True)
class Case:
    dtype: str
    headdim: int
    causal: bool
    window: int
    doc_len: int
    dropout_p: float
    seqlen: int
    batch: int
    nheads: int
    variant: str = "none"


#: The attention variants a sweep may time (``variants``); none is plain attention.
VARIANTS = ("none", "alibi", "softcap", "sinks")
#: The soft-cap of the ``softcap`` variant: Gemma 2's attention logit cap.
SOFTCAP = 50.0


def make_cases(cfg) -> list[Case]:
    """Every case of the sweep, seqlen ascending within a series (so an OOM can skip the rest)."""
    cases = []
    base = (cfg.windows[0], cfg.doc_lens[0], cfg.dropout_ps[0])
    for dtype, d, causal, window, doc_len, p, variant, n in itertools.product(
            cfg.dtypes, cfg.headdims, cfg.causal, cfg.windows, cfg.doc_lens, cfg.dropout_ps,
            cfg.get("variants", ["none"]), sorted(cfg.seqlens)):
        if variant != "none" and (window, doc_len, p) != base:
            continue
        cases.append(Case(dtype, d, bool(causal), int(window), int(doc_len), float(p), n,
                          max(1, cfg.tokens_per_batch // n), cfg.hidden // d, str(variant)))
    return cases


def variant_kwargs(case: Case, device) -> dict:
    """The attention call's keywords of the case's variant (empty for none)."""
    if case.variant == "alibi":
        from fatrain.kernels._common import alibi_slopes_for
        return {"alibi_slopes": alibi_slopes_for(case.nheads).to(device)}
    if case.variant == "softcap":
        return {"softcap": SOFTCAP}
    if case.variant == "sinks":
        return {"sink_logits": torch.zeros(case.nheads, device=device, requires_grad=True)}
    return {}


def sdpa_alibi_bias_call(q, k, v, case: Case) -> Callable:
    """What a user of PyTorch's SDPA has for ALiBi: the bias materialised, (1, H, N, N) in the
    input dtype with the causal mask and window folded in as -inf, passed as ``attn_mask``
    (SDPA then picks a kernel that takes a float mask, the memory-efficient one on CUDA)."""
    from fatrain.kernels._common import alibi_bias, allowed_mask, alibi_slopes_for

    slopes = alibi_slopes_for(case.nheads).to(q.device)[None]
    bias = alibi_bias(slopes, case.seqlen, case.seqlen).to(q.dtype)
    if case.causal or case.window >= 0:
        left, right = window_pair(case.window, case.causal)
        keep = allowed_mask(case.seqlen, case.seqlen, causal=case.causal, window_size=(left, right), device=q.device)
        bias = bias.masked_fill(~keep, float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return lambda: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias).transpose(1, 2)


def make_doc_ids(batch: int, seqlen: int, mean_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seqlen) document ids, lengths uniform in [mean_len / 2, 3 mean_len / 2]."""
    rows = []
    lo, hi = max(1, mean_len // 2), max(1, (3 * mean_len) // 2)
    for _ in range(batch):
        lengths, total = [], 0
        while total < seqlen:
            lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)))
            total += lengths[-1]
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seqlen]
        rows.append(ids)
    return torch.stack(rows).to(torch.int32)


def window_pair(window: int, causal: bool) -> tuple[int, int]:
    """The attention call's ``window_size`` for a case's left window."""
    return (-1, -1) if window < 0 else (window, 0 if causal else window)


# ----- FLOPs -------------------------------------------------------------------------------------


def attention_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, *, causal: bool,
                    mode: str = "fwd") -> float:
    """FLOPs of one call: forward 4 B H Nq Nk D (halved when causal), backward 2.5x, both 3.5x."""
    fwd = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    if causal:
        fwd /= 2
    return fwd * MODE_FLOP_FACTOR[mode]


def attended_pairs(seqlen: int, *, causal: bool, window: int, doc_ids: Optional[torch.Tensor]) -> float:
    """Number of (query, key) pairs a square (seqlen_q == seqlen_k) mask keeps, summed over the batch."""
    i = torch.arange(seqlen, dtype=torch.int64)
    lo = torch.zeros(seqlen, dtype=torch.int64)
    hi = i.clone() if causal else torch.full((seqlen,), seqlen - 1, dtype=torch.int64)
    if window >= 0:
        lo = torch.clamp(i - window, min=0)
        hi = torch.minimum(hi, i + window)
    if doc_ids is None:
        return float((hi - lo + 1).sum())
    ids = doc_ids.cpu().to(torch.int64)
    starts = torch.searchsorted(ids, ids, right=False)  # first index of each token's document
    ends = torch.searchsorted(ids, ids, right=True) - 1
    counts = torch.minimum(hi, ends) - torch.maximum(lo, starts) + 1
    return float(counts.clamp(min=0).sum())


def case_flops(case: Case, mode: str, doc_ids: Optional[torch.Tensor]) -> float:
    """FLOPs of one (case, mode) call: the formula, or the attended pairs with a window or documents."""
    if case.window < 0 and doc_ids is None:
        return attention_flops(case.batch, case.nheads, case.seqlen, case.seqlen, case.headdim,
                               causal=case.causal, mode=mode)
    pairs = attended_pairs(case.seqlen, causal=case.causal, window=case.window, doc_ids=doc_ids)
    if doc_ids is None:
        pairs *= case.batch
    return 4.0 * case.nheads * pairs * case.headdim * MODE_FLOP_FACTOR[mode]


def tflops(case: Case, mode: str, doc_ids: Optional[torch.Tensor], ms: float) -> float:
    """TFLOP/s of one (case, mode) call that took ``ms`` milliseconds."""
    return case_flops(case, mode, doc_ids) / (ms * 1e-3) / 1e12
