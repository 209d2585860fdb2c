"""Issue 5's attention features in naive, flash_v1 (and sdpa where it can): dropout, sliding
windows, packed documents, the varlen interface and fully masked rows.

Every case checks outputs and gradients against the float64 reference with
``check_backend`` (error relative to PyTorch's own error at the same dtype). Dropout cases
pass the kernel's own keep-mask (``return_dropout_mask=True``) to the reference. On the CPU
the flash kernels run through the Triton interpreter with a small on-chip budget, so the
16 x 16 blocks make the window / document block skipping run on every shape.
"""

import functools

import numpy as np
import pytest
import torch

from attention_checks import check_backend, make_qkv, max_err
from fatrain.kernels import MASKED_ROW_LSE, get_backend, reference_attention
from fatrain.kernels import _dropout
from fatrain.kernels._dropout import dropout_mask, resolve_seed
from fatrain.kernels.flash_v1 import flash_v1_attention
from fatrain.kernels.varlen import cu_seqlens_to_doc_ids, varlen_attention

# 4096 bytes: every flash_v1 block is 16 x 16, so short sequences still span several blocks.
SMALL_SRAM = 4096
SEED = 1234


def backend(name):
    if name == "flash_v1":
        return functools.partial(flash_v1_attention, sram_bytes=SMALL_SRAM)
    return get_backend(name)


def packed_doc_ids(B, N, lengths=None, seed=0):
    """(B, N) non-decreasing ids; fixed ``lengths`` or random ones (including a length-1 document)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        if lengths is None:
            cuts = torch.randperm(N - 1, generator=gen)[:3] + 1
            starts = torch.zeros(N, dtype=torch.long)
            starts[cuts] = 1
            starts[N - 1] = 1  # a one-token document at the end
            rows.append(torch.cumsum(starts, 0))
        else:
            rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def with_seed(attn, seed):
    """attn with a fixed dropout seed that accepts (and drops) the reference's dropout_mask argument."""
    def call(q, k, v, dropout_mask=None, **kwargs):
        return attn(q, k, v, dropout_seed=seed, **kwargs)
    return call


# (B, Nq, Nk, H, Hkv, D, causal, window, docs)
MASK_CASES = [
    (2, 37, 37, 4, 2, 16, True, (7, 0), False),     # causal sliding window, GQA
    (1, 45, 61, 2, 2, 32, False, (5, 9), False),    # two-sided window, Nq < Nk
    (1, 53, 29, 4, 1, 16, True, (4, -1), False),    # Nq > Nk: the first rows see nothing, MQA
    (2, 50, 50, 2, 1, 16, False, (-1, -1), True),   # documents only
    (2, 47, 47, 4, 2, 16, True, (-1, -1), True),    # causal documents, GQA
    (1, 41, 57, 2, 2, 24, True, (6, 0), True),      # documents + causal window, Nq < Nk
    (1, 40, 40, 2, 2, 16, False, (3, 3), True),     # documents + two-sided window
]


def case_id(c):
    B, Nq, Nk, H, Hkv, D, causal, window, docs = c
    return f"{B}x{Nq}x{Nk}x{H}x{Hkv}x{D}-{'causal' if causal else 'full'}-w{window[0]}_{window[1]}" + \
        ("-docs" if docs else "")


def case_inputs(case, dtype):
    B, Nq, Nk, H, Hkv, D, causal, window, docs = case
    q, k, v = make_qkv(B, Nq, Nk, H, Hkv, D, dtype=dtype)
    kwargs = dict(causal=causal, window_size=window)
    if docs:
        kwargs["doc_ids"] = packed_doc_ids(B, Nk, seed=Nk)
    return q, k, v, kwargs


@pytest.mark.parametrize("case", MASK_CASES, ids=case_id)
@pytest.mark.parametrize("name", ["naive", "flash_v1", "sdpa"])
def test_window_and_documents_match_reference(name, case):
    q, k, v, kwargs = case_inputs(case, torch.float32)
    check_backend(backend(name), q, k, v, **kwargs)


@pytest.mark.parametrize("case", [MASK_CASES[0], MASK_CASES[4], MASK_CASES[5]], ids=case_id)
@pytest.mark.parametrize("name", ["naive", "flash_v1"])
def test_window_and_documents_float16(name, case):
    q, k, v, kwargs = case_inputs(case, torch.float16)
    check_backend(backend(name), q, k, v, **kwargs)


