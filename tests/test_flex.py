"""The flex backend (PyTorch's FlexAttention): the contract's mask as a mask_mod, the cached
block masks, and what it refuses.

FlexAttention has no backward on the CPU, so the CPU tests check forwards (output and
logsumexp against the float64 reference); the GPU tests add the compiled kernels and gradients.
"""

import pytest
import torch

from attention_checks import check_backend, make_qkv, max_err
from fatrain.kernels import MASKED_ROW_LSE, backend_info, get_backend, reference_attention

pytest.importorskip("torch.nn.attention.flex_attention")


def flex():
    return get_backend("flex")


def packed_ids(B, N, p=0.1):
    return torch.cumsum(torch.rand(B, N) < p, dim=1)


CPU_CASES = [  # (shape (B, Nq, Nk, H, Hkv, D), kwargs)
    ((1, 37, 37, 4, 2, 16), dict(causal=True)),
    ((2, 33, 70, 4, 4, 32), dict(causal=True)),               # Nq < Nk: bottom-right diagonal
    ((1, 70, 33, 2, 1, 16), dict(causal=True)),               # Nq > Nk: the first rows see nothing
    ((1, 50, 83, 2, 1, 16), dict(window_size=(20, 5))),
    ((1, 83, 50, 2, 1, 16), dict(causal=True, window_size=(7, 0))),
    ((1, 97, 97, 2, 2, 80), dict()),
    ((2, 60, 60, 2, 2, 16), dict(causal=True, doc_ids=True)),
    ((1, 40, 60, 2, 2, 16), dict(causal=True, window_size=(9, 0), doc_ids=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, kwargs", CPU_CASES)
def test_forward_and_lse_match_reference(shape, kwargs, dtype):
    q, k, v = (t.detach() for t in make_qkv(*shape, dtype=dtype))
    kwargs = dict(kwargs)
    if kwargs.pop("doc_ids", False):
        kwargs["doc_ids"] = packed_ids(shape[0], shape[2])
    check_backend(flex(), q, k, v, grads=False, **kwargs)  # no backward on the CPU
    out, lse = flex()(q, k, v, return_lse=True, **kwargs)
    _, ref_lse = reference_attention(q, k, v, return_lse=True, **kwargs)
    assert lse.dtype == torch.float32 and lse.shape == (shape[0], shape[3], shape[1])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    if kwargs.get("causal") and shape[1] > shape[2]:
        empty = shape[1] - shape[2]
        assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
        assert (lse[:, :, :empty] == MASKED_ROW_LSE).all()


def test_block_masks_are_cached_per_shape_mask_and_doc_ids_version():
    from fatrain.kernels import flex as module
    module._BLOCK_MASKS.clear()
    q = torch.randn(1, 40, 2, 16)
    ids = packed_ids(1, 40)
    flex()(q, q, q, causal=True)
    flex()(q, q, q, causal=True)
    assert len(module._BLOCK_MASKS) == 1
    flex()(q, q, q, causal=True, doc_ids=ids)
    flex()(q, q, q, causal=True, doc_ids=ids)
    assert len(module._BLOCK_MASKS) == 2
    ids[0, 20:] += 1  # in place: a new version, so a new mask, and its output follows the new ids
    out = flex()(q, q, q, causal=True, doc_ids=ids)
    assert len(module._BLOCK_MASKS) == 3
    assert max_err(out, reference_attention(q, q, q, causal=True, doc_ids=ids)) < 1e-5
    flex()(q, q, q)  # nothing masked: no block mask
    assert len(module._BLOCK_MASKS) == 3


def test_what_flex_refuses():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="flex"):
        flex()(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="flex"):
        flex()(q, q, q, return_dropout_mask=True)
    with pytest.raises(ValueError, match="head_dim 8 is not supported by flex"):
        flex()(torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8))
    with pytest.raises(ValueError, match="float64 is not supported by flex"):
        flex()(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="doc_ids need seqlen_q <= seqlen_k"):
        flex()(torch.randn(1, 9, 2, 16), q, q, doc_ids=torch.zeros(1, 8, dtype=torch.long))


def test_registry_entry():
    info = backend_info("flex")
    assert info.devices == ("cuda",) and not info.supports("dropout") and info.supports("return_lse")


# ---------------------------------------------------------------------------- GPU only

GPU_CASES = [
    ((2, 1025, 1025, 4, 1, 64), dict(causal=True)),
    ((1, 513, 1500, 8, 2, 128), dict(causal=True)),
    ((1, 1500, 513, 4, 2, 64), dict(causal=True)),
    ((2, 1000, 1100, 4, 2, 64), dict(causal=True, window_size=(256, 0), doc_ids=True)),
    ((1, 777, 777, 4, 4, 64), dict(window_size=(100, 50))),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, kwargs", GPU_CASES)
def test_gpu_matches_reference(shape, kwargs):
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")
    kwargs = dict(kwargs)
    if kwargs.pop("doc_ids", False):
        kwargs["doc_ids"] = torch.cumsum(torch.rand(shape[0], shape[2], device="cuda") < 0.003, dim=1)
    check_backend(flex(), q, k, v, **kwargs)
