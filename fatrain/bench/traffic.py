"""flash_v1's HBM traffic, modelled: the bytes each load and store of Algorithms 1 and 4 moves.

FlashAttention-1 keeps O_i, l_i and m_i in HBM and reads and writes them on every inner step,
so its traffic has a Theta(N^2 d^2 / M) term (M the on-chip budget) that FlashAttention-2
does not. The bench reports a flash_v1 run's modelled bytes next to its time (the
``modelled_hbm_gb`` column), so the achieved bandwidth can be read off. The blocks and
splits are the launcher's own (``fatrain.kernels.flash_v1``), so the model counts what runs.
"""

from __future__ import annotations

import dataclasses
import math

from fatrain.kernels._common import normalize_window
from fatrain.kernels.flash_v1 import _check_sram_bytes, _launch_blocks, resolve_num_splits


@dataclasses.dataclass(frozen=True)
class Flash1Traffic:
    """Modelled HBM bytes of one flash_v1 call; ``*_inner`` is the part moved inside the inner loop."""
    forward: int
    backward: int
    forward_inner: int
    backward_inner: int
    block_m: int
    block_n: int
    fwd_splits: int = 1
    bwd_splits: int = 1


def _visited_rows(seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, left: int, right: int) -> int:
    """Sum over K/V blocks j of the Q rows the inner loop visits (the rows of the Q blocks not skipped).

    The Q-block range per K/V block is the kernels' (``m_lo``, ``m_hi``): right = 0 is causal,
    -1 unlimited.
    """
    if left < 0 and right < 0:
        return math.ceil(seqlen_k / block_n) * seqlen_q
    diag_offset = seqlen_k - seqlen_q
    rows = 0
    for start_n in range(0, seqlen_k, block_n):
        m_lo = (max(start_n - diag_offset - right, 0) // block_m) * block_m if right >= 0 else 0
        m_hi = min(start_n + block_n - diag_offset + left, seqlen_q) if left >= 0 else seqlen_q
        if m_hi > m_lo:
            n_blocks = math.ceil((m_hi - m_lo) / block_m)
            rows += min(m_lo + n_blocks * block_m, seqlen_q) - m_lo
    return rows


def flash_v1_hbm_traffic(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                         dtype_bytes: int, sram_bytes: int, causal: bool,
                         window_size: tuple[int, int] = (-1, -1), num_splits: int = 1,
                         device=None) -> Flash1Traffic:
    """Bytes of HBM the forward and backward move, counting each load and store of Algorithms 1 and 4.

    Per (batch, head), with R = sum over K/V blocks j of the Q rows the inner loop visits
    (T_c * Nq without causal; T_c = ceil(Nk / B_c) with B_c about M / 4d, so R is
    Theta(Nq Nk d / M) and the inner terms are the paper's Theta(N^2 d^2 / M)), b = dtype_bytes:

      forward  = b * 2 Nk d * S_f           K_j, V_j once per program (line 7)
               + R * (b d + 4 d + 4 d + 4 * 4)   Q_i, O_i load + store (float32), l_i, m_i load + store
               + 4 Nq d + 8 Nq              O = 0, l = 0, m = -inf (line 3)
               + 4 Nq d + b Nq d            the final cast of O to the input dtype
      backward = b * 4 Nk d                 K_j, V_j loaded and dK_j, dV_j stored once (lines 8, 25)
               + R * (3 b d + 8 d + 8)      Q_i, O_i, dO_i; dQ_i load + store (float32); l_i, m_i
               + 4 Nq d + 4 Nq d + b Nq d   dQ = 0; the final cast of dQ

    MHA is assumed (K/V heads = nheads); the blocks are the launcher's (``flash_v1_block_sizes``,
    capped at the sequence length). ``window_size`` (left, right) narrows R to the Q blocks the
    kernels visit, so R grows as Nq * (left + right + B_r + B_c) instead of Nq * Nk. Document
    masking is not modelled (its skipped blocks depend on the document lengths): the model
    is an upper bound there. Dropout moves no extra bytes (the mask is regenerated on chip).

    ``num_splits`` is flash_v1_attention's (0: the heuristic for ``device``'s SM count): S_f
    forward programs per head each load every K_j, V_j; the backward's splits move the same
    bytes (a split's dQ_i update is an atomic read-modify-write, counted as the load + store).
    """
    block_m, block_n = _launch_blocks(seqlen_q, seqlen_k, head_dim, _check_sram_bytes(sram_bytes))
    fwd_splits, bwd_splits = resolve_num_splits(num_splits, False, batch, nheads, nheads, seqlen_q, seqlen_k,
                                                block_m, block_n, device if device is not None else "cpu")
    left, right = normalize_window(window_size, causal)
    rows = _visited_rows(seqlen_q, seqlen_k, block_m, block_n, left, right)
    b, d = dtype_bytes, head_dim
    fwd_inner = rows * (b * d + 8 * d + 16)
    fwd = 2 * b * seqlen_k * d * fwd_splits + fwd_inner + (4 * seqlen_q * d + 8 * seqlen_q) + (4 + b) * seqlen_q * d
    bwd_inner = rows * (3 * b * d + 8 * d + 8)
    bwd = 4 * b * seqlen_k * d + bwd_inner + (8 + b) * seqlen_q * d
    heads = batch * nheads
    return Flash1Traffic(forward=heads * fwd, backward=heads * bwd, forward_inner=heads * fwd_inner,
                         backward_inner=heads * bwd_inner, block_m=block_m, block_n=block_n,
                         fwd_splits=fwd_splits, bwd_splits=bwd_splits)
