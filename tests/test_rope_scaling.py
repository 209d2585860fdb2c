"""RoPE scaling (model.rope_scaling): the frequencies and YaRN's attention temperature of every
type against a float64 reference written from the papers' formulas, through the model's PyTorch
path and the fused kernel (outputs and the gradient of qkv); the settings are checked, stored in
the spec and changed by a fatrain-eval override."""

import math

import pytest
import torch

from attention_checks import max_err
from fatrain.kernels.rope import rope_qkv
from fatrain.model import GPT, GPTSpec, RopeScaling, apply_rope, rope_inv_freq, rope_tables

_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}
# The PyTorch path's own error bound: float32 angles of positions near 200, or float16 outputs.
_ABS = {torch.float32: 1e-4, torch.float16: 1e-2}


def reference_inv_freq(d: int, theta: float, kind: str, factor: float, original: int | None = None,
                       beta_fast: float = 32.0, beta_slow: float = 1.0) -> list[float]:
    """Float64 frequencies, one pair index i at a time (Chen et al. 2023; bloc97 2023; Peng et al. 2023 eq. 18-19)."""
    if kind == "ntk":
        theta = theta * factor ** (d / (d - 2))
    base = [theta ** (-2 * i / d) for i in range(d // 2)]
    if kind == "linear":
        return [f / factor for f in base]
    if kind != "yarn":
        return base

    # YaRN: r(i) = L / lambda_i rotations of pair i over the original length L; gamma ramps from 0
    # (r < beta_slow: interpolate) to 1 (r > beta_fast: keep), on HF's integer-truncated dimension range.
    def dim_of(rotations):
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), d - 1)
    out = []
    for i, f in enumerate(base):
        keep = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / factor * (1 - keep) + f * keep)
    return out


def reference_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: list[float], mscale: float) -> torch.Tensor:
    """x (B, T, H, D) rotated in float64: pairs (x[:d/2], x[d/2:]) by position * frequency, times mscale."""
    angles = positions.double()[:, None] * torch.tensor(inv_freq, dtype=torch.float64)[None, :]
    c, s = (mscale * torch.cos(angles))[None, :, None, :], (mscale * torch.sin(angles))[None, :, None, :]
    a, b = x.double().chunk(2, dim=-1)
    return torch.cat((a * c - b * s, a * s + b * c), dim=-1)


SCALINGS = [  # (RopeScaling, float64 mscale)
    (RopeScaling(), 1.0),
    (RopeScaling(type="linear", factor=4.0), 1.0),
    (RopeScaling(type="ntk", factor=8.0), 1.0),
    (RopeScaling(type="yarn", factor=4.0, original_seq_len=64), 0.1 * math.log(4.0) + 1),
    (RopeScaling(type="yarn", factor=16.0, original_seq_len=1024, beta_fast=16.0, beta_slow=2.0, mscale=1.5), 1.5),
]


@pytest.mark.parametrize("scaling, mscale", SCALINGS, ids=lambda v: getattr(v, "type", ""))
@pytest.mark.parametrize("B, T, H, Hkv, D, dtype", [(2, 37, 4, 2, 32, torch.float32), (1, 19, 2, 1, 24, torch.float16)])
def test_scaled_rope_matches_the_float64_reference(scaling, mscale, B, T, H, Hkv, D, dtype):
    theta = 10000.0
    ref_freq = reference_inv_freq(D, theta, scaling.type, scaling.factor, scaling.original_seq_len,
                                  scaling.beta_fast, scaling.beta_slow)
    assert torch.allclose(rope_inv_freq(D, theta, scaling).double(), torch.tensor(ref_freq, dtype=torch.float64),
                          rtol=1e-6, atol=0)
    assert scaling.attention_factor() == pytest.approx(mscale, rel=1e-12)

    positions = torch.arange(T) + 3 * 64 - 5  # past the original length: where the scaling matters
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(positions, D, theta, scaling)
    q_ref = reference_rotate(qkv[..., :H * D].reshape(B, T, H, D), positions, ref_freq, mscale)
    k_ref = reference_rotate(qkv[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D), positions, ref_freq, mscale)

    q_torch = apply_rope(qkv[..., :H * D].reshape(B, T, H, D), cos, sin)
    k_torch = apply_rope(qkv[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D), cos, sin)
    q, k, v = rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, Hkv)
    for out, torch_out, ref in ((q, q_torch, q_ref), (k, k_torch, k_ref)):
        torch_err = max_err(torch_out, ref)
        assert torch_err <= _ABS[dtype]  # the PyTorch path itself follows the reference
        assert max_err(out, ref) <= 2 * torch_err + _FLOOR[dtype]
    assert torch.equal(v, qkv[..., (H + Hkv) * D:].reshape(B, T, Hkv, D))

    # Gradients: the fused backward against float64 autograd through the reference.
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    (dqkv,) = torch.autograd.grad((q * gq).sum() + (k * gk).sum(), qkv)
    x64 = qkv.detach().double().requires_grad_(True)
    q64 = reference_rotate(x64[..., :H * D].reshape(B, T, H, D), positions, ref_freq, mscale)
    k64 = reference_rotate(x64[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D), positions, ref_freq, mscale)
    (d64,) = torch.autograd.grad((q64 * gq.double()).sum() + (k64 * gk.double()).sum(), x64)
    qkv_t = qkv.detach().clone().requires_grad_(True)
    qt = apply_rope(qkv_t[..., :H * D].reshape(B, T, H, D), cos, sin)
    kt = apply_rope(qkv_t[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D), cos, sin)
    (dt,) = torch.autograd.grad((qt * gq).sum() + (kt * gk).sum(), qkv_t)
    assert max_err(dqkv, d64) <= 3 * max_err(dt, d64) + _FLOOR[dtype]


