"""FlashAttention-2 in Triton: forward, recompute backward (Dao 2023, arXiv 2307.08691).

Forward (paper Algorithm 1, section 3.1). Grid (cdiv(Nq, BLOCK_M), batch * nheads): one
program owns one block of BLOCK_M query rows of one (batch, head) and loops over the key
blocks. The online softmax runs in base 2 with softmax_scale * log2(e) folded into S:

    S_ij   = Q_i K_j^T * scale * log2(e)              (masked entries -inf)
    m_new  = max(m_i, rowmax(S_ij))
    P_ij   = exp2(S_ij - m_new)
    l_i    = l_i * exp2(m_i - m_new) + rowsum(P_ij)
    acc    = acc * exp2(m_i - m_new) + P_ij V_j       (acc unnormalised: lazy rescale)
    O_i    = acc / l_i                                 (one division, after the loop)
    LSE_i  = (m_i + log2(l_i)) * ln(2)                 (natural log, float32, (B, H, Nq))

O and LSE are written once. Masks follow _common.allowed_mask: query i sits at key
position p = i + Nk - Nq (bottom-right alignment) and sees keys p - left <= j <= p + right
of window_size (left, right), causal being (-1, 0); with doc_ids only keys of its own
document. Key blocks outside every row's window (above the causal diagonal) are never
visited, blocks every row sees whole run without any mask, and only blocks that a window
edge, the diagonal or the Nk tail crosses pay for the mask. Documents (as flash_v1): each
pass loads the ids of its own block once and those of every block it visits (positions
past Nk clamped to Nk - 1, in the same block) and takes their min and max; a pair whose
[min, max] ranges are disjoint is skipped (no query shares a key's document), and a pair
whose ids are all one value runs without the document mask. Both tests are exact for any
ids; non-decreasing ids (packed sequences) make the ranges narrow. The ranges are computed
in the kernels, per tile the kernel runs. For packed rows the loops are also clipped to
the documents a block touches: ``_doc_ranges`` gives each position the [start, end) of its
run of equal ids (a few device ops per call, no sync; [0, Nk) for rows whose ids decrease
somewhere), and each program loops only from the run start of its first position to the
run end of its last, so packed documents cost about sum(len_i^2), not N^2.
GQA/MQA maps query head h to key/value head h // (H / Hkv) by index
arithmetic; every tensor is addressed through its strides, so strided (B, N, H, D) views
are read in place. HEAD_DIM is D rounded up to a power of two (tl.arange needs one); the
tail of d is masked on load and store.

Backward (paper Algorithm 2, split as in the Triton tutorial). Saved: q, k, v, o, lse.
    1. _bwd_dq, grid (cdiv(Nq, BLOCK_M), batch * nheads): one program owns one query block,
           Delta = rowsum(dO * O)             (float32, (B, H, Nq), stored for pass 2)
           LSE2  = LSE * log2(e)              (float32, (B, H, Nq), stored for pass 2)
           dQ  += (P * (dO V^T - Delta)) K    (times scale at the end)
    2. _bwd_dkdv, grid (cdiv(Nk, BLOCK_N), batch * nheads_k): one program owns one K/V
       block and loops over the query heads of its GQA group and their query blocks,
           P^T  = exp2(K Q^T * scale * log2(e) - LSE2)
           dV  += P^T dO
           dS^T = P^T * (V dO^T - Delta)
           dK  += dS^T Q                      (times scale at the end)
       so dK and dV of a shared K/V head are summed inside one program, without atomics.
(FA2's separate preprocess pass for Delta and LSE2, _bwd_preprocess, runs only for
deterministic=False, whose dK/dV pass also makes dQ.) No atomics anywhere: two runs on the same inputs give
bit-identical gradients (for one autotuned configuration, which the autotuner caches per shape).

Dropout (FlashAttention-1 Algorithm 2 line 14 / Algorithm 4 lines 15-19, in FA2's loops).
Z_ij = dropout_keep(seed, b * H + h, row, col) from ``_dropout.py``, the counter-based mask
naive and flash_v1 draw, so the three backends agree for one seed and nothing N x N is
stored (ctx keeps the seed). The forward drops P_ij after the row sum (l_i stays the
softmax's normaliser) and applies 1 / (1 - p) once to O_i; the dK/dV pass regenerates Z
for its (query block x key block) tile and transposes it, for dV += (P o Z)^T dO and
dP^T = (V dO^T) o Z^T / (1 - p); the dQ pass regenerates Z for dP. Delta = rowsum(dO o O)
is unchanged (sum_j P_ij dP_ij = dO_i . O_i with the dropped O). dropout_p = 0 compiles
every draw out (constexpr HAS_DROPOUT).

Loads on Hopper (sm_90+): the tiles a pass loops over (K and V in the forward and the dQ pass,
Q and dO in the dK/dV pass) come through tensor descriptors (``tl.make_tensor_descriptor``,
one per program over the (N, D) rows of its head; the copy engine zero-fills rows past N and
columns past D, so no masks on those loads) instead of pointer tiles: fewer registers (the
forward at d=128: 138 instead of 216) and larger tiles that fit (128 x 128 at d=128). Measured
on an H100 (experiments/README.md, session 5): a minimal forward at d=128 N=8192 ran 538 vs
489 TFLOP/s with pointer tiles. Inputs whose d stride is not 1, or whose rows or heads are not
16-byte aligned, use the pointer tiles (``_use_tma``); FATRAIN_TMA=0 forces them everywhere.
The dK/dV pass also reads its query rows' LSE2 and Delta through 1-D descriptors (when Nq is a
multiple of 4 and a step has 32 rows or more): as pointer loads they were 16 bounds-checked copies
per thread per step, a third of the loop's instructions at d=64, which left it issue-bound
(backward +6-9% on an H100, experiments/README.md, session 7).

Registration: on CUDA the launchers are `torch.library.triton_op`s that launch through
`wrap_triton`, so `torch.compile(fullgraph=True)` traces through them and sees the
kernels. Under the CPU interpreter they are opaque `torch.library.custom_op`s with fake
implementations instead (wrap_triton cannot trace interpreted kernels), which
`torch.compile(fullgraph=True)` also traces. Block sizes, warps, stages and register caps are
autotuned on CUDA (key: seqlens, head dim, mask kind, precision; the three fastest configs
timed again in interleaved rounds, ``_RefiningAutotuner``; ``autotune_picks()`` lists the picks;
FATRAIN_AUTOTUNE=0 pins the first config); the CPU interpreter uses one fixed small
configuration. Fixed tiles (block_m, block_n), for the block-size ablation, skip the
autotuner: block_m tiles what a program owns and block_n what it loops over, so the forward
and the dQ pass run (BLOCK_M, BLOCK_N) = (block_m, block_n) and the dK/dV pass (BLOCK_N keys,
BLOCK_M queries) = (block_m, block_n), the convention of the autotune lists (fwd 128 x 64,
dK/dV 128 keys x 32 queries, dQ 128 x 32); 8 warps from a 128 x 64 tile up, stages as the
first config. No divisibility between them is needed (every
block range is computed per pass with its own tiles).

Caution / known limits: ids that are not non-decreasing get no loop clipping: every block
in the window is stepped over and its ids (BLOCK_N integers) loaded to decide the skip, and
ranges of interleaved documents overlap, so little is skipped. Dropout costs one
multiply, compare and select per element of every visited block in the forward and in each
backward pass (``_dropout.py``; measured 1.17x forward+backward, 1.22-1.30x forward alone);
without a dropout_seed the seed is drawn on the host (``.item()``: a graph break under
torch.compile). The P and dS that feed the second matmul of each pair are rounded to the
input dtype, as in FlashAttention; float32 inputs use IEEE float32 dot products (no TF32).
The backward recomputes Q K^T twice (once per pass), the price of a dQ without atomics.
torch.compile launches the kernels with fp64 scale arguments, cast to fp32 on entry. The
interpreter's bfloat16 arithmetic is wrong (Triton 3.9): bf16 is tested on GPU only. Fixed
tiles are not checked against the GPU's shared memory before the launch: when they do not
fit, eager mode retries with fewer stages and then raises a ValueError naming block_m /
block_n; under torch.compile the compiler's own error comes instead. Host time per eager call is
about 0.2 ms forward and 1 ms forward+backward on an H100 machine (SDPA: 0.03 / 0.2 ms; most of it
torch.library's custom-op dispatch, experiments/README.md session 6): below about 2k tokens per
sequence at 16k tokens per batch the forward+backward is bound by it (CUDA graphs remove it).
"""

