"""The counter-based dropout mask (``fatrain.kernels._dropout``), whatever backend draws it.

The stream itself: the bits _dropout.py documents, independent of the tiles a kernel uses,
with the statistics of fair coins. Then the backends: each one with dropout keeps a
fraction 1 - p of P and scales it by 1 / (1 - p); the backends with the ``dropout_seed``
feature draw that one mask for a seed (so they agree with each other, and the backward
regenerates it), and draw a seed from torch's generator when given none. The matrix in
test_attention.py compares each backend's dropout with the reference given its own mask.
"""

import numpy as np
import pytest
import torch

from attention_checks import features, make_qkv, max_err
from fatrain.kernels import _dropout, available_backends, get_backend
from fatrain.kernels._dropout import dropout_mask, resolve_seed

SEED = 1234
SEEDED = [b for b in available_backends(device="cpu") if "dropout_seed" in features(b, "cpu")]
DROPOUT = [b for b in available_backends(device="cpu") if "dropout" in features(b, "cpu")]

_M32 = 0xFFFFFFFF


def _lowbias32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix(x, key):
    x = ((x ^ key) * 0x9E3779B1) & _M32
    return (x ^ (x >> 16)) | 1


def _random16(seed, bh, r, c):
    """The 16 random bits _dropout.py documents for element (b * H + h, row, col)."""
    key = _lowbias32(_lowbias32(bh ^ _lowbias32(seed >> 32)) ^ (seed & _M32))
    key_c = _lowbias32((key + 0x9E3779B9) & _M32)
    return ((_mix(r, key) * _mix(c, key_c)) & _M32) >> 16


def _random16_np(seed, bh, rows, cols):
    """_random16 for every (row, col) pair at once, in numpy uint64 (for statistics)."""
    key = _lowbias32(_lowbias32(bh ^ _lowbias32(seed >> 32)) ^ (seed & _M32))
    key_c = _lowbias32((key + 0x9E3779B9) & _M32)
    r_hash = _mix(np.asarray(rows, dtype=np.uint64), np.uint64(key))
    c_hash = _mix(np.asarray(cols, dtype=np.uint64), np.uint64(key_c))
    return ((r_hash[:, None] * c_hash[None, :]) & _M32) >> 16


# ------------------------------------------------------------------------------- the stream


def test_dropout_stream_statistics():
    """Kept fraction and dependence between neighbouring rows, columns, heads and seeds, and
    the 16 keep patterns of 2 x 2 neighbourhoods, at p = 0.5 on 2**22 elements per stream:
    every statistic within 4.5 standard errors of independent fair coins."""
    n = 2048
    idx = np.arange(n)
    a = _random16_np(7, 3, idx, idx) >= 2**15
    streams = {"next head": _random16_np(7, 4, idx, idx) >= 2**15,
               "next seed": _random16_np(8, 3, idx, idx) >= 2**15,
               "seed + 2**32": _random16_np(7 + 2**32, 3, idx, idx) >= 2**15}
    tol = 4.5 / (n * n) ** 0.5

    def corr(x, y):
        x, y = x.astype(np.float64) - 0.5, y.astype(np.float64) - 0.5
        return 4 * (x * y).mean()

    assert abs(a.mean() - 0.5) < tol / 2
    assert abs(corr(a[1:], a[:-1])) < tol and abs(corr(a[:, 1:], a[:, :-1])) < tol
    assert abs(corr(a[2:], a[:-2])) < tol and abs(corr(a[1:, 1:], a[:-1, :-1])) < tol
    for name, b in streams.items():
        assert abs(corr(a, b)) < tol, name
    # 2 x 2 patterns: a chi-square with 15 degrees of freedom (p < 1e-4 above 44.3).
    pattern = (a[:-1, :-1] * 1 + a[:-1, 1:] * 2 + a[1:, :-1] * 4 + a[1:, 1:] * 8)[::2, ::2].ravel()
    counts = np.bincount(pattern, minlength=16)
    expected = pattern.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 44.3, counts


@pytest.mark.parametrize("seed", [5, 2**40 + 3])
def test_dropout_mask_is_the_documented_stream(seed):
    # keep[b, h, r, c] = u >= round(p * 2**16), u the element's 16 random bits (_dropout.py).
    B, H, Nq, Nk, p = 2, 2, 5, 21, 0.3
    mask = dropout_mask(seed, B, H, Nq, Nk, p, "cpu")
    threshold = int(p * 2**16 + 0.5)
    for b in range(B):
        for h in range(H):
            for r in range(Nq):
                for c in range(Nk):
                    u = _random16(seed, b * H + h, r, c)
                    assert bool(mask[b, h, r, c]) == (u >= threshold), (b, h, r, c)


def test_dropout_mask_does_not_depend_on_the_tiles():
    B, H, Nq, Nk, p, seed = 1, 3, 37, 75, 0.2, 99
    expected = dropout_mask(seed, B, H, Nq, Nk, p, "cpu")
    for block_m, block_n in [(16, 16), (1, 32), (32, 128)]:
        mask = torch.empty(B, H, Nq, Nk, dtype=torch.int8)
        grid = (B * H, -(-Nq // block_m))
        _dropout._dropout_mask_kernel[grid](mask, seed, p, Nq, Nk, BLOCK_M=block_m, BLOCK_N=block_n)
        assert torch.equal(mask.bool(), expected), (block_m, block_n)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_within_four_sigma(p):
    B, H, N = 2, 3, 64
    n = B * H * N * N
    sigma = (p * (1 - p) / n) ** 0.5
    masks = [dropout_mask(seed, B, H, N, N, p, "cpu") for seed in (0, 1, 2**40 + 3)]
    for mask in masks:
        assert abs(mask.float().mean().item() - (1 - p)) < 4 * sigma
        # Heads and rows get different draws (offsets cover (b, h, row, col)).
        assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
        assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1])
    assert not torch.equal(masks[0], masks[1])


