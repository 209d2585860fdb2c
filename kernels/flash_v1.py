"""FlashAttention-1 in Triton, as the paper writes it (Dao et al. 2022, arXiv 2205.14135).

The row-tiling algorithm of the original paper, kept literal so that its cost can be measured
against FlashAttention-2 (``flash_v2.py``): the outer loop runs over K/V blocks, the inner
loop over Q blocks, and the running O and the softmax statistics l and m make a round trip
through HBM on every inner step. Comments in the kernels name the Algorithm lines they run.

Grid. The paper's (``num_splits=1``): forward (B * H, 1), one program per (batch, query
head); backward (B * Hkv, 1), one program per (batch, K/V head) looping over the query heads
of its GQA group, so dK, dV sum in registers and each dQ row has one writer. ``num_splits``
S > 1 (flash-attn 1.x's, 0 chooses it: :func:`flash_v1_num_splits`) gives each (batch, head)
S programs: in the forward they own Q blocks i = s (mod S) (rows are independent, so the
output is bit-identical); in the backward K/V blocks j = s (mod S), adding into a float32 dQ
with atomics (``deterministic=True`` keeps one split).

Blocks (Algorithm 1 line 2): B_c = ceil(M / 4d), B_r = min(B_c, d), M = sram_bytes // 4
float32 words (argument, :func:`set_sram_bytes`, the GPU's opt-in shared memory per block, or
16 KiB under the interpreter); each rounded down to a power of two, at least 16 (tl.dot),
capped at the sequence length's next power of two.

Forward (Algorithm 1 with Algorithm 2's scale tau, mask and dropout). O = 0 (float32), l = 0,
m = -inf in HBM; for each K/V block j, for each Q block i: load Q_i, O_i, l_i, m_i;
    S_ij = tau Q_i K_j^T (masked)   m~ = rowmax(S_ij)   P~ = exp(S_ij - m~)   l~ = rowsum(P~)
    m_new = max(m_i, m~)            l_new = e^(m_i - m_new) l_i + e^(m~ - m_new) l~
    O_i = diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~ - m_new) (P~ o Z / (1 - p)) V_j)
and store O_i, l_new, m_new. Saved: q, k, v, out, l, m (not a logsumexp; ``return_lse`` is
m + log l on the host).
Backward (Algorithm 4): for each K/V block j (dK~, dV~ on chip), for each Q block i:
    P = diag(l_i)^-1 exp(tau Q_i K_j^T - m_i)   dV~ += (P o Z)^T dO_i   dP = (dO_i V_j^T) o Z
    D_i = rowsum(dO_i o O_i)   dS = P o (dP - D_i)   dQ_i += tau dS K_j (HBM)   dK~ += tau dS^T Q_i
Variants (each a constexpr switch, so the plain kernels are unchanged): soft-cap
S_ij = c tanh(S_ij / c) after the scale (the backward recomputes the tanh and multiplies dS_ij
by 1 - tanh^2 before lines 22-23); ALiBi S_ij -= slope_bh |r + Nk - Nq - c| after it (the
(B, H) float32 slopes are read once per program). Sinks follow from O, l, m living in HBM:
each row starts at m = sink_h, l = 1 (a key with score sink_h and no value), so every l and m
and the returned lse include the sink, and the backward's P_ij is right unchanged; d sink_h =
-sum_(b,i) e^(sink_h - m_i) / l_i D_i is reduced on the host from O, dO, l and m by torch's
(atomic-free, deterministic) sums.
Dropout: Z is ``_dropout.dropout_keep`` (counter-based, shared with naive and flash_v2), so
the backward regenerates it from the seed. Masks: query r sits at key position
r + Nk - Nq; a K/V block's inner loop covers only the Q blocks its window can see;
documents skip block pairs with disjoint id ranges. A row that sees no key gives out = 0,
lse = MASKED_ROW_LSE and zero gradients ("safe" max and sum).

Caution / known limits: slow by design (O_i, l_i, m_i read and written on every inner step,
O rescaled every step, D_i recomputed for every (i, j)); O and dQ are float32 buffers the
size of q in HBM. A program reads back what it wrote for an earlier K/V block, so a
``tl.debug_barrier()`` ends each outer step (not in a split backward). The inner loop is not
software-pipelined (``NUM_STAGES``). K/V blocks are loaded even when no Q block sees them.
float32 uses IEEE dots. The soft-cap's tanh is written with exp (no libdevice call, so the
interpreter runs it). ALiBi slopes get no gradient. Without a dropout_seed the seed is drawn on the host (a graph break
under torch.compile); the CPU interpreter cannot torch.compile the triton_ops. If Triton's
staging needs more shared memory than the formula budgets, the eager launcher halves the
blocks and warns. The returned lse is not differentiable. bfloat16 is wrong under the
interpreter. The modelled HBM traffic is ``fatrain.bench.traffic``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _dropout
from ._common import (MASKED_ROW_LSE, check_alibi_slopes, check_deterministic, check_doc_ids, check_dropout,
                      check_qkv, check_sink_logits, check_softcap, check_triton_device, default_scale,
                      normalize_window)
from ._dropout import dropout_keep

BACKEND = "flash_v1"
HEAD_DIMS = (16, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: The on-chip budget used under the CPU interpreter (which has no shared memory): 16 KiB,
#: M = 4096 float32 words, so B_c = B_r = 16 for d = 64 and the loops run many times.
CPU_INTERPRETER_SRAM_BYTES = 16 * 1024
#: tl.dot needs block sides that are powers of two and at least 16.
MIN_BLOCK = 16
#: M is counted in float32 words (the on-chip accumulators are float32).
_BYTES_PER_WORD = 4

_sram_bytes_override: int | None = None
#: Software-pipelining depth of the inner loop (Triton's num_stages). Deeper pipelines are
#: safe (consecutive inner steps touch different rows; the bar.sync sits between K/V blocks)
#: but slower on an H100: 2 stages took 1.1-2.1x the time of 1 (forward+backward, bf16,
#: d 64/128, N 4k/8k): not pipelined.
NUM_STAGES = 1


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _window_mask(offs_m, offs_n, m_valid, n_valid, diag_offset, WINDOW_LEFT, WINDOW_RIGHT,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: in bounds and inside the window (causal is right = 0)."""
    allowed = m_valid[:, None] & n_valid[None, :]
    pos = offs_m[:, None] + diag_offset
    if HAS_RIGHT:
        allowed = allowed & (offs_n[None, :] <= pos + WINDOW_RIGHT)
    if HAS_LEFT:
        allowed = allowed & (offs_n[None, :] >= pos - WINDOW_LEFT)
    return allowed


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (1 - e^(-2|x|)) / (1 + e^(-2|x|)); e^(-2|x|) <= 1, so nothing overflows.

    NOTE: written out because libdevice's tanh does not run under the CPU interpreter.
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _alibi_bias(slope, offs_m, offs_n, diag_offset):
    """(BLOCK_M, BLOCK_N) ALiBi bias -slope * |r + diag_offset - c| (flash-attn's definition)."""
    dist = tl.abs((offs_m[:, None] + diag_offset) - offs_n[None, :]).to(tl.float32)
    return -slope * dist


