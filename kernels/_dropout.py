"""Counter-based attention dropout shared by every backend that draws its own mask.

A kept entry of P is decided by a stateless generator on a seed and the element's place,
so a kernel's backward regenerates exactly the mask its forward used from (seed, b, h, r, c)
alone and nothing N x N is stored (FlashAttention-1, Algorithm 2 line 14 and Algorithm 4
line 15). Kept entries are scaled by 1 / (1 - dropout_p).

The generator: 16 random bits per element from a counter-based hash
    key = lowbias32(lowbias32((b * H + h) ^ lowbias32(seed_hi)) ^ seed_lo)   (per head)
    u   = pcg3d(col, row, key).z >> 16                                     (per element)
    keep[b, h, r, c] = u >= round(dropout_p * 2**16)
pcg3d is the three-lane integer hash of Jarzynski and Olano ("Hash Functions for GPU
Rendering", JCGT 2020), a bijection of its 96 input bits built from multiply-adds and one
xorshift; lowbias32 is a two-round multiply-xorshift finaliser (also a bijection). Each
element is hashed on its own, so the mask is drawn in whatever register layout the kernel
holds P in (no data movement between threads), in either orientation (``dropout_keep_t``
for the P^T tiles of the dK/dV pass), and it does not depend on the tile shapes: every
kernel and the host ``dropout_mask`` draw the same mask. dropout_p is applied in steps of
2**-16 (|error| <= 7.6e-6; the scale 1 / (1 - dropout_p) is not changed).

Why not Philox: one Philox4x32-7 call per 8 consecutive columns (flash-attn's scheme, cut
into 16-bit pieces) was measured against this on an H100 (bf16, causal, d=128, N=16384,
each kernel's default config): forward 1.95x / 1.78x the time without dropout, forward+
backward 1.81x / 1.51x for Philox / pcg3d. In Triton the grouped draws must be moved between
threads (join, reshape, layout conversion through shared memory) to reach P's layout,
and that cost more than the per-element hash's arithmetic (experiments/README.md). Both
streams passed the same statistics (kept fraction; correlation of neighbouring rows,
columns, heads and seeds within 2 standard errors at 2M elements).

Pieces:
    dropout_keep        the ``@triton.jit`` helper a kernel calls on one (rows x columns) tile
    dropout_keep_t      the same mask for a (columns x rows) tile
    dropout_mask        host function: the full bool (B, H, Nq, Nk) keep-mask for the same
                        seed, made by a tiny kernel that calls the same helper; used by
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
def _keep(seed, off_bh, cols, rows, dropout_p):
    """u >= round(dropout_p * 2**16) with u = pcg3d(col, row, key(seed, b * H + h)).z >> 16;
    ``cols`` and ``rows`` broadcast against each other (any tile orientation)."""
    seed64 = tl.cast(seed, tl.uint64)
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed64 >> 32).to(tl.uint32)
    key = _lowbias32(_lowbias32(tl.cast(off_bh, tl.uint32) ^ _lowbias32(k1)) ^ k0)
    u = _pcg3d(cols.to(tl.uint32), rows.to(tl.uint32), key) >> 16
    return u >= (tl.cast(dropout_p, tl.float32) * _LEVELS + 0.5).to(tl.uint32)


@triton.jit
def dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p):
    """Keep-mask (True = keep) of the tile rows ``offs_m`` x columns ``offs_n`` of head
    ``off_bh = b * H + h`` (any positions: the stream is elementwise)."""
    return _keep(seed, off_bh, offs_n[None, :], offs_m[:, None], dropout_p)


@triton.jit
def dropout_keep_t(seed, off_bh, offs_n, offs_m, dropout_p):
    """``dropout_keep``'s tile transposed, (columns ``offs_n``) x (rows ``offs_m``), drawn in
    that orientation (the stream is elementwise): for kernels that hold P^T (the dK/dV pass)."""
    return _keep(seed, off_bh, offs_n[:, None], offs_m[None, :], dropout_p)


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
