"""Checks every attention backend's test shares: error relative to PyTorch's own error.

As flash-attention's tests do, a backend's error against the float64 reference is
compared with the error of the same math done plainly in the input dtype:
err(backend) <= OUT_FACTOR * err(torch, same dtype) + floor for outputs (and the
logsumexp), GRAD_FACTOR for gradients. The floor keeps float64/float32 cases (where
PyTorch's error is ~1e-7) from demanding more than the dtype can give.

Which features and dtypes a backend is tested with comes from its registry entry alone
(``features``, ``dtypes`` below).
"""

from __future__ import annotations

import torch

from fatrain.kernels import backend_info, reference_attention

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
# NOTE: half precision's floor is two units in the last place at 1.0 (float16 2 x 2^-10, bfloat16
# 2 x 2^-7): on the small CPU shapes PyTorch's own maximum error is sometimes far below one ulp by
# chance, and an exact kernel then failed a test that only measured the luck of the draw.
_FLOOR = {torch.float32: 1e-5, torch.float16: 2 * 2.0 ** -10, torch.bfloat16: 2 * 2.0 ** -7, torch.float64: 1e-12}

def features(name: str, device: str) -> set[str]:
    """The features the matrix tests ``name`` with on ``device``: its registry entry's."""
    return set(backend_info(name).features_on(device))


def dtypes(name: str, device: str) -> list[torch.dtype]:
    """The registry's dtypes of ``name`` on ``device``, less bfloat16 for a Triton backend on the
    CPU (the interpreter computes it wrongly)."""
    info = backend_info(name)
    return [getattr(torch, d) for d in info.dtypes_on(device)
            if not (device == "cpu" and info.triton and d == "bfloat16")]


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


def _check_close(name, got, ref, same, factor, floor):
    assert got.shape == ref.shape, f"{name} shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err, torch_err = max_err(got, ref), max_err(same, ref)
    # NaN anywhere makes err NaN, and NaN <= x is False: an unwritten element fails here.
    assert err <= factor * torch_err + floor, f"{name} error {err:.3e} > {factor} x torch's {torch_err:.3e}"


def check_attention(attn, q, k, v, *, kernel_kwargs=None, grads=True, out_factor=OUT_FACTOR,
                    grad_factor=GRAD_FACTOR, floor=None, **kwargs):
    """Compare attn(q, k, v, **kwargs, **kernel_kwargs) and its gradients with the float64
    reference given ``kwargs`` (causal, window_size, doc_ids, softmax_scale, dropout_p,
    return_lse, alibi_slopes, softcap, sink_logits: the arguments both take; a sink_logits
    that requires grad has its gradient compared too). ``kernel_kwargs`` go to the kernel only
    (dropout_seed, return_dropout_mask); with return_dropout_mask the reference gets the
    kernel's own keep-mask. With return_lse the logsumexp is compared too.
    ``floor`` replaces the dtype's floor. Returns (out, lse or None, dropout mask or None)."""
    dtype = q.dtype
    floor = _FLOOR[dtype] if floor is None else floor
    kernel_kwargs = dict(kernel_kwargs or {})
    result = attn(q, k, v, **kwargs, **kernel_kwargs)
    parts = list(result) if isinstance(result, tuple) else [result]
    out = parts.pop(0)
    lse = parts.pop(0) if kwargs.get("return_lse") else None
    mask = parts.pop(0) if kernel_kwargs.get("return_dropout_mask") else None
    assert not parts, f"{len(parts)} unexpected extra outputs"
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "backend output has NaN/Inf"
    ref_kwargs = dict(kwargs, dropout_mask=mask) if mask is not None else kwargs
    ref = reference_attention(q, k, v, upcast=True, **ref_kwargs)
    same = reference_attention(q, k, v, upcast=False, **ref_kwargs)
    if lse is not None:
        (ref, ref_lse), (same, same_lse) = ref, same
        assert lse.dtype == torch.float32 and torch.isfinite(lse).all(), "logsumexp has NaN/Inf"
        # NOTE: the logsumexp is float32 whatever the inputs: float32's floor at least.
        _check_close("lse", lse, ref_lse, same_lse, out_factor, max(floor, _FLOOR[torch.float32]))
    _check_close("output", out, ref, same, out_factor, floor)
    if grads:
        dout = torch.randn_like(out)
        inputs, names = (q, k, v), ("dq", "dk", "dv")
        sinks = kwargs.get("sink_logits")
        if sinks is not None and sinks.requires_grad:
            inputs, names = inputs + (sinks,), names + ("d sink_logits",)
        g = torch.autograd.grad(out, inputs, dout, retain_graph=lse is not None)
        g_ref = torch.autograd.grad(ref, inputs, dout.double())
        g_same = torch.autograd.grad(same, inputs, dout)
        for name, a, r, s in zip(names, g, g_ref, g_same):
            # NOTE: d sink_logits sums over batch x rows, so its floor scales with their number.
            scale = q.shape[0] * q.shape[1] if name == "d sink_logits" else 1
            _check_close(name, a, r, s, grad_factor, floor * 10 * scale)
    return out, lse, mask


def packed_doc_ids(B, N, lengths=None, device="cpu"):
    """(B, N) non-decreasing ids (packed documents): fixed ``lengths``, or random cuts with a
    one-token document at the end."""
    rows = []
    for _ in range(B):
        if lengths is None:
            starts = torch.zeros(N, dtype=torch.long)
            starts[torch.randperm(max(N - 1, 1))[:3] + 1] = 1
            starts[N - 1] = 1 if N > 1 else 0
            starts = starts[:N]
            rows.append(torch.cumsum(starts, 0))
        else:
            rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).to(device)


def unsorted_doc_ids(B, N, device="cpu"):
    """(B, N) ids that do not increase along the sequence (nothing may be skipped by range),
    with tokens 32..47 in one document (a whole 16-key block inside one document)."""
    ids = torch.randint(0, 3, (B, N))
    ids[:, 32:48] = 5
    return ids.to(device)


def check_backend(attn, q, k, v, *, grads=True, out_factor=OUT_FACTOR, grad_factor=GRAD_FACTOR, **kwargs):
    """check_attention with every keyword given to both attn and the reference (attn must
    accept, and may ignore, the reference's dropout_mask)."""
    check_attention(attn, q, k, v, grads=grads, out_factor=out_factor, grad_factor=grad_factor, **kwargs)
