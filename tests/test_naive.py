"""The naive backend, the registry and the shared argument checks."""

import pytest
import torch

from attention_checks import check_backend, make_qkv
from fatrain.kernels import available_backends, get_backend, reference_attention

SHAPES = [  # (B, Nq, Nk, H, Hkv, D)
    (2, 17, 17, 4, 4, 16),
    (1, 97, 97, 4, 1, 32),
    (2, 1, 33, 4, 2, 16),
    (1, 33, 7, 6, 3, 8),
    (1, 64, 129, 2, 2, 80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_naive_matches_reference(shape, causal, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype)
    check_backend(get_backend("naive"), q, k, v, causal=causal)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("window", [(3, 0), (5, 2)])
def test_window_and_documents_match_reference(backend, window):
    q, k, v = make_qkv(2, 37, 37, 4, 2, 16, dtype=torch.float32)
    doc_ids = torch.cumsum(torch.rand(2, 37) < 0.15, dim=1)
    check_backend(get_backend(backend), q, k, v, causal=True, window_size=window, doc_ids=doc_ids)


@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_reference(shape):
    q, k, v = make_qkv(*shape, dtype=torch.float32)
    check_backend(get_backend("sdpa"), q, k, v, causal=True)


def test_lse_and_fully_masked_rows():
    # seqlen_q > seqlen_k with causal leaves the first rows with no key to see.
    q, k, v = make_qkv(1, 9, 4, 2, 2, 16, dtype=torch.float32)
    out, lse = get_backend("naive")(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    (out.sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_naive_dropout_is_seeded_and_scaled():
    q, k, v = make_qkv(2, 64, 64, 2, 2, 16, dtype=torch.float32)
    attn = get_backend("naive")
    torch.manual_seed(3)
    a = attn(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = attn(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, attn(q, k, v))


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*flash_v2.*naive"):
        get_backend("flash_v3")
    assert {"naive", "sdpa", "flash_v1", "flash_v2"} <= set(available_backends())


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)), "multiple of the number of key/value heads"),
    (dict(q=torch.randn(2, 8, 4)), "q must have 4 dims"),
    (dict(v=torch.randn(2, 8, 2, 16, dtype=torch.float64)), "share one dtype"),
    (dict(k=torch.randn(3, 8, 2, 16), v=torch.randn(3, 8, 2, 16)), "same batch size"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(q=torch.randn(2, 8, 4, 16), k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        get_backend("naive")(args["q"], args["k"], args["v"])


def test_bad_scalar_arguments():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        get_backend("naive")(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="window_size"):
        get_backend("naive")(q, q, q, window_size=(-3, 0))
    with pytest.raises(ValueError, match="softmax_scale"):
        get_backend("naive")(q, q, q, softmax_scale=-1.0)
