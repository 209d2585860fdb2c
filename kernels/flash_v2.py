"""FlashAttention-2 in Triton: forward, recompute backward (Dao 2023, arXiv 2307.08691).

Forward (Algorithm 1, section 3.1). Grid (cdiv(Nq, BLOCK_M), batch * nheads): one program
owns BLOCK_M query rows of one (batch, head) and loops over key blocks, online softmax in
base 2 with softmax_scale * log2(e) folded into S:
    S_ij  = Q_i K_j^T * scale * log2(e)         m_new = max(m_i, rowmax(S_ij))
    P_ij  = exp2(S_ij - m_new)                   l_i   = l_i exp2(m_i - m_new) + rowsum(P_ij)
    acc   = acc exp2(m_i - m_new) + P_ij V_j     (unnormalised: one division after the loop)
    O_i   = acc / l_i                            LSE_i = (m_i + log2(l_i)) ln 2  (float32, (B, H, Nq))
Saved for the backward: q, k, v, o, lse, doc_ids (and the dropout seed, never a mask).
Backward (Algorithm 2, split as in the Triton tutorial; P recomputed from Q, K and LSE):
  1. dQ pass, grid (cdiv(Nq, BLOCK_M), B * H): Delta = rowsum(dO o O) and LSE2 = LSE log2(e)
     (stored for pass 2), dQ += (P o (dO V^T - Delta)) K.
  2. dK/dV pass, grid (cdiv(Nk, BLOCK_N), B * Hkv), looping over the query heads of its GQA
     group: P^T = exp2(K Q^T scale log2(e) - LSE2), dV += P^T dO,
     dS^T = P^T o (V dO^T - Delta), dK += dS^T Q; so no atomics and bit-identical gradients.
  deterministic=False: a preprocess pass (Delta, LSE2), then the dK/dV pass also adds dS K
  into a float32 dQ with atomics (5 matmuls instead of 7).
Masks (_common.allowed_mask): query i sits at key position i + Nk - Nq (bottom-right) and
sees keys in [pos - left, pos + right]; key blocks outside every row's window are never
visited, blocks every row sees whole run unmasked. doc_ids: each pass takes the min and max
id of its block and of each visited block; disjoint ranges skip the pair, equal ones drop
the document mask; ``_doc_ranges`` clips the loops of non-decreasing (packed) rows to the
documents a block touches, so packed documents cost about sum(len_i^2). Dropout: the
counter-based Z of ``_dropout.py`` (shared with naive and flash_v1), applied to P after the
row sum; each backward pass regenerates it. GQA by index arithmetic; strides everywhere.
On sm_90+ the looped-over tiles come through tensor descriptors (``_tma.py``). On CUDA the
launchers are ``torch.library.triton_op``s (``torch.compile(fullgraph=True)`` sees the
kernels), in the interpreter opaque custom ops. Configs are autotuned per shape key
(``_autotune.py``, lists in ``_flash_v2_configs.py``); ``configs``/``pin`` choose one,
``block_m``/``block_n`` fix the tiles for ablations.

Variants (constexprs HAS_ALIBI, HAS_SOFTCAP, HAS_SINKS; off, they compile out: the plain
kernels' sm_90 PTX is the same instruction stream with them as without). Each pass forms
the base-2 scores from the raw tile (``_score_mod``), before the mask:
    S = softcap * tanh(qk * scale / softcap) * log2(e) - slope_bh * log2(e) * |i + Nk - Nq - j|
(without the soft-cap S = qk * scale * log2(e) - ...; the slope is loaded once per program,
the distance recomputed per tile, so no bias is stored). A causal call sees no key right of its
query, so there the bias is one-sided and each row's scores are moved by a per-row constant
that the softmax ignores: S + slope * log2(e) * (i - r0) (r0 the query block's first row) is a
term per column plus the tile, one add per score; the LSE is moved back in the forward's
epilogue and moved again where a backward pass loads it. The forward folds the sink into its
epilogue: m = max(m_i, sink), l = l_i 2^(m_i - m) + 2^(sink - m), O = acc 2^(m_i - m) / l,
LSE = (m + log2 l) ln 2, so a row that sees no key gets O = 0 and LSE = sink. The backward
recomputes P from that LSE (the sink is in it), dS = P o (dP - Delta) o (1 - tanh^2) with the
soft-cap, and d sink_h = -sum_(b, i) exp(sink_h - LSE_i) Delta_i from the Delta the first pass
already writes, reduced by a torch sum (deterministic; no atomics). tanh: the MUFU's
tanh.approx.f32 for half-precision inputs on NVIDIA GPUs (as flash-attn's soft-cap), else
1 - 2 / (exp(2x) + 1). ALiBi and the soft-cap leave the masks, and so the block skipping, as they are.

VARLEN mode (``flash_v2_varlen_attention``): sequences packed without padding, q
(total_q, H, D) and k, v (total_k, Hkv, D) with their own offsets cu_seqlens_q and
cu_seqlens_k. The grid is (cdiv(max_seqlen_q, BLOCK_M), batch * H) (dK/dV: max_seqlen_k,
batch * Hkv); a program reads its sequence's offsets and lengths (``_sequence``), moves its
row pointers there, and exits at once if its block lies past the sequence's own length. Each
sequence then runs exactly the dense kernel with its own Nq, Nk (causal and windows aligned
bottom-right per sequence, GQA, the same block skipping), so no block of another sequence is
loaded; LSE, Delta and LSE2 are (H, total_q) as in flash-attn. No dropout or doc_ids there,
and the statistics and dQ reduce-add never use tensor descriptors (a sequence's rows start at
any packed offset, not 16-byte aligned).

Caution / known limits: ids that are not non-decreasing get no loop clipping and skip
little. P and dS are rounded to the input dtype before their second matmul (as in FA);
float32 uses IEEE dots (no TF32). The backward computes Q K^T twice, the price of a dQ
without atomics. Without a dropout_seed the seed is drawn on the host (a graph break under
torch.compile). Fixed tiles are not checked against shared memory before launch: eager mode
retries with fewer stages, then raises. Host overhead per eager call (custom-op dispatch)
dominates below about 2k tokens per sequence. The interpreter's bfloat16 is wrong: GPU only.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _dropout
from . import _flash_v2_configs as _configs
from ._autotune import picks, shape_class_autotuned
from ._common import (MASKED_ROW_LSE, check_alibi_slopes, check_deterministic, check_doc_ids, check_dropout,
                      check_qkv, check_row_offsets, check_sink_logits, check_softcap, default_scale, normalize_window,
                      register_op)
from ._dropout import dropout_apply, dropout_apply_t
from ._tma import use_tma, use_tma_stats

BACKEND = "flash_v2"
HEAD_DIMS = (16, 256)
LOG2E = 1.4426950408889634  # 1 / ln(2)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _allowed(rows, cols, Nk, seq_shift, win_left, win_right, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """_common.allowed_mask's window and tail for one tile: rows and cols broadcast against each other."""
    pos = rows + seq_shift  # bottom-right alignment: query i sits at key position i + Nk - Nq
    allowed = cols < Nk
    if MASK_RIGHT:  # causal is the window (-1, 0)
        allowed = allowed & (cols <= pos + win_right)
    if MASK_LEFT:
        allowed = allowed & (cols >= pos - win_left)
    return allowed


@triton.jit
def _mask_tile(x, rows, cols, doc_q, doc_k, mixed_docs, Nk, seq_shift, win_left, win_right, fill,
               MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr):
    """x with the pairs no query may see set to ``fill``: the window, diagonal and Nk tail in a
    MASKED block, and different documents wherever the block spans several (mixed_docs).
    rows, cols (and doc_q, doc_k) broadcast to x's orientation."""
    if MASKED:
        allowed = _allowed(rows, cols, Nk, seq_shift, win_left, win_right, MASK_LEFT, MASK_RIGHT)
        if HAS_DOCS:
            if mixed_docs:
                allowed = allowed & (doc_q == doc_k)
        x = tl.where(allowed, x, fill)
    elif HAS_DOCS:
        if mixed_docs:
            x = tl.where(doc_q == doc_k, x, fill)
    return x


@triton.jit
def _tanh(x, FAST_TANH: tl.constexpr):
    """tanh in float32: FAST_TANH, the MUFU's tanh.approx.f32 (2^-11 relative error, as flash-attn's
    soft-cap; half-precision inputs on NVIDIA GPUs only); else 1 - 2 / (exp(2x) + 1), which
    saturates to +-1 without a NaN and runs in the interpreter."""
    if FAST_TANH:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # NOTE: 2 log2(e)


@triton.jit
def _score_mod(qk, rows, r0, cols, seq_shift, qk_scale, softcap_in, softcap_out, slope2,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr):
    """(x, t, x_scale) of a raw Q K^T tile: the variants' base-2 scores are S = x * x_scale, t is
    tanh of the soft-cap (for dS). The soft-cap alone returns x = t and x_scale = softcap * log2(e),
    so the caller's exponent multiplies it in with its subtraction (one FMA, as the plain path
    folds the softmax scale); with ALiBi x is S itself and x_scale 1:
        S = softcap * tanh(qk * scale / softcap) * log2(e)    (softcap_in = scale / softcap,
                                                               softcap_out = softcap * log2(e))
        S = S - slope * log2(e) * |i + Nk - Nq - j|            (slope2 = slope * log2(e))
    rows and cols broadcast to qk's orientation; ALiBi's |.| makes the transposed tile alike.

    HAS_ALIBI == 1 (any window): the distance is taken between the positions converted to float32
    as the (BLOCK, 1) and (1, BLOCK) vectors they are, so the tile pays one float subtraction per
    score and no int-to-float conversion (a quarter-rate instruction on Hopper); positions below
    2^24 are exact in float32, and so is their difference.

    HAS_ALIBI == 2 (causal: every visible key has j <= i + Nk - Nq): ``r0`` is the query block's
    first row (``rows`` is not read), and the tile is S + slope2 * (i - r0), the scores of row i
    moved by a per-row constant, which leaves the softmax as it is:
        S + slope2 * (i - r0) = qk * scale + slope2 * (j - r0 - (Nk - Nq)),
    a term per column (a vector computed once per tile) and one add per score. The caller applies
    the row term to the statistics instead: the forward subtracts it from its LSE (and adds it to
    the sink), the backward adds it to the LSE it loads (``_alibi_rows``). Near the block the two
    terms are small, so no float32 precision is lost where P is not negligible."""
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_in, FAST_TANH)
        if HAS_ALIBI:
            s = t * softcap_out
        else:
            s = t
    else:
        t = qk  # NOTE: unused without the soft-cap
        s = qk * qk_scale
    if HAS_ALIBI == 2:
        s = s + slope2 * (cols - (r0 + seq_shift)).to(tl.float32)
    elif HAS_ALIBI:
        s = s - slope2 * tl.abs((rows + seq_shift).to(tl.float32) - cols.to(tl.float32))
    if HAS_SOFTCAP and not HAS_ALIBI:
        x_scale = softcap_out
    else:
        x_scale = 1.0
    return s, t, x_scale


