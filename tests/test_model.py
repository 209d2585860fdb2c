"""The GPT model: shapes, parameter count, RoPE, KV cache, backends interchangeable."""

import pytest
import torch

from fatrain.model import GPT, GPTSpec, apply_rope, positions_from_doc_ids, rope_tables


def tiny(**kw):
    base = dict(vocab_size=257, attention="naive", n_layer=2, n_head=4, n_embd=64)
    base.update(kw)
    return GPTSpec(**base)


def test_gpt2_small_has_124m_parameters():
    spec = GPTSpec(vocab_size=50304, attention="naive", n_layer=12, n_head=12, n_embd=768, norm="layernorm", bias=False)
    with torch.device("meta"):
        model = GPT(spec)
    assert 123e6 < model.num_params() < 125e6


def test_llama_1b_config_is_a_llama_with_128_dim_heads():
    from fatrain.cli.max_context import compose_config
    from fatrain.trainer import build_spec

    cfg, _ = compose_config(["model=llama-1b", "attention.backend=sdpa"])
    spec = build_spec(cfg, 257)
    assert (spec.head_dim, spec.n_head, spec.kv_heads, spec.hidden) == (128, 16, 4, 8192)
    assert (spec.norm, spec.mlp, spec.bias, spec.rope_theta) == ("rmsnorm", "swiglu", False, 500000.0)
    with torch.device("meta"):
        model = GPT(spec)
    assert 1.0e9 < model.num_params() < 1.1e9
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert isinstance(model.blocks[0].norm1, torch.nn.RMSNorm)
    # q (16 x 128) + k, v (4 x 128 each) in one projection: GQA, K/V not repeated
    assert model.blocks[0].attn.qkv.weight.shape == ((16 + 2 * 4) * 128, 2048)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, mlp="swiglu", norm="layernorm"), dict(n_kv_head=1)])
def test_forward_loss_and_backward(kw):
    torch.manual_seed(0)
    model = GPT(tiny(**kw))
    idx, targets = torch.randint(0, 257, (2, 24)), torch.randint(0, 257, (2, 24))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 24, 257)
    # A fresh model predicts close to uniform over the vocabulary.
    assert abs(loss.item() - torch.log(torch.tensor(257.0)).item()) < 0.3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rope_preserves_norm_and_relative_positions():
    x = torch.randn(1, 6, 2, 16)
    cos, sin = rope_tables(torch.arange(6), 16, 10000.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # <rope(q, m), rope(k, n)> depends only on m - n.
    q, k = torch.randn(16), torch.randn(16)

    def rotated(v, pos):
        c, s = rope_tables(torch.tensor([pos]), 16, 10000.0)
        return apply_rope(v.view(1, 1, 1, 16), c, s).view(16)

    torch.testing.assert_close(rotated(q, 5) @ rotated(k, 2), rotated(q, 13) @ rotated(k, 10), atol=1e-5, rtol=1e-5)


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_document_masking_equals_separate_documents():
    torch.manual_seed(0)
    model = GPT(tiny(document_masking=True, rope_reset_per_document=True)).eval()
    a, b = torch.randint(0, 257, (1, 7)), torch.randint(0, 257, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    logits, _ = model(packed, doc_ids=doc_ids)
    torch.testing.assert_close(logits[:, :7], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 7:], model(b)[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_head=2)).eval()
    idx = torch.randint(0, 257, (2, 5))
    a = model.generate(idx, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(1),
                       use_cache=False)
    assert a.shape == (2, 15)
    assert torch.equal(a, b)


def test_backends_give_the_same_model_output():
    torch.manual_seed(0)
    spec = tiny(n_kv_head=2)
    ref = GPT(spec).eval()
    idx = torch.randint(0, 257, (2, 20))
    out = ref(idx)[0]
    other = GPT(GPTSpec(**{**spec.__dict__, "attention": "sdpa"})).eval()
    other.load_state_dict(ref.state_dict())
    torch.testing.assert_close(other(idx)[0], out, atol=1e-5, rtol=1e-5)
