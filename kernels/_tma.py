"""When flash_v2's kernels may load tiles through Hopper's tensor memory accelerator (TMA).

On sm_90+ the tiles a pass loops over come through tensor descriptors
(``tl.make_tensor_descriptor``, made per program in global scratch) instead of pointer
tiles: the copy engine zero-fills rows past N and columns past D (no masks on those loads)
and the kernels need fewer registers, so larger tiles fit. The copy engine needs a unit
stride along d and every other stride and the start 16-byte aligned; inputs that are not
so use the pointer tiles.

FATRAIN_TMA: "auto" (default) uses descriptors on CUDA GPUs of compute capability 9 and
up; "0" never (pointer tiles everywhere); "1" also under the CPU interpreter (what the CPU
tests use to check the descriptor path). ``MODE`` holds it (tests set it).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
from triton.runtime import _allocation  # NOTE: private; _allocator and NullAllocator exist in triton 3.6-3.9

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODE = os.environ.get("FATRAIN_TMA", "auto")
if MODE not in ("auto", "0", "1"):
    raise ValueError(f"FATRAIN_TMA must be auto, 0 or 1, got {MODE!r}")


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global memory for the kernels' on-device tensor descriptors (128 bytes per descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def use_tma(*tensors: torch.Tensor) -> bool:
    """True when the (B, N, H, D) tiles of ``tensors`` can come through tensor descriptors: a
    TMA-capable device (or FATRAIN_TMA=1 in the interpreter), unit stride along d and every
    other stride and the start 16-byte aligned (the copy engine's rule).

    NOTE: a descriptor is made per program in global scratch from triton's allocator; one is
    set here when the caller has none (the allocator is a context variable, and autograd runs
    the backward in another thread, so this runs before every launch that needs it).
    """
    if MODE == "0":
        return False
    device = tensors[0].device
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] < 9:
            return False
    elif not (_INTERPRET and MODE == "1"):
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


def use_tma_stats(nq: int) -> bool:
    """True when the dK/dV pass, reading Q and dO through descriptors, can read its float32
    (B, H, Nq) base-2 LSE and Delta rows (fresh contiguous buffers) through 1-D descriptors too:
    a row starts 16-byte aligned only when Nq is a multiple of 4 (else they stay pointer loads)."""
    return nq % 4 == 0
