"""Counter-based attention dropout shared by every backend that draws its own mask.

A kept entry of P is decided by a stateless generator on a seed and the element's place,
so a kernel's backward regenerates exactly the mask its forward used from (seed, b, h, r, c)
alone and nothing N x N is stored (FlashAttention-1, Algorithm 2 line 14 and Algorithm 4
line 15). Kept entries are scaled by 1 / (1 - dropout_p).

The generator: a product of two odd factors, one per row and one per column
    key   = lowbias32(lowbias32((b * H + h) ^ lowbias32(seed_hi)) ^ seed_lo)   (per head)
    mix(x, k) = (y ^ (y >> 16)) | 1   with   y = (x ^ k) * 0x9E3779B1 mod 2**32
    R_r   = mix(row, key),   C_c = mix(col, lowbias32(key + 0x9E3779B9))   (per row, per column)
    keep[b, h, r, c] = (R_r * C_c mod 2**32) >= min(round(dropout_p * 2**16), 2**16 - 1) * 2**16
lowbias32 is a two-round multiply-xorshift finaliser. Multiplication by an odd number mod
2**32 is a bijection, so for a fixed column the product is uniform over the rows (and the
other way round), and two rows' products differ by (R_r - R_r') C_c, a shift that changes
with every column, so no row, column, head or seed pattern repeats: neighbouring rows,
columns (lags 1 to 256), heads and seeds are uncorrelated and the 16 keep patterns of 2 x 2
neighbourhoods are equally frequent, within sampling error over 200 keys
(tests/test_dropout.py checks one). The top 16 bits of the product are the element's random
bits, so dropout_p is applied in steps of 2**-16 (|error| <= 7.6e-6; the scale 1 / (1 - p)
is not changed; p >= 1 - 2**-17 keeps 1 element in 2**16). The ``| 1`` can give two rows (or
columns) of one head the same factor, with probability 2**-31 per pair: such a pair shares its
mask along the other axis; harmless for dropout, and documented here rather than paid for.

Cost is what decides the generator: per element of P it is one 32-bit multiply, one compare
and one select; the row and column hashes cost O(B_r + B_c) per tile. P's softmax arithmetic
already shares the forward with the tensor cores, and a full hash per element is a dozen
integer operations, several times the element's exp2 and its other softmax work, so it is not
free: on an H100 (bf16, causal, d=128, N=16384, default configs), pcg3d per element cost 1.78x the forward time
without dropout and 1.51x forward+backward, and Philox4x32-7 per 8 columns (flash-attn's
scheme) 1.95x / 1.81x, because in Triton its grouped draws must move between threads
(join, reshape, layout conversion through shared memory) to reach P's layout. The product
needs no data movement: each element is computed in whatever register layout the kernel
holds P in, in either orientation (``dropout_apply_t`` for the P^T tiles of the dK/dV pass),
and the mask does not depend on the tile shapes: every kernel and the host ``dropout_mask``
draw the same mask. Measured the same way (autotuned, N = 8192 and 16384): the product costs
1.17x forward+backward and 1.22-1.25x forward alone.

Pieces:
    dropout_keep        the ``@triton.jit`` function a kernel calls on one (rows x columns) tile
    dropout_apply       a float32 tile with the dropped entries zeroed (what flash_v2's loops
                        call; one inline-PTX block per element on the GPU)
    dropout_apply_t     the same for a (columns x rows) tile
    dropout_mask        host function: the full bool (B, H, Nq, Nk) keep-mask for the same
                        seed, made by a tiny kernel that calls the same function; used by
                        ``naive``, by the debug path ``return_dropout_mask`` and by tests
    resolve_seed        the seed policy: an explicit seed, or one drawn from torch's default
                        generator, so ``torch.manual_seed`` reproduces a run

Caution / known limits
    * The stream is this module's own, so it does not depend on how a Triton version
      implements ``tl.rand``; it is not torch's dropout stream (``sdpa`` keeps PyTorch's).
    * A hash, not a cryptographic generator: fine for dropout, not for anything adversarial.
    * ``dropout_mask`` materialises B * H * Nq * Nk bools: meant for small shapes (tests,
      debugging) and for ``naive``, which holds N x N tensors anyway.
    * Limits: Nq, Nk and B * H below 2**32 (the hash inputs are 32-bit).
    * The draw of a default seed moves torch's CPU generator by one draw per call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Seeds are non-negative and below 2**63 (the key hashes both 32-bit halves).
_SEED_LIMIT = 1 << 63
#: Default seeds are drawn in [0, 2**31): fits an int32 kernel argument.
_DRAW_LIMIT = (1 << 31) - 1
_MASK_BLOCK_M = 16
_MASK_BLOCK_N = 64


#: Bits of randomness per element: dropout_p is applied in steps of 2**-16.
DROPOUT_BITS = 16
_LEVELS = tl.constexpr(1 << DROPOUT_BITS)
#: On the GPU the multiply, compare and select of each element are one inline-PTX block (the
#: interpreter runs no PTX): as separate Triton ops, LLVM moves the select past the bf16
#: conversion, which then no longer pairs two elements per instruction.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _lowbias32(x):
    """A 32-bit integer finaliser (bijective; two multiply-xorshift rounds)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _mix(x, key):
    """One multiply-xorshift round of x ^ key, made odd: a row's or a column's factor."""
    x = (x ^ key) * 0x9E3779B1
    return (x ^ (x >> 16)) | 1