from __future__ import annotations

import os
import statistics
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime import _allocation  # NOTE: private; _allocator and NullAllocator exist in triton 3.6-3.9

from . import _dropout
from ._common import (MASKED_ROW_LSE, check_deterministic, check_doc_ids, check_dropout, check_qkv,
                      default_scale, normalize_window, register_op)
from ._dropout import dropout_apply, dropout_apply_t

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
def _fwd_block(acc, l_i, m_i, q, kT_ptrs, v_ptrs, K_desc, V_desc, start_n, cols, doc_q, doc_k, mixed_docs,
               offs_m, offs_d, Nk, seq_shift, win_left, win_right, qk_scale, seed, dropout_p, off_bh, Nq,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr):
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
        # 5-10% against a minimal kernel with the same loop (session 6).
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
    qk = _mask_tile(qk, offs_m[:, None], cols[None, :], doc_q, doc_k, mixed_docs, Nk, seq_shift, win_left,
                    win_right, float("-inf"), MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS)
    # -- m_new = max(m_i, rowmax(S_ij)) --
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED or HAS_DOCS:
        # NOTE: a row that has seen no key yet keeps m = -inf; subtract 0 instead so
        # exp2(-inf - -inf) never makes a NaN (its P and alpha are 0 either way).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    # -- P_ij = exp2(S_ij - m_new); rescale the running sums lazily --
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
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
               offs_m, offs_n, offs_d, lo, hi, Nk, seq_shift, win_left, win_right, qk_scale,
               seed, dropout_p, off_bh, Nq,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr):
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
                                           doc_k[None, :], mixed_docs, offs_m, offs_d, Nk, seq_shift, win_left,
                                           win_right, qk_scale, seed, dropout_p, off_bh, Nq, D, HEAD_DIM, MASKED,
                                           MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
        else:
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, kT_ptrs, v_ptrs, K_desc, V_desc, start_n, cols, doc_q, 0,
                                       False, offs_m, offs_d, Nk, seq_shift, win_left, win_right,
                                       qk_scale, seed, dropout_p, off_bh, Nq, D, HEAD_DIM, MASKED,
                                       MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
        kT_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, DOC, DOC_RANGE,
                stride_qb, stride_qm, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vh, stride_vd,
                stride_ob, stride_om, stride_oh, stride_od,
                stride_docb, stride_docn,
                H, GROUP, Nq, Nk, qk_scale, win_left, win_right, seed, dropout_p, dropout_scale,
                D: tl.constexpr, HEAD_DIM: tl.constexpr,
                MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED_LSE: tl.constexpr,
                USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    seq_shift = Nk - Nq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    row_ok = offs_m < Nq

    Q_blk = Q + off_b * stride_qb + off_h * stride_qh
    K_blk = K + off_b * stride_kb + off_hk * stride_kh
    V_blk = V + off_b * stride_vb + off_hk * stride_vh
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
                                   offs_m, offs_n, offs_d, lo, full_lo, Nk, seq_shift, win_left, win_right,
                                   qk_scale, seed, dropout_p, pid_bh, Nq, D, HEAD_DIM, BLOCK_N, True, MASK_LEFT,
                                   MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn,
                               stride_vd, DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                               offs_m, offs_n, offs_d, full_lo, full_hi, Nk, seq_shift, win_left, win_right,
                               qk_scale, seed, dropout_p, pid_bh, Nq, D, HEAD_DIM, BLOCK_N, False, MASK_LEFT,
                               MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn,
                               stride_vd, DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                               offs_m, offs_n, offs_d, full_hi, hi, Nk, seq_shift, win_left, win_right,
                               qk_scale, seed, dropout_p, pid_bh, Nq, D, HEAD_DIM, BLOCK_N, True, MASK_LEFT,
                               MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)

    # -- O_i = acc / l_i, once; rows that saw no key give 0 and MASKED_LSE --
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        acc = acc * (dropout_scale / l_safe)[:, None]  # O_i = acc / l_i / (1 - p)
    else:
        acc = acc / l_safe[:, None]
    lse = tl.where(empty, MASKED_LSE, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # NOTE: ln(2)
    tl.store(LSE + pid_bh.to(tl.int64) * Nq + offs_m, lse, mask=row_ok)
    O_blk = Out + off_b * stride_ob + off_h * stride_oh
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
                DQ_blk, stride_dqm, dq_scale, D: tl.constexpr, MASKED: tl.constexpr,
                MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                USE_TMA: tl.constexpr, STATS_TMA: tl.constexpr, DQ_TMA: tl.constexpr):
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
    # per row per step: backward +1-2% at d=64 causal on an H100, session 7).
    if STATS_TMA:
        # NOTE: as pointer loads, the pipeliner issued LSE and Delta as 4-byte cp.asyncs with a
        # bounds check each, 16 per thread per step at d=64: with the address arithmetic, a
        # third of the hot loop's instructions, and the loop issue-bound (sm_90a SASS, session 7).
        lse2 = LSE_row.load([start_m])
        delta = Delta_row.load([start_m])
    else:
        lse2 = tl.load(LSE_row + rows, mask=row_ok, other=0.0)
    qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
    if not USE_TMA:
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # NOTE: dP^T is issued before the exp2s of P^T, which do not need it, so ptxas runs them while
    # that wgmma is in flight (sm_90a SASS); issued after the dV dot they ran alone. Measured on an
    # H100 (experiments/README.md, session 6): backward +1-2% at d=64 and d=128.
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    # -- P^T = exp2(S^T - LSE), recomputed --
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
    dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
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
                    seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    USE_TMA: tl.constexpr, STATS_TMA: tl.constexpr, DQ_TMA: tl.constexpr):
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
                                     stride_dqm, dq_scale, D, MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION,
                                     HAS_DROPOUT, ATOMIC_DQ, USE_TMA, STATS_TMA, DQ_TMA)
        else:
            dk, dv = _dkdv_block(dk, dv, k, v, qT_ptrs, do_ptrs, Q_desc, DO_desc, start_m, LSE_row, Delta_row,
                                 rows, offs_n, offs_d, 0, doc_k, False, Nq, Nk, seq_shift, win_left, win_right,
                                 qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, D, MASKED,
                                 MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, ATOMIC_DQ, USE_TMA,
                                 STATS_TMA, DQ_TMA)
        qT_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DOC, DOC_RANGE,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_dob, stride_dom, stride_doh, stride_dod,
              stride_dkb, stride_dkn, stride_dkh, stride_dkd,
              stride_dvb, stride_dvn, stride_dvh, stride_dvd,
              stride_docb, stride_docn, DQ, stride_dqb, stride_dqm, stride_dqh,
              H, Hkv, GROUP, Nq, Nk, qk_scale, sm_scale, win_left, win_right, seed, dropout_p, dropout_scale,
              D: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr,
              STATS_TMA: tl.constexpr, DQ_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    seq_shift = Nk - Nq

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn
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
        Q_blk = Q + off_b * stride_qb + off_h * stride_qh
        DO_blk = DO + off_b * stride_dob + off_h * stride_doh
        DQ_blk = DQ + off_b * stride_dqb + off_h * stride_dqh  # ATOMIC_DQ only
        if DQ_TMA:  # ATOMIC_DQ through the copy engine: a descriptor of (BLOCK_M, HEAD_DIM) tiles
            DQ_blk = tl.make_tensor_descriptor(DQ_blk, shape=[Nq, D], strides=[stride_dqm, 1],
                                               block_shape=[BLOCK_M, HEAD_DIM])
        Q_desc, DO_desc = _row_sources(Q_blk, DO_blk, Nq, stride_qm, stride_dom, D, BLOCK_M, HEAD_DIM, USE_TMA)
        LSE_row, Delta_row = _stat_sources(LSE + bh * Nq, Delta + bh * Nq, Nq, BLOCK_M, STATS_DESC)
        if MASK_RIGHT:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_blk, DO_blk, Q_desc, DO_desc, LSE_row, Delta_row,
                                     DOC_row, stride_docn, doc_k, k_doc_lo, k_doc_hi,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     offs_n, offs_d, lo, full_lo, Nq, Nk, seq_shift, win_left, win_right,
                                     qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, D, BLOCK_M, True,
                                     MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, ATOMIC_DQ,
                                     USE_TMA, STATS_DESC, DQ_TMA)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_blk, DO_blk, Q_desc, DO_desc, LSE_row, Delta_row,
                                 DOC_row, stride_docn, doc_k, k_doc_lo, k_doc_hi,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 offs_n, offs_d, full_lo, full_hi, Nq, Nk, seq_shift, win_left, win_right,
                                 qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, D, BLOCK_M, False,
                                 MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, ATOMIC_DQ,
                                 USE_TMA, STATS_DESC, DQ_TMA)
        if MASK_LEFT:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_blk, DO_blk, Q_desc, DO_desc, LSE_row, Delta_row,
                                     DOC_row, stride_docn, doc_k, k_doc_lo, k_doc_hi,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     offs_n, offs_d, full_hi, hi, Nq, Nk, seq_shift, win_left, win_right,
                                     qk_scale, seed, dropout_p, dropout_scale, bh, DQ_blk, stride_dqm, dq_scale, D, BLOCK_M, True,
                                     MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, ATOMIC_DQ,
                                     USE_TMA, STATS_DESC, DQ_TMA)
    if HAS_DROPOUT:
        dk *= sm_scale * dropout_scale
        dv *= dropout_scale
    else:
        dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, K_desc, V_desc, start_n, cols, offs_m, offs_d, doc_q, doc_k,
              mixed_docs, Nk, seq_shift, win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, off_bh, Nq,
              D: tl.constexpr, MASKED: tl.constexpr,
              MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
              DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr):
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
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    p = _mask_tile(p, offs_m[:, None], cols[None, :], doc_q, doc_k, mixed_docs, Nk, seq_shift, win_left,
                   win_right, 0.0, MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS)
    # -- dS = P * (dP - Delta), dP = (dO V^T) o Z / (1 - p); dQ += dS K --
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        dp = dropout_apply(dp, seed, off_bh, offs_m, cols, dropout_p)  # NOTE: 1 / (1 - p) is in delta, dq
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn, stride_vd,
                  DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                  offs_m, offs_n, offs_d, lo, hi, Nk, seq_shift, win_left, win_right, qk_scale,
                  seed, dropout_p, dropout_scale, off_bh, Nq,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr):
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
                               offs_d, doc_q, doc_k[None, :], mixed_docs, Nk, seq_shift, win_left, win_right,
                               qk_scale, seed, dropout_p, dropout_scale, off_bh, Nq, D, MASKED, MASK_LEFT,
                               MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
        else:
            dq = _dq_block(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, K_desc, V_desc, start_n, cols, offs_m, offs_d,
                           doc_q, 0, False, Nk, seq_shift, win_left, win_right, qk_scale, seed,
                           dropout_p, dropout_scale, off_bh, Nq, D, MASKED, MASK_LEFT, MASK_RIGHT, HAS_DOCS,
                           DOT_PRECISION, HAS_DROPOUT, USE_TMA)
        kT_ptrs += BLOCK_N * stride_kn
        vT_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, Out, LSE, LSE2, Delta, DQ, DOC, DOC_RANGE,
            stride_qb, stride_qm, stride_qh, stride_qd,
            stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd,
            stride_dob, stride_dom, stride_doh, stride_dod,
            stride_ob, stride_om, stride_oh, stride_od,
            stride_dqb, stride_dqm, stride_dqh, stride_dqd,
            stride_docb, stride_docn,
            H, GROUP, Nq, Nk, qk_scale, sm_scale, win_left, win_right, seed, dropout_p, dropout_scale,
            D: tl.constexpr, HEAD_DIM: tl.constexpr,
            MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    seq_shift = Nk - Nq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    bh = pid_bh.to(tl.int64)
    lse2 = tl.load(LSE + bh * Nq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634  # NOTE: log2(e)
    tl.store(LSE2 + bh * Nq + offs_m, lse2, mask=row_ok)  # for the dK/dV pass, which runs after this one
    # -- Delta_i = rowsum(dO_i * O_i), stored for the dK/dV pass, which runs after this one --
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh * Nq + offs_m, delta, mask=row_ok)
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

    K_blk = K + off_b * stride_kb + off_hk * stride_kh
    V_blk = V + off_b * stride_vb + off_hk * stride_vh
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
                           offs_m, offs_n, offs_d, lo, full_lo, Nk, seq_shift,
                           win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh, Nq, D, BLOCK_N, True,
                           MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn, stride_vd,
                       DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                       offs_m, offs_n, offs_d, full_lo, full_hi, Nk, seq_shift,
                       win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh, Nq, D, BLOCK_N, False,
                       MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_blk, V_blk, K_desc, V_desc, stride_kn, stride_kd, stride_vn, stride_vd,
                       DOC_row, stride_docn, doc_q, q_doc_lo, q_doc_hi,
                       offs_m, offs_n, offs_d, full_hi, hi, Nk, seq_shift,
                       win_left, win_right, qk_scale, seed, dropout_p, dropout_scale, bh, Nq, D, BLOCK_N, True,
                       MASK_LEFT, MASK_RIGHT, HAS_DOCS, DOT_PRECISION, HAS_DROPOUT, USE_TMA)
    if HAS_DROPOUT:
        dq *= sm_scale * dropout_scale
    else:
        dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Configurations: autotuned on CUDA, one fixed small one in the interpreter
