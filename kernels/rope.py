"""Rotary position embedding of the QKV projection in one Triton kernel, forward and backward.

    q, k, v = rope_qkv(qkv, cos, sin, n_head, n_kv_head)

``qkv`` is the attention's projection output, (batch, seqlen, (n_head + 2 * n_kv_head) * head_dim):
the heads of Q, then K, then V. The forward writes Q and K rotated and V copied into three
(batch, seqlen, heads, head_dim) tensors (one launch per tensor); the backward writes the
gradient of ``qkv`` from the three gradients (Q's and K's rotated back, V's copied), so
autograd neither concatenates the three gradients nor runs the element-wise graph of the
rotation. The rotation is GPT-NeoX's (the model's ``apply_rope``): pairs (x[:d/2], x[d/2:])
turned by the angle of each position, computed in float32, rounded once to the input dtype.
The tables carry any RoPE scaling (``model.rope_scaling``): interpolated or NTK/YaRN frequencies
are in the angles, and YaRN's attention temperature multiplies cos and sin, so the kernel applies
``mscale * R(angle)`` forward and its transpose ``mscale * R(-angle)`` backward without a
branch of its own.

Why: in eager PyTorch, ``apply_rope`` on Q and K is about ten element-wise kernels forward and
more backward, each a round trip of the activations through HBM in float32; on GPT-2 small at
32k tokens per step that is a few GB per layer and step. Here each element is read once and
written once, in the input dtype.
The launchers are torch.library ops (``_common.register_op``), so torch.compile keeps them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import register_op

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK_T = 16 if _INTERPRET else 64  # tokens per program


@triton.jit
def _rope_kernel(X, COS, SIN, O, stride_xb, stride_xt, stride_cb, stride_ct, stride_ob, stride_ot, stride_oh,
                 T, col0, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                 ROTATE: tl.constexpr, BACKWARD: tl.constexpr):
    """One head of BLOCK_T tokens of one of Q, K, V. Forward: the head's columns of the packed rows
    X (from column col0) -> O, rotated (Q, K) or copied (V). Backward: the gradient O -> X's columns,
    turned by the opposite angle (the rotation's transpose)."""
    pid_t = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    # NOTE: int64 rows: a token's offset is rows x (n_head + 2 n_kv_head) x head_dim, which passes
    # 2^31 at 932,068 tokens of GPT-2 small's packed QKV (2304 columns); in int32 it wrapped and
    # the kernel read and wrote outside the tensors (an illegal address at 1M tokens).
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (rows[:, None] < T) & (cols[None, :] < HALF)
    x_ptrs = X + off_b * stride_xb + rows[:, None] * stride_xt + col0 + head * (2 * HALF) + cols[None, :]
    o_ptrs = O + off_b * stride_ob + rows[:, None] * stride_ot + head * stride_oh + cols[None, :]
    if BACKWARD:
        src = o_ptrs
        dst = x_ptrs
    else:
        src = x_ptrs
        dst = o_ptrs
    a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        c_off = off_b * stride_cb + rows[:, None] * stride_ct + cols[None, :]
        cos = tl.load(COS + c_off, mask=mask, other=1.0)
        sin = tl.load(SIN + c_off, mask=mask, other=0.0)
        if BACKWARD:
            sin = -sin
        a, b = a * cos - b * sin, a * sin + b * cos
    tl.store(dst, a.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, b.to(dst.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, backward: bool) -> None:
    """Three launches, one per tensor (Q and K rotated, V copied), each on its own columns of x.

    NOTE: one launch per tensor rather than one picking its output inside the kernel: a
    branch-selected store pointer is what torch.compile's analysis of which arguments a Triton
    kernel mutates may not follow, and the launches are about 10 us of a 0.1 ms pass."""
    B, T = x.shape[0], x.shape[1]
    half = cos.shape[-1]
    col0 = 0
    for out, rotate in ((q, True), (k, True), (v, False)):
        grid = (triton.cdiv(T, _BLOCK_T), B, out.shape[2])
        wrap_triton(_rope_kernel)[grid](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), cos.stride(1),
                                        out.stride(0), out.stride(1), out.stride(2), T, col0,
                                        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_T=_BLOCK_T,
                                        ROTATE=rotate, BACKWARD=backward)
        col0 += out.shape[2] * 2 * half


def _rope_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int,
              n_kv_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    q = qkv.new_empty((B, T, n_head, D))
    k = qkv.new_empty((B, T, n_kv_head, D))
    v = qkv.new_empty((B, T, n_kv_head, D))
    _launch(qkv, cos, sin, q, k, v, backward=False)
    return q, k, v


def _rope_fwd_fake(qkv, cos, sin, n_head, n_kv_head):
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    return (qkv.new_empty((B, T, n_head, D)), qkv.new_empty((B, T, n_kv_head, D)),
            qkv.new_empty((B, T, n_kv_head, D)))


def _rope_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    B, T, H, D = dq.shape
    dqkv = dq.new_empty((B, T, (H + 2 * dk.shape[2]) * D))
    _launch(dqkv, cos, sin, dq, dk, dv, backward=True)
    return dqkv


def _rope_bwd_fake(dq, dk, dv, cos, sin):
    B, T, H, D = dq.shape
    return dq.new_empty((B, T, (H + 2 * dk.shape[2]) * D))


_rope_fwd_op = register_op("rope_qkv_fwd", _rope_fwd, _rope_fwd_fake)
_rope_bwd_op = register_op("rope_qkv_bwd", _rope_bwd, _rope_bwd_fake)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class RopeQKV(torch.autograd.Function):

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv_head):
        q, k, v = _rope_fwd_op(_unit_last_stride(qkv), cos, sin, n_head, n_kv_head)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_head, n_kv_head)
        ctx.shape = qkv.shape
        ctx.dtype = qkv.dtype
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        n_head, n_kv_head = ctx.heads
        B, T, width = ctx.shape
        D = width // (n_head + 2 * n_kv_head)
        # NOTE: a gradient autograd did not produce (an output the loss does not use) is None.
        grads = [torch.zeros((B, T, n, D), dtype=ctx.dtype, device=cos.device) if g is None else _unit_last_stride(g)
                 for g, n in ((dq, n_head), (dk, n_kv_head), (dv, n_kv_head))]
        return _rope_bwd_op(*grads, cos, sin), None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int):
    """Split the QKV projection into (B, T, heads, head_dim) Q, K, V with Q and K rotated.

    Arguments:
        qkv: (batch, seqlen, (n_head + 2 * n_kv_head) * head_dim), any float dtype; a CUDA
            tensor (or a CPU one under the Triton interpreter)
        cos, sin: float32 (seqlen, head_dim / 2) or (batch, seqlen, head_dim / 2) tables of
            each position's angles (``fatrain.model.rope_tables`` without its head axis), scaled
            by YaRN's attention temperature where the model's rope_scaling has one
        n_head, n_kv_head: query and key/value heads (n_head % n_kv_head == 0)
    Returns:
        q (batch, seqlen, n_head, head_dim), k and v (batch, seqlen, n_kv_head, head_dim),
        fresh tensors in qkv's dtype; differentiable with respect to qkv.
    """
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (batch, seqlen, (n_head + 2 * n_kv_head) * head_dim), got shape "
                         f"{tuple(qkv.shape)}")
    if n_head < 1 or n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_head must be a positive multiple of n_kv_head, got n_head={n_head}, "
                         f"n_kv_head={n_kv_head}")
    B, T, width = qkv.shape
    heads = n_head + 2 * n_kv_head
    if width % heads or (width // heads) % 2:
        raise ValueError(f"qkv's last dim ({width}) must be (n_head + 2 * n_kv_head) = {heads} heads of an even "
                         f"head_dim")
    half = width // heads // 2
    if cos.shape != sin.shape or cos.shape[-2:] != (T, half) or cos.dim() not in (2, 3):
        raise ValueError(f"cos and sin must both be (seqlen, head_dim / 2) = ({T}, {half}) or (batch, {T}, {half}), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not (qkv.device.type == "cuda" or (_INTERPRET and qkv.device.type == "cpu")):
        raise ValueError(f"qkv must be a CUDA tensor (or a CPU tensor under the Triton interpreter), got {qkv.device}")
    cos, sin = (t.to(device=qkv.device, dtype=torch.float32) for t in (cos, sin))
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0).expand(B, T, half), sin.unsqueeze(0).expand(B, T, half)
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    return RopeQKV.apply(qkv, cos, sin, n_head, n_kv_head)