def test_yarn_temperature_scales_the_logits_and_keeps_high_frequencies():
    """q.k with YaRN is mscale^2 times q.k rotated by YaRN's frequencies alone; the fastest pairs keep
    the trained frequency, the slowest are interpolated by the factor (the paper's 'by-parts')."""
    D, factor = 64, 8.0
    yarn = RopeScaling(type="yarn", factor=factor, original_seq_len=512)
    unit = RopeScaling(type="yarn", factor=factor, original_seq_len=512, mscale=1.0)
    positions = torch.arange(700, 720)
    q, k = torch.randn(1, 20, 1, D, dtype=torch.float64), torch.randn(1, 20, 1, D, dtype=torch.float64)
    scaled = [apply_rope(t.float(), *rope_tables(positions, D, 10000.0, yarn)).double() for t in (q, k)]
    plain = [apply_rope(t.float(), *rope_tables(positions, D, 10000.0, unit)).double() for t in (q, k)]
    logits, plain_logits = (torch.einsum("bqhd,bkhd->qk", a, b) for a, b in (scaled, plain))
    mscale = 0.1 * math.log(factor) + 1
    assert torch.allclose(logits, mscale**2 * plain_logits, rtol=1e-5, atol=1e-4)
    base, freq = rope_inv_freq(D, 10000.0), rope_inv_freq(D, 10000.0, yarn)
    assert freq[0] == base[0] and torch.allclose(freq[-1], base[-1] / factor)
    assert bool(((freq <= base) & (freq >= base / factor * (1 - 1e-6))).all())


def test_spec_round_trip_and_generate_with_scaling():
    """The spec keeps the scaling as a plain mapping (checkpoints, export) and rebuilds it; decoding
    through the KV cache rotates the cached keys by the same scaled tables as a full forward."""
    from dataclasses import asdict

    spec = GPTSpec(vocab_size=60, attention="naive", n_layer=1, n_head=2, n_embd=32,
                   rope_scaling={"type": "yarn", "factor": 4.0, "original_seq_len": 16})
    assert isinstance(spec.rope_scaling, RopeScaling) and GPTSpec(**asdict(spec)) == spec
    torch.manual_seed(0)
    model = GPT(spec).eval()
    idx = torch.randint(0, 60, (2, 11))
    cached = model.generate(idx, 6, temperature=0, use_cache=True)
    full = model.generate(idx, 6, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    with pytest.raises(ValueError, match="original_seq_len is required"):
        RopeScaling(type="yarn", factor=2.0)
    with pytest.raises(ValueError, match="model.rope_scaling.type='longrope' is not allowed"):
        RopeScaling(type="longrope")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_rope_kernel_on_the_gpu(dtype):
    """The compiled kernel (not the interpreter) with YaRN's tables at 16k positions, bf16 included."""
    B, T, H, Hkv, D = 2, 4096, 8, 2, 64
    scaling = RopeScaling(type="yarn", factor=4.0, original_seq_len=1024)
    positions = torch.arange(T, device="cuda") + 12288
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(positions, D, 10000.0, scaling)
    ref_freq = reference_inv_freq(D, 10000.0, "yarn", 4.0, 1024)
    mscale = 0.1 * math.log(4.0) + 1
    q, k, _ = rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, Hkv)
    q_ref = reference_rotate(qkv[..., :H * D].reshape(B, T, H, D).cpu(), positions.cpu(), ref_freq, mscale)
    q_torch = apply_rope(qkv[..., :H * D].reshape(B, T, H, D), cos, sin)
    assert max_err(q.cpu(), q_ref) <= 2 * max_err(q_torch.cpu(), q_ref) + 1e-2