# ----------------------------------------------------------------------------------------

# NOTE: the interpreter runs one program at a time in numpy: 32 x 16 blocks keep its
# per-program overhead low and still give the CPU tests several blocks and a diagonal (the dK/dV pass
# 32 query rows a step: the fewest for which it reads LSE and Delta through descriptors).
_INTERPRETER_FWD = dict(BLOCK_M=32, BLOCK_N=16)
_INTERPRETER_BWD = dict(BLOCK_M=32, BLOCK_N=32)
_INTERPRETER_DQ = dict(BLOCK_M=32, BLOCK_N=16)
_PREPROCESS_BLOCK_M = 64

def _configs(*rows):
    """triton.Configs of (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) rows; maxnreg caps
    the registers per thread (ptxas .maxnreg), e.g. so that two 8-warp programs share an SM."""
    return [triton.Config({"BLOCK_M": row[0], "BLOCK_N": row[1]}, num_warps=row[2], num_stages=row[3],
                          maxnreg=row[4] if len(row) > 4 else None) for row in rows]


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]); the first row of each list is the default
# when autotuning is off (FATRAIN_AUTOTUNE=0), so it must fit shared memory for fp32 inputs
# too (the autotuner skips configs that do not fit; a pinned one would fail). Heads wider than 128 get smaller tiles so
# Q, K, V stages fit in shared memory and the fp32 accumulators in registers.
_FWD_CONFIGS = _configs((128, 64, 8, 3),
                        # NOTE: 128 registers a thread (166 uncapped, no spills at d=64), so two programs
                        # share an SM (2 x 113 KB of shared memory just fits): the fastest d=64 causal
                        # forward at GPT-2 small's training shapes, +2-5% on the next (session 9). Second
                        # in the list: timed last, its autotune time at 16k came out 3% under its pinned one.
                        (128, 128, 8, 3, 128),
                        (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                        (128, 64, 8, 4), (128, 64, 8, 2),
                        (64, 64, 4, 3))  # NOTE: twice the programs; fastest at d=128 causal N=2048 with TMA
_FWD_WIDE = _configs((64, 64, 4, 2), (64, 32, 4, 2))
_DKDV_CONFIGS = _configs((32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3),
                         (64, 128, 8, 2), (64, 128, 8, 4), (32, 128, 4, 4),
                         (16, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 4),  # these three: no spills at d=128
                         (32, 64, 4, 3))  # NOTE: fastest at d=64 causal with TMA (session 5)
_DKDV_WIDE = _configs((32, 32, 8, 2), (16, 32, 4, 2))
_DQ_CONFIGS = _configs((128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                       (128, 64, 16, 3), (128, 128, 8, 3),
                       (64, 32, 4, 3))  # NOTE: fastest at d=128 causal N=2048 with TMA (session 5)
_DQ_WIDE = _configs((64, 32, 8, 2), (32, 32, 4, 2))
_AUTOTUNE = os.environ.get("FATRAIN_AUTOTUNE", "1") != "0"


def _autotune_bench(kernel_call, quantiles):
    """The autotuner's timing of one config: one call first (the config's compilation, seconds
    during which the GPU idles and its clocks drop), then do_bench with 100 ms of warm-up.

    NOTE (session 5, H100): with triton's default (compile inside a 25 ms warm-up) one config
    measured 1.34 and 1.95 ms in one process; picks moved between runs by more than the gaps
    between configs."""
    from triton.testing import do_bench
    kernel_call()
    return do_bench(kernel_call, warmup=100, rep=100, quantiles=quantiles)


#: Configs re-timed after the autotuner's pass over the list, and the interleaved rounds they get.
_REFINE_TOP = 3
_REFINE_ROUNDS = 3


class _RefiningAutotuner(triton.runtime.autotuner.Autotuner):
    """triton's autotuner, then the fastest ``_REFINE_TOP`` configs timed again in
    ``_REFINE_ROUNDS`` interleaved rounds; the median of the rounds picks.

    Why (session 9, H100, GPT-2 small's training shapes): the autotuner times each config once,
    in list order, and over the seconds that takes the GPU's clocks and temperature drift; in
    one process its pick for the dK/dV pass at 16k was a config 7% slower than the best one
    (the whole backward 5.48 vs 5.12 ms), in others the best; forward picks moved by 3%.
    Interleaved rounds put every candidate under the same conditions. Cost: 9 more timings per pass
    and new shape (about 0.2 s each by _autotune_bench's 100 + 100 ms; not timed); ``refined`` keeps each key's round times (``autotune_picks`` reports them)."""

    def run(self, *args, **kwargs):
        known = set(self.cache)
        ret = super().run(*args, **kwargs)
        new = [key for key in self.cache if key not in known]
        timings = getattr(self, "configs_timings", None)
        if not new or not timings or len(timings) < 2:
            return ret
        key = new[0]
        top = sorted(timings, key=lambda c: _first(timings[c]))[:_REFINE_TOP]
        self.nargs = dict(zip(self.arg_names, args))
        rounds = {config: [] for config in top}
        for _ in range(_REFINE_ROUNDS):
            for config in top:
                rounds[config].append(_first(self._bench(*args, config=config, **kwargs)))
        best = min(top, key=lambda c: statistics.median(rounds[c]))
        self.cache[key] = self.best_config = best
        if not hasattr(self, "refined"):
            self.refined = {}
        self.refined[key] = {_config_label(c): rounds[c] for c in top}
        # NOTE: the trials overwrote the outputs (dQ's accumulator included, reset before each):
        # the launch again with the pick leaves exactly its results.
        full_nargs = {**self.nargs, **kwargs, **best.all_kwargs()}
        self.pre_hook(full_nargs, reset_only=True)
        ret = self.fn.run(*args, **kwargs, **best.all_kwargs())
        self.nargs = None
        return ret


def _config_label(config) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.all_kwargs().items())


def _first(timing):
    """A config's time from the autotuner: a float, or [median, p20, p80] with quantiles."""
    return timing[0] if isinstance(timing, (list, tuple)) else timing


def _autotuned(kernel, configs, reset_to_zero=None, do_bench=_autotune_bench):
    configs = configs if _AUTOTUNE else configs[:1]
    key = [name for name in ("Nq", "Nk", "HEAD_DIM", "MASK_LEFT", "MASK_RIGHT", "HAS_DOCS", "HAS_DROPOUT",
                             "DOT_PRECISION", "ATOMIC_DQ", "USE_TMA", "STATS_TMA", "DQ_TMA") if name in kernel.arg_names]
    tuner = triton.autotune(configs, key=key, reset_to_zero=reset_to_zero, do_bench=do_bench)(kernel)
    # NOTE: the class swapped rather than the constructor called, whose arguments differ
    # between triton versions; torch.compile still sees a triton Autotuner.
    tuner.__class__ = _RefiningAutotuner
    return tuner


def autotune_picks() -> list[dict]:
    """The configs flash_v2's autotuners picked in this process, one row per pass and shape key:
    kernel (fwd, dq, dkdv, dkdv_atomic), key ({Nq, Nk, HEAD_DIM, the mask and feature flags: their
    values as strings, dtypes: the tensor arguments' dtypes}), config, and rounds_ms (the refining
    rounds' times in ms per candidate; empty when the list had one config)."""
    rows = []
    for name, launchers in _LAUNCHERS.items() if not _INTERPRET else ():
        for tuner in dict.fromkeys(launchers):
            names = [n for n in tuner.keys if n in tuner.arg_names]
            for key, config in getattr(tuner, "cache", {}).items():
                named = {n: str(k) for n, k in zip(names, key)}
                named["dtypes"] = [str(k) for k in key[len(names):]]
                rows.append(dict(kernel=name, key=named, config=_config_label(config),
                                 rounds_ms=getattr(tuner, "refined", {}).get(key, {})))
    return rows


# One launcher per (kernel, head-dim class): HEAD_DIM > 128 picks the "wide" launcher on
# the host, so no early_config_prune hook is needed (torch.compile replays autotuners).
if _INTERPRET:
    _LAUNCHERS = {name: (kernel, kernel) for name, kernel in
                  (("fwd", _fwd_kernel), ("dkdv", _bwd_dkdv), ("dkdv_atomic", _bwd_dkdv), ("dq", _bwd_dq))}
else:
    _LAUNCHERS = {
        "fwd": (_autotuned(_fwd_kernel, _FWD_CONFIGS), _autotuned(_fwd_kernel, _FWD_WIDE)),
        "dkdv": (_autotuned(_bwd_dkdv, _DKDV_CONFIGS), _autotuned(_bwd_dkdv, _DKDV_WIDE)),
        # NOTE: the autotuner runs each config on the same arguments: dQ's accumulator is zeroed
        # before every trial and after the last.
        "dkdv_atomic": (_autotuned(_bwd_dkdv, _DKDV_CONFIGS, reset_to_zero=["DQ"]),
                        _autotuned(_bwd_dkdv, _DKDV_WIDE, reset_to_zero=["DQ"])),
        "dq": (_autotuned(_bwd_dq, _DQ_CONFIGS), _autotuned(_bwd_dq, _DQ_WIDE)),
    }


def _launcher(name: str, head_dim: int):
    return _LAUNCHERS[name][head_dim > 128]


def _fixed(config: dict) -> dict:
    """Explicit block sizes in the interpreter; the autotuner picks them on CUDA."""
    return dict(config) if _INTERPRET else {}


_KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv, "dkdv_atomic": _bwd_dkdv, "dq": _bwd_dq}
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
    # NOTE: 8 warps from a 128 x 64 tile up, as the autotuner picks on an H100 (experiments/
    # flash_v2_notes.md); stages as the first (default) config of the autotune lists.
    meta["num_warps"] = 8 if block_m * block_n >= 128 * 64 else 4
    meta["num_stages"] = 3 if head_dim <= 128 else 2
    return meta