@triton.jit
def _alibi_rows(slope2, BLOCK_M: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """The per-row term of HAS_ALIBI == 2's scores (``_score_mod``), slope2 * (i - r0) for the
    BLOCK_M rows of a query block; zeros otherwise."""
    if HAS_ALIBI == 2:
        return slope2 * tl.arange(0, BLOCK_M).to(tl.float32)
    else:
        return tl.zeros([BLOCK_M], dtype=tl.float32)


@triton.jit
def _doc_range(DOC_row, stride_docn, pos, Nk):
    """Document ids at key positions ``pos`` and their min and max.

    NOTE: positions past Nk are clamped to Nk - 1, which lies in the same (last) block, so the
    range is that of the block's valid positions; the tail masks handle the rest.
    """
    ids = tl.load(DOC_row + tl.minimum(pos, Nk - 1) * stride_docn)
    return ids, tl.min(ids, 0), tl.max(ids, 0)


@triton.jit
def _narrow_to_documents(RANGE_row, Nk, first, last, offset, lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """Clip the loop's segments [lo, full_lo) [full_lo, full_hi) [full_hi, hi) to the positions
    the documents of key positions ``first`` .. ``last`` cover, minus ``offset``.

    RANGE_row holds [start, end) of each position's run of equal ids when the row's ids are
    non-decreasing, else [0, Nk) (``_doc_ranges``). lo stays a multiple of BLOCK; the
    unmasked segment may now end inside a block: the extra positions are still inside
    every row's window and belong to other documents, so the document mask removes them.
    """
    doc_lo = tl.load(RANGE_row + first) - offset
    doc_hi = tl.load(RANGE_row + Nk + last) - offset
    lo = tl.maximum(lo, (tl.maximum(doc_lo, 0) // BLOCK) * BLOCK)
    hi = tl.minimum(hi, doc_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _row_sources(A_blk, B_blk, N, stride_an, stride_bn, D: tl.constexpr, BLOCK: tl.constexpr,
                 HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Where a pass reads the two (N, D) row tiles it loops over (K, V or Q, dO of one head):
    USE_TMA, tensor descriptors of BLOCK x HEAD_DIM tiles (the host checked unit d strides and
    16-byte aligned rows; the copy engine zero-fills past N and past D); else the base pointers."""
    if USE_TMA:
        a = tl.make_tensor_descriptor(A_blk, shape=[N, D], strides=[stride_an, 1], block_shape=[BLOCK, HEAD_DIM])
        b = tl.make_tensor_descriptor(B_blk, shape=[N, D], strides=[stride_bn, 1], block_shape=[BLOCK, HEAD_DIM])
    else:
        a = A_blk
        b = B_blk
    return a, b


@triton.jit
def _stat_sources(LSE_row, Delta_row, N, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """Where the dK/dV pass reads the float32 LSE and Delta of the query rows it loops over:
    USE_TMA, 1-D descriptors of BLOCK rows (the host checked that N * 4 bytes keeps every row
    16-byte aligned; zero fill past N); else the row pointers."""
    if USE_TMA:
        a = tl.make_tensor_descriptor(LSE_row, shape=[N], strides=[1], block_shape=[BLOCK])
        b = tl.make_tensor_descriptor(Delta_row, shape=[N], strides=[1], block_shape=[BLOCK])
    else:
        a = LSE_row
        b = Delta_row
    return a, b


@triton.jit
def _sequence(CU_Q, CU_K, off_b, Nq, Nk, VARLEN: tl.constexpr):
    """(q_start, k_start, Nq, Nk) of the program's sequence: VARLEN, sequence off_b's offsets
    into the packed rows and its own lengths from cu_seqlens_q/k; else batch entry off_b's
    (rows from 0, the call's Nq and Nk)."""
    if VARLEN:
        q_lo = tl.load(CU_Q + off_b)
        k_lo = tl.load(CU_K + off_b)
        Nq = tl.load(CU_Q + off_b + 1) - q_lo
        Nk = tl.load(CU_K + off_b + 1) - k_lo
        return q_lo.to(tl.int64), k_lo.to(tl.int64), Nq, Nk
    else:
        return 0, 0, Nq, Nk


@triton.jit
def _variant_scalars(SLOPES, off_b, off_h, stride_slb, stride_slh, softcap_in, softcap_out,
                     HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(softcap_in, softcap_out, slope2) as float32: the soft-cap's factors and the ALiBi slope of
    (sequence off_b, head off_h) in base 2; zeros for the variants that are off."""
    if HAS_SOFTCAP:  # NOTE: fp64 under torch.compile, see _fwd_kernel
        softcap_in = tl.cast(softcap_in, tl.float32)
        softcap_out = tl.cast(softcap_out, tl.float32)
    else:
        softcap_in = 0.0
        softcap_out = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + off_b * stride_slb + off_h * stride_slh) * 1.4426950408889634  # NOTE: log2(e)
    else:
        slope2 = 0.0
    return softcap_in, softcap_out, slope2


@triton.jit
def _fwd_block(acc, l_i, m_i, q, kT_ptrs, v_ptrs, K_desc, V_desc, start_n, cols, doc_q, doc_k, mixed_docs,
               offs_m, q_lo, offs_d, Nk, seq_shift, win_left, win_right, qk_scale, seed, dropout_p, off_bh, Nq,
               softcap_in, softcap_out, slope2,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr):
    """One key block of Algorithm 1's inner loop. MASKED: a window edge, the diagonal or the Nk
    tail crosses it; with documents the id mask applies only where the pair spans several (mixed_docs).
    USE_TMA: K_j and V_j come through tensor descriptors (zero fill past Nk and past D), else
    through the pointer tiles kT_ptrs, v_ptrs."""
    d_ok = offs_d < D
    # -- S_ij = Q_i K_j^T (base 2, scaled) --
    if USE_TMA:
        # NOTE: V_j is asked for with K_j, the two loads adjacent: the pipeliner then gives both
        # copies one barrier and one wait at the top of the step (a transpose between them made
        # two). Asked for after the softmax (where the pointer path loads it), V got a wait of
        # its own there, a branch in the middle of the step that kept ptxas from interleaving
        # the exp2s with the bf16 packing and the row sums (sm_90a SASS); that cost the forward
        # 5-10% against a minimal kernel with the same loop.
        k = K_desc.load([start_n, 0])
        v = V_desc.load([start_n, 0])
        kT = tl.trans(k)
    elif MASKED:
        kT = tl.load(kT_ptrs, mask=d_ok[:, None] & (cols[None, :] < Nk), other=0.0)
    elif D == HEAD_DIM:
        kT = tl.load(kT_ptrs)
    else:
        kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
    if HAS_SOFTCAP or HAS_ALIBI:
        # -- S_ij = softcap tanh(S_ij / softcap) - slope |i + Nk - Nq - j|, already in base 2 --
        qk, _, s_scale = _score_mod(qk, offs_m[:, None], q_lo, cols[None, :], seq_shift, qk_scale, softcap_in,
                                    softcap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    else:
        s_scale = qk_scale  # the plain path folds the scale into the exponent
    qk = _mask_tile(qk, offs_m[:, None], cols[None, :], doc_q, doc_k, mixed_docs, Nk, seq_shift, win_left,
                    win_right, float("-inf"), MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS)
    # -- m_new = max(m_i, rowmax(S_ij)) --
    m_new = tl.maximum(m_i, tl.max(qk, 1) * s_scale)
    if MASKED or HAS_DOCS:
        # NOTE: a row that has seen no key yet keeps m = -inf; subtract 0 instead so
        # exp2(-inf - -inf) never makes a NaN (its P and alpha are 0 either way).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    # -- P_ij = exp2(S_ij - m_new); rescale the running sums lazily --
    p = tl.math.exp2(qk * s_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # -- P_ij <- P_ij o Z_ij after the row sum: l_i is the softmax's normaliser; the
        # factor 1 / (1 - p) is applied to O once, after the loop --
        p = dropout_apply(p, seed, off_bh, offs_m, cols, dropout_p)
    # -- acc += P_ij V_j (with TMA, V_j came with K_j) --
    if not USE_TMA:
        if MASKED:
            v = tl.load(v_ptrs, mask=d_ok[None, :] & (cols[:, None] < Nk), other=0.0)
        elif D == HEAD_DIM:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn, stride_vd,
               DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
               offs_m, q_lo, offs_n, offs_d, lo, hi, Nk, seq_shift, win_left, win_right, qk_scale,
               seed, dropout_p, off_bh, Nq, softcap_in, softcap_out, slope2,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr):
    """Key blocks [lo, hi) of Algorithm 1's inner loop; MASKED=False only for blocks every row's window sees whole."""
    kT_ptrs = K_blk + (lo + offs_n)[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V_blk + (lo + offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if HAS_DOCS:
            # Skip the pair when the id ranges are disjoint: no query shares a key's document.
            doc_k, k_doc_lo, k_doc_hi = _doc_range(DOC_row, stride_docn, cols, Nk)
            if (k_doc_lo <= q_doc_hi) & (q_doc_lo <= k_doc_hi):
                mixed_docs = (k_doc_lo != k_doc_hi) | (q_doc_lo != q_doc_hi)
                acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, kT_ptrs, v_ptrs, K_desc, V_desc, start_n, cols, doc_q,
                                           doc_k[None, :], mixed_docs, offs_m, q_lo, offs_d, Nk, seq_shift, win_left,
                                           win_right, qk_scale, seed, dropout_p, off_bh, Nq, softcap_in,
                                           softcap_out, slope2, D, HEAD_DIM, MASKED, MASK_LEFT, MASK_RIGHT,
                                           HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA, HAS_SOFTCAP, HAS_ALIBI,
                                           FAST_TANH)
        else:
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, kT_ptrs, v_ptrs, K_desc, V_desc, start_n, cols, doc_q, 0,
                                       False, offs_m, q_lo, offs_d, Nk, seq_shift, win_left, win_right,
                                       qk_scale, seed, dropout_p, off_bh, Nq, softcap_in, softcap_out, slope2,
                                       D, HEAD_DIM, MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION,
                                       HAS_DROPOUT, USE_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
        kT_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, DOC, DOC_RANGE, CU_Q, CU_K,
                stride_qb, stride_qm, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vh, stride_vd,
                stride_ob, stride_om, stride_oh, stride_od,
                stride_docb, stride_docn, stride_lseb, stride_lseh,
                H, GROUP, Nq, Nk, qk_scale, win_left, win_right, seed, dropout_p, dropout_scale,
                SLOPES, SINKS, stride_slb, stride_slh, softcap_in, softcap_out,
                D: tl.constexpr, HEAD_DIM: tl.constexpr,
                MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED_LSE: tl.constexpr,
                USE_TMA: tl.constexpr, VARLEN: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_SINKS: tl.constexpr, FAST_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # NOTE (2026-11, torch 2.11): torch.compile launches this kernel with Python floats typed
    # fp64; without the cast S, P and the accumulator silently become fp64.
    qk_scale = tl.cast(qk_scale, tl.float32)
    if HAS_DROPOUT:  # NOTE: fp64 under torch.compile too; fp32 keeps the mask identical to eager's
        dropout_p = tl.cast(dropout_p, tl.float32)
        dropout_scale = tl.cast(dropout_scale, tl.float32)
    pid_m = tl.program_id(0)
    if MASK_RIGHT and not MASK_LEFT:
        # NOTE: causally the last query blocks see the most keys; launching them first shortens the tail.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    off_hk = off_h // GROUP  # GQA: the key/value head this query head reads
    start_m = pid_m * BLOCK_M
    q_start, k_start, Nq, Nk = _sequence(CU_Q, CU_K, off_b, Nq, Nk, VARLEN)
    if VARLEN:
        if start_m >= Nq:  # the grid covers max_seqlen_q; this sequence is shorter
            return
    seq_shift = Nk - Nq
    softcap_in, softcap_out, slope2 = _variant_scalars(SLOPES, off_b, off_h, stride_slb, stride_slh, softcap_in,
                                                       softcap_out, HAS_ALIBI, HAS_SOFTCAP)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    row_ok = offs_m < Nq

    Q_blk = Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh
    K_blk = K + off_b * stride_kb + k_start * stride_kn + off_hk * stride_kh
    V_blk = V + off_b * stride_vb + k_start * stride_vn + off_hk * stride_vh
    K_desc, V_desc = _row_sources(K_blk, V_blk, Nk, stride_kn, stride_vn, D, BLOCK_N, HEAD_DIM, USE_TMA)
    DOC_row = DOC + off_b * stride_docb
    q = tl.load(Q_blk + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    doc_q = 0
    q_doc_lo = 0
    q_doc_hi = 0
    if HAS_DOCS:
        doc_q, q_doc_lo, q_doc_hi = _doc_range(DOC_row, stride_docn, offs_m + seq_shift, Nk)
        doc_q = doc_q[:, None]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key range: masked [lo, full_lo), seen whole by every row [full_lo, full_hi), masked
    # [full_hi, hi) (causal diagonal, window edges, Nk tail, documents); keys outside [lo, hi)
    # are invisible to every row and never loaded. Computed inline so the default case keeps
    # the literal lower bound 0.
    lo = 0
    full_lo = 0
    hi = Nk
    full_hi = Nk
    if MASK_LEFT:
        lo = (tl.maximum(0, start_m + seq_shift - win_left) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(0, start_m + BLOCK_M - 1 + seq_shift - win_left), BLOCK_N) * BLOCK_N
    if MASK_RIGHT:  # causal is the window (-1, 0)
        hi = tl.minimum(Nk, tl.maximum(0, start_m + BLOCK_M + seq_shift + win_right))
        full_hi = tl.minimum(Nk, tl.maximum(0, start_m + seq_shift + win_right + 1))
    full_hi = (full_hi // BLOCK_N) * BLOCK_N  # whole blocks only: the Nk tail stays masked
    if MASK_LEFT:
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.maximum(full_hi, full_lo)
    if HAS_DOCS:  # packed documents: only the keys of the documents of this block's rows
        lo, full_lo, full_hi, hi = _narrow_to_documents(DOC_RANGE + off_b * 2 * Nk, Nk, start_m + seq_shift,
                                                        tl.minimum(start_m + BLOCK_M, Nq) - 1 + seq_shift, 0,
                                                        lo, full_lo, full_hi, hi, BLOCK_N)
    if MASK_LEFT:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn,
                                   stride_vd, DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                                   offs_m, start_m, offs_n, offs_d, lo, full_lo, Nk, seq_shift, win_left, win_right,
                                   qk_scale, seed, dropout_p, pid_bh, Nq, softcap_in, softcap_out, slope2, D,
                                   HEAD_DIM, BLOCK_N, True, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION,
                                   HAS_DROPOUT, USE_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn,
                               stride_vd, DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                               offs_m, start_m, offs_n, offs_d, full_lo, full_hi, Nk, seq_shift, win_left, win_right,
                               qk_scale, seed, dropout_p, pid_bh, Nq, softcap_in, softcap_out, slope2, D,
                               HEAD_DIM, BLOCK_N, False, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                               USE_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn,
                               stride_vd, DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                               offs_m, start_m, offs_n, offs_d, full_hi, hi, Nk, seq_shift, win_left, win_right,
                               qk_scale, seed, dropout_p, pid_bh, Nq, softcap_in, softcap_out, slope2, D,
                               HEAD_DIM, BLOCK_N, True, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                               USE_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)

    # HAS_ALIBI == 2 ran the rows' scores moved by slope2 * (i - start_m) (_score_mod): the LSE is
    # moved back, and the sink, a score of its own, moved alike
    row_shift = _alibi_rows(slope2, BLOCK_M, HAS_ALIBI)
    if HAS_SINKS:
        # -- the sink joins the denominator: m = max(m_i, sink), l = l_i 2^(m_i - m) + 2^(sink - m);
        # a row that saw no key (m_i = -inf) gives O = 0 and LSE = sink --
        sink2 = tl.load(SINKS + off_h) * 1.4426950408889634 + row_shift  # NOTE: log2(e)
        m_f = tl.maximum(m_i, sink2)
        alpha = tl.math.exp2(m_i - m_f)
        l_f = l_i * alpha + tl.math.exp2(sink2 - m_f)
        if HAS_DROPOUT:
            acc = acc * (alpha * dropout_scale / l_f)[:, None]
        else:
            acc = acc * (alpha / l_f)[:, None]
        lse = (m_f + tl.math.log2(l_f) - row_shift) * 0.6931471805599453  # NOTE: ln(2)
    else:
        # -- O_i = acc / l_i, once; rows that saw no key give 0 and MASKED_LSE --
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        if HAS_DROPOUT:
            acc = acc * (dropout_scale / l_safe)[:, None]  # O_i = acc / l_i / (1 - p)
        else:
            acc = acc / l_safe[:, None]
        lse = tl.where(empty, MASKED_LSE, (m_i + tl.math.log2(l_safe) - row_shift) * 0.6931471805599453)  # NOTE: ln(2)
    tl.store(LSE + off_b * stride_lseb + off_h * stride_lseh + q_start + offs_m, lse, mask=row_ok)
    O_blk = Out + off_b * stride_ob + q_start * stride_om + off_h * stride_oh
    tl.store(O_blk + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_preprocess(Out, DO, Delta, LSE, LSE2,
                    stride_ob, stride_om, stride_oh, stride_od,
                    stride_dob, stride_dom, stride_doh, stride_dod,
                    H, Nq, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    # -- Delta_i = rowsum(dO_i * O_i); LSE_i in base 2 for the dK/dV pass --
    rows = pid_bh.to(tl.int64) * Nq + offs_m
    tl.store(Delta + rows, tl.sum(o * do, axis=1), mask=offs_m < Nq)
    lse = tl.load(LSE + rows, mask=offs_m < Nq, other=0.0)
    tl.store(LSE2 + rows, lse * 1.4426950408889634, mask=offs_m < Nq)  # NOTE: log2(e)


@triton.jit
def _dkdv_block(dk, dv, k, v, qT_ptrs, do_ptrs, Q_desc, DO_desc, start_m, LSE_row, Delta_row, rows, offs_n, offs_d,
                doc_q, doc_k, mixed_docs,
                Nq, Nk, seq_shift, win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh,
                DQ_blk, stride_dqm, dq_scale, softcap_in, softcap_out, slope2, alibi_rows, D: tl.constexpr,
                MASKED: tl.constexpr,
                MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                USE_TMA: tl.constexpr, STATS_TMA: tl.constexpr, DQ_TMA: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr):
    """One query block against the program's K/V block; masks as in _fwd_block (USE_TMA: Q and
    dO rows through tensor descriptors, as K and V in _fwd_block; STATS_TMA: the rows' LSE and
    Delta too, LSE_row and Delta_row being 1-D descriptors). ATOMIC_DQ: also
    add this block's dS K to the float32 dQ accumulator DQ_blk (unscaled; atomics, so the order
    of the additions, and the last bits of dQ, vary from run to run)."""
    d_ok = offs_d < D
    row_ok = rows < Nq
    # NOTE: rows past Nq load q = dO = LSE = Delta = 0, so they add exactly 0 to dK, dV.
    if USE_TMA:  # NOTE: Q_i and dO_i asked for together: one barrier, one wait (see _fwd_block)
        q = Q_desc.load([start_m, 0])
        do = DO_desc.load([start_m, 0])
        qT = tl.trans(q)
    else:
        qT = tl.load(qT_ptrs, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
    # NOTE: LSE_row holds LSE in base 2, written by the pass before this one (no log2(e) multiply
    # per row per step: backward +1-2% at d=64 causal).
    if STATS_TMA:
        # NOTE: as pointer loads, the pipeliner issued LSE and Delta as 4-byte cp.asyncs with a
        # bounds check each, 16 per thread per step at d=64: with the address arithmetic, a
        # third of the hot loop's instructions, and the loop issue-bound (sm_90a SASS).
        lse2 = LSE_row.load([start_m])
        delta = Delta_row.load([start_m])
    else:
        lse2 = tl.load(LSE_row + rows, mask=row_ok, other=0.0)
    qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
    if not USE_TMA:
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # NOTE: dP^T is issued before the exp2s of P^T, which do not need it, so ptxas runs them while
    # that wgmma is in flight (sm_90a SASS); issued after the dV dot they ran alone: backward
    # +1-2% at d=64 and d=128.
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    # -- P^T = exp2(S^T - LSE), recomputed --
    if HAS_SOFTCAP or HAS_ALIBI:
        sT, tT, s_scale = _score_mod(qkT, rows[None, :], start_m, offs_n[:, None], seq_shift, qk_scale, softcap_in,
                                     softcap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
        if HAS_ALIBI == 2:  # the rows' scores moved by slope2 * (i - start_m), and so their LSE
            lse2 = lse2 + alibi_rows
        pT = tl.math.exp2(sT * s_scale - lse2[None, :])
    else:
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    pT = _mask_tile(pT, rows[None, :], offs_n[:, None], doc_q, doc_k, mixed_docs, Nk, seq_shift, win_left,
                    win_right, 0.0, MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS)
    # -- dV += (P o Z)^T dO (times 1 / (1 - p) at the end) --
    if HAS_DROPOUT:
        # NOTE: the mask is drawn twice (here and for dP^T) rather than held across the two dots:
        # a held bool tile made this pass spill (1.6 KB at d=128), a redraw is a multiply and a compare.
        dv = tl.dot(dropout_apply_t(pT, seed, bh, offs_n, rows, dropout_p).to(do.dtype), do, dv,
                    input_precision=DOT_PRECISION)
    else:
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    # -- dS^T = P^T * (dP^T - Delta), dP^T = (V dO^T) o Z / (1 - p); dK += dS^T Q --
    # With dropout, dS^T = (P^T * ((V dO^T) o Z - Delta (1 - p))) / (1 - p): the 1 / (1 - p)
    # moves to dK's epilogue, so each element costs one select and no multiply.
    if not STATS_TMA:
        delta = tl.load(Delta_row + rows, mask=row_ok, other=0.0)
    if HAS_DROPOUT:
        dpT = dropout_apply_t(dpT, seed, bh, offs_n, rows, dropout_p)
        delta = delta * (1.0 - dropout_p)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:  # -- through the soft-cap: d tanh(x) = 1 - tanh(x)^2 --
        dsT = dsT * (1.0 - tT * tT)
    dsT = dsT.to(qT.dtype)
    dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        # NOTE: scaled here (softmax scale, and 1 / (1 - p) with dropout), so the host's only
        # epilogue is the cast of the float32 accumulator.
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION) * dq_scale
        if DQ_TMA:
            # NOTE: one bulk reduce-add of the tile by the copy engine (cp.reduce.async.bulk.tensor,
            # as FlashAttention-3's dQ), instead of BLOCK_M * D / (32 * num_warps) red.global.f32
            # per thread per step; rows past Nq and columns past D are clipped by the engine.
            DQ_blk.atomic_add([start_m, 0], dq)
        else:
            tl.atomic_add(DQ_blk + rows[:, None] * stride_dqm + offs_d[None, :], dq,
                          mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q_blk, DO_blk, Q_desc, DO_desc, LSE_row, Delta_row, DOC_row, stride_docn, doc_k,
                    k_doc_lo, k_doc_hi, stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, lo, hi, Nq, Nk, seq_shift, win_left, win_right, qk_scale,
                    seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, softcap_in, softcap_out, slope2,
                    alibi_rows, D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    USE_TMA: tl.constexpr, STATS_TMA: tl.constexpr, DQ_TMA: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr):
    """Query blocks [lo, hi) against one K/V block; MASKED=True applies the window and tail masks."""
    offs_m = lo + tl.arange(0, BLOCK_M)
    qT_ptrs = Q_blk + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd
    do_ptrs = DO_blk + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        if HAS_DOCS:
            # Skip the pair when the id ranges are disjoint: no query shares a key's document.
            doc_q, q_doc_lo, q_doc_hi = _doc_range(DOC_row, stride_docn, rows + seq_shift, Nk)
            if (k_doc_lo <= q_doc_hi) & (q_doc_lo <= k_doc_hi):
                mixed_docs = (k_doc_lo != k_doc_hi) | (q_doc_lo != q_doc_hi)
                dk, dv = _dkdv_block(dk, dv, k, v, qT_ptrs, do_ptrs, Q_desc, DO_desc, start_m, LSE_row, Delta_row,
                                     rows, offs_n, offs_d, doc_q[None, :], doc_k, mixed_docs, Nq, Nk, seq_shift,
                                     win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk,
                                     stride_dqm, dq_scale, softcap_in, softcap_out, slope2, alibi_rows, D, MASKED,
                                     MASK_LEFT,
                                     MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, ATOMIC_DQ, USE_TMA, STATS_TMA,
                                     DQ_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
        else:
            dk, dv = _dkdv_block(dk, dv, k, v, qT_ptrs, do_ptrs, Q_desc, DO_desc, start_m, LSE_row, Delta_row,
                                 rows, offs_n, offs_d, 0, doc_k, False, Nq, Nk, seq_shift, win_left, win_right,
                                 qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale,
                                 softcap_in, softcap_out, slope2, alibi_rows, D, MASKED, MASK_LEFT, MASK_RIGHT,
                                 HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, ATOMIC_DQ, USE_TMA, STATS_TMA, DQ_TMA, HAS_SOFTCAP,
                                 HAS_ALIBI, FAST_TANH)
        qT_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DOC, DOC_RANGE, CU_Q, CU_K,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_dob, stride_dom, stride_doh, stride_dod,
              stride_dkb, stride_dkn, stride_dkh, stride_dkd,
              stride_dvb, stride_dvn, stride_dvh, stride_dvd,
              stride_docb, stride_docn, DQ, stride_dqb, stride_dqm, stride_dqh, stride_lseb, stride_lseh,
              H, Hkv, GROUP, Nq, Nk, qk_scale, sm_scale, win_left, win_right, seed, dropout_p, dropout_scale,
              SLOPES, stride_slb, stride_slh, softcap_in, softcap_out,
              D: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr,
              STATS_TMA: tl.constexpr, DQ_TMA: tl.constexpr, VARLEN: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # NOTE: fp64 under torch.compile, see _fwd_kernel
    sm_scale = tl.cast(sm_scale, tl.float32)
    if HAS_DROPOUT:  # NOTE: fp64 under torch.compile too; fp32 keeps the mask identical to eager's
        dropout_p = tl.cast(dropout_p, tl.float32)
        dropout_scale = tl.cast(dropout_scale, tl.float32)
    # NOTE: a TMA copy's shared-memory destination must be 128-byte aligned, and triton 3.6 packs
    # the pipeline's 1-D buffers back to back: a 16-row LSE or Delta tile (64 bytes) put every
    # other stage off the boundary (CUDA "misaligned address" on an H100), so from 32 rows only.
    STATS_DESC: tl.constexpr = STATS_TMA and BLOCK_M >= 32
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // Hkv).to(tl.int64)
    off_hk = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    q_start, k_start, Nq, Nk = _sequence(CU_Q, CU_K, off_b, Nq, Nk, VARLEN)
    if VARLEN:
        if start_n >= Nk:  # the grid covers max_seqlen_k; this sequence is shorter
            return
    seq_shift = Nk - Nq

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
    k = tl.load(K + off_b * stride_kb + k_start * stride_kn + off_hk * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + k_start * stride_vn + off_hk * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    DOC_row = DOC + off_b * stride_docb
    doc_k = 0
    k_doc_lo = 0
    k_doc_hi = 0
    if HAS_DOCS:
        doc_k, k_doc_lo, k_doc_hi = _doc_range(DOC_row, stride_docn, offs_n, Nk)
        doc_k = doc_k[:, None]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query rows that see this key block: masked [lo, full_lo), seeing all of it
    # [full_lo, full_hi), masked [full_hi, hi). Rows past Nq add exactly zero (q = dO = 0).
    lo = 0
    full_lo = 0
    hi = Nq
    full_hi = Nq
    if MASK_RIGHT:
        lo = (tl.maximum(0, start_n - seq_shift - win_right) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(0, start_n + BLOCK_N - 1 - seq_shift - win_right), BLOCK_M) * BLOCK_M
    if MASK_LEFT:
        hi = tl.minimum(Nq, tl.maximum(0, start_n + BLOCK_N - seq_shift + win_left))
        full_hi = (tl.maximum(0, start_n - seq_shift + win_left + 1) // BLOCK_M) * BLOCK_M
        full_hi = tl.minimum(full_hi, hi)
    if MASK_RIGHT:
        full_lo = tl.minimum(full_lo, hi)
        if MASK_LEFT:
            full_hi = tl.maximum(full_hi, full_lo)
    if HAS_DOCS:  # packed documents: only the query rows of the documents of this key block
        lo, full_lo, full_hi, hi = _narrow_to_documents(DOC_RANGE + off_b * 2 * Nk, Nk, start_n,
                                                        tl.minimum(start_n + BLOCK_N, Nk) - 1, seq_shift,
                                                        lo, full_lo, full_hi, hi, BLOCK_M)
    dq_scale = sm_scale
    if HAS_DROPOUT:
        dq_scale = sm_scale * dropout_scale
    # GQA: this program owns dK, dV of one K/V head, so it sums over the group's query heads.
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b * H + off_h
        Q_blk = Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh
        DO_blk = DO + off_b * stride_dob + q_start * stride_dom + off_h * stride_doh
        DQ_blk = DQ + off_b * stride_dqb + q_start * stride_dqm + off_h * stride_dqh  # ATOMIC_DQ only
        if DQ_TMA:  # ATOMIC_DQ through the copy engine: a descriptor of (BLOCK_M, HEAD_DIM) tiles
            DQ_blk = tl.make_tensor_descriptor(DQ_blk, shape=[Nq, D], strides=[stride_dqm, 1],
                                               block_shape=[BLOCK_M, HEAD_DIM])
        Q_desc, DO_desc = _row_sources(Q_blk, DO_blk, Nq, stride_qm, stride_dom, D, BLOCK_M, HEAD_DIM, USE_TMA)
        stat_row = off_b * stride_lseb + off_h * stride_lseh + q_start  # (B, H, Nq) or varlen (H, total_q)
        LSE_row, Delta_row = _stat_sources(LSE + stat_row, Delta + stat_row, Nq, BLOCK_M, STATS_DESC)
        cap_in, cap_out, slope2 = _variant_scalars(SLOPES, off_b, off_h, stride_slb, stride_slh, softcap_in,
                                                   softcap_out, HAS_ALIBI, HAS_SOFTCAP)
        alibi_rows = _alibi_rows(slope2, BLOCK_M, HAS_ALIBI)
        if MASK_RIGHT:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_blk, DO_blk, Q_desc, DO_desc, LSE_row, Delta_row,
                                     DOC_row, stride_docn, doc_k, k_doc_lo, k_doc_hi,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     offs_n, offs_d, lo, full_lo, Nq, Nk, seq_shift, win_left, win_right,
                                     qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, cap_in, cap_out,
                                     slope2, alibi_rows, D, BLOCK_M, True, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                                     ATOMIC_DQ, USE_TMA, STATS_DESC, DQ_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_blk, DO_blk, Q_desc, DO_desc, LSE_row, Delta_row,
                                 DOC_row, stride_docn, doc_k, k_doc_lo, k_doc_hi,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 offs_n, offs_d, full_lo, full_hi, Nq, Nk, seq_shift, win_left, win_right,
                                 qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, cap_in, cap_out,
                                 slope2, alibi_rows, D, BLOCK_M, False, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                                 ATOMIC_DQ, USE_TMA, STATS_DESC, DQ_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
        if MASK_LEFT:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_blk, DO_blk, Q_desc, DO_desc, LSE_row, Delta_row,
                                     DOC_row, stride_docn, doc_k, k_doc_lo, k_doc_hi,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     offs_n, offs_d, full_hi, hi, Nq, Nk, seq_shift, win_left, win_right,
                                     qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, cap_in, cap_out,
                                     slope2, alibi_rows, D, BLOCK_M, True, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                                     ATOMIC_DQ, USE_TMA, STATS_DESC, DQ_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    if HAS_DROPOUT:
        dk *= sm_scale * dropout_scale
        dv *= dropout_scale
    else:
        dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + k_start * stride_dkn + off_hk * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + k_start * stride_dvn + off_hk * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, K_desc, V_desc, start_n, cols, offs_m, q_lo, offs_d, doc_q,
              doc_k,
              mixed_docs, Nk, seq_shift, win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, off_bh, Nq,
              softcap_in, softcap_out, slope2, D: tl.constexpr, MASKED: tl.constexpr,
              MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
              DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr):
    """One key block of the dQ loop; masks (and USE_TMA) as in _fwd_block."""
    if USE_TMA:  # NOTE: the two loads adjacent share one barrier (see _fwd_block)
        k = K_desc.load([start_n, 0])
        v = V_desc.load([start_n, 0])
        kT = tl.trans(k)
        vT = tl.trans(v)
    else:
        d_ok = offs_d < D
        if MASKED:
            kv_ok = d_ok[:, None] & (cols[None, :] < Nk)
        else:
            kv_ok = d_ok[:, None]
        kT = tl.load(kT_ptrs, mask=kv_ok, other=0.0)
        vT = tl.load(vT_ptrs, mask=kv_ok, other=0.0)
    # -- P = exp2(S - LSE), recomputed --
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
    if HAS_SOFTCAP or HAS_ALIBI:
        # HAS_ALIBI == 2: lse2 arrives moved as the rows' scores are (_bwd_dq)
        s, t, s_scale = _score_mod(qk, offs_m[:, None], q_lo, cols[None, :], seq_shift, qk_scale, softcap_in,
                                   softcap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
        p = tl.math.exp2(s * s_scale - lse2[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    p = _mask_tile(p, offs_m[:, None], cols[None, :], doc_q, doc_k, mixed_docs, Nk, seq_shift, win_left,
                   win_right, 0.0, MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS)
    # -- dS = P * (dP - Delta), dP = (dO V^T) o Z / (1 - p); dQ += dS K --
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        dp = dropout_apply(dp, seed, off_bh, offs_m, cols, dropout_p)  # NOTE: 1 / (1 - p) is in delta, dq
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:  # -- through the soft-cap: d tanh(x) = 1 - tanh(x)^2 --
        ds = ds * (1.0 - t * t)
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn, stride_vd,
                  DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                  offs_m, q_lo, offs_n, offs_d, lo, hi, Nk, seq_shift, win_left, win_right, qk_scale,
                  seed, dropout_p, dropout_scale, off_bh, Nq, softcap_in, softcap_out, slope2,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr):
    """Key blocks [lo, hi) against the program's query block."""
    kT_ptrs = K_blk + (lo + offs_n)[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = V_blk + (lo + offs_n)[None, :] * stride_vn + offs_d[:, None] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if HAS_DOCS:
            # Skip the pair when the id ranges are disjoint: no query shares a key's document.
            doc_k, k_doc_lo, k_doc_hi = _doc_range(DOC_row, stride_docn, cols, Nk)
            if (k_doc_lo <= q_doc_hi) & (q_doc_lo <= k_doc_hi):
                mixed_docs = (k_doc_lo != k_doc_hi) | (q_doc_lo != q_doc_hi)
                dq = _dq_block(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, K_desc, V_desc, start_n, cols, offs_m,
                               q_lo, offs_d, doc_q, doc_k[None, :], mixed_docs, Nk, seq_shift, win_left, win_right,
                               qk_scale, seed, dropout_p, dropout_scale, off_bh, Nq, softcap_in, softcap_out, slope2,
                               D, MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA,
                               HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
        else:
            dq = _dq_block(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, K_desc, V_desc, start_n, cols, offs_m, q_lo,
                           offs_d, doc_q, 0, False, Nk, seq_shift, win_left, win_right, qk_scale, seed,
                           dropout_p, dropout_scale, off_bh, Nq, softcap_in, softcap_out, slope2, D, MASKED,
                           MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA, HAS_SOFTCAP,
                           HAS_ALIBI, FAST_TANH)
        kT_ptrs += BLOCK_N * stride_kn
        vT_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, Out, LSE, LSE2, Delta, DQ, DOC, DOC_RANGE, CU_Q, CU_K,
            stride_qb, stride_qm, stride_qh, stride_qd,
            stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd,
            stride_dob, stride_dom, stride_doh, stride_dod,
            stride_ob, stride_om, stride_oh, stride_od,
            stride_dqb, stride_dqm, stride_dqh, stride_dqd,
            stride_docb, stride_docn, stride_lseb, stride_lseh,
            H, GROUP, Nq, Nk, qk_scale, sm_scale, win_left, win_right, seed, dropout_p, dropout_scale,
            SLOPES, stride_slb, stride_slh, softcap_in, softcap_out,
            D: tl.constexpr, HEAD_DIM: tl.constexpr,
            MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, VARLEN: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # NOTE: fp64 under torch.compile, see _fwd_kernel
    sm_scale = tl.cast(sm_scale, tl.float32)
    if HAS_DROPOUT:  # NOTE: fp64 under torch.compile too; fp32 keeps the mask identical to eager's
        dropout_p = tl.cast(dropout_p, tl.float32)
        dropout_scale = tl.cast(dropout_scale, tl.float32)
    pid_m = tl.program_id(0)
    if MASK_RIGHT and not MASK_LEFT:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    off_hk = off_h // GROUP
    start_m = pid_m * BLOCK_M
    q_start, k_start, Nq, Nk = _sequence(CU_Q, CU_K, off_b, Nq, Nk, VARLEN)
    if VARLEN:
        if start_m >= Nq:  # the grid covers max_seqlen_q; this sequence is shorter
            return
    seq_shift = Nk - Nq
    softcap_in, softcap_out, slope2 = _variant_scalars(SLOPES, off_b, off_h, stride_slb, stride_slh, softcap_in,
                                                       softcap_out, HAS_ALIBI, HAS_SOFTCAP)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + q_start * stride_dom + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    bh = pid_bh.to(tl.int64)
    stat_rows = off_b * stride_lseb + off_h * stride_lseh + q_start + offs_m  # (B, H, Nq) or varlen (H, total_q)
    lse2 = tl.load(LSE + stat_rows, mask=row_ok, other=0.0) * 1.4426950408889634  # NOTE: log2(e)
    tl.store(LSE2 + stat_rows, lse2, mask=row_ok)  # for the dK/dV pass, which runs after this one
    lse2 = lse2 + _alibi_rows(slope2, BLOCK_M, HAS_ALIBI)  # HAS_ALIBI == 2's moved rows (_score_mod)
    # -- Delta_i = rowsum(dO_i * O_i), stored for the dK/dV pass, which runs after this one --
    o = tl.load(Out + off_b * stride_ob + q_start * stride_om + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + stat_rows, delta, mask=row_ok)
    if HAS_DROPOUT:  # dS = (P * (dP o Z - Delta (1 - p))) / (1 - p), see _dkdv_block
        delta = delta * (1.0 - dropout_p)
    DOC_row = DOC + off_b * stride_docb
    doc_q = 0
    q_doc_lo = 0
    q_doc_hi = 0
    if HAS_DOCS:
        doc_q, q_doc_lo, q_doc_hi = _doc_range(DOC_row, stride_docn, offs_m + seq_shift, Nk)
        doc_q = doc_q[:, None]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    K_blk = K + off_b * stride_kb + k_start * stride_kn + off_hk * stride_kh
    V_blk = V + off_b * stride_vb + k_start * stride_vn + off_hk * stride_vh
    K_desc, V_desc = _row_sources(K_blk, V_blk, Nk, stride_kn, stride_vn, D, BLOCK_N, HEAD_DIM, USE_TMA)
    # Key range: masked [lo, full_lo), seen whole by every row [full_lo, full_hi), masked
    # [full_hi, hi) (causal diagonal, window edges, Nk tail, documents); keys outside [lo, hi)
    # are invisible to every row and never loaded. Computed inline so the default case keeps
    # the literal lower bound 0.
    lo = 0
    full_lo = 0
    hi = Nk
    full_hi = Nk
    if MASK_LEFT:
        lo = (tl.maximum(0, start_m + seq_shift - win_left) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(0, start_m + BLOCK_M - 1 + seq_shift - win_left), BLOCK_N) * BLOCK_N
    if MASK_RIGHT:  # causal is the window (-1, 0)
        hi = tl.minimum(Nk, tl.maximum(0, start_m + BLOCK_M + seq_shift + win_right))
        full_hi = tl.minimum(Nk, tl.maximum(0, start_m + seq_shift + win_right + 1))
    full_hi = (full_hi // BLOCK_N) * BLOCK_N  # whole blocks only: the Nk tail stays masked
    if MASK_LEFT:
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.maximum(full_hi, full_lo)
    if HAS_DOCS:  # packed documents: only the keys of the documents of this block's rows
        lo, full_lo, full_hi, hi = _narrow_to_documents(DOC_RANGE + off_b * 2 * Nk, Nk, start_m + seq_shift,
                                                        tl.minimum(start_m + BLOCK_M, Nq) - 1 + seq_shift, 0,
                                                        lo, full_lo, full_hi, hi, BLOCK_N)
    if MASK_LEFT:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn,
                           stride_vd, DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                           offs_m, start_m, offs_n, offs_d, lo, full_lo, Nk, seq_shift,
                           win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh, Nq, softcap_in, softcap_out,
                           slope2, D, BLOCK_N, True, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                           USE_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn, stride_vd,
                       DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                       offs_m, start_m, offs_n, offs_d, full_lo, full_hi, Nk, seq_shift,
                       win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh, Nq, softcap_in, softcap_out,
                       slope2, D, BLOCK_N, False, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                       USE_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn, stride_vd,
                       DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                       offs_m, start_m, offs_n, offs_d, full_hi, hi, Nk, seq_shift,
                       win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh, Nq, softcap_in, softcap_out,
                       slope2, D, BLOCK_N, True, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT,
                       USE_TMA, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    if HAS_DROPOUT:
        dq *= sm_scale * dropout_scale
    else:
        dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + q_start * stride_dqm + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Host launchers, registered as torch.library triton ops
# ----------------------------------------------------------------------------------------

#: The passes a call launches: the forward, the dK/dV pass (deterministic), the dK/dV pass
#: that also adds dQ with atomics (deterministic=False) and the dQ pass.
PASSES = ("fwd", "dkdv", "dkdv_atomic", "dq")
_KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv, "dkdv_atomic": _bwd_dkdv, "dq": _bwd_dq}
_AUTOTUNE_KEY = ["Nq", "Nk", "HEAD_DIM", "MASK_LEFT", "MASK_RIGHT", "HAS_DOCS", "HAS_DROPOUT", "DOT_PRECISION",
                 "ATOMIC_DQ", "USE_TMA", "STATS_TMA", "DQ_TMA", "VARLEN", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_SINKS"]


def _autotuned_pass(name: str, wide: bool):
    # NOTE: the autotuner runs each config on the same arguments: the atomic pass's dQ
    # accumulator is zeroed before every trial and after the last. One tuning per shape class
    # (Nq, Nk rounded up to powers of two), its pick kept on disk for later processes.
    return shape_class_autotuned(_KERNELS[name], _configs.triton_configs(_configs.ROWS[name][wide]), _AUTOTUNE_KEY,
                                 name=f"flash_v2-{name}-{'wide' if wide else 'narrow'}",
                                 reset_to_zero=["DQ"] if name == "dkdv_atomic" else None)


# One launcher per (pass, head-dim class): HEAD_DIM > 128 picks the "wide" one on the host, so
# no early_config_prune hook is needed (torch.compile replays autotuners). The interpreter
# launches the plain kernels with _configs.INTERPRETER's blocks.
_LAUNCHERS = {name: (_KERNELS[name], _KERNELS[name]) if _INTERPRET else
              (_autotuned_pass(name, False), _autotuned_pass(name, True)) for name in PASSES}
#: (pass, wide) -> the config ``pin`` set (a full config dict).
_PINNED: dict[tuple[str, bool], dict] = {}

#: Fixed tiles (block_m, block_n): powers of two in this range (tl.dot needs sides >= 16).
FIXED_BLOCKS = (16, 256)


def check_blocks(block_m, block_n) -> Optional[tuple[int, int]]:
    """Validate the public block_m / block_n: both None (autotune) or both powers of two in 16..256."""
    if block_m is None and block_n is None:
        return None
    if block_m is None or block_n is None:
        raise ValueError(f"block_m and block_n must be set together (or both None to autotune), "
                         f"got block_m={block_m}, block_n={block_n}")
    lo, hi = FIXED_BLOCKS
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi) or value & (value - 1):
            raise ValueError(f"{name} must be a power of two in {lo}..{hi} (16, 32, 64, 128, 256), got {value!r}")
    return block_m, block_n


def _fixed_meta(name: str, block_m: int, block_n: int, head_dim: int) -> dict:
    """Launch parameters of a fixed tile: block_m tiles the dimension a program owns, block_n
    the one it loops over, so the dK/dV pass (which owns keys) swaps the two."""
    if name in ("dkdv", "dkdv_atomic"):
        meta = dict(BLOCK_M=block_n, BLOCK_N=block_m)
    else:
        meta = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    # NOTE: 8 warps from a 128 x 64 tile up, as the autotuner picks on an H100; stages as the
    # first (default) config of the autotune lists.
    meta["num_warps"] = 8 if block_m * block_n >= 128 * 64 else 4
    meta["num_stages"] = 3 if head_dim <= 128 else 2
    return meta


def _pinned_meta(config: dict) -> dict:
    """A pinned config as launch keywords: the interpreter takes only the block sizes."""
    if _INTERPRET:
        return dict(BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"])
    meta = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    if config["maxnreg"] is not None:
        meta["maxnreg"] = config["maxnreg"]
    return meta


def _launch(name: str, grid, args: tuple, meta: dict, head_dim: int, blocks: tuple[int, int]) -> None:
    """Launch one pass: with the fixed tiles ``blocks``, else the pinned config, else autotuned
    (the interpreter: its one small config)."""
    block_m, block_n = blocks
    if block_m < 0:
        pinned = _PINNED.get((name, head_dim > 128))
        if pinned is not None:
            wrap_triton(_KERNELS[name])[grid](*args, **meta, **_pinned_meta(pinned))
        elif _INTERPRET:
            wrap_triton(_KERNELS[name])[grid](*args, **meta, **_configs.INTERPRETER[name])
        else:
            wrap_triton(_LAUNCHERS[name][head_dim > 128])[grid](*args, **meta)
        return
    fixed = _fixed_meta(name, block_m, block_n, head_dim)
    while True:
        try:
            wrap_triton(_KERNELS[name])[grid](*args, **meta, **fixed)
            return
        except triton.runtime.errors.OutOfResources as err:
            # NOTE: eager mode only (a traced launch does not run here). Fewer pipeline stages
            # need less shared memory; the tile itself, the ablation's variable, never changes.
            if fixed["num_stages"] <= 1:
                raise ValueError(f"block_m={block_m}, block_n={block_n} need more on-chip memory than this GPU "
                                 f"has at head_dim {head_dim} ({err}); use smaller tiles") from err
            warnings.warn(f"flash_v2 {name}: tiles (block_m, block_n) = {(block_m, block_n)} with "
                          f"num_stages={fixed['num_stages']} exceed the GPU's resources; retrying with "
                          f"{fixed['num_stages'] - 1}", RuntimeWarning, stacklevel=2)
            fixed["num_stages"] -= 1


def _dot_precision(dtype: torch.dtype) -> str:
    # NOTE: Triton's default for a float32 dot is TF32 (about 1e-3 relative error);
    # float32 callers get IEEE float32. For fp16/bf16 the setting has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


def _doc_ranges(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 2, Nk) int32: [start, end) of each key position's run of equal ids in rows whose
    ids are non-decreasing (packed documents: a run is a document), else [0, Nk).

    A few element-wise device ops per call and no device->host sync; the kernels clip their
    loops to these ranges, so packed documents cost their own lengths, not N^2.
    """
    B, N = doc_ids.shape
    pos = torch.arange(N, device=doc_ids.device)
    first = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    new_run = torch.cat((first, doc_ids[:, 1:] != doc_ids[:, :-1]), dim=1)
    ends_run = torch.cat((new_run[:, 1:], first), dim=1)
    start = torch.where(new_run, pos, 0).cummax(dim=1).values
    end = torch.where(ends_run, pos + 1, N).flip(1).cummin(dim=1).values.flip(1)
    packed = (doc_ids[:, 1:] >= doc_ids[:, :-1]).all(dim=1, keepdim=True)
    start = torch.where(packed, start, 0)
    end = torch.where(packed, end, N)
    return torch.stack((start, end), dim=1).to(torch.int32).contiguous()


def _mask_args(q, doc_ids, window_left, window_right, dropout_p, seed):
    """Kernel arguments of the mask and dropout: (DOC, its two strides), (win_left, win_right,
    seed, dropout_p, dropout_scale) and the constexprs (features that are off compile out)."""
    # NOTE: without documents the kernels never read DOC or DOC_RANGE; q stands in for them.
    doc = (q, q) if doc_ids is None else (doc_ids, _doc_ranges(doc_ids))
    doc_strides = (0, 0) if doc_ids is None else doc_ids.stride()
    flags = dict(MASK_LEFT=window_left >= 0, MASK_RIGHT=window_right >= 0, HAS_DOCS=doc_ids is not None,
                 HAS_DROPOUT=dropout_p > 0.0)
    # NOTE: 1 / (1 - p) is computed once on the host; unused when p = 0.
    scalars = (max(window_left, 0), max(window_right, 0), seed, dropout_p, 1.0 / (1.0 - dropout_p))
    return doc, doc_strides, scalars, flags


def _variant_args(q, alibi_slopes, softcap, sink_logits, softmax_scale, causal: bool = False,
                  sinks_arg: bool = True):
    """Kernel arguments of the variants: (SLOPES[, SINKS], the slopes' two strides, softcap_in,
    softcap_out) and their constexprs (a variant that is off compiles out; its pointers are q).
    HAS_ALIBI is 0 (off), 2 for a causal call (window_right == 0: no visible key lies right of
    its query, so ALiBi's |.| is one-sided and becomes a column term, see _score_mod), else 1."""
    slopes = (q, 0, 0) if alibi_slopes is None else (alibi_slopes, *alibi_slopes.stride())
    sinks = (q if sink_logits is None else sink_logits,) if sinks_arg else ()
    cap_in, cap_out = (softmax_scale / softcap, softcap * LOG2E) if softcap > 0.0 else (0.0, 0.0)
    # NOTE: tanh.approx.f32 (inline PTX) for half-precision inputs on NVIDIA GPUs, as flash-attn's
    # soft-cap; float32 keeps the exact formula, and so does the interpreter.
    fast_tanh = (not _INTERPRET and q.device.type == "cuda" and torch.version.hip is None
                 and q.dtype in (torch.float16, torch.bfloat16))
    alibi = 0 if alibi_slopes is None else (2 if causal else 1)
    flags = dict(HAS_ALIBI=alibi, HAS_SOFTCAP=softcap > 0.0, FAST_TANH=fast_tanh)
    if sinks_arg:
        flags["HAS_SINKS"] = sink_logits is not None
    return (slopes[0], *sinks, slopes[1], slopes[2], cap_in, cap_out), flags


def _sink_grad(sink_logits: Optional[torch.Tensor], lse: torch.Tensor, delta: torch.Tensor,
               head_dim: int) -> torch.Tensor:
    """d sink_h = -sum over rows of exp(sink_h - LSE_i) Delta_i (the sink's probability times
    rowsum(dO o O)); lse, delta have the heads on ``head_dim``. A torch reduction, so bit-identical
    on every run (no atomics). Empty (0,) without sinks."""
    if sink_logits is None:
        return lse.new_empty((0,))
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    terms = torch.exp(sink_logits.view(shape) - lse) * delta
    return -terms.sum(dim=[d for d in range(lse.dim()) if d != head_dim])


def _flash_v2_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor],
                  softmax_scale: float, window_left: int, window_right: int, dropout_p: float, seed: int,
                  block_m: int, block_n: int, alibi_slopes: Optional[torch.Tensor] = None, softcap: float = 0.0,
                  sink_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    out = torch.empty((B, Nq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    doc, doc_strides, scalars, flags = _mask_args(q, doc_ids, window_left, window_right, dropout_p, seed)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    # NOTE: the kernels read cu_seqlens only when VARLEN; q stands in for them.
    variant, variant_flags = _variant_args(q, alibi_slopes, softcap, sink_logits, softmax_scale, window_right == 0)
    args = (q, k, v, out, lse, *doc, q, q, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *doc_strides,
            lse.stride(0), lse.stride(1), H, H // Hkv, Nq, Nk, softmax_scale * LOG2E, *scalars, *variant)
    meta = dict(D=D, HEAD_DIM=triton.next_power_of_2(D), **flags, DOT_PRECISION=_dot_precision(q.dtype),
                MASKED_LSE=MASKED_ROW_LSE, USE_TMA=use_tma(k, v), VARLEN=False, **variant_flags)
    _launch("fwd", grid, args, meta, D, (block_m, block_n))
    return out, lse


def _flash_v2_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, doc_ids: Optional[torch.Tensor], softmax_scale: float, window_left: int,
                  window_right: int, dropout_p: float, seed: int, block_m: int,
                  block_n: int, deterministic: bool = True, bulk_reduce_dq: bool = True,
                  alibi_slopes: Optional[torch.Tensor] = None, softcap: float = 0.0,
                  sink_logits: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    HEAD_DIM = triton.next_power_of_2(D)
    doc, doc_strides, scalars, flags = _mask_args(q, doc_ids, window_left, window_right, dropout_p, seed)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)  # LSE in base 2, written by the first pass for the dK/dV pass
    dq = torch.empty((B, Nq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Nk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Nk, Hkv, D), dtype=v.dtype, device=v.device)
    variant, variant_flags = _variant_args(q, alibi_slopes, softcap, None, softmax_scale, window_right == 0,
                                                  sinks_arg=False)
    meta = dict(D=D, HEAD_DIM=HEAD_DIM, **flags, DOT_PRECISION=_dot_precision(q.dtype), VARLEN=False,
                **variant_flags)
    blocks = (block_m, block_n)
    tma_dkdv = use_tma(q, do)
    tma_dq = use_tma(k, v)

    def grid_q(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    def grid_kv(meta):
        return (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hkv)

    if deterministic:
        # The dQ pass first: it also computes Delta = rowsum(dO * O) for its rows (no preprocess
        # launch, one read of dO fewer), which the dK/dV pass then reads.
        args = (q, k, v, do, out, lse, lse2, delta, dq, *doc, q, q,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *out.stride(), *dq.stride(), *doc_strides,
                lse.stride(0), lse.stride(1), H, H // Hkv, Nq, Nk, softmax_scale * LOG2E, softmax_scale, *scalars,
                *variant)
        _launch("dq", grid_q, args, dict(meta, USE_TMA=tma_dq), D, blocks)
    else:
        wrap_triton(_bwd_preprocess)[(triton.cdiv(Nq, _configs.PREPROCESS_BLOCK_M), B * H)](
            out, do, delta, lse, lse2, *out.stride(), *do.stride(), H, Nq,
            D=D, HEAD_DIM=HEAD_DIM, BLOCK_M=_configs.PREPROCESS_BLOCK_M)

    # deterministic=False: the dK/dV pass also adds dS K into a float32 dQ with atomics (5
    # matmuls instead of 7, as flash-attn's default backward): a bulk reduce-add of each tile by
    # the copy engine where the pass reads through descriptors (bulk_reduce_dq, eager only), else
    # one red.global per element; dQ came from its own pass when deterministic.
    dq_acc = torch.zeros((B, Nq, H, D), dtype=torch.float32, device=q.device) if not deterministic else \
        torch.empty(1, dtype=torch.float32, device=q.device)  # NOTE: a dummy, never read
    dq_strides = (dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2)) if not deterministic else (0, 0, 0)
    args = (q, k, v, do, lse2, delta, dk, dv, *doc, q, q,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *doc_strides,
            dq_acc, *dq_strides, lse.stride(0), lse.stride(1),
            H, Hkv, H // Hkv, Nq, Nk, softmax_scale * LOG2E, softmax_scale, *scalars, *variant)
    _launch("dkdv" if deterministic else "dkdv_atomic", grid_kv, args,
            dict(meta, ATOMIC_DQ=not deterministic, USE_TMA=tma_dkdv, STATS_TMA=tma_dkdv and use_tma_stats(Nq),
                 DQ_TMA=not deterministic and bulk_reduce_dq and tma_dkdv and not _INTERPRET and use_tma(dq_acc)),
            D, blocks)
    dsink = _sink_grad(sink_logits, lse, delta, 1)
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv, dsink
    return dq, dk, dv, dsink


def _flash_v2_fwd_fake(q, k, v, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed, block_m,
                       block_n, alibi_slopes=None, softcap=0.0, sink_logits=None):
    B, Nq, H, D = q.shape
    return q.new_empty((B, Nq, H, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


def _flash_v2_bwd_fake(do, q, k, v, out, lse, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed,
                       block_m, block_n, deterministic=True, bulk_reduce_dq=True, alibi_slopes=None, softcap=0.0,
                       sink_logits=None):
    dsink = lse.new_empty((0,) if sink_logits is None else tuple(sink_logits.shape))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


_flash_v2_fwd_op = register_op("flash_v2_fwd", _flash_v2_fwd, _flash_v2_fwd_fake)
_flash_v2_bwd_op = register_op("flash_v2_bwd", _flash_v2_bwd, _flash_v2_bwd_fake)


def _varlen_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """A packed (total, nheads, headdim) tensor's strides as the kernels' (b, n, h, d): the
    program's sequence is found through cu_seqlens, so the batch stride is 0."""
    return (0, *t.stride())


def _flash_v2_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                         window_left: int, window_right: int, block_m: int, block_n: int,
                         alibi_slopes: Optional[torch.Tensor] = None, softcap: float = 0.0,
                         sink_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    total_q, H, D = q.shape
    Hkv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse
    doc, doc_strides, scalars, flags = _mask_args(q, None, window_left, window_right, 0.0, 0)

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * H)

    variant, variant_flags = _variant_args(q, alibi_slopes, softcap, sink_logits, softmax_scale, window_right == 0)
    args = (q, k, v, out, lse, *doc, cu_seqlens_q, cu_seqlens_k, *_varlen_strides(q), *_varlen_strides(k),
            *_varlen_strides(v), *_varlen_strides(out), *doc_strides, 0, lse.stride(0),
            H, H // Hkv, max_seqlen_q, max_seqlen_k, softmax_scale * LOG2E, *scalars, *variant)
    meta = dict(D=D, HEAD_DIM=triton.next_power_of_2(D), **flags, DOT_PRECISION=_dot_precision(q.dtype),
                MASKED_LSE=MASKED_ROW_LSE, USE_TMA=False, VARLEN=True,  # packed rows: pointer loads
                **variant_flags)
    _launch("fwd", grid, args, meta, D, (block_m, block_n))
    return out, lse


def _flash_v2_varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int,
                         window_right: int, block_m: int, block_n: int, deterministic: bool = True,
                         alibi_slopes: Optional[torch.Tensor] = None, softcap: float = 0.0,
                         sink_logits: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    total_q, H, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    HEAD_DIM = triton.next_power_of_2(D)
    # Every row is written: each query block of a sequence has a program, and so does each key
    # block (keys of a sequence without queries get dK = dV = 0 from an empty loop).
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if total_q == 0 or total_k == 0:
        # NOTE: rows without keys have LSE = sink and O = 0, so Delta = 0 and the sink's gradient is 0 too.
        dsink = lse.new_empty((0,)) if sink_logits is None else torch.zeros_like(sink_logits)
        return dq.zero_(), dk.zero_(), dv.zero_(), dsink
    doc, doc_strides, scalars, flags = _mask_args(q, None, window_left, window_right, 0.0, 0)
    delta = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    variant, variant_flags = _variant_args(q, alibi_slopes, softcap, None, softmax_scale, window_right == 0,
                                                  sinks_arg=False)
    meta = dict(D=D, HEAD_DIM=HEAD_DIM, **flags, DOT_PRECISION=_dot_precision(q.dtype), VARLEN=True,
                **variant_flags)
    blocks = (block_m, block_n)

    def grid_q(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * H)

    def grid_kv(meta):
        return (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), batch * Hkv)

    if deterministic:
        args = (q, k, v, do, out, lse, lse2, delta, dq, *doc, cu_seqlens_q, cu_seqlens_k,
                *_varlen_strides(q), *_varlen_strides(k), *_varlen_strides(v), *_varlen_strides(do),
                *_varlen_strides(out), *_varlen_strides(dq), *doc_strides, 0, lse.stride(0),
                H, H // Hkv, max_seqlen_q, max_seqlen_k, softmax_scale * LOG2E, softmax_scale, *scalars, *variant)
        _launch("dq", grid_q, args, dict(meta, USE_TMA=False), D, blocks)
    else:
        # The packed rows as a batch of one with total_q queries: the (H, total_q) statistics
        # are then the preprocess pass's own (B, H, Nq) layout.
        wrap_triton(_bwd_preprocess)[(triton.cdiv(total_q, _configs.PREPROCESS_BLOCK_M), H)](
            out, do, delta, lse, lse2, *_varlen_strides(out), *_varlen_strides(do), H, total_q,
            D=D, HEAD_DIM=HEAD_DIM, BLOCK_M=_configs.PREPROCESS_BLOCK_M)
    dq_acc = torch.zeros((total_q, H, D), dtype=torch.float32, device=q.device) if not deterministic else \
        torch.empty(1, dtype=torch.float32, device=q.device)  # NOTE: a dummy, never read
    dq_strides = _varlen_strides(dq_acc)[:3] if not deterministic else (0, 0, 0)
    args = (q, k, v, do, lse2, delta, dk, dv, *doc, cu_seqlens_q, cu_seqlens_k,
            *_varlen_strides(q), *_varlen_strides(k), *_varlen_strides(v), *_varlen_strides(do),
            *_varlen_strides(dk), *_varlen_strides(dv), *doc_strides, dq_acc, *dq_strides, 0, lse.stride(0),
            H, Hkv, H // Hkv, max_seqlen_q, max_seqlen_k, softmax_scale * LOG2E, softmax_scale, *scalars, *variant)
    # NOTE: no tensor descriptors for the statistics or the dQ reduce-add here: a sequence's
    # rows start at any packed offset, so its LSE row is not 16-byte aligned.
    _launch("dkdv" if deterministic else "dkdv_atomic", grid_kv, args,
            dict(meta, ATOMIC_DQ=not deterministic, USE_TMA=False, STATS_TMA=False, DQ_TMA=False),
            D, blocks)
    dsink = _sink_grad(sink_logits, lse, delta, 0)
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv, dsink
    return dq, dk, dv, dsink


def _flash_v2_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                              window_left, window_right, block_m, block_n, alibi_slopes=None, softcap=0.0,
                              sink_logits=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _flash_v2_varlen_bwd_fake(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              softmax_scale, window_left, window_right, block_m, block_n, deterministic=True,
                              alibi_slopes=None, softcap=0.0, sink_logits=None):
    dsink = lse.new_empty((0,) if sink_logits is None else tuple(sink_logits.shape))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


_flash_v2_varlen_fwd_op = register_op("flash_v2_varlen_fwd", _flash_v2_varlen_fwd, _flash_v2_varlen_fwd_fake)
_flash_v2_varlen_bwd_op = register_op("flash_v2_varlen_bwd", _flash_v2_varlen_bwd, _flash_v2_varlen_bwd_fake)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------

class FlashV2Function(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed, block_m, block_n,
                deterministic, alibi_slopes=None, softcap=0.0, sink_logits=None):
        out, lse = _flash_v2_fwd_op(q, k, v, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed,
                                    block_m, block_n, alibi_slopes, softcap, sink_logits)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids, alibi_slopes, sink_logits)
        ctx.softcap = softcap
        ctx.softmax_scale = softmax_scale
        ctx.window = (window_left, window_right)
        ctx.dropout = (dropout_p, seed)  # the seed, not the mask: the backward regenerates Z
        ctx.blocks = (block_m, block_n)
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, doc_ids, alibi_slopes, sink_logits = ctx.saved_tensors
        # NOTE (2026-11, torch 2.11): torch.compile's analysis of which arguments a Triton kernel
        # mutates does not see a tensor descriptor's reduce-add, so under compile dQ's float32
        # accumulator came back unwritten (zeros); there the atomic pass adds with pointer atomics.
        dq, dk, dv, dsink = _flash_v2_bwd_op(dout, q, k, v, out, lse, doc_ids, ctx.softmax_scale, *ctx.window,
                                             *ctx.dropout, *ctx.blocks, ctx.deterministic,
                                             not torch.compiler.is_compiling(), alibi_slopes, ctx.softcap,
                                             sink_logits)
        return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None,
                dsink if sink_logits is not None else None)


class FlashV2VarlenFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                window_right, block_m, block_n, deterministic, alibi_slopes=None, softcap=0.0, sink_logits=None):
        out, lse = _flash_v2_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           softmax_scale, window_left, window_right, block_m, block_n,
                                           alibi_slopes, softcap, sink_logits)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits)
        ctx.softcap = softcap
        ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
        ctx.softmax_scale = softmax_scale
        ctx.window = (window_left, window_right)
        ctx.blocks = (block_m, block_n)
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits = ctx.saved_tensors
        dq, dk, dv, dsink = _flash_v2_varlen_bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                    *ctx.max_seqlens, ctx.softmax_scale, *ctx.window, *ctx.blocks,
                                                    ctx.deterministic, alibi_slopes, ctx.softcap, sink_logits)
        return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None,
                dsink if sink_logits is not None else None)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

def flash_v2_attention(q, k, v, *, causal: bool = False, softmax_scale=None, dropout_p: float = 0.0,
                       window_size=(-1, -1), doc_ids=None, return_lse: bool = False,
                       dropout_seed: Optional[int] = None, return_dropout_mask: bool = False,
                       block_m: Optional[int] = None, block_n: Optional[int] = None, deterministic: bool = True,
                       alibi_slopes=None, softcap: float = 0.0, sink_logits=None):
    """FlashAttention-2: softmax(Q K^T * softmax_scale) V without materialising S or P.

    Arguments as in fatrain.kernels (the registry); float16, bfloat16 or float32, headdim
    16..256, CUDA tensors (CPU tensors under the Triton interpreter). Its own options:
        block_m, block_n: fixed tiles instead of the autotuner's (both None: autotune; else
            both powers of two in 16..256). block_m tiles the dimension a program owns and
            block_n the one it loops over: (BLOCK_M, BLOCK_N) = (block_m, block_n) queries x
            keys in the forward and the dQ pass, keys x queries in the dK/dV pass, as the
            FA2 tutorial's (BLOCK_M1, BLOCK_N1) = (32, 128) / (BLOCK_M2, BLOCK_N2) = (128, 32).
            num_warps 8 from a 128 x 64 tile up, else 4; num_stages as the autotuner's first
            config, lowered (with a warning) if the tiles do not fit in shared memory; a tile
            that does not fit even with one stage raises ValueError.
        deterministic: True (default): dQ from its own pass, bit-identical gradients on every
            run. False: the dK/dV pass also adds dS K into a float32 dQ with atomic adds (5
            matmuls in the backward instead of 7, as flash-attn's default backward), so dQ's
            last bits depend on the order the additions land in; on Hopper each dQ tile is
            added by one bulk reduce-add of the copy engine (pointer atomics under
            torch.compile, whose mutation analysis misses the reduce-add).
    Limits: without a dropout_seed the seed is drawn on the host (a graph break under
    torch.compile: pass a seed to compile with fullgraph=True). Under autocast the inputs are
    cast to the autocast dtype, and so is the output. alibi_slopes, softcap and sink_logits as
    the registry defines them (the bias recomputed from the slopes in each pass; d sink_logits
    reduced by a torch sum from per-row terms, so bit-identical on every run).
    """
    check_qkv(q, k, v, backend=BACKEND, head_dims=HEAD_DIMS,
              dtypes=(torch.float16, torch.bfloat16, torch.float32))
    B, Nq, Nk = q.shape[0], q.shape[1], k.shape[1]
    # the inputs as given, and the contiguous outputs and gradients (out, dq; dk, dv)
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    check_row_offsets(BACKEND, q=(Nq, max(q.stride(1), H * D)), k=(Nk, max(k.stride(1), Hkv * D)),
                      v=(Nk, max(v.stride(1), Hkv * D)))
    check_doc_ids(doc_ids, B, Nk, q.device)
    slopes = check_alibi_slopes(alibi_slopes, B, q.shape[2], q.device)
    cap = check_softcap(softcap)
    sinks = check_sink_logits(sink_logits, q.shape[2], q.device)
    if doc_ids is not None and Nq > Nk:
        raise ValueError(f"doc_ids need seqlen_q <= seqlen_k, got seqlen_q {Nq} > seqlen_k {Nk}")
    p = check_dropout(dropout_p)
    if dropout_seed is not None:
        _dropout.check_seed(dropout_seed)
    seed = _dropout.resolve_seed(dropout_seed) if p > 0.0 else 0  # 0: unused, HAS_DROPOUT is off
    window_left, window_right = normalize_window(window_size, causal)
    scale = default_scale(softmax_scale, q.shape[-1])
    blocks = check_blocks(block_m, block_n) or (-1, -1)  # -1: autotune (the ops take ints)
    check_deterministic(deterministic)
    if not (q.device.type == "cuda" or (_INTERPRET and q.device.type == "cpu")):
        raise ValueError(f"q, k and v must be CUDA tensors (or CPU tensors under the Triton interpreter), "
                         f"got {q.device}")
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = FlashV2Function.apply(q, k, v, doc_ids, scale, window_left, window_right, p, seed, *blocks,
                                     deterministic, slopes, cap, sinks)
    results = [out]
    if return_lse:
        results.append(lse)
    if return_dropout_mask:
        results.append(_dropout.dropout_mask(seed, B, q.shape[2], Nq, Nk, p, q.device))
    return results[0] if len(results) == 1 else tuple(results)


def flash_v2_attention_backward(do, q, k, v, out, lse, *, causal: bool = False, softmax_scale=None,
                                window_size=(-1, -1), doc_ids=None, block_m: Optional[int] = None,
                                block_n: Optional[int] = None, deterministic: bool = True):
    """dQ, dK, dV of :func:`flash_v2_attention` (no dropout) from dO and the forward's out and lse,
    through the same recompute backward (P from Q, K and lse; Delta = rowsum(dO o O)).

    ``out`` and ``lse`` ((B, H, Nq), float32) may come from a larger computation than this call:
    ring attention passes the output and logsumexp merged over every key block, and gets this
    block's share of dQ and its dK, dV. Returns dq, dk, dv in the input dtype.
    """
    check_qkv(q, k, v, backend=BACKEND, head_dims=HEAD_DIMS, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_doc_ids(doc_ids, q.shape[0], k.shape[1], q.device)
    window_left, window_right = normalize_window(window_size, causal)
    scale = default_scale(softmax_scale, q.shape[-1])
    blocks = check_blocks(block_m, block_n) or (-1, -1)
    check_deterministic(deterministic)
    # NOTE: the statistics kernels index lse's last dim with stride 1.
    lse = lse.float().contiguous()
    dq, dk, dv, _ = _flash_v2_bwd_op(do, q, k, v, out, lse, doc_ids, scale, window_left, window_right, 0.0, 0,
                                     *blocks, deterministic, not torch.compiler.is_compiling())
    return dq, dk, dv


def _check_varlen_layout(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have 3 dims (total_tokens, nheads, headdim) in the varlen layout, "
                             f"got {shape}")


def _check_varlen_offsets(name: str, cu_seqlens, batch: Optional[int], total: int, max_seqlen, max_name: str,
                          device) -> torch.Tensor:
    """cu_seqlens checked (1-D int32/int64 on ``device``, 0 .. total, non-decreasing, no
    sequence longer than max_seqlen) and returned as int32. The values are read on the host
    (one sync) except while torch.compile traces."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{name} must be a 1-D integer tensor of shape (batch + 1,), got {shape}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {cu_seqlens.device}")
    if batch is not None and cu_seqlens.numel() != batch + 1:
        raise ValueError(f"{name} must have as many sequences as cu_seqlens_q ({batch + 1} entries), "
                         f"got {cu_seqlens.numel()}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"{max_name} must be a positive int, got {max_seqlen!r}")
    if not torch.compiler.is_compiling():
        values = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(values, values[1:])]
        if values[0] != 0 or values[-1] != total or min(lengths) < 0:
            shown = values if len(values) <= 8 else values[:4] + ["..."] + values[-2:]
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length {total}, "
                             f"got {shown}")
        if max(lengths) > max_seqlen:
            raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence ({max(lengths)})")
    return cu_seqlens.to(torch.int32).contiguous()


def flash_v2_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                              causal: bool = False, softmax_scale=None, window_size=(-1, -1),
                              return_lse: bool = False, block_m: Optional[int] = None,
                              block_n: Optional[int] = None, deterministic: bool = True, alibi_slopes=None,
                              softcap: float = 0.0, sink_logits=None):
    """FlashAttention-2 over sequences packed without padding, with their own query and key
    packings (flash-attn's ``flash_attn_varlen_func`` layout): sequence b's queries
    q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] attend only to its keys k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].

    Arguments:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), nheads % nheads_k == 0
            (GQA/MQA without copying K/V); float16, bfloat16 or float32, headdim 16..256
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 (or int64) cumulative lengths, from 0 to
            total_q / total_k; sequences may be empty, and Nq_b != Nk_b
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (size the grid; checked)
        causal: per sequence, aligned to the bottom-right corner as in flash-attn: query i of
            sequence b sits at key position i + Nk_b - Nq_b. For Nq_b = 2, Nk_b = 5 (1 = kept):
                1 1 1 1 0
                1 1 1 1 1
            and for Nq_b = 5, Nk_b = 2 (the first rows see no key: output 0, lse 0):
                0 0
                0 0
                0 0
                1 0
                1 1
        softmax_scale: default 1 / sqrt(headdim)
        window_size: (left, right) per sequence around each query's aligned position; -1 means
            infinite. causal forces right = 0.
        return_lse: also return the float32 logsumexp, (nheads, total_q) as flash-attn's
        block_m, block_n, deterministic: as in :func:`flash_v2_attention`
        alibi_slopes: optional float32 (nheads,) or (batch, nheads), batch = the number of
            sequences: key j of sequence b gets -slope[b, h] * |i + Nk_b - Nq_b - j| in its query i's row
        softcap: 0 (off) or > 0: scores become softcap * tanh(scores / softcap)
        sink_logits: optional float32 (nheads,), differentiable: exp(sink_h) in every row's
            denominator (a row without keys gets lse = sink_h)
    Returns:
        out (total_q, nheads, headdim) [, lse (nheads, total_q)]

    One program per (query block, sequence, head): blocks past a sequence's own length exit
    at once, and no key block of another sequence is ever loaded. No dropout here (use
    flash_v2_attention with doc_ids for dropout over packed documents).
    """
    _check_varlen_layout(q, k, v)
    check_qkv(q[None], k[None], v[None], backend=BACKEND, head_dims=HEAD_DIMS,
              dtypes=(torch.float16, torch.bfloat16, torch.float32))
    cu_q = _check_varlen_offsets("cu_seqlens_q", cu_seqlens_q, None, q.shape[0], max_seqlen_q, "max_seqlen_q",
                                 q.device)
    cu_k = _check_varlen_offsets("cu_seqlens_k", cu_seqlens_k, cu_q.numel() - 1, k.shape[0], max_seqlen_k,
                                 "max_seqlen_k", q.device)
    # a sequence's first row is an int64 offset; its rows are addressed from there in 32 bits
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    check_row_offsets(BACKEND, q=(max_seqlen_q, max(q.stride(0), H * D)), k=(max_seqlen_k, max(k.stride(0), Hkv * D)),
                      v=(max_seqlen_k, max(v.stride(0), Hkv * D)))
    window_left, window_right = normalize_window(window_size, causal)
    scale = default_scale(softmax_scale, q.shape[-1])
    slopes = check_alibi_slopes(alibi_slopes, cu_q.numel() - 1, q.shape[1], q.device)
    cap = check_softcap(softcap)
    sinks = check_sink_logits(sink_logits, q.shape[1], q.device)
    blocks = check_blocks(block_m, block_n) or (-1, -1)  # -1: autotune (the ops take ints)
    check_deterministic(deterministic)
    if not (q.device.type == "cuda" or (_INTERPRET and q.device.type == "cpu")):
        raise ValueError(f"q, k and v must be CUDA tensors (or CPU tensors under the Triton interpreter), "
                         f"got {q.device}")
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = FlashV2VarlenFunction.apply(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                                           window_right, *blocks, deterministic, slopes, cap, sinks)
    return (out, lse) if return_lse else out


def _check_pass(pass_name: str) -> None:
    if pass_name not in PASSES:
        raise ValueError(f"unknown flash_v2 pass '{pass_name}' (valid: {', '.join(PASSES)})")


def configs(pass_name: str, head_dim: int = 64) -> list[dict]:
    """The configs the autotuner of ``pass_name`` (one of PASSES) chooses from on CUDA at
    ``head_dim``, in the order it times them; the first is the default (FATRAIN_AUTOTUNE=0).
    Each is a dict of BLOCK_M, BLOCK_N, num_warps, num_stages and maxnreg (None: uncapped).
    BLOCK_M tiles what a program owns: queries in fwd and dq, keys in dkdv and dkdv_atomic.
    The CPU interpreter launches one small config instead, unless one is pinned."""
    _check_pass(pass_name)
    return [_configs.as_dict(row) for row in _configs.ROWS[pass_name][head_dim > 128]]


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg")


def _full_config(pass_name: str, config: dict, head_dim: int) -> dict:
    """``config`` checked, its missing num_warps, num_stages and maxnreg taken from the default."""
    if not isinstance(config, dict) or not {"BLOCK_M", "BLOCK_N"} <= config.keys() \
            or not config.keys() <= set(_CONFIG_KEYS):
        raise ValueError(f"a flash_v2 config is a dict with BLOCK_M and BLOCK_N and optionally num_warps, "
                         f"num_stages, maxnreg, got {config!r}")
    for key in ("BLOCK_M", "BLOCK_N"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{key} must be a power of two >= 16 (tl.dot needs it), got {value!r}")
    default = configs(pass_name, head_dim)[0]
    return {key: config.get(key, default[key]) for key in _CONFIG_KEYS}


@contextlib.contextmanager
def pin(pass_name: str, config: Optional[dict], head_dim: int = 64):
    """Within the block, pass ``pass_name`` launches with exactly ``config`` at head dims of
    ``head_dim``'s class (up to 128, or wider), with no autotuning; None restores the
    autotuned default within the block. Pins nest; each is undone on exit.

    ``config`` is one of :func:`configs` or any dict with BLOCK_M and BLOCK_N (num_warps,
    num_stages, maxnreg default to the first config's). On CUDA a config that needs more
    shared memory than the GPU has raises triton's OutOfResources. Under the interpreter
    only BLOCK_M and BLOCK_N apply. Fixed tiles (block_m, block_n) take precedence. A
    torch.compile'd graph keeps the config it was traced with.
    """
    _check_pass(pass_name)
    key = (pass_name, head_dim > 128)
    full = None if config is None else _full_config(pass_name, config, head_dim)
    previous = _PINNED.get(key)
    if full is None:
        _PINNED.pop(key, None)
    else:
        _PINNED[key] = full
    try:
        yield full
    finally:
        if previous is None:
            _PINNED.pop(key, None)
        else:
            _PINNED[key] = previous


def autotune_picks(seq_len: Optional[int] = None) -> list[dict]:
    """The configs flash_v2's autotuners picked in this process, one row per pass and shape key:
    kernel (one of PASSES), key ({Nq, Nk, HEAD_DIM, the mask and feature flags: their values as
    strings, dtypes: the tensor arguments' dtypes}), config, and rounds_ms (the refining rounds'
    times in ms per candidate; empty when the list had one config). ``seq_len`` keeps only the
    shapes with that many queries (the autotuners live in the process, so a sweep's earlier jobs
    are there too). Empty in the interpreter."""
    if _INTERPRET:
        return []
    rows = [dict(kernel=name, **row) for name, launchers in _LAUNCHERS.items()
            for tuner in dict.fromkeys(launchers) for row in picks(tuner)]
    return [row for row in rows if seq_len is None or row["key"].get("Nq") == str(seq_len)]
