"""The flash_v1 backend (FlashAttention-1, Algorithms 1 and 4): outputs, gradients, block sizes, splits.

On the CPU the kernels run through the Triton interpreter; small on-chip budgets
(``sram_bytes``) keep the blocks at 16 so the outer and inner loops run several times.
"""

import functools

import pytest
import torch

from attention_checks import check_backend, make_qkv
from fatrain.kernels import get_backend, reference_attention
from fatrain.kernels import flash_v1
from fatrain.kernels.flash_v1 import flash_v1_attention, flash_v1_block_sizes

# 4096 bytes = 1024 float32 words: B_c = ceil(1024 / 4d) <= 16 for d >= 16, so every block is 16 x 16.
SMALL_SRAM = 4096


def test_registered_as_triton_ops():
    assert get_backend("flash_v1") is flash_v1_attention
    assert hasattr(torch.ops.fatrain, "flash_v1_forward") and hasattr(torch.ops.fatrain, "flash_v1_backward")


def test_block_size_setter_changes_blocks_not_results():
    q, k, v = make_qkv(1, 50, 50, 2, 2, 16, dtype=torch.float32)
    previous = flash_v1.set_sram_bytes(SMALL_SRAM)
    try:
        small = flash_v1_attention(q, k, v, causal=True)
        assert flash_v1.device_sram_bytes("cpu") == SMALL_SRAM
    finally:
        flash_v1.set_sram_bytes(previous)
    large = flash_v1_attention(q, k, v, causal=True, sram_bytes=1 << 20)
    torch.testing.assert_close(small, large, atol=1e-5, rtol=1e-5)


def _pow2_floor(x):
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