def _launch(name: str, grid, args: tuple, meta: dict, head_dim: int, blocks: tuple[int, int],
            interpreter_config: dict) -> None:
    """Launch one pass: autotuned (blocks == (-1, -1)) or with the fixed tiles ``blocks``."""
    block_m, block_n = blocks
    if block_m < 0:
        wrap_triton(_launcher(name, head_dim))[grid](*args, **meta, **_fixed(interpreter_config))
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


#: FATRAIN_TMA: "auto" (default) loads tiles through Hopper's tensor memory accelerator on
#: CUDA GPUs of compute capability 9 and up; "0" never (pointer tiles everywhere); "1" also
#: under the CPU interpreter (what the CPU tests use to check the descriptor path).
_TMA = os.environ.get("FATRAIN_TMA", "auto")
if _TMA not in ("auto", "0", "1"):
    raise ValueError(f"FATRAIN_TMA must be auto, 0 or 1, got {_TMA!r}")


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global memory for the kernels' on-device tensor descriptors (128 bytes per descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _use_tma(*tensors: torch.Tensor) -> bool:
    """True when the tiles of ``tensors`` can come through tensor descriptors: a TMA-capable
    device (or FATRAIN_TMA=1 in the interpreter), unit stride along d and every other stride
    and the start 16-byte aligned (the copy engine's rule). Else the kernels use pointer tiles.

    NOTE: a descriptor is made per program in global scratch from triton's allocator; one is
    set here when the caller has none (the allocator is a context variable, and autograd runs
    the backward in another thread, so this runs before every launch that needs it).
    """
    if _TMA == "0":
        return False
    device = tensors[0].device
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] < 9:
            return False
    elif not (_INTERPRET and _TMA == "1"):
        return False
    for t in tensors:  # (B, N, H, D): a descriptor per (b, h) over its (N, D) rows
        size = t.element_size()
        (nb, _, nh, _), (sb, sn, sh, sd) = t.shape, t.stride()
        if sd != 1 or sn <= 0 or (sn * size) % 16 or (t.storage_offset() * size) % 16:
            return False
        if (nb > 1 and (sb * size) % 16) or (nh > 1 and (sh * size) % 16):
            return False
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    return True


