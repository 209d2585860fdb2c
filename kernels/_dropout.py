"""Counter-based attention dropout shared by every backend that draws its own mask.

A kept entry of P is decided by a stateless generator on a seed and the element's place,
so a kernel's backward regenerates exactly the mask its forward used from (seed, b, h, r, c)
alone and nothing N x N is stored (FlashAttention-1, Algorithm 2 line 14 and Algorithm 4
line 15). Kept entries are scaled by 1 / (1 - dropout_p).

The generator (the same scheme as flash-attn's CUDA kernels: one Philox call feeds many
elements, so the draws cost a fraction of the attention's own arithmetic)
    One Philox4x32 call with 7 rounds (Salmon et al. 2011; flash-attn also runs 7) on the
    counter (group, row, b * H + h, 0) and the key (seed low 32 bits, seed high 32 bits)
    gives 128 random bits. They are cut into ``DROPOUT_BITS``-bit integers u, one per
    element of a group of ``128 / DROPOUT_BITS`` consecutive columns of row ``row``
    (group = col // (128 / DROPOUT_BITS)), and

        keep[b, h, r, c] = u >= round(dropout_p * 2**DROPOUT_BITS)

    so dropout_p is applied in steps of 2**-DROPOUT_BITS (16 bits: |error| <= 7.6e-6; the
    scale 1 / (1 - dropout_p) is not changed). The position of element c inside its group
    is a fixed permutation, the same for any tile shape, so every kernel, whatever its
    blocks, and the host ``dropout_mask`` draw the same mask. The counters are 32-bit
    integers with no arithmetic on the element's flat index: no int64 products per element.

Pieces:
    dropout_keep        the ``@triton.jit`` helper a kernel calls on one (rows x columns)
                        tile whose first column is a multiple of the group width
    dropout_mask        host function: the full bool (B, H, Nq, Nk) keep-mask for the same
                        seed, made by a tiny kernel that calls the same helper; used by
                        ``naive``, by the debug path ``return_dropout_mask`` and by tests
    resolve_seed        the seed policy: an explicit seed, or one drawn from torch's default
                        generator, so ``torch.manual_seed`` reproduces a run

Caution / known limits
    * The stream is this module's own Philox, so it does not depend on how a Triton version
      maps offsets in ``tl.rand``; it is not torch's dropout stream (``sdpa`` keeps PyTorch's).
    * Tiles must start on a group boundary and be a whole number of groups wide (the kernels'
      column blocks are powers of two >= 16 starting at multiples of their width).
    * ``dropout_mask`` materialises B * H * Nq * Nk bools: meant for small shapes (tests,
      debugging) and for ``naive``, which holds N x N tensors anyway.
    * Limits: Nq, Nk and B * H below 2**32 (the counters are 32-bit).
    * The draw of a default seed moves torch's CPU generator by one draw per call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Seeds are non-negative and below 2**63 (Philox takes a 64-bit key).
_SEED_LIMIT = 1 << 63
#: Default seeds are drawn in [0, 2**31): fits an int32 kernel argument.
_DRAW_LIMIT = (1 << 31) - 1
_MASK_BLOCK_M = 16
_MASK_BLOCK_N = 64


#: The generator: "philox" (one Philox4x32-7 call per 8 consecutive columns, cut into 16-bit
#: pieces) or "pcg" (one pcg3d hash per element). An experiment switch while the two are
#: compared on the GPU; both give 16 random bits per element.
DROPOUT_RNG = os.environ.get("FATRAIN_DROPOUT_RNG", "philox")
if DROPOUT_RNG not in ("philox", "pcg"):
    raise ValueError(f"FATRAIN_DROPOUT_RNG must be 'philox' or 'pcg', got {DROPOUT_RNG!r}")
_USE_PCG = tl.constexpr(DROPOUT_RNG == "pcg")
#: Bits of randomness per element: dropout_p is applied in steps of 2**-16.
DROPOUT_BITS = 16
#: Columns per Philox call (the group width).
GROUP_COLS = 128 // DROPOUT_BITS
_GROUP = tl.constexpr(GROUP_COLS)
_LEVELS = tl.constexpr(1 << DROPOUT_BITS)
_ROUNDS = tl.constexpr(7)


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr):
    """ROUNDS rounds of Philox4x32 on the uint32 counter (c0, c1, c2, c3) and key (k0, k1)."""
    for _ in tl.static_range(ROUNDS):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _lowbias32(x):
    """A 32-bit integer finaliser (bijective; two multiply-xorshift rounds)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _pcg3d(x, y, z):
    """pcg3d (Jarzynski and Olano 2020, "Hash Functions for GPU Rendering"), a bijection of
    three uint32 lanes; returns the third lane."""
    x = x * 1664525 + 1013904223
    y = y * 1664525 + 1013904223
    z = z * 1664525 + 1013904223
    x = x + y * z
    y = y + z * x
    z = z + x * y
    x = x ^ (x >> 16)
    y = y ^ (y >> 16)
    z = z ^ (z >> 16)
    x = x + y * z
    y = y + z * x
    return z + x * y