def test_seed_resolution():
    torch.manual_seed(5)
    first = resolve_seed(None)
    torch.manual_seed(5)
    assert resolve_seed(None) == first and resolve_seed(None) != first
    assert resolve_seed(17) == 17


# ------------------------------------------------------------------------------ the backends


@pytest.mark.parametrize("name", DROPOUT)
def test_backend_keeps_one_minus_p_and_scales_by_its_inverse(name):
    # q = 0 gives P = 1 / Nk everywhere, and V = I reads P o Z / (1 - p) out row by row: the
    # backend's own keep-mask Z, counted (and, with dropout_seed, the documented one).
    B, H, N, p = 1, 4, 64, 0.25
    q = torch.zeros(B, N, H, N)
    v = torch.eye(N)[None, :, None, :].expand(B, N, H, N).contiguous()
    kwargs = dict(dropout_seed=SEED) if name in SEEDED else {}
    torch.manual_seed(SEED)
    out = get_backend(name)(q, torch.randn(B, N, H, N), v, dropout_p=p, **kwargs)
    kept = (out.double() * N * (1 - p)).permute(0, 2, 1, 3)  # (B, H, Nq, Nk)
    assert max_err(kept, kept.round()) < 1e-4 and set(kept.round().unique().tolist()) <= {0.0, 1.0}
    kept = kept.round()
    assert abs(kept.mean().item() - (1 - p)) < 4 * (p * (1 - p) / kept.numel()) ** 0.5
    if name in SEEDED:
        assert torch.equal(kept.bool(), dropout_mask(SEED, B, H, N, N, p, "cpu"))


def test_seeded_backends_draw_one_mask_for_a_seed():
    """For one seed every backend with dropout_seed gives the same outputs and gradients (to
    rounding); another seed gives another mask; the same seed, the same bits."""
    q, k, v = make_qkv(1, 40, 56, 4, 2, 16, dtype=torch.float32)
    kw = dict(causal=True, dropout_p=0.2, window_size=(11, 0), doc_ids=torch.tensor([[0] * 20 + [1] * 36]))
    dout = torch.randn(q.shape)
    results = {}
    for name in SEEDED:
        attn = get_backend(name)
        out = attn(q, k, v, dropout_seed=7, **kw)
        assert torch.equal(out, attn(q, k, v, dropout_seed=7, **kw)), name
        assert max_err(out, attn(q, k, v, dropout_seed=8, **kw)) > 1e-3, name
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), dout))
    first, *others = SEEDED
    for name in others:
        for what, a, b in zip(("out", "dq", "dk", "dv"), results[first], results[name]):
            assert max_err(a, b) < (1e-5 if what == "out" else 1e-4), f"{name} {what} differs from {first}"


@pytest.mark.parametrize("name", SEEDED)
def test_no_seed_draws_one_from_torch(name):
    q, k, v = make_qkv(1, 33, 33, 2, 2, 16, dtype=torch.float32)
    attn = get_backend(name)
    torch.manual_seed(5)
    c = attn(q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(5)
    assert torch.equal(c, attn(q, k, v, causal=True, dropout_p=0.2))
    assert not torch.equal(c, attn(q, k, v, causal=True, dropout_p=0.2))  # the generator moved on


@pytest.mark.parametrize("name", SEEDED)
def test_dropout_zero_is_exactly_no_dropout(name):
    q, k, v = make_qkv(1, 33, 33, 2, 2, 16, dtype=torch.float32)
    attn = get_backend(name)
    out, mask = attn(q, k, v, causal=True, dropout_p=0.0, dropout_seed=3, return_dropout_mask=True)
    assert mask.all() and mask.shape == (1, 2, 33, 33)
    assert torch.equal(out, attn(q, k, v, causal=True))


@pytest.mark.gpu
@pytest.mark.parametrize("name", [b for b in available_backends(device="cuda")
                                  if "dropout_seed" in features(b, "cuda")])
def test_seed_reproduces_on_the_gpu(name):
    q, k, v = make_qkv(1, 2048, 2048, 4, 4, 64, dtype=torch.bfloat16, device="cuda")
    attn = get_backend(name)
    a = attn(q, k, v, causal=True, dropout_p=0.1, dropout_seed=11)
    assert torch.equal(a, attn(q, k, v, causal=True, dropout_p=0.1, dropout_seed=11))
    _, mask = attn(q, k, v, causal=True, dropout_p=0.1, dropout_seed=11, return_dropout_mask=True)
    assert torch.equal(mask, dropout_mask(11, 1, 4, 2048, 2048, 0.1, q.device))
    assert max_err(a, get_backend("naive")(q, k, v, causal=True, dropout_p=0.1, dropout_seed=11)) < 2e-2
