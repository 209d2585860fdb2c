"""Counter-based attention dropout shared by every backend that draws its own mask.

A kept entry of P is decided by a stateless generator on a seed and the element's place:

    keep[b, h, r, c] = tl.rand(seed, offset) >= dropout_p
    offset = ((b * H + h) * Nq + r) * Nk + c          (int64; h is the query head)

so a kernel's backward regenerates exactly the mask its forward used from (seed, b, h, r,
c) alone and nothing N x N is stored (FlashAttention-1, Algorithm 2 line 14 and Algorithm
4 line 15). Kept entries are scaled by 1 / (1 - dropout_p).

Pieces:
    dropout_keep        the ``@triton.jit`` helper a kernel calls on one (B_r, B_c) tile
    dropout_mask        host function: the full bool (B, H, Nq, Nk) keep-mask for the same
                        seed, made by a tiny kernel that calls the same helper; used by
                        ``naive``, by the debug path ``return_dropout_mask`` and by tests
    resolve_seed        the seed policy: an explicit seed, or one drawn from torch's default
                        generator, so ``torch.manual_seed`` reproduces a run

Caution / known limits
    * The stream is Triton's Philox: the same seed gives the same mask on every device for
      one Triton version, but Triton may change how ``tl.rand`` maps int64 offsets between
      versions (3.9 splits them into two 32-bit counters). Compare masks made by one install.
    * ``dropout_mask`` materialises B * H * Nq * Nk bools: meant for small shapes (tests,
      debugging) and for ``naive``, which holds N x N tensors anyway.
    * The draw of a default seed moves torch's CPU generator by one draw per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Seeds are non-negative and below 2**63 (Philox takes a 64-bit key).
_SEED_LIMIT = 1 << 63
#: Default seeds are drawn in [0, 2**31): fits an int32 kernel argument.
_DRAW_LIMIT = (1 << 31) - 1
_MASK_BLOCK_M = 16
_MASK_BLOCK_N = 64


@triton.jit
def dropout_keep(seed, off_bh, offs_m, offs_n, N_CTX_Q, N_CTX_K, dropout_p):
    """Keep-mask (True = keep) of the tile rows ``offs_m`` x columns ``offs_n`` of head ``off_bh = b * H + h``."""
    # NOTE: int64 offsets: B * H * Nq * Nk passes 2**31 at long sequence lengths.
    rows = off_bh.to(tl.int64) * N_CTX_Q + offs_m.to(tl.int64)
    offsets = rows[:, None] * N_CTX_K + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_mask_kernel(Mask, seed, dropout_p, N_CTX_Q, N_CTX_K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (b * H + h, row block): writes the keep-mask rows of one head as int8."""
    off_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = Mask + off_bh.to(tl.int64) * N_CTX_Q * N_CTX_K
    for start_n in range(0, N_CTX_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, off_bh, offs_m, offs_n, N_CTX_Q, N_CTX_K, dropout_p)
        valid = (offs_m[:, None] < N_CTX_Q) & (offs_n[None, :] < N_CTX_K)
        tl.store(base + offs_m[:, None].to(tl.int64) * N_CTX_K + offs_n[None, :], keep.to(tl.int8), mask=valid)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < _SEED_LIMIT):
        raise ValueError(f"dropout_seed must be an int in [0, 2**63) or None (draw from torch's generator), "
                         f"got {seed!r}")
    return seed


def resolve_seed(seed) -> int:
    """The seed a call uses: ``seed`` itself, or (None) a draw from torch's default CPU generator.

    Drawing from the default generator makes ``torch.manual_seed`` reproduce runs that pass no
    seed, and gives every call a fresh mask.
    """
    if seed is None:
        return int(torch.randint(0, _DRAW_LIMIT, (1,)).item())
    return check_seed(seed)


def dropout_mask(seed: int, B: int, H: int, Nq: int, Nk: int, p: float, device) -> torch.Tensor:
    """The bool (B, H, Nq, Nk) keep-mask (True = keep) every kernel draws for this seed and p.

    Made by a tiny Triton kernel calling :func:`dropout_keep`, the helper the attention kernels
    call, so it is exactly their mask. p = 0 keeps everything (no kernel is launched).
    """
    seed = check_seed(seed)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p == 0.0:
        return torch.ones(B, H, Nq, Nk, dtype=torch.bool, device=device)
    mask = torch.empty(B, H, Nq, Nk, dtype=torch.int8, device=device)
    grid = (B * H, triton.cdiv(Nq, _MASK_BLOCK_M))
    _dropout_mask_kernel[grid](mask, seed, float(p), Nq, Nk, BLOCK_M=_MASK_BLOCK_M, BLOCK_N=_MASK_BLOCK_N)
    return mask.bool()
