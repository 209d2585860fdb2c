"""A plain nanoGPT-style GPT: what a researcher would train instead of fatrain.

``model.implementation=reference`` trains this model through fatrain's own loop (same data,
same batches, same optimizer, same metrics), so that fatrain's speed, memory and loss are
always measured beside the alternative in one run (``experiment=vs_nanogpt``).

It is written the way nanoGPT's ``model.py`` is: plain ``nn.Module`` s, one
``F.scaled_dot_product_attention`` call per layer (PyTorch picks the kernel, or
``attention=sdpa_flash|sdpa_cudnn|sdpa_efficient|sdpa_math`` pins one), full logits and
``F.cross_entropy``, and ``torch.compile`` of the whole model when ``trainer.compile=true``.
None of fatrain's kernels (attention, RoPE, loss) run in it.

Its math is fatrain's model, so the two can be compared step for step: rotary positions applied
with plain tensor ops (where nanoGPT learns absolute positions), pre-norm blocks, tanh GELU or
SwiGLU, RMSNorm or LayerNorm, grouped-query attention through SDPA's ``enable_gqa``, tied head,
and nanoGPT's initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 n_layer)).
Its modules have the names and the registration order of ``fatrain.model.GPT``'s, so one seed
gives both the same initial weights and a checkpoint of either loads into the other
(``fatrain-eval`` and ``fatrain-sample`` read a reference run's checkpoints with fatrain's model).
It takes nothing from ``fatrain.model`` but the spec (and the FLOP count of the report): its
initialisation and rotation are written again on purpose, so that the equality of the two,
tested in float64, is a check of fatrain's model and not true by construction.

Not in it (refused by ``check_reference_config``): ALiBi and the other attention variants, RoPE
scaling, windows, document masking, the chunked loss, activation checkpointing, context
parallelism, the KV cache.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

#: attention.backend values the reference takes: SDPA, with PyTorch's choice or one kernel pinned.
SDPA_KERNELS = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}


def check_reference_config(cfg) -> None:
    """ValueError naming the first setting the reference model does not have."""
    m, a, d, t = cfg.model, cfg.attention, cfg.data, cfg.trainer
    if a.backend not in SDPA_KERNELS:
        raise ValueError(f"model.implementation=reference calls PyTorch's SDPA: attention.backend must be one of "
                         f"{', '.join(SDPA_KERNELS)}, got {a.backend}")
    refused = [
        (m.position != "rope", f"model.position={m.position} (it has RoPE only)"),
        (m.attn_softcap > 0, f"model.attn_softcap={m.attn_softcap}"),
        (m.attn_sinks, "model.attn_sinks=true"),
        (m.rope_scaling.type != "none", f"model.rope_scaling.type={m.rope_scaling.type}"),
        (m.rope_reset_per_document, "model.rope_reset_per_document=true"),
        (m.loss_chunk_tokens > 0, f"model.loss_chunk_tokens={m.loss_chunk_tokens}"),
        ((a.window_left, a.window_right) != (-1, -1), "attention.window_left/window_right"),
        (d.document_masking, "data.document_masking=true"),
        (t.activation_checkpointing, "trainer.activation_checkpointing=true"),
        (t.context_parallel > 1, f"trainer.context_parallel={t.context_parallel}"),
    ]
    for bad, setting in refused:
        if bad:
            raise ValueError(f"model.implementation=reference (the plain nanoGPT-style model) does not have "
                             f"{setting}; use model.implementation=fatrain")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, T, H, D) by (T, 1, D/2) tables, the halves rotated as pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, spec, kernel):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = spec.n_head, spec.kv_heads, spec.head_dim
        self.qkv = nn.Linear(spec.n_embd, (spec.n_head + 2 * spec.kv_heads) * spec.head_dim, bias=spec.bias)
        self.proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias)
        self.dropout = spec.attn_dropout
        self.kernel = kernel

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k = rotate(q.view(B, T, H, D), cos, sin), rotate(k.view(B, T, Hkv, D), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, Hkv, D).transpose(1, 2)
        context = contextlib.nullcontext()
        if self.kernel is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            context = sdpa_kernel([getattr(SDPBackend, self.kernel)])
        with context:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=Hkv != H)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.swiglu = spec.mlp == "swiglu"
        self.fc = nn.Linear(spec.n_embd, (2 if self.swiglu else 1) * spec.hidden, bias=spec.bias)
        self.proj = nn.Linear(spec.hidden, spec.n_embd, bias=spec.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(h, approximate="tanh"))


def norm(spec) -> nn.Module:
    return nn.RMSNorm(spec.n_embd, eps=1e-6) if spec.norm == "rmsnorm" else nn.LayerNorm(spec.n_embd, bias=spec.bias)


class Block(nn.Module):
    def __init__(self, spec, kernel):
        super().__init__()
        self.norm1, self.norm2 = norm(spec), norm(spec)
        self.attn = Attention(spec, kernel)
        self.mlp = MLP(spec)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin))
        return x + self.drop(self.mlp(self.norm2(x)))


class ReferenceGPT(nn.Module):
    """The nanoGPT-style model of a ``fatrain.model.GPTSpec`` (the settings check_reference_config allows)."""

    def __init__(self, spec):
        super().__init__()
        if spec.attention not in SDPA_KERNELS:
            raise ValueError(f"the reference model calls SDPA: attention must be one of {', '.join(SDPA_KERNELS)}, "
                             f"got {spec.attention}")
        self.spec = spec
        self.wte = nn.Embedding(spec.padded_vocab, spec.n_embd)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec, SDPA_KERNELS[spec.attention]) for _ in range(spec.n_layer))
        self.norm_f = norm(spec)
        self.lm_head = nn.Linear(spec.n_embd, spec.padded_vocab, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=spec.init_std / math.sqrt(2 * spec.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.spec.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        from fatrain.model import GPT

        return GPT.flops_per_token(self, seq_len, causal)

    def forward(self, idx, targets=None, *, doc_ids=None):
        """(logits, loss). ``doc_ids`` is accepted and unused: the loop passes it, and the settings
        that would use it (document masking, RoPE reset per document) are refused."""
        B, T = idx.shape
        angles = torch.arange(T, device=idx.device, dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm_f(x))[..., :self.spec.vocab_size]
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(-1))
