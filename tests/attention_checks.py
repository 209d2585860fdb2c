"""Checks every attention backend's test shares: error relative to PyTorch's own error.

As flash-attention's tests do, a backend's error against the float64 reference is
compared with the error of the same math done plainly in the input dtype:
err(backend) <= OUT_FACTOR * err(torch, same dtype) + floor for outputs, GRAD_FACTOR for
gradients. The floor keeps float64/float32 cases (where PyTorch's error is ~1e-7) from
demanding more than the dtype can give.
"""

from __future__ import annotations

import torch

from fatrain.kernels import reference_attention

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def make_qkv(B, Nq, Nk, H, Hkv, D, dtype, device="cpu", strided=False, seed=None):
    """Fresh random q, k, v in (B, N, H, D); strided=True gives non-contiguous views."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    if strided:
        # Slices of a packed qkv-like buffer and a transposed layout: neither is contiguous.
        q = rand(B, Nq, H, 2 * D)[..., ::2]
        k = rand(B, Hkv, Nk, D).transpose(1, 2)
        v = rand(B, Nk, 2 * Hkv, D)[:, :, ::2]
    else:
        q, k, v = rand(B, Nq, H, D), rand(B, Nk, Hkv, D), rand(B, Nk, Hkv, D)
    return [t.requires_grad_() for t in (q, k, v)]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_backend(attn, q, k, v, *, grads=True, out_factor=OUT_FACTOR, grad_factor=GRAD_FACTOR, **kwargs):
    """Compare attn(q, k, v, **kwargs) and its gradients with the float64 reference."""
    dtype = q.dtype
    floor = _FLOOR[dtype]
    out = attn(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "backend output has NaN/Inf"
    ref = reference_attention(q, k, v, upcast=True, **kwargs)
    same = reference_attention(q, k, v, upcast=False, **kwargs)
    err, torch_err = max_err(out, ref), max_err(same, ref)
    assert err <= out_factor * torch_err + floor, f"output error {err:.3e} > {out_factor} x torch's {torch_err:.3e}"
    if not grads:
        return
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout.double())
    g_same = torch.autograd.grad(same, (q, k, v), dout)
    for name, a, r, s in zip(("dq", "dk", "dv"), g, g_ref, g_same):
        assert a.shape == r.shape
        e, te = max_err(a, r), max_err(s, r)
        assert e <= grad_factor * te + floor * 10, f"{name} error {e:.3e} > {grad_factor} x torch's {te:.3e}"
