"""The flash kernels' block geometry with windows and documents (backend-internal).

With 16 x 16 blocks (flash_v1's ``sram_bytes=4096``, flash_v2's ``block_m=block_n=16``) short
sequences span several blocks, so the window / document block skipping runs on every
shape: the block pairs a mask cannot reach are skipped, and what is computed still matches
the float64 reference.
"""

import functools

import pytest
import torch

from attention_checks import check_attention, make_qkv, packed_doc_ids
from fatrain.kernels import get_backend
from fatrain.kernels._dropout import dropout_mask

# 4096 bytes: every flash_v1 block is 16 x 16.
TILES = {"flash_v1": dict(sram_bytes=4096), "flash_v2": dict(block_m=16, block_n=16)}
SEED = 1234


def tiled(name, **kwargs):
    return functools.partial(get_backend(name), **TILES[name], **kwargs)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over poisoned rows
@pytest.mark.parametrize("name", sorted(TILES))
@pytest.mark.parametrize("masking", ["window", "documents"])
def test_flash_kernels_skip_blocks_they_cannot_see(masking, name):
    # NaN in K and V of keys 0..15 poisons every block pair the kernels visit (0 * NaN = NaN,
    # even for masked entries), so finite rows prove the pairs were skipped.
    N = 64
    q, k, v = make_qkv(1, N, N, 2, 2, 16, dtype=torch.float32)
    if masking == "window":
        # Key block 0 is seen by rows <= 15 + 16: Q blocks from row 32 on skip it.
        kwargs, skipped = dict(causal=True, window_size=(16, 0)), slice(32, N)
    else:
        # Documents of 16 tokens aligned with the blocks: only diagonal block pairs are visited.
        kwargs, skipped = dict(doc_ids=packed_doc_ids(1, N, [16, 16, 16, 16])), slice(16, N)
    attn = tiled(name, **kwargs)
    clean = attn(q, k, v)
    k_bad, v_bad = k.detach().clone(), v.detach().clone()
    k_bad[:, :16], v_bad[:, :16] = float("nan"), float("nan")
    q2 = q.detach().clone().requires_grad_()
    out = attn(q2, k_bad, v_bad)
    assert torch.isnan(out[:, :16]).any()  # the visited pairs do see the poison
    assert torch.equal(out[:, skipped], clean[:, skipped])
    out[:, skipped].sum().backward()
    assert torch.isfinite(q2.grad[:, skipped]).all()


# (B, Nq, Nk, H, Hkv, D, causal, window, documents, dropout)
SMALL_BLOCK_CASES = [
    ((2, 37, 37, 4, 2, 16), True, (7, 0), False, False),    # causal sliding window, GQA
    ((1, 45, 61, 2, 2, 32), False, (5, 9), False, False),   # two-sided window, Nq < Nk
    ((1, 53, 29, 4, 1, 16), True, (4, -1), False, False),   # Nq > Nk: the first rows see nothing
    ((1, 41, 57, 2, 2, 16), True, (6, 0), True, True),      # documents + window + dropout
]


@pytest.mark.parametrize("name", sorted(TILES))
@pytest.mark.parametrize("shape, causal, window, docs, dropout", SMALL_BLOCK_CASES,
                         ids=["window-gqa", "two-sided", "empty-rows", "docs-window-dropout"])
def test_small_blocks_match_reference(name, shape, causal, window, docs, dropout):
    B, Nq, Nk, H = shape[:4]
    q, k, v = make_qkv(*shape, dtype=torch.float32)
    kwargs = dict(causal=causal, window_size=window)
    if docs:
        kwargs["doc_ids"] = packed_doc_ids(B, Nk)
    kernel_kwargs = {}
    if dropout:
        kwargs["dropout_p"] = 0.3
        kernel_kwargs = dict(dropout_seed=SEED, return_dropout_mask=True)
    _, _, mask = check_attention(tiled(name), q, k, v, kernel_kwargs=kernel_kwargs, **kwargs)
    if dropout:
        assert torch.equal(mask, dropout_mask(SEED, B, H, Nq, Nk, 0.3, q.device))