DROPOUT_CASES = [
    (2, 33, 33, 2, 2, 16, False, (-1, -1), False),  # dropout alone
    (1, 37, 51, 4, 2, 16, True, (-1, -1), False),   # x causal x GQA, Nq < Nk
    (1, 40, 40, 2, 1, 16, True, (9, 0), False),     # x window, MQA
    (2, 45, 45, 2, 2, 16, True, (-1, -1), True),    # x documents
    (1, 43, 43, 4, 2, 16, False, (6, 4), True),     # x two-sided window x documents x GQA
    (1, 41, 23, 2, 2, 16, True, (5, -1), False),    # x empty rows (Nq > Nk)
]


# float32 on every case, float16 on two representative ones (CPU time).
DROPOUT_PARAMS = [(c, torch.float32) for c in DROPOUT_CASES] + [(DROPOUT_CASES[i], torch.float16) for i in (1, 4)]


@pytest.mark.parametrize("case, dtype", DROPOUT_PARAMS, ids=lambda x: case_id(x) if isinstance(x, tuple) else str(x))
@pytest.mark.parametrize("name", ["naive", "flash_v1"])
def test_dropout_matches_reference_with_the_kernels_mask(name, case, dtype):
    q, k, v, kwargs = case_inputs(case, dtype)
    p = 0.3
    attn = backend(name)
    out, mask = attn(q, k, v, dropout_p=p, dropout_seed=SEED, return_dropout_mask=True, **kwargs)
    B, Nq, H = q.shape[0], q.shape[1], q.shape[2]
    assert mask.dtype == torch.bool and mask.shape == (B, H, Nq, k.shape[1])
    assert torch.equal(mask, dropout_mask(SEED, B, H, Nq, k.shape[1], p, q.device))
    check_backend(with_seed(attn, SEED), q, k, v, dropout_p=p, dropout_mask=mask, **kwargs)


def test_dropout_seed_reproduces_and_naive_equals_flash_v1():
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16, dtype=torch.float32)
    kw = dict(causal=True, dropout_p=0.2, window_size=(11, 0))
    flash = backend("flash_v1")
    a = flash(q, k, v, dropout_seed=7, **kw)
    b = flash(q, k, v, dropout_seed=7, **kw)
    assert torch.equal(a, b)
    assert max_err(a, flash(q, k, v, dropout_seed=8, **kw)) > 1e-3
    # naive draws the same counter-based mask, so the two agree to rounding.
    assert max_err(a, backend("naive")(q, k, v, dropout_seed=7, **kw)) < 1e-5
    # No seed: drawn from torch's default generator, so torch.manual_seed reproduces a run.
    torch.manual_seed(5)
    c = flash(q, k, v, **kw)
    torch.manual_seed(5)
    assert torch.equal(c, flash(q, k, v, **kw))
    assert not torch.equal(c, flash(q, k, v, **kw))  # the generator moved on: a fresh mask
    torch.manual_seed(5)
    assert resolve_seed(None) != resolve_seed(None)


def test_dropout_zero_is_exactly_no_dropout():
    q, k, v = make_qkv(1, 33, 33, 2, 2, 16, dtype=torch.float32)
    flash = backend("flash_v1")
    out, mask = flash(q, k, v, causal=True, dropout_p=0.0, dropout_seed=3, return_dropout_mask=True)
    assert mask.all()
    assert torch.equal(out, flash(q, k, v, causal=True))


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


@pytest.mark.parametrize("name", ["naive", "flash_v1", "sdpa"])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 0))])
def test_packed_documents_equal_each_document_alone(name, causal, window):
    lengths = [5, 23, 1, 17]
    N = sum(lengths)
    q, k, v = make_qkv(1, N, N, 4, 2, 16, dtype=torch.float32)
    attn = backend(name)
    doc_ids = packed_doc_ids(1, N, lengths)
    packed = attn(q, k, v, causal=causal, window_size=window, doc_ids=doc_ids)
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = attn(q[:, s], k[:, s], v[:, s], causal=causal, window_size=window)
        assert max_err(packed[:, s], alone) < 1e-5, f"document at {start}:{start + length}"
        start += length