@triton.jit
def _head_keys(seed, off_bh):
    """The row and column keys of head ``off_bh = b * H + h`` (uint32 scalars)."""
    seed64 = tl.cast(seed, tl.uint64)
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed64 >> 32).to(tl.uint32)
    key = _lowbias32(_lowbias32(tl.cast(off_bh, tl.uint32) ^ _lowbias32(k1)) ^ k0)
    return key, _lowbias32(key + 0x9E3779B9)


@triton.jit
def _factors(seed, off_bh, rows, cols):
    """R_row and C_col of head ``off_bh = b * H + h``; rows and cols broadcast against each other
    (any tile orientation), so each costs one hash per row or column of the tile."""
    key, key_c = _head_keys(seed, off_bh)
    return _mix(rows.to(tl.uint32), key), _mix(cols.to(tl.uint32), key_c)


@triton.jit
def _threshold(dropout_p):
    """round(dropout_p * 2**16), at most 2**16 - 1, in the product's top 16 bits."""
    level = tl.minimum((tl.cast(dropout_p, tl.float32) * _LEVELS + 0.5).to(tl.uint32), _LEVELS - 1)
    return level << 16


@triton.jit
def _drop(x, r_factor, c_factor, dropout_p):
    """x where R * C >= threshold, else 0 (x float32): one multiply, compare and select."""
    if _PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .pred %p0; .reg .b32 %t0; mul.lo.u32 %t0, $2, $3; setp.hs.u32 %p0, %t0, $4; "
            "selp.f32 $0, $1, 0f00000000, %p0; }",
            "=f,f,r,r,r", [x, r_factor, c_factor, _threshold(dropout_p)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.where(r_factor * c_factor >= _threshold(dropout_p), x, 0.0)


@triton.jit
def dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p):
    """Keep-mask (True = keep) of the tile rows ``offs_m`` x columns ``offs_n`` of head
    ``off_bh = b * H + h`` (any positions: the stream is elementwise)."""
    r_factor, c_factor = _factors(seed, off_bh, offs_m[:, None], offs_n[None, :])
    return r_factor * c_factor >= _threshold(dropout_p)


@triton.jit
def dropout_apply(x, seed, off_bh, offs_m, offs_n, dropout_p):
    """The float32 tile x (rows ``offs_m`` x columns ``offs_n`` of head ``off_bh``) with the
    entries ``dropout_keep`` drops set to 0."""
    r_factor, c_factor = _factors(seed, off_bh, offs_m[:, None], offs_n[None, :])
    return _drop(x, r_factor, c_factor, dropout_p)


@triton.jit
def dropout_apply_t(x, seed, off_bh, offs_n, offs_m, dropout_p):
    """``dropout_apply`` on a transposed tile, (columns ``offs_n``) x (rows ``offs_m``), drawn in
    that orientation (the stream is elementwise): for the P^T tiles of the dK/dV pass."""
    r_factor, c_factor = _factors(seed, off_bh, offs_m[None, :], offs_n[:, None])
    return _drop(x, r_factor, c_factor, dropout_p)


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

    Made by a tiny Triton kernel calling :func:`dropout_keep`, the function the attention kernels
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