def _use_tma_stats(nq: int) -> bool:
    """True when the dK/dV pass, reading Q and dO through descriptors, can read its float32
    (B, H, Nq) base-2 LSE and Delta rows (fresh contiguous buffers) through 1-D descriptors too:
    a row starts 16-byte aligned only when Nq is a multiple of 4 (else they stay pointer loads)."""
    return nq % 4 == 0


def _dot_precision(dtype: torch.dtype) -> str:
    # NOTE: Triton's default for a float32 dot is TF32 (about 1e-3 relative error);
    # float32 callers get IEEE float32. For fp16/bf16 the setting has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------
# Host launchers, registered as torch.library triton ops
# ----------------------------------------------------------------------------------------

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


def _flash_v2_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor],
                  softmax_scale: float, window_left: int, window_right: int, dropout_p: float, seed: int,
                  block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    out = torch.empty((B, Nq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    doc, doc_strides, scalars, flags = _mask_args(q, doc_ids, window_left, window_right, dropout_p, seed)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    args = (q, k, v, out, lse, *doc, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *doc_strides,
            H, H // Hkv, Nq, Nk, softmax_scale * LOG2E, *scalars)
    meta = dict(D=D, HEAD_DIM=triton.next_power_of_2(D), **flags, DOT_PRECISION=_dot_precision(q.dtype),
                MASKED_LSE=MASKED_ROW_LSE, USE_TMA=_use_tma(k, v))
    _launch("fwd", grid, args, meta, D, (block_m, block_n), _INTERPRETER_FWD)
    return out, lse


def _flash_v2_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, doc_ids: Optional[torch.Tensor], softmax_scale: float, window_left: int,
                  window_right: int, dropout_p: float, seed: int, block_m: int,
                  block_n: int, deterministic: bool = True,
                  bulk_reduce_dq: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    HEAD_DIM = triton.next_power_of_2(D)
    doc, doc_strides, scalars, flags = _mask_args(q, doc_ids, window_left, window_right, dropout_p, seed)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)  # LSE in base 2, written by the first pass for the dK/dV pass
    dq = torch.empty((B, Nq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Nk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Nk, Hkv, D), dtype=v.dtype, device=v.device)
    meta = dict(D=D, HEAD_DIM=HEAD_DIM, **flags, DOT_PRECISION=_dot_precision(q.dtype))
    blocks = (block_m, block_n)
    tma_dkdv = _use_tma(q, do)
    tma_dq = _use_tma(k, v)

    def grid_q(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    def grid_kv(meta):
        return (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hkv)

    if deterministic:
        # The dQ pass first: it also computes Delta = rowsum(dO * O) for its rows (no preprocess
        # launch, one read of dO fewer), which the dK/dV pass then reads.
        args = (q, k, v, do, out, lse, lse2, delta, dq, *doc,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *out.stride(), *dq.stride(), *doc_strides,
                H, H // Hkv, Nq, Nk, softmax_scale * LOG2E, softmax_scale, *scalars)
        _launch("dq", grid_q, args, dict(meta, USE_TMA=tma_dq), D, blocks, _INTERPRETER_DQ)
    else:
        wrap_triton(_bwd_preprocess)[(triton.cdiv(Nq, _PREPROCESS_BLOCK_M), B * H)](
            out, do, delta, lse, lse2, *out.stride(), *do.stride(), H, Nq,
            D=D, HEAD_DIM=HEAD_DIM, BLOCK_M=_PREPROCESS_BLOCK_M)

    # deterministic=False: the dK/dV pass also adds dS K into a float32 dQ with atomics (5
    # matmuls instead of 7, as flash-attn's default backward): a bulk reduce-add of each tile by
    # the copy engine where the pass reads through descriptors (bulk_reduce_dq, eager only), else
    # one red.global per element; dQ came from its own pass when deterministic.
    dq_acc = torch.zeros((B, Nq, H, D), dtype=torch.float32, device=q.device) if not deterministic else \
        torch.empty(1, dtype=torch.float32, device=q.device)  # NOTE: a dummy, never read
    dq_strides = (dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2)) if not deterministic else (0, 0, 0)
    args = (q, k, v, do, lse2, delta, dk, dv, *doc,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *doc_strides,
            dq_acc, *dq_strides,
            H, Hkv, H // Hkv, Nq, Nk, softmax_scale * LOG2E, softmax_scale, *scalars)
    _launch("dkdv" if deterministic else "dkdv_atomic", grid_kv, args,
            dict(meta, ATOMIC_DQ=not deterministic, USE_TMA=tma_dkdv, STATS_TMA=tma_dkdv and _use_tma_stats(Nq),
                 DQ_TMA=not deterministic and bulk_reduce_dq and tma_dkdv and not _INTERPRET and _use_tma(dq_acc)),
            D, blocks, _INTERPRETER_BWD)
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv
    return dq, dk, dv


def _flash_v2_fwd_fake(q, k, v, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed, block_m,
                       block_n):
    B, Nq, H, D = q.shape
    return q.new_empty((B, Nq, H, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


def _flash_v2_bwd_fake(do, q, k, v, out, lse, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed,
                       block_m, block_n, deterministic=True, bulk_reduce_dq=True):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_flash_v2_fwd_op = register_op("flash_v2_fwd", _flash_v2_fwd, _flash_v2_fwd_fake)
_flash_v2_bwd_op = register_op("flash_v2_bwd", _flash_v2_bwd, _flash_v2_bwd_fake)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------

class FlashV2Function(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed, block_m, block_n,
                deterministic):
        out, lse = _flash_v2_fwd_op(q, k, v, doc_ids, softmax_scale, window_left, window_right, dropout_p, seed,
                                    block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.softmax_scale = softmax_scale
        ctx.window = (window_left, window_right)
        ctx.dropout = (dropout_p, seed)  # the seed, not the mask: the backward regenerates Z
        ctx.blocks = (block_m, block_n)
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        # NOTE (2026-11, torch 2.11): torch.compile's analysis of which arguments a Triton kernel
        # mutates does not see a tensor descriptor's reduce-add, so under compile dQ's float32
        # accumulator came back unwritten (zeros); there the atomic pass adds with pointer atomics.
        dq, dk, dv = _flash_v2_bwd_op(dout, q, k, v, out, lse, doc_ids, ctx.softmax_scale, *ctx.window,
                                      *ctx.dropout, *ctx.blocks, ctx.deterministic,
                                      not torch.compiler.is_compiling())
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

def flash_v2_attention(q, k, v, *, causal: bool = False, softmax_scale=None, dropout_p: float = 0.0,
                       window_size=(-1, -1), doc_ids=None, return_lse: bool = False,
                       dropout_seed: Optional[int] = None, return_dropout_mask: bool = False,
                       block_m: Optional[int] = None, block_n: Optional[int] = None, deterministic: bool = True):
    """FlashAttention-2: softmax(Q K^T * softmax_scale) V without materialising S or P.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16, bfloat16 or float32, headdim 16..256
        k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0 (GQA/MQA read
            in place, no copy); any strides (non-contiguous views are read in place)
        causal: mask aligned to the bottom-right corner when seqlen_q != seqlen_k:
            seqlen_q=2, seqlen_k=5         seqlen_q=5, seqlen_k=2
                1 1 1 1 0                      0 0
                1 1 1 1 1                      0 0
                                               0 0
                                               1 0
                                               1 1
            (a row of zeros attends to nothing and returns zeros)
        softmax_scale: defaults to 1 / sqrt(headdim)
        dropout_p: dropout on P inside the kernels; kept entries are scaled by
            1 / (1 - dropout_p). The mask is counter-based (``_dropout.py``, the one naive
            and flash_v1 draw), so the backward regenerates it and the same seed gives the
            same mask in all three backends.
        window_size: (left, right); -1 means infinite. Query i (at key position
            i + seqlen_k - seqlen_q) sees keys in [pos - left, pos + right]; causal sets
            right = 0. Key blocks outside every row's window are skipped.
        doc_ids: optional (batch, seqlen_k) integers; a query sees only keys of its own
            document (query i has the document of key i + seqlen_k - seqlen_q, so
            seqlen_q <= seqlen_k). Any ids are correct; with non-decreasing ids (packed
            documents) block pairs between documents are skipped.
        return_lse: also return the float32 logsumexp of each row, (batch, nheads, seqlen_q);
            rows that see no key get MASKED_ROW_LSE
        dropout_seed: seed of the dropout mask; None draws one from torch's default
            generator (torch.manual_seed reproduces a run; a graph break under torch.compile,
            so pass a seed to compile with fullgraph=True)
        return_dropout_mask: also return the bool (batch, nheads, seqlen_q, seqlen_k)
            keep-mask the kernels used (all True when dropout_p = 0); materialised: small
            shapes only
        block_m, block_n: fixed tiles instead of the autotuner's (both None: autotune; else
            both powers of two in 16..256). block_m tiles the dimension a program owns and
            block_n the one it loops over: (BLOCK_M, BLOCK_N) = (block_m, block_n) queries x
            keys in the forward and the dQ pass, keys x queries in the dK/dV pass (its
            BLOCK_N = block_m keys per program, BLOCK_M = block_n queries per step), as the
            FA2 tutorial's (BLOCK_M1, BLOCK_N1) = (32, 128) / (BLOCK_M2, BLOCK_N2) = (128, 32).
            num_warps 8 from a 128 x 64 tile up, else 4; num_stages as the autotuner's
            first config, lowered (with a warning) if the tiles do not fit in shared memory;
            a tile that does not fit even with one stage raises ValueError.
        deterministic: True (default): dQ from its own pass, bit-identical gradients on every
            run. False: the dK/dV pass also adds dS K into a float32 dQ with atomic adds (5
            matmuls in the backward instead of 7, as flash-attn's and PyTorch's flash backward
            do), so dQ's last bits depend on the order the additions land in. On Hopper each
            dQ tile is added by one bulk reduce-add of the copy engine (FlashAttention-3's way;
            pointer atomics under torch.compile, whose mutation analysis misses it). Measured on
            an H100 it is still slower than the default: forward+backward 0.94x at d=64 causal
            8k, 0.99x at 16k, 0.81x at d=128 (session 8; 0.79-1.00x with pointer atomics).
    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype (the autocast dtype under
        autocast) [, lse] [, dropout_mask]
    """
    check_qkv(q, k, v, backend=BACKEND, head_dims=HEAD_DIMS,
              dtypes=(torch.float16, torch.bfloat16, torch.float32))
    B, Nq, Nk = q.shape[0], q.shape[1], k.shape[1]
    check_doc_ids(doc_ids, B, Nk, q.device)
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
                                     deterministic)
    results = [out]
    if return_lse:
        results.append(lse)
    if return_dropout_mask:
        results.append(_dropout.dropout_mask(seed, B, q.shape[2], Nq, Nk, p, q.device))
    return results[0] if len(results) == 1 else tuple(results)