@triton.jit
def _random16_pcg(k0, k1, bh, cols, rows):
    """16 random bits per element: pcg3d(col, row, key(seed, b * H + h)), high half; ``cols``
    and ``rows`` broadcast against each other (any tile orientation)."""
    key = _lowbias32(_lowbias32(bh ^ _lowbias32(k1)) ^ k0)
    z = _pcg3d(cols.to(tl.uint32), rows.to(tl.uint32), key)
    return z >> 16


@triton.jit
def _random16_philox(k0, k1, bh, offs_m, offs_n):
    """16 random bits per element: Philox4x32-7 on (col // 8, row, b * H + h, 0), cut in 8."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    G: tl.constexpr = BLOCK_N // _GROUP
    groups = (tl.max(tl.reshape(offs_n, [G, _GROUP]), axis=1) // _GROUP).to(tl.uint32)
    rows = offs_m.to(tl.uint32)
    zero = tl.zeros([1, G], dtype=tl.uint32)
    # NOTE: counter (group, row, b * H + h, 0); the shapes broadcast to (rows, G) in round 2.
    r0, r1, r2, r3 = _philox4x32(groups[None, :], rows[:, None], bh + zero, zero, k0, k1, _ROUNDS)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [offs_m.shape[0], 4 * G])
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), [offs_m.shape[0], BLOCK_N])


@triton.jit
def dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p):
    """Keep-mask (True = keep) of the tile rows ``offs_m`` x columns ``offs_n`` of head
    ``off_bh = b * H + h``; ``offs_n`` is consecutive, starts on a group boundary and is a
    whole number of groups long."""
    seed64 = tl.cast(seed, tl.uint64)
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed64 >> 32).to(tl.uint32)
    bh = tl.cast(off_bh, tl.uint32)
    if _USE_PCG:
        vals = _random16_pcg(k0, k1, bh, offs_n[None, :], offs_m[:, None])
    else:
        vals = _random16_philox(k0, k1, bh, offs_m, offs_n)
    threshold = (tl.cast(dropout_p, tl.float32) * _LEVELS + 0.5).to(tl.uint32)
    return vals >= threshold


@triton.jit
def dropout_keep_t(seed, off_bh, offs_n, offs_m, dropout_p):
    """``dropout_keep``'s tile transposed: (columns ``offs_n``) x (rows ``offs_m``), for kernels
    that hold P^T (the dK/dV pass). The pcg stream is elementwise, so it is drawn in that
    orientation directly; Philox's groups run along columns, so its tile is transposed."""
    if _USE_PCG:
        seed64 = tl.cast(seed, tl.uint64)
        k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
        k1 = (seed64 >> 32).to(tl.uint32)
        vals = _random16_pcg(k0, k1, tl.cast(off_bh, tl.uint32), offs_n[:, None], offs_m[None, :])
        threshold = (tl.cast(dropout_p, tl.float32) * _LEVELS + 0.5).to(tl.uint32)
        return vals >= threshold
    else:
        return tl.trans(dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p))


@triton.jit
def _dropout_mask_kernel(Mask, seed, dropout_p, N_CTX_Q, N_CTX_K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (b * H + h, row block): writes the keep-mask rows of one head as int8."""
    off_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = Mask + off_bh.to(tl.int64) * N_CTX_Q * N_CTX_K
    for start_n in range(0, N_CTX_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p)
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