@pytest.mark.parametrize("name", ["naive", "flash_v1"])
def test_varlen_equals_per_document_calls(name):
    lengths = [7, 1, 30, 12]
    total = sum(lengths)
    q, k, v = (t[0].detach().requires_grad_() for t in make_qkv(1, total, total, 4, 2, 16, dtype=torch.float32))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    out, lse = varlen_attention(name, q, k, v, cu, cu, max(lengths),
                                max(lengths), causal=True, window_size=(8, 0), return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, total) and lse.dtype == torch.float32
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        ref, ref_lse = get_backend(name)(q[None, s], k[None, s], v[None, s], causal=True, window_size=(8, 0),
                                         return_lse=True)
        assert max_err(out[s], ref[0]) < 1e-5 and max_err(lse[:, s], ref_lse[0]) < 1e-5
        start += length
    # Gradients flow through the packed call.
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_varlen_rejects_bad_cu_seqlens():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cu_seqlens_q == cu_seqlens_k"):
        varlen_attention("naive", q, q, q, cu, torch.tensor([0, 5, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="end at the packed length 10"):
        varlen_attention("naive", q, q, q, cu[:2], cu[:2], 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q=5 is smaller"):
        varlen_attention("naive", q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="int32 or int64"):
        varlen_attention("naive", q, q, q, cu.float(), cu.float(), 6, 6)
    with pytest.raises(ValueError, match="3 dims"):
        varlen_attention("naive", q[None], q, q, cu, cu, 6, 6)
    assert cu_seqlens_to_doc_ids(cu, 10).tolist() == [0] * 4 + [1] * 6


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("name", ["naive", "flash_v1"])
def test_fully_masked_rows_give_zeros_and_finite_lse(name, dropout_p):
    # Nq > Nk with causal: rows 0..19 sit left of every key; the window empties nothing more.
    q, k, v = make_qkv(1, 40, 20, 2, 1, 16, dtype=torch.float32)
    out, lse = backend(name)(q, k, v, causal=True, window_size=(3, 0), dropout_p=dropout_p,
                             dropout_seed=SEED, return_lse=True)
    assert torch.equal(out[:, :20], torch.zeros_like(out[:, :20]))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (lse[..., :20] == MASKED_ROW_LSE).all()
    if dropout_p == 0.0:
        _, ref_lse = reference_attention(q, k, v, causal=True, window_size=(3, 0), return_lse=True)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :20], torch.zeros_like(q.grad[:, :20]))


def test_unsupported_combinations_raise_clear_errors():
    q = torch.randn(1, 8, 2, 16)
    sdpa = get_backend("sdpa")
    with pytest.raises(NotImplementedError, match="'sdpa' does not support dropout_seed"):
        sdpa(q, q, q, dropout_p=0.1, dropout_seed=3)
    with pytest.raises(NotImplementedError, match="'sdpa' does not support return_dropout_mask"):
        sdpa(q, q, q, return_dropout_mask=True)
    with pytest.raises(NotImplementedError, match="'sdpa_math' does not support return_lse"):
        get_backend("sdpa_math")(q, q, q, window_size=(2, 0), return_lse=True)
    for name in ("naive", "flash_v1"):
        with pytest.raises(ValueError, match="doc_ids need seqlen_q <= seqlen_k"):
            backend(name)(q, q[:, :4], q[:, :4], doc_ids=torch.zeros(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="dropout_seed"):
            backend(name)(q, q, q, dropout_p=0.1, dropout_seed=-2)
        with pytest.raises(ValueError, match="doc_ids must hold integers"):
            backend(name)(q, q, q, doc_ids=torch.zeros(1, 8))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over poisoned rows
@pytest.mark.parametrize("name", ["flash_v1", "flash_v2"])
@pytest.mark.parametrize("masking", ["window", "documents"])
def test_flash_kernels_skip_blocks_they_cannot_see(masking, name):
    # Blocks are 16 x 16 (all three flash_v2 passes). NaN in K and V of keys 0..15 poisons every
    # block pair the kernels visit (0 * NaN = NaN, even for masked entries), so finite rows
    # prove the pairs were skipped.
    N = 64
    q, k, v = make_qkv(1, N, N, 2, 2, 16, dtype=torch.float32)
    if masking == "window":
        # Key block 0 is seen by rows <= 15 + 16: Q blocks from row 32 on skip it.
        kwargs, skipped = dict(causal=True, window_size=(16, 0)), slice(32, N)
    else:
        # Documents of 16 tokens aligned with the blocks: only diagonal block pairs are visited.
        kwargs, skipped = dict(doc_ids=packed_doc_ids(1, N, [16, 16, 16, 16])), slice(16, N)
    tiles = dict(sram_bytes=SMALL_SRAM) if name == "flash_v1" else dict(block_m=16, block_n=16)
    attn = functools.partial(get_backend(name), **tiles, **kwargs)
    clean = attn(q, k, v)
    k_bad, v_bad = k.detach().clone(), v.detach().clone()
    k_bad[:, :16], v_bad[:, :16] = float("nan"), float("nan")
    q2 = q.detach().clone().requires_grad_()
    out = attn(q2, k_bad, v_bad)
    assert torch.isnan(out[:, :16]).any()  # the visited pairs do see the poison
    assert torch.equal(out[:, skipped], clean[:, skipped])
    out[:, skipped].sum().backward()
    assert torch.isfinite(q2.grad[:, skipped]).all()


def test_traffic_model_window_grows_linearly():
    from fatrain.bench.traffic import flash_v1_hbm_traffic

    kw = dict(batch=1, nheads=1, head_dim=64, dtype_bytes=2, sram_bytes=4 * 4 * 64 * 64, causal=True)
    full = [flash_v1_hbm_traffic(seqlen_q=n, seqlen_k=n, **kw).forward_inner for n in (4096, 8192)]
    window = [flash_v1_hbm_traffic(seqlen_q=n, seqlen_k=n, window_size=(256, 0), **kw).forward_inner
              for n in (4096, 8192)]
    assert full[1] / full[0] > 3.9  # N^2
    assert 1.95 < window[1] / window[0] < 2.05  # N x window (the first blocks see fewer rows)
    assert window[0] < full[0] / 6
    # The default (no window) is the old model.
    assert flash_v1_hbm_traffic(seqlen_q=4096, seqlen_k=4096, **kw).forward_inner == full[0]


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["naive", "flash_v1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature", ["window", "docs", "docs+window", "dropout", "dropout+docs+window"])
def test_features_gpu(name, dtype, feature):
    B, N, H, Hkv, D = 2, 2048, 4, 2, 128
    q, k, v = make_qkv(B, N, N, H, Hkv, D, dtype=dtype, device="cuda")
    kwargs = dict(causal=True)
    if "window" in feature:
        kwargs["window_size"] = (256, 0)
    if "docs" in feature:
        # Documents of mean length 256: a boundary after each token with probability 1/256.
        kwargs["doc_ids"] = torch.cumsum(torch.rand(B, N, device="cuda") < 1 / 256, dim=1)
    attn = get_backend(name)
    if "dropout" in feature:
        p = 0.1
        _, mask = attn(q, k, v, dropout_p=p, dropout_seed=SEED, return_dropout_mask=True, **kwargs)
        assert abs(mask.float().mean().item() - (1 - p)) < 1e-3
        check_backend(with_seed(attn, SEED), q, k, v, dropout_p=p, dropout_mask=mask, **kwargs)
    else:
        check_backend(attn, q, k, v, **kwargs)


@pytest.mark.gpu
def test_packed_documents_and_varlen_gpu():
    lengths = [300, 17, 1, 900, 830]
    total = sum(lengths)
    q, k, v = (t[0] for t in make_qkv(1, total, total, 4, 4, 64, dtype=torch.bfloat16, device="cuda"))
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    out = varlen_attention("flash_v1", q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = flash_v1_attention(q[None, s], k[None, s], v[None, s], causal=True)[0]
        assert max_err(out[s], alone) < 2e-2
        start += length


@pytest.mark.gpu
def test_dropout_seed_reproduces_gpu():
    q, k, v = make_qkv(1, 2048, 2048, 4, 4, 64, dtype=torch.bfloat16, device="cuda")
    a = flash_v1_attention(q, k, v, causal=True, dropout_p=0.1, dropout_seed=11)
    b = flash_v1_attention(q, k, v, causal=True, dropout_p=0.1, dropout_seed=11)
    assert torch.equal(a, b)
    n = get_backend("naive")(q, k, v, causal=True, dropout_p=0.1, dropout_seed=11)
    assert max_err(a, n) < 2e-2


# ------------------------------------------------------------------------------ flash_v2
# The same feature cases for flash_v2 (its own file tests more shapes; these keep the three
# backends side by side). Its CPU-interpreter tiles are 32 x 16 / 16 x 32, so 16-token
# blocks are asked for explicitly where a test needs to know the block geometry.


@pytest.mark.parametrize("case", MASK_CASES, ids=case_id)
def test_flash_v2_window_and_documents_match_reference(case):
    q, k, v, kwargs = case_inputs(case, torch.float32)
    check_backend(backend("flash_v2"), q, k, v, **kwargs)


@pytest.mark.parametrize("case, dtype", DROPOUT_PARAMS, ids=lambda x: case_id(x) if isinstance(x, tuple) else str(x))
def test_flash_v2_dropout_matches_reference_with_the_kernels_mask(case, dtype):
    q, k, v, kwargs = case_inputs(case, dtype)
    p = 0.3
    attn = backend("flash_v2")
    out, mask = attn(q, k, v, dropout_p=p, dropout_seed=SEED, return_dropout_mask=True, **kwargs)
    assert torch.equal(mask, dropout_mask(SEED, q.shape[0], q.shape[2], q.shape[1], k.shape[1], p, q.device))
    check_backend(with_seed(attn, SEED), q, k, v, dropout_p=p, dropout_mask=mask, **kwargs)


def test_flash_v2_dropout_equals_naive_and_flash_v1_for_one_seed():
    q, k, v, kwargs = case_inputs(DROPOUT_CASES[4], torch.float32)  # window x documents x GQA
    outs = {name: backend(name)(q, k, v, dropout_p=0.2, dropout_seed=SEED, **kwargs)
            for name in ("naive", "flash_v1", "flash_v2")}
    assert max_err(outs["flash_v2"], outs["naive"]) < 1e-5
    assert max_err(outs["flash_v2"], outs["flash_v1"]) < 1e-5


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 0))])
def test_flash_v2_packed_documents_equal_each_document_alone(causal, window):
    lengths = [5, 23, 1, 17]
    N = sum(lengths)
    q, k, v = make_qkv(1, N, N, 4, 2, 16, dtype=torch.float32)
    attn = backend("flash_v2")
    packed = attn(q, k, v, causal=causal, window_size=window, doc_ids=packed_doc_ids(1, N, lengths))
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = attn(q[:, s], k[:, s], v[:, s], causal=causal, window_size=window)
        assert max_err(packed[:, s], alone) < 1e-5, f"document at {start}:{start + length}"
        start += length