@pytest.mark.parametrize("sram_bytes", [4096, 16384, 49152, 101376, 232448])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 96, 128, 256])
def test_block_sizes_follow_the_formula(head_dim, sram_bytes):
    words = sram_bytes // 4  # M in float32 words
    block_c = -(-words // (4 * head_dim))  # ceil(M / 4d)
    block_r = min(block_c, head_dim)
    b_r, b_c = flash_v1_block_sizes(head_dim, sram_bytes)
    assert (b_r, b_c) == (max(16, _pow2_floor(block_r)), max(16, _pow2_floor(block_c)))
    # Powers of two, at least 16, and within the budget whenever the formula allows blocks of 16.
    for b in (b_r, b_c):
        assert b >= 16 and b & (b - 1) == 0
    assert b_r <= max(16, head_dim) and b_r <= b_c
    if block_c >= 16:
        assert 4 * b_c * head_dim <= words + 4 * head_dim  # ceil() may overshoot M by less than one row


def test_block_sizes_on_an_h100():
    # 227 KiB of shared memory per block: M = 58112 words.
    assert flash_v1_block_sizes(64, 232448) == (64, 128)  # B_c = 227, B_r = 64
    assert flash_v1_block_sizes(128, 232448) == (64, 64)  # B_c = 114, B_r = 114
    assert flash_v1_block_sizes(16, 232448) == (16, 512)  # B_c = 908, B_r = 16


SPLIT_SHAPES = [  # (B, Nq, Nk, H, Hkv, D): 7 Q blocks and 7 K/V blocks of 16, or fewer than splits
    (1, 97, 97, 4, 1, 64),
    (1, 97, 33, 4, 2, 80),
    (2, 33, 97, 2, 2, 16),
]


@pytest.mark.parametrize("num_splits", [2, 3, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_splits_match_reference(shape, causal, num_splits):
    # Programs per (batch, head): the forward's own Q blocks i = split mod n, the backward's
    # K/V blocks j = split mod n with dQ added by atomics; 64 is more splits than blocks.
    q, k, v = make_qkv(*shape, dtype=torch.float32)
    attn = functools.partial(flash_v1_attention, sram_bytes=SMALL_SRAM, num_splits=num_splits)
    check_backend(attn, q, k, v, causal=causal)


@pytest.mark.parametrize("kwargs", [
    dict(causal=True, window_size=(20, 0)),
    dict(causal=False, window_size=(9, 13)),
    dict(causal=True, dropout_p=0.2, dropout_seed=3),
    dict(causal=True, doc_ids=torch.tensor([[0] * 30 + [1] * 41 + [2] * 26])),
], ids=["window", "two-sided", "dropout", "documents"])
def test_splits_give_the_paper_grids_results(kwargs):
    # Rows are independent in Algorithm 1 and a K/V block's dK, dV sums in the same order at any
    # split, so out, dK and dV are bit-identical to num_splits=1; dQ sums in another order.
    q, k, v = make_qkv(1, 97, 97, 4, 2, 16, dtype=torch.float32)
    dout = torch.randn_like(q)
    results = []
    for n in (1, 3):
        out = flash_v1_attention(q, k, v, sram_bytes=SMALL_SRAM, num_splits=n, **kwargs)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    (out1, dq1, dk1, dv1), (out3, dq3, dk3, dv3) = results
    assert torch.equal(out1, out3) and torch.equal(dk1, dk3) and torch.equal(dv1, dv3)
    torch.testing.assert_close(dq3, dq1, atol=1e-5, rtol=1e-5)


def test_split_heuristic():
    # About 16 programs per SM (132 on an H100), at most 16 per (batch, head) and per block count.
    assert flash_v1.flash_v1_num_splits(32, 128, 132) == 16  # B x H = 32 (8k tokens at d=128)
    assert flash_v1.flash_v1_num_splits(128, 32, 132) == 16  # 2112 / 128 = 16.5, capped
    assert flash_v1.flash_v1_num_splits(384, 16, 132) == 6  # GPT-2 small at N=1024, 32k tokens
    assert flash_v1.flash_v1_num_splits(4096, 16, 132) == 1  # B x H alone fills the GPU
    assert flash_v1.flash_v1_num_splits(16, 2, 132) == 2  # capped at the block count
    assert flash_v1.flash_v1_num_splits(1, 1, 132) == 1
    # The resolved pair: capped at the blocks, 1 on the CPU by default, backward 1 when deterministic.
    args = (2, 16, 16, 8192, 8192, 64, 64)
    assert flash_v1.resolve_num_splits(0, False, *args, "cpu") == (1, 1)
    assert flash_v1.resolve_num_splits(4, False, *args, "cpu") == (4, 4)
    assert flash_v1.resolve_num_splits(4, True, *args, "cpu") == (4, 1)
    assert flash_v1.resolve_num_splits(500, False, 1, 2, 2, 100, 40, 16, 16, "cpu") == (7, 3)


def test_deterministic_backward_is_bit_identical():
    q, k, v = make_qkv(1, 70, 70, 2, 1, 16, dtype=torch.float32)
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = flash_v1_attention(q, k, v, causal=True, sram_bytes=SMALL_SRAM, num_splits=4, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_unsupported_features_and_bad_input():
    # dropout, window_size and doc_ids are supported (tests/test_attention.py); bad values raise.
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="dropout_seed"):
        flash_v1_attention(q, q, q, dropout_p=0.1, dropout_seed=-1)
    with pytest.raises(ValueError, match="window_size"):
        flash_v1_attention(q, q, q, window_size=(4,))
    with pytest.raises(ValueError, match="doc_ids need seqlen_q <= seqlen_k"):
        flash_v1_attention(q, q[:, :4], q[:, :4], doc_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim 8 is not supported by flash_v1 \\(supported: 16..256\\)"):
        x = torch.randn(1, 8, 2, 8)
        flash_v1_attention(x, x, x)
    with pytest.raises(ValueError, match="head_dim 320"):
        x = torch.randn(1, 8, 2, 320)
        flash_v1_attention(x, x, x)
    with pytest.raises(ValueError, match="dtype float64 is not supported by flash_v1"):
        x = q.double()
        flash_v1_attention(x, x, x)
    with pytest.raises(ValueError, match="sram_bytes"):
        flash_v1_attention(q, q, q, sram_bytes=0)
    with pytest.raises(ValueError, match="sram_bytes"):
        flash_v1.set_sram_bytes(-5)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_v1_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_v1_attention(q, q, q, softmax_scale=0.0)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_splits must be an int >= 0"):
            flash_v1_attention(q, q, q, num_splits=bad)
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        flash_v1_attention(q, q, q, deterministic=1)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_flash_v1_gpu_float32_strided_and_block_sizes(causal):
    q, k, v = make_qkv(2, 1031, 517, 4, 2, 96, dtype=torch.float32, device="cuda", strided=True)
    check_backend(flash_v1_attention, q, k, v, causal=causal)
    m = flash_v1.device_sram_bytes(q.device)
    assert m >= 48 * 1024  # every GPU we support has at least 48 KiB of shared memory per block
    b_r, b_c = flash_v1_block_sizes(96, m)
    assert b_r <= 64 and b_c >= 16


@pytest.mark.gpu
def test_flash_v1_gpu_lse_long_causal():
    q, k, v = make_qkv(1, 4096, 4096, 2, 2, 128, dtype=torch.bfloat16, device="cuda")
    out, lse = flash_v1_attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_flash_v1_gpu_splits(causal):
    # B x H = 4 leaves an H100 idle, so the default splits both passes; deterministic=True keeps
    # the backward at one program per (batch, head), bit-identical across runs.
    q, k, v = make_qkv(1, 3001, 3001, 4, 2, 128, dtype=torch.bfloat16, device="cuda")
    args = (1, 4, 2, 3001, 3001, *flash_v1._launch_blocks(3001, 3001, 128, flash_v1.device_sram_bytes(q.device)))
    fwd, bwd = flash_v1.resolve_num_splits(0, False, *args, q.device)
    assert fwd > 1 and bwd > 1
    check_backend(flash_v1_attention, q, k, v, causal=causal)
    check_backend(functools.partial(flash_v1_attention, deterministic=True), q, k, v, causal=causal)
    dout = torch.randn_like(q)
    grads = [torch.autograd.grad(flash_v1_attention(q, k, v, causal=causal, deterministic=True), (q, k, v), dout)
             for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
def test_flash_v1_gpu_torch_compile():
    # triton_op makes the kernels visible to torch.compile (the CPU interpreter cannot trace them).
    q, k, v = make_qkv(2, 300, 300, 4, 2, 64, dtype=torch.float16, device="cuda")
    compiled = torch.compile(functools.partial(flash_v1_attention, causal=True), fullgraph=True)
    out = compiled(q, k, v)
    dq, dk, dv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eager = flash_v1_attention(q2, k2, v2, causal=True)
    dq2, dk2, dv2 = torch.autograd.grad(eager.float().square().sum(), (q2, k2, v2))
    for a, b in ((out, eager), (dq, dq2), (dk, dk2), (dv, dv2)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