@triton.jit
def _first_owned(lo, BLOCK: tl.constexpr, split, NUM_SPLITS):
    """The first block start >= lo (lo a multiple of BLOCK) whose block index is split mod NUM_SPLITS."""
    return lo + ((split + NUM_SPLITS - (lo // BLOCK) % NUM_SPLITS) % NUM_SPLITS) * BLOCK


@triton.jit
def _doc_block(doc_base, stride_docn, offs, N_CTX_K):
    """Document ids at key positions ``offs`` and their min and max.

    NOTE: positions past the sequence end are clamped to the last one, which lies in the same
    block, so the min and max are those of the block's valid positions without a mask.
    """
    ids = tl.load(doc_base + tl.minimum(offs, N_CTX_K - 1) * stride_docn)
    return ids, tl.min(ids, 0), tl.max(ids, 0)


@triton.jit
def _float32_scalars(softmax_scale, softcap, dropout_p, dropout_scale, HAS_SOFTCAP: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr):
    """The kernels' float arguments as float32. NOTE: torch.compile launches the kernels with Python
    floats typed fp64; uncast, the scores are scaled and soft-capped in fp64 and round differently
    from the eager launch's."""
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    if HAS_SOFTCAP:
        softcap = tl.cast(softcap, tl.float32)
    if HAS_DROPOUT:
        dropout_p = tl.cast(dropout_p, tl.float32)
        dropout_scale = tl.cast(dropout_scale, tl.float32)
    return softmax_scale, softcap, dropout_p, dropout_scale


@triton.jit
def _flash_v1_fwd_kernel(
    Q, K, V, O, L, M, DOC, ALIBI,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_docb, stride_docn, stride_alibib, stride_alibih,
    softmax_scale, softcap, N_CTX_Q, N_CTX_K, NHEADS, GROUP, D,
    WINDOW_LEFT, WINDOW_RIGHT, dropout_p, dropout_scale, seed, NUM_SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Algorithm 1 for one (batch, query head) and the Q blocks i = split (mod NUM_SPLITS).

    O is float32 in HBM; L and M are (B, H, Nq). With NUM_SPLITS = 1 this is the paper's
    program; more splits give each (batch, head) NUM_SPLITS programs that own disjoint Q rows.
    Sinks need nothing here: the launcher starts each row at m = sink_h, l = 1.
    """
    softmax_scale, softcap, dropout_p, dropout_scale = _float32_scalars(softmax_scale, softcap, dropout_p,
                                                                        dropout_scale, HAS_SOFTCAP, HAS_DROPOUT)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    off_b = pid // NHEADS
    off_h = pid % NHEADS
    off_hk = off_h // GROUP
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk * stride_vh
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h * stride_oh
    lm_offset = pid.to(tl.int64) * N_CTX_Q  # L, M are contiguous (B, H, Nq)
    doc_base = DOC + off_b.to(tl.int64) * stride_docb
    offs_d = tl.arange(0, HEAD_DIM)
    d_valid = offs_d < D
    # Query row r sits at key position r + diag_offset (causal aligned bottom-right).
    diag_offset = N_CTX_K - N_CTX_Q
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + off_b * stride_alibib + off_h * stride_alibih)

    # -- line 6: for 1 <= j <= T_c --
    for start_n in range(0, N_CTX_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N_CTX_K
        kv_mask = n_valid[:, None] & d_valid[None, :]
        # -- line 7: load K_j, V_j --
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        # Skip the Q blocks whose rows all lie outside this K/V block's window: row r sees
        # keys [r + diag_offset - left, r + diag_offset + right] (causal: right = 0).
        m_lo = 0
        m_hi = N_CTX_Q
        if HAS_RIGHT:
            m_lo = (tl.maximum(start_n - diag_offset - WINDOW_RIGHT, 0) // BLOCK_M) * BLOCK_M
        if HAS_LEFT:
            m_hi = tl.minimum(start_n + BLOCK_N - diag_offset + WINDOW_LEFT, N_CTX_Q)
        if HAS_DOCS:
            doc_k, k_lo, k_hi = _doc_block(doc_base, stride_docn, offs_n, N_CTX_K)
        # -- line 8: for 1 <= i <= T_r (this program's i: i = split mod NUM_SPLITS) --
        for start_m in range(_first_owned(m_lo, BLOCK_M, split, NUM_SPLITS), m_hi, BLOCK_M * NUM_SPLITS):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < N_CTX_Q
            qo_mask = m_valid[:, None] & d_valid[None, :]
            visit = True
            if HAS_DOCS:
                # Skip the pair when the id ranges are disjoint: no query shares a key's document.
                doc_q, q_lo, q_hi = _doc_block(doc_base, stride_docn, offs_m + diag_offset, N_CTX_K)
                visit = (q_lo <= k_hi) & (k_lo <= q_hi)
            if visit:
                # -- line 9: load Q_i, O_i, l_i, m_i --
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qo_mask, other=0.0)
                o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
                o = tl.load(o_ptrs, mask=qo_mask, other=0.0)
                l_i = tl.load(L + lm_offset + offs_m, mask=m_valid, other=0.0)
                m_i = tl.load(M + lm_offset + offs_m, mask=m_valid, other=float("-inf"))
                # -- line 10: S_ij = tau Q_i K_j^T, then MASK (Algorithm 2 lines 10-11) --
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * softmax_scale
                if HAS_SOFTCAP:
                    # -- soft-cap: S_ij = c tanh(S_ij / c) --
                    s = softcap * _tanh(s / softcap)
                if HAS_ALIBI:
                    # -- ALiBi: S_ij -= slope |r + Nk - Nq - c| --
                    s += _alibi_bias(slope, offs_m, offs_n, diag_offset)
                allowed = _window_mask(offs_m, offs_n, m_valid, n_valid, diag_offset, WINDOW_LEFT, WINDOW_RIGHT,
                                       HAS_LEFT, HAS_RIGHT)
                if HAS_DOCS:
                    # Blocks inside one document need no document mask.
                    if (q_lo != q_hi) | (k_lo != k_hi):
                        allowed = allowed & (doc_q[:, None] == doc_k[None, :])
                s = tl.where(allowed, s, float("-inf"))
                # -- line 11: m~_ij = rowmax(S_ij), P~_ij = exp(S_ij - m~_ij), l~_ij = rowsum(P~_ij) --
                m_ij = tl.max(s, 1)
                # NOTE: a row with no allowed key in this block has m~_ij = -inf; subtracting 0
                # instead gives P~_ij = exp(-inf) = 0 rather than exp(-inf + inf) = NaN.
                m_ij_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
                p = tl.exp(s - m_ij_safe[:, None])
                l_ij = tl.sum(p, 1)
                # -- line 12: m_new = max(m_i, m~_ij), l_new = e^(m_i - m_new) l_i + e^(m~_ij - m_new) l~_ij --
                m_new = tl.maximum(m_i, m_ij)
                m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_new_safe)
                beta = tl.exp(m_ij - m_new_safe)
                l_new = alpha * l_i + beta * l_ij
                # -- Algorithm 2 line 14: P~_ij^dropped = P~_ij o Z_ij / (1 - p); l stays un-dropped --
                if HAS_DROPOUT:
                    keep = dropout_keep(seed, pid, offs_m, offs_n, dropout_p)
                    p = tl.where(keep, p * dropout_scale, 0.0)
                # -- line 13: O_i = diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j) --
                # NOTE: P~_ij is cast to the input dtype for the tensor-core product, as in FA.
                pv = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
                l_new_safe = tl.where(l_new == 0.0, 1.0, l_new)  # rows that have seen no key yet keep O_i = 0
                o = ((l_i * alpha)[:, None] * o + beta[:, None] * pv) / l_new_safe[:, None]
                tl.store(o_ptrs, o, mask=qo_mask)
                # -- line 14: l_i = l_new, m_i = m_new --
                tl.store(L + lm_offset + offs_m, l_new, mask=m_valid)
                tl.store(M + lm_offset + offs_m, m_new, mask=m_valid)
        # NOTE: the next K/V block reads these O_i, l_i, m_i rows again, maybe through other
        # threads of this CTA; bar.sync makes the writes above visible to them first. Inside
        # the inner loop each step touches other rows, so the loop can be software-pipelined.
        tl.debug_barrier()


@triton.jit
def _flash_v1_bwd_kernel(
    Q, K, V, O, DO, L, M, DQ, DK, DV, DOC, ALIBI,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_docb, stride_docn, stride_alibib, stride_alibih,
    softmax_scale, softcap, N_CTX_Q, N_CTX_K, NHEADS, NHEADS_K, GROUP, D,
    WINDOW_LEFT, WINDOW_RIGHT, dropout_p, dropout_scale, seed, NUM_SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """Algorithm 4 for one (batch, key/value head), the GROUP query heads that share it, and the
    K/V blocks j = split (mod NUM_SPLITS).

    With NUM_SPLITS = 1 this is the paper's program and dQ_i is read-modify-written (ATOMIC_DQ
    off: bit-reproducible). With more splits several programs add into the same dQ_i, so
    line 22 becomes a float32 atomic add in HBM (ATOMIC_DQ on), as flash-attn 1.x did.
    With sinks, l_i and m_i include the sink, so P_ij is already right; d sink is the launcher's.
    """
    softmax_scale, softcap, dropout_p, dropout_scale = _float32_scalars(softmax_scale, softcap, dropout_p,
                                                                        dropout_scale, HAS_SOFTCAP, HAS_DROPOUT)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    off_b = pid // NHEADS_K
    off_hk = pid % NHEADS_K
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk * stride_vh
    dk_base = DK + off_b.to(tl.int64) * stride_dkb + off_hk * stride_dkh
    dv_base = DV + off_b.to(tl.int64) * stride_dvb + off_hk * stride_dvh
    doc_base = DOC + off_b.to(tl.int64) * stride_docb
    offs_d = tl.arange(0, HEAD_DIM)
    d_valid = offs_d < D
    diag_offset = N_CTX_K - N_CTX_Q

    # -- line 7: for 1 <= j <= T_c (this program's j: j = split mod NUM_SPLITS) --
    for start_n in range(split * BLOCK_N, N_CTX_K, BLOCK_N * NUM_SPLITS):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N_CTX_K
        kv_mask = n_valid[:, None] & d_valid[None, :]
        # -- line 8: load K_j, V_j --
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        # -- line 9: dK~_j = 0, dV~_j = 0 on chip --
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # The same Q-block range as the forward (blocks outside the window are skipped).
        m_lo = 0
        m_hi = N_CTX_Q
        if HAS_RIGHT:
            m_lo = (tl.maximum(start_n - diag_offset - WINDOW_RIGHT, 0) // BLOCK_M) * BLOCK_M
        if HAS_LEFT:
            m_hi = tl.minimum(start_n + BLOCK_N - diag_offset + WINDOW_LEFT, N_CTX_Q)
        if HAS_DOCS:
            doc_k, k_lo, k_hi = _doc_block(doc_base, stride_docn, offs_n, N_CTX_K)
        # GQA/MQA: the query heads of this K/V head, so dK_j, dV_j sum over them on chip.
        for g in range(0, GROUP):
            off_h = off_hk * GROUP + g
            q_base = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
            o_base = O + off_b.to(tl.int64) * stride_ob + off_h * stride_oh
            do_base = DO + off_b.to(tl.int64) * stride_dob + off_h * stride_doh
            dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h * stride_dqh
            lm_offset = (off_b.to(tl.int64) * NHEADS + off_h) * N_CTX_Q
            slope = 0.0
            if HAS_ALIBI:
                slope = tl.load(ALIBI + off_b * stride_alibib + off_h * stride_alibih)
            # -- line 10: for 1 <= i <= T_r --
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_valid = offs_m < N_CTX_Q
                qo_mask = m_valid[:, None] & d_valid[None, :]
                visit = True
                if HAS_DOCS:
                    doc_q, q_lo, q_hi = _doc_block(doc_base, stride_docn, offs_m + diag_offset, N_CTX_K)
                    visit = (q_lo <= k_hi) & (k_lo <= q_hi)
                if visit:
                    # -- line 11: load Q_i, O_i, dO_i, dQ_i (not with atomics), l_i, m_i --
                    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                                mask=qo_mask, other=0.0)
                    o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                                mask=qo_mask, other=0.0)
                    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                                 mask=qo_mask, other=0.0)
                    dq_ptrs = dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
                    if not ATOMIC_DQ:
                        dq = tl.load(dq_ptrs, mask=qo_mask, other=0.0)
                    l_i = tl.load(L + lm_offset + offs_m, mask=m_valid, other=0.0)
                    m_i = tl.load(M + lm_offset + offs_m, mask=m_valid, other=float("-inf"))
                    # -- lines 12-13: S_ij = tau Q_i K_j^T (soft-capped, ALiBi-biased as forward), MASK --
                    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * softmax_scale
                    if HAS_SOFTCAP:
                        tanh_s = _tanh(s / softcap)
                        s = softcap * tanh_s
                    if HAS_ALIBI:
                        s += _alibi_bias(slope, offs_m, offs_n, diag_offset)
                    allowed = _window_mask(offs_m, offs_n, m_valid, n_valid, diag_offset, WINDOW_LEFT,
                                           WINDOW_RIGHT, HAS_LEFT, HAS_RIGHT)
                    if HAS_DOCS:
                        if (q_lo != q_hi) | (k_lo != k_hi):
                            allowed = allowed & (doc_q[:, None] == doc_k[None, :])
                    s = tl.where(allowed, s, float("-inf"))
                    # -- line 14: P_ij = diag(l_i)^-1 exp(S_ij - m_i) --
                    # NOTE: rows that saw no key have m_i = -inf, l_i = 0; the safe values give P = 0.
                    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
                    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
                    p = tl.exp(s - m_safe[:, None]) / l_safe[:, None]
                    # -- lines 15-16: regenerate Z_ij; P_ij^dropped = P_ij o Z_ij / (1 - p) --
                    p_dropped = p
                    if HAS_DROPOUT:
                        keep = dropout_keep(seed, off_b * NHEADS + off_h, offs_m, offs_n, dropout_p)
                        p_dropped = tl.where(keep, p * dropout_scale, 0.0)
                    # -- line 17: dV~_j += (P_ij^dropped)^T dO_i --
                    dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=INPUT_PRECISION)
                    # -- lines 18-19: dP_ij^dropped = dO_i V_j^T, dP_ij = dP_ij^dropped o Z_ij / (1 - p) --
                    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
                    if HAS_DROPOUT:
                        dp = tl.where(keep, dp * dropout_scale, 0.0)
                    # -- line 20: D_i = rowsum(dO_i o O_i) --
                    d_i = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                    # -- line 21: dS_ij = P_ij o (dP_ij - D_i) --
                    ds = p * (dp - d_i[:, None])
                    if HAS_SOFTCAP:
                        # -- through the soft-cap: d(c tanh(x / c)) / dx = 1 - tanh^2 --
                        ds = ds * (1.0 - tanh_s * tanh_s)
                    # -- line 22: dQ_i += tau dS_ij K_j in HBM (float32) --
                    dq_ij = softmax_scale * tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
                    if ATOMIC_DQ:
                        tl.atomic_add(dq_ptrs, dq_ij, mask=qo_mask, sem="relaxed")
                    else:
                        tl.store(dq_ptrs, dq + dq_ij, mask=qo_mask)
                    # -- line 23: dK~_j += dS_ij^T Q_i (tau applied at line 25) --
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)
        # NOTE: dQ_i is read again for the next j, maybe by other threads of this CTA (inside
        # the loops over g and i every step touches other rows). Atomic adds need no order.
        if not ATOMIC_DQ:
            tl.debug_barrier()
        # -- line 25: write dK_j = tau dK~_j, dV_j = dV~_j --
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------
# Host side: block sizes, splits, launchers
# ----------------------------------------------------------------------------------------

def set_sram_bytes(sram_bytes: int | None) -> int | None:
    """Set the on-chip budget M (in bytes) every later flash_v1 call uses; None: detect it.

    Returns the previous setting, so a caller can restore it.
    """
    global _sram_bytes_override
    if sram_bytes is not None:
        _check_sram_bytes(sram_bytes)
    previous, _sram_bytes_override = _sram_bytes_override, sram_bytes
    return previous


def _check_sram_bytes(sram_bytes) -> int:
    if isinstance(sram_bytes, bool) or not isinstance(sram_bytes, int) or sram_bytes < 1:
        raise ValueError(f"sram_bytes must be a positive int (bytes of on-chip memory), got {sram_bytes!r}")
    return sram_bytes


def device_sram_bytes(device=None) -> int:
    """The on-chip budget in bytes: the setter's value, the GPU's shared memory per block, or the CPU value."""
    if _sram_bytes_override is not None:
        return _sram_bytes_override
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return CPU_INTERPRETER_SRAM_BYTES
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    return int(triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def flash_v1_block_sizes(head_dim: int, sram_bytes: int | None = None) -> tuple[int, int]:
    """(B_r, B_c) of Algorithm 1 line 2 for an on-chip budget of ``sram_bytes``.

    M = sram_bytes // 4 float32 words; B_c = ceil(M / 4d), B_r = min(B_c, d); each is then
    rounded down to a power of two and raised to at least 16, which ``tl.dot`` requires.
    ``sram_bytes=None`` takes the value of :func:`device_sram_bytes` for the current CUDA
    device (or the CPU interpreter's fixed value).
    """
    if sram_bytes is None:
        sram_bytes = device_sram_bytes("cuda" if torch.cuda.is_available() else "cpu")
    _check_sram_bytes(sram_bytes)
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    words = sram_bytes // _BYTES_PER_WORD
    block_c = math.ceil(words / (4 * head_dim))
    block_r = min(block_c, head_dim)
    return max(MIN_BLOCK, _pow2_floor(block_r)), max(MIN_BLOCK, _pow2_floor(block_c))


def _launch_blocks(seqlen_q: int, seqlen_k: int, head_dim: int, sram_bytes: int) -> tuple[int, int]:
    """The blocks the kernels run with: the formula's, capped at the sequence length's power of two."""
    block_m, block_n = flash_v1_block_sizes(head_dim, sram_bytes)
    block_m = min(block_m, max(MIN_BLOCK, triton.next_power_of_2(seqlen_q)))
    block_n = min(block_n, max(MIN_BLOCK, triton.next_power_of_2(seqlen_k)))
    return block_m, block_n


#: The split heuristic aims at this many programs per SM (see :func:`flash_v1_num_splits`).
WAVES_PER_SM = 16
#: ... and gives no (batch, head) more programs than this (the most that was measured).
MAX_SPLITS = 16


def flash_v1_num_splits(programs: int, blocks: int, num_sms: int) -> int:
    """How many programs to give each of ``programs`` (batch, head) pairs on a GPU with ``num_sms`` SMs.

    S = min(ceil(WAVES_PER_SM * num_sms / programs), MAX_SPLITS, blocks), at least 1: enough
    programs for about 16 per SM, each owning at least one block (``blocks``: the Q blocks
    of the forward, the K/V blocks of the backward). On an H100 (bf16, d 64/128, N 2k-16k,
    causal and not) S = 16 was the fastest or
    within 3% of it in all 12 cases, 2-8x faster than S = 1 forward+backward. Filling the
    SMs once is not enough: flash-attn 1.x's wave-efficiency rule (one program per SM)
    chose S = 2 at d=64 N=8192 (41.5 ms) where S = 16 took 25.6 ms, and S = 1 at d=128
    N=2048 (15.1 ms vs 12.5 ms): smaller programs keep more of their O_i, l_i, m_i rows in
    L2 between the round trips, and two d=64 programs fit on one SM.
    """
    want = math.ceil(WAVES_PER_SM * max(1, num_sms) / max(1, programs))
    return max(1, min(want, MAX_SPLITS, blocks))


def _check_num_splits(num_splits) -> int:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen from the GPU's SM count, 1: the paper's "
                         f"batch x heads grid, n > 1: n programs per (batch, head)), got {num_splits!r}")
    return num_splits


def resolve_num_splits(num_splits: int, deterministic: bool, batch: int, nheads: int, nheads_k: int,
                       seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, device) -> tuple[int, int]:
    """(forward splits over Q blocks, backward splits over K/V blocks) for one call.

    ``num_splits`` 0 applies :func:`flash_v1_num_splits` on a GPU (1 on the CPU interpreter,
    which runs programs one at a time); n >= 1 is used as given, capped at the block counts.
    ``deterministic`` keeps the backward at one split (no atomic adds into dQ).
    """
    _check_num_splits(num_splits)
    q_blocks, kv_blocks = math.ceil(seqlen_q / block_m), math.ceil(seqlen_k / block_n)
    device = torch.device(device)
    if num_splits == 0 and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        fwd = flash_v1_num_splits(batch * nheads, q_blocks, sms)
        bwd = flash_v1_num_splits(batch * nheads_k, kv_blocks, sms)
    else:
        fwd = bwd = max(num_splits, 1)
    fwd, bwd = max(1, min(fwd, q_blocks)), max(1, min(bwd, kv_blocks))
    return fwd, 1 if deterministic else bwd


def _input_precision(dtype: torch.dtype) -> str:
    # NOTE: "ieee" keeps float32 products exact (tl.dot defaults to TF32 on NVIDIA GPUs).
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_warps(head_dim_padded: int) -> int:
    return 4 if head_dim_padded <= 64 else 8


def _launch(kernel, grid, args, *, block_m: int, block_n: int, **meta) -> None:
    """Launch with the formula's blocks; if Triton's staging needs more shared memory than
    the formula budgets, halve B_c (then both) and warn, instead of failing.

    NOTE: only the eager path can retry; under torch.compile the launch is traced, not run.
    """
    while True:
        try:
            wrap_triton(kernel)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_stages=NUM_STAGES, **meta)
            return
        except triton.runtime.errors.OutOfResources as err:
            if block_n <= MIN_BLOCK:
                raise
            smaller = (block_m, block_n // 2) if block_n > block_m else (block_m // 2, block_n // 2)
            warnings.warn(f"flash_v1: blocks (B_r, B_c) = {(block_m, block_n)} exceed the GPU's resources "
                          f"({err}); retrying with {smaller}", RuntimeWarning, stacklevel=2)
            block_m, block_n = smaller


def _mask_meta(window_left: int, window_right: int, doc_ids, dropout_p: float, alibi_slopes,
               softcap: float) -> dict:
    """The constexpr switches: features that are off compile out of the kernels (dropout_p = 0, no
    ALiBi and no soft-cap cost nothing)."""
    return dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_DOCS=doc_ids is not None,
                HAS_DROPOUT=dropout_p > 0.0, HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0.0)


def _mask_args(q: torch.Tensor, window_left: int, window_right: int, doc_ids, dropout_p: float, seed: int,
               alibi_slopes):
    """(doc and ALiBi pointers, their strides), (window, dropout) kernel arguments; q stands in
    for absent doc_ids and slopes."""
    docs = (q, 0, 0) if doc_ids is None else (doc_ids, doc_ids.stride(0), doc_ids.stride(1))
    slopes = (q, 0, 0) if alibi_slopes is None else (alibi_slopes, *alibi_slopes.stride())
    # NOTE: the scale 1 / (1 - p) is computed once on the host; unused when p = 0.
    drop = (window_left, window_right, dropout_p, 1.0 / (1.0 - dropout_p), seed)
    return (docs[0], slopes[0]), (*docs[1:], *slopes[1:]), drop


@triton_op("fatrain::flash_v1_forward", mutates_args={})
def _flash_v1_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                      window_left: int, window_right: int, doc_ids: Optional[torch.Tensor], dropout_p: float,
                      seed: int, block_m: int, block_n: int, fwd_splits: int, bwd_splits: int,
                      alibi_slopes: Optional[torch.Tensor], softcap: float,
                      sink_logits: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run Algorithm 1 with Algorithm 2's mask and dropout; return out (input dtype), l and m (float32, (B, H, Nq)).

    ``fwd_splits`` programs per (batch, head) share its Q blocks; ``bwd_splits`` is for the backward.
    ``alibi_slopes`` is (B, H) float32 or None; ``softcap`` 0 is off; with ``sink_logits`` (H,) the
    returned l and m include each row's sink.
    """
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    # -- Algorithm 1 line 3: O = 0, l = 0, m = -inf in HBM (O in float32) --
    o = torch.zeros(B, Nq, H, D, device=q.device, dtype=torch.float32)
    if sink_logits is None:
        l = torch.zeros(B, H, Nq, device=q.device, dtype=torch.float32)
        m = torch.full((B, H, Nq), float("-inf"), device=q.device, dtype=torch.float32)
    else:
        # The sink is a key with score sink_h and no value, seen by every row: each row starts
        # as if it had been visited first, m = sink_h and l = e^(sink_h - m) = 1 (O stays 0).
        l = torch.ones(B, H, Nq, device=q.device, dtype=torch.float32)
        m = sink_logits.detach().float()[None, :, None].expand(B, H, Nq).contiguous()
    head_dim_padded = max(MIN_BLOCK, triton.next_power_of_2(D))
    (doc, slopes), strides, mask_args = _mask_args(q, window_left, window_right, doc_ids, dropout_p, seed,
                                                   alibi_slopes)
    _launch(_flash_v1_fwd_kernel, (B * H, fwd_splits), (
        q, k, v, o, l, m, doc, slopes,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *strides,
        softmax_scale, softcap, Nq, Nk, H, H // Hkv, D, *mask_args, fwd_splits,
    ), block_m=block_m, block_n=block_n, HEAD_DIM=head_dim_padded,
        **_mask_meta(window_left, window_right, doc_ids, dropout_p, alibi_slopes, softcap),
        INPUT_PRECISION=_input_precision(q.dtype), num_warps=_num_warps(head_dim_padded))
    return o.to(q.dtype), l, m


@triton_op("fatrain::flash_v1_backward", mutates_args={})
def _flash_v1_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       l: torch.Tensor, m: torch.Tensor, softmax_scale: float, window_left: int, window_right: int,
                       doc_ids: Optional[torch.Tensor], dropout_p: float, seed: int,
                       block_m: int, block_n: int, bwd_splits: int, alibi_slopes: Optional[torch.Tensor],
                       softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run Algorithm 4 with ``bwd_splits`` programs per (batch, K/V head); return dq, dk, dv in the input dtype."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    # -- Algorithm 4 line 6: dQ = 0 in HBM (float32, read-modify-written); dK, dV written once --
    dq = torch.zeros(B, Nq, H, D, device=q.device, dtype=torch.float32)
    dk = torch.empty(B, Nk, Hkv, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Nk, Hkv, D, device=q.device, dtype=v.dtype)
    head_dim_padded = max(MIN_BLOCK, triton.next_power_of_2(D))
    (doc, slopes), strides, mask_args = _mask_args(q, window_left, window_right, doc_ids, dropout_p, seed,
                                                   alibi_slopes)
    _launch(_flash_v1_bwd_kernel, (B * Hkv, bwd_splits), (
        q, k, v, out, do, l, m, dq, dk, dv, doc, slopes,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(), *strides,
        softmax_scale, softcap, Nq, Nk, H, Hkv, H // Hkv, D, *mask_args, bwd_splits,
    ), block_m=block_m, block_n=block_n, HEAD_DIM=head_dim_padded,
        **_mask_meta(window_left, window_right, doc_ids, dropout_p, alibi_slopes, softcap),
        INPUT_PRECISION=_input_precision(q.dtype), ATOMIC_DQ=bwd_splits > 1,
        num_warps=_num_warps(head_dim_padded))
    return dq.to(q.dtype), dk, dv


# ----------------------------------------------------------------------------------------
# Autograd: the forward saves O, l and m; the backward recomputes P from them
# ----------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    (q, k, v, softmax_scale, window_left, window_right, doc_ids, dropout_p, seed, block_m, block_n, _, bwd_splits,
     alibi_slopes, softcap, sink_logits) = inputs
    out, l, m = output
    # The seed, not the mask, is saved: the backward regenerates Z_ij (Algorithm 4 line 15).
    ctx.save_for_backward(q, k, v, out, l, m, doc_ids, alibi_slopes, sink_logits)
    ctx.softmax_scale = softmax_scale
    ctx.window = (window_left, window_right)
    ctx.dropout = (dropout_p, seed)
    ctx.blocks = (block_m, block_n, bwd_splits)
    ctx.softcap = softcap


def _sink_grad(dout, out, l, m, sink_logits):
    """d sink_h = -sum over (b, i) of P_sink,i D_i, where P_sink,i = e^(sink_h - m_i) / l_i is the
    sink's probability in row i and D_i = rowsum(dO_i o O_i) (Algorithm 4 line 20): the sink
    enters each row's softmax with no value, so its dP is 0 and dS_sink = P_sink (0 - D_i).

    NOTE: computed from the HBM tensors with torch's reductions, which use no atomics: the same
    bits every run, whatever the backward's split count.
    """
    d_i = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (B, H, Nq)
    p_sink = torch.exp(sink_logits.float()[None, :, None] - m) / l
    return -(p_sink * d_i).sum(dim=(0, 2))


def _backward(ctx, dout, dl, dm):
    # dl, dm: l and m are statistics, not outputs a loss depends on (lse is detached).
    q, k, v, out, l, m, doc_ids, alibi_slopes, sink_logits = ctx.saved_tensors
    dq, dk, dv = _flash_v1_backward(dout, q, k, v, out, l, m, ctx.softmax_scale, *ctx.window, doc_ids,
                                    *ctx.dropout, *ctx.blocks, alibi_slopes, ctx.softcap)
    dsink = None
    if sink_logits is not None and ctx.needs_input_grad[15]:
        dsink = _sink_grad(dout, out, l, m, sink_logits).to(sink_logits.dtype)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, dsink


_flash_v1_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------

def flash_v1_attention(q, k, v, *, causal: bool = False, softmax_scale=None, dropout_p: float = 0.0,
                       window_size=(-1, -1), doc_ids=None, return_lse: bool = False,
                       dropout_seed: int | None = None, return_dropout_mask: bool = False, sram_bytes=None,
                       num_splits: int = 0, deterministic: bool = False, alibi_slopes=None,
                       softcap: float = 0.0, sink_logits=None):
    """FlashAttention-1 (Algorithms 1, 2 and 4): exact attention with O, l and m kept in HBM.

    Arguments as in fatrain.kernels (the registry), ALiBi slopes, soft-cap and sink logits
    included (d sink_logits is deterministic at any split); float16, bfloat16 or float32, headdim
    16..256, CUDA tensors (CPU tensors under the Triton interpreter). Its own options:
        sram_bytes: the on-chip budget M in bytes that sets the block sizes
            (None: :func:`set_sram_bytes`'s value, else the GPU's shared memory per block)
        num_splits: programs per (batch, head). 1 is the paper's grid (parallel over
            batch x heads only). n > 1 gives each (batch, head) n programs: in the forward
            they own the Q blocks i = split (mod n), in the backward the K/V blocks
            j = split (mod n), adding into dQ with float32 atomics. 0 (default) chooses n
            from the GPU's SM count (:func:`flash_v1_num_splits`: about 16 programs per
            SM, at most 16 per (batch, head)); 1 on the CPU interpreter.
        deterministic: keep the backward at one split, so dQ is read-modify-written by
            one program and two runs give bit-identical gradients (slower when batch x
            heads is small). The forward is deterministic at any split.
    Limits: the returned lse is not differentiable; torch.compile works on a GPU only (not
    through the CPU interpreter); without a dropout_seed the seed is drawn on the host.
    """
    B, Nq, Nk, H, Hkv, D = check_qkv(q, k, v, backend=BACKEND, head_dims=HEAD_DIMS, dtypes=DTYPES)
    check_triton_device(q)
    slopes = check_alibi_slopes(alibi_slopes, B, H, q.device)
    cap = check_softcap(softcap)
    sinks = check_sink_logits(sink_logits, H, q.device)
    check_doc_ids(doc_ids, B, Nk, q.device)
    if doc_ids is not None and Nq > Nk:
        raise ValueError(f"doc_ids need seqlen_q <= seqlen_k, got seqlen_q {Nq} > seqlen_k {Nk}")
    scale = default_scale(softmax_scale, D)
    p = check_dropout(dropout_p)
    if dropout_seed is not None:
        _dropout.check_seed(dropout_seed)
    seed = _dropout.resolve_seed(dropout_seed) if p > 0.0 else 0  # 0: unused, HAS_DROPOUT is off
    left, right = normalize_window(window_size, causal)
    if sram_bytes is None:
        sram_bytes = device_sram_bytes(q.device)
    block_m, block_n = _launch_blocks(Nq, Nk, D, _check_sram_bytes(sram_bytes))
    check_deterministic(deterministic)
    splits = resolve_num_splits(num_splits, deterministic, B, H, Hkv, Nq, Nk, block_m, block_n, q.device)
    out, l, m = _flash_v1_forward(q, k, v, scale, left, right, doc_ids, p, seed, block_m, block_n, *splits,
                                  slopes, cap, sinks)
    results = [out]
    if return_lse:
        l, m = l.detach(), m.detach()
        results.append(torch.where(l > 0, m + torch.log(l), torch.full_like(l, MASKED_ROW_LSE)))
    if return_dropout_mask:
        results.append(_dropout.dropout_mask(seed, B, H, Nq, Nk, p, q.device))
    return results[0] if len(results) == 1 else tuple(results)


def flash_v1_attention_backward(do, q, k, v, out, lse, *, causal: bool = False, softmax_scale=None,
                                window_size=(-1, -1), doc_ids=None, sram_bytes=None, num_splits: int = 0,
                                deterministic: bool = False):
    """dQ, dK, dV of :func:`flash_v1_attention` (no dropout) from dO and the forward's out and lse,
    through Algorithm 4 with m = lse and l = 1 (so P = exp(S - lse)).

    ``out`` and ``lse`` ((B, H, Nq), float32) may come from a larger computation than this call:
    ring attention passes the output and logsumexp merged over every key block, and gets this
    block's share of dQ and its dK, dV. Returns dq, dk, dv in the input dtype.
    """
    B, Nq, Nk, H, Hkv, D = check_qkv(q, k, v, backend=BACKEND, head_dims=HEAD_DIMS, dtypes=DTYPES)
    check_triton_device(q)
    check_doc_ids(doc_ids, B, Nk, q.device)
    scale = default_scale(softmax_scale, D)
    left, right = normalize_window(window_size, causal)
    if sram_bytes is None:
        sram_bytes = device_sram_bytes(q.device)
    block_m, block_n = _launch_blocks(Nq, Nk, D, _check_sram_bytes(sram_bytes))
    check_deterministic(deterministic)
    splits = resolve_num_splits(num_splits, deterministic, B, H, Hkv, Nq, Nk, block_m, block_n, q.device)
    # NOTE: the kernel reads l and m as contiguous (B, H, Nq) rows.
    m = lse.float().contiguous()
    return _flash_v1_backward(do, q, k, v, out, torch.ones_like(m), m, scale, left, right, doc_ids, 0.0, 0,
                              block_m, block_n, splits[1], None, 0.0)