def test_flash_v2_varlen_equals_per_document_calls():
    lengths = [7, 1, 30, 12]
    total = sum(lengths)
    q, k, v = (t[0].detach().requires_grad_() for t in make_qkv(1, total, total, 4, 2, 16, dtype=torch.float32))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    out = varlen_attention("flash_v2", q, k, v, cu, cu, max(lengths), max(lengths), causal=True, window_size=(8, 0))
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        ref = backend("flash_v2")(q[None, s], k[None, s], v[None, s], causal=True, window_size=(8, 0))
        assert max_err(out[s], ref[0]) < 1e-5
        start += length
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_flash_v2_fully_masked_rows_give_zeros_and_finite_lse(dropout_p):
    q, k, v = make_qkv(1, 40, 20, 2, 1, 16, dtype=torch.float32)
    out, lse = backend("flash_v2")(q, k, v, causal=True, window_size=(3, 0), dropout_p=dropout_p,
                                   dropout_seed=SEED, return_lse=True)
    assert torch.equal(out[:, :20], torch.zeros_like(out[:, :20]))
    assert torch.isfinite(out).all() and (lse[..., :20] == MASKED_ROW_LSE).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :20], torch.zeros_like(q.grad[:, :20]))


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["docs+window", "dropout+docs+window"])
def test_flash_v2_features_gpu(feature):
    # bf16 and two combinations only: each one compiles three kernels (test_flash_v2.py has more).
    test_features_gpu("flash_v2", torch.bfloat16, feature)
