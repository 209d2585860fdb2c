"""Mean cross-entropy of the output head's logits in Triton, without float32 copies of the logits.

    loss = cross_entropy(logits, targets, vocab_size=None, ignore_index=-100)

The model's PyTorch path, ``F.cross_entropy(logits.float(), targets)``, makes a float32 copy of
the (tokens x vocabulary) logits, a float32 log-softmax saved for the backward, and float32
gradients before casting them back: on GPT-2 small at 32k tokens per step each of those is
6.6 GB, so the loss is a few tens of GB of HBM traffic per step and the step's memory peak.
Here each row is one program:
    forward   one pass over the row in BLOCK_V chunks with the online softmax (running max m,
              running sum l of exp(x - m)); saves lse = m + log(l) per row (float32)
    backward  one pass writing dlogits = (exp(x - lse) - onehot(target)) * dloss / n_valid in
              the logits' dtype
so the logits are read twice and the gradient written once, all in the logits' dtype; nothing
float32 of the logits' size exists. Everything is computed in float32 from the stored logits,
as PyTorch's path does after its cast. The launchers are torch.library ops
(``_common.register_op``), so torch.compile keeps them.

``vocab_size`` lets the logits carry padding columns (the model pads its head to a multiple
of 64): they are left out of the softmax and get zero gradient, so no slice (and no
zero-filled slice backward) is needed. Rows whose target is ``ignore_index`` add nothing and
are not counted in the mean, as ``F.cross_entropy``'s default. Caution: targets must lie in
[0, vocab_size) or equal ignore_index; any other target is treated like ignore_index here (no
device-side assert), where PyTorch would raise.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import register_op

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK_V = 64 if _INTERPRET else 4096  # vocabulary entries per step of a row's loop
_NUM_WARPS = 8


@triton.jit
def _ce_fwd_kernel(Logits, Targets, LSE, Loss, stride_row, V, ignore_index, BLOCK_V: tl.constexpr):
    """One row: lse with the online softmax over [0, V), loss = lse - logit[target] (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(x, axis=0))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    target = tl.load(Targets + row)
    valid = (target != ignore_index) & (target >= 0) & (target < V)
    x_t = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(Loss + row, tl.where(valid, lse - x_t, 0.0))


@triton.jit
def _ce_bwd_kernel(Logits, Targets, LSE, Grad, DLoss, NValid, stride_row, stride_grow, V, P, ignore_index,
                   BLOCK_V: tl.constexpr):
    """One row: dlogits = (softmax - onehot(target)) * dloss / n_valid over [0, V), 0 in [V, P)."""
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    gbase = Grad + row * stride_grow
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(Targets + row)
    valid = (target != ignore_index) & (target >= 0) & (target < V)
    # NOTE: dloss and n_valid are read on the device (no host sync for the mean's scale)
    scale = tl.load(DLoss).to(tl.float32) / tl.maximum(tl.load(NValid).to(tl.float32), 1.0)
    scale = tl.where(valid, scale, 0.0)
    lse = tl.load(LSE + row)
    for start in range(0, P, BLOCK_V):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(idx == target, 1.0, 0.0)
        tl.store(gbase + idx, (p * scale).to(Grad.dtype.element_ty), mask=idx < P)


def _rows(t: torch.Tensor) -> tuple[int, int] | None:
    """(number of rows, row stride) of a (..., P) tensor whose rows are evenly spaced with a unit
    stride inside each row (a contiguous tensor, or a slice of one along P); else None."""
    if t.stride(-1) != 1:
        return None
    n_rows = t.numel() // t.shape[-1]
    stride = t.stride(-2) if t.dim() >= 2 else t.shape[-1]
    for d in range(t.dim() - 2):  # leading dims must flatten onto the row stride
        if t.shape[d] > 1 and t.stride(d) != t.stride(d + 1) * t.shape[d + 1]:
            return None
    return n_rows, stride


def _ce_fwd(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
            ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, per-row loss), float32 (rows,); targets flattened."""
    n_rows, stride = _rows(logits)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    wrap_triton(_ce_fwd_kernel)[(n_rows,)](logits, targets, lse, losses, stride, vocab_size, ignore_index,
                                           BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS)
    return lse, losses


def _ce_fwd_fake(logits, targets, vocab_size, ignore_index):
    n_rows = logits.numel() // logits.shape[-1]
    return (logits.new_empty(n_rows, dtype=torch.float32), logits.new_empty(n_rows, dtype=torch.float32))


def _ce_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, dloss: torch.Tensor,
            n_valid: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    n_rows, stride = _rows(logits)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    wrap_triton(_ce_bwd_kernel)[(n_rows,)](logits, targets, lse, grad, dloss, n_valid, stride, grad.shape[-1],
                                           vocab_size, logits.shape[-1], ignore_index,
                                           BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS)
    return grad


def _ce_bwd_fake(logits, targets, lse, dloss, n_valid, vocab_size, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


_ce_fwd_op = register_op("cross_entropy_fwd", _ce_fwd, _ce_fwd_fake)
_ce_bwd_op = register_op("cross_entropy_bwd", _ce_bwd, _ce_bwd_fake)


class CrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, targets, vocab_size, ignore_index):
        targets = targets.reshape(-1).contiguous()
        lse, losses = _ce_fwd_op(logits, targets, vocab_size, ignore_index)
        n_valid = ((targets != ignore_index) & (targets >= 0) & (targets < vocab_size)).sum()
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.vocab_size, ctx.ignore_index = vocab_size, ignore_index
        # NOTE: a mean over no valid row is 0 here (PyTorch's is nan)
        return losses.sum() / n_valid.clamp(min=1)

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse, n_valid = ctx.saved_tensors
        grad = _ce_bwd_op(logits, targets, lse, dloss.reshape(1).float(), n_valid, ctx.vocab_size, ctx.ignore_index)
        return grad, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None,
                  ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (..., P) against integer ``targets`` (...), as
    ``F.cross_entropy(logits[..., :vocab_size].float().flatten(0, -2), targets.flatten())``.

    Arguments:
        logits: (..., P) float16, bfloat16 or float32, unit stride along P; a CUDA tensor (or a
            CPU one under the Triton interpreter)
        targets: (...) integers in [0, vocab_size), or ignore_index
        vocab_size: the first vocab_size columns are the classes (None: all P); the rest are
            padding, outside the softmax, with zero gradient
        ignore_index: rows with this target add nothing and are not counted in the mean
    Returns:
        the float32 mean over the rows whose target is not ignore_index (0 if there is none)
    """
    P = logits.shape[-1]
    V = P if vocab_size is None else int(vocab_size)
    if not 1 <= V <= P:
        raise ValueError(f"vocab_size must be in 1..{P} (the logits' last dim), got {vocab_size}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have the logits' leading shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"logits must be float16, bfloat16 or float32, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if not (logits.device.type == "cuda" or (_INTERPRET and logits.device.type == "cpu")):
        raise ValueError(f"logits must be a CUDA tensor (or a CPU tensor under the Triton interpreter), "
                         f"got {logits.device}")
    if _rows(logits) is None:
        logits = logits.contiguous()
    return CrossEntropy.apply(logits, targets, V, ignore_index)
