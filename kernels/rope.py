"""Rotary position embedding of the QKV projection in one Triton kernel, forward and backward.

    q, k, v = rope_qkv(qkv, cos, sin, n_head, n_kv_head)

``qkv`` is the attention's projection output, (batch, seqlen, (n_head + 2 * n_kv_head) * head_dim):
the heads of Q, then K, then V. The forward writes Q and K rotated and V copied into three
(batch, seqlen, heads, head_dim) tensors in one launch; the backward writes the gradient of
``qkv`` in one launch from the three gradients (Q's and K's rotated back, V's copied), so
autograd neither concatenates the three gradients nor runs the element-wise graph of the
rotation. The rotation is GPT-NeoX's (the model's ``apply_rope``): pairs (x[:d/2], x[d/2:])
turned by the angle of each position, computed in float32, rounded once to the input dtype.

Why: in eager PyTorch, ``apply_rope`` on Q and K is about ten element-wise kernels forward and
more backward, each a round trip of the activations through HBM in float32; on GPT-2 small at
32k tokens per step that is a few GB per layer and step. Here each element is read once and
written once, in the input dtype (benchmark and numbers: experiments/README.md, session 8).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK_T = 16 if _INTERPRET else 64  # tokens per program


@triton.jit
def _rope_qkv_kernel(X, COS, SIN, Q, K, V,
                     stride_xb, stride_xt, stride_cb, stride_ct,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh,
                     T, H, HKV,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BACKWARD: tl.constexpr):
    """One head of BLOCK_T tokens. Forward: X (packed rows) -> Q, K rotated, V copied. Backward:
    the gradients Q, K, V -> X, Q's and K's turned by the opposite angle (the rotation's transpose)."""
    pid_t = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (rows[:, None] < T) & (cols[None, :] < HALF)
    # the packed row's column of this head's first element (heads of Q, then K, then V)
    x_ptrs = X + off_b * stride_xb + rows[:, None] * stride_xt + head * (2 * HALF) + cols[None, :]
    if head < H:
        o_ptrs = Q + off_b * stride_qb + rows[:, None] * stride_qt + head * stride_qh + cols[None, :]
    elif head < H + HKV:
        o_ptrs = K + off_b * stride_kb + rows[:, None] * stride_kt + (head - H) * stride_kh + cols[None, :]
    else:
        o_ptrs = V + off_b * stride_vb + rows[:, None] * stride_vt + (head - H - HKV) * stride_vh + cols[None, :]
    if BACKWARD:
        src = o_ptrs
        dst = x_ptrs
    else:
        src = x_ptrs
        dst = o_ptrs
    a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if head < H + HKV:
        c_off = off_b * stride_cb + rows[:, None] * stride_ct + cols[None, :]
        cos = tl.load(COS + c_off, mask=mask, other=1.0)
        sin = tl.load(SIN + c_off, mask=mask, other=0.0)
        if BACKWARD:
            sin = -sin
        a, b = a * cos - b * sin, a * sin + b * cos
    tl.store(dst, a.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, b.to(dst.dtype.element_ty), mask=mask)


def _launch(x, cos, sin, q, k, v, n_head, n_kv_head, backward: bool):
    B, T = x.shape[0], x.shape[1]
    half = cos.shape[-1]
    grid = (triton.cdiv(T, _BLOCK_T), B, n_head + 2 * n_kv_head)
    _rope_qkv_kernel[grid](x, cos, sin, q, k, v,
                           x.stride(0), x.stride(1), cos.stride(0), cos.stride(1),
                           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                           T, n_head, n_kv_head,
                           HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_T=_BLOCK_T, BACKWARD=backward)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class RopeQKV(torch.autograd.Function):

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv_head):
        B, T, width = qkv.shape
        D = width // (n_head + 2 * n_kv_head)
        qkv = _unit_last_stride(qkv)
        q = qkv.new_empty((B, T, n_head, D))
        k = qkv.new_empty((B, T, n_kv_head, D))
        v = qkv.new_empty((B, T, n_kv_head, D))
        _launch(qkv, cos, sin, q, k, v, n_head, n_kv_head, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_head, n_kv_head)
        ctx.shape = (B, T, width)
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
        dqkv = torch.empty((B, T, width), dtype=ctx.dtype, device=cos.device)
        _launch(dqkv, cos, sin, *grads, n_head, n_kv_head, backward=True)
        return dqkv, None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int):
    """Split the QKV projection into (B, T, heads, head_dim) Q, K, V with Q and K rotated.

    Arguments:
        qkv: (batch, seqlen, (n_head + 2 * n_kv_head) * head_dim), any float dtype; a CUDA
            tensor (or a CPU one under the Triton interpreter)
        cos, sin: float32 (seqlen, head_dim / 2) or (batch, seqlen, head_dim / 2) tables of
            each position's angles (``fatrain.model.rope_tables`` without its head axis)
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
