"""GPT decoder: token embedding, rotary positions, pre-norm blocks, tied output head.

Each block is ``x + attn(norm(x))`` then ``x + mlp(norm(x))``. The attention module owns
the QKV projection, RoPE and the head layout; the inner attention call comes from the
registry in ``fatrain.kernels`` (``attention.backend``), so backends are swapped without
touching the model. Q, K and V stay in the (batch, seqlen, heads, head_dim) layout the
kernels take, so the projection output is never transposed or copied.

Rotary embeddings (no learned positions) let evaluation run past the training length.
With ``rope_reset_per_document`` positions restart at each document of a packed sequence.
A ``KVCache`` serves incremental decoding: new queries attend to every cached key
through the backends' bottom-right-aligned causal mask (seqlen_q != seqlen_k). On CUDA the
cache goes through ``fatrain.kernels.flash_attn.flash_attn_with_kvcache``: the new keys are
written into the preallocated buffers in place and flash_v2 decodes with its split-K kernel
(``kernels/decode.py``); elsewhere the backend is called on views of the valid prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fatrain.kernels import get_backend


@dataclass
class GPTSpec:
    """Everything that fixes the model's shapes and computation (saved in checkpoints)."""

    vocab_size: int
    attention: str  # a name from fatrain.kernels.available_backends()
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    n_embd: int = 128
    norm: str = "rmsnorm"
    mlp: str = "gelu"
    mlp_hidden: int | None = None
    bias: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_reset_per_document: bool = False
    rope_kernel: str = "auto"  # auto | triton | torch: how Q and K are rotated (same numbers, see uses_kernel)
    loss_kernel: str = "auto"  # auto | triton | torch: how the training loss is computed (the same)
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention_options: dict = field(default_factory=dict)  # the backend's own tuning keywords (BackendInfo.options)
    window_size: tuple[int, int] = (-1, -1)
    document_masking: bool = False
    activation_checkpointing: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            # 2/3 of 4x keeps the parameter count of a GELU MLP; rounded up to a multiple of 64.
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        # NOTE: a multiple of 64 keeps the embedding and head matmuls on fast tensor-core shapes.
        return 64 * math.ceil(self.vocab_size / 64)


def make_norm(spec: GPTSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.n_embd, eps=1e-6)
    return nn.LayerNorm(spec.n_embd, bias=spec.bias)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin for rotary embeddings at integer positions: (..., T) -> (..., T, 1, head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cos(angles)[..., None, :], torch.sin(angles)[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, T, H, D); computed in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def uses_kernel(choice: str, x: torch.Tensor, setting: str = "rope_kernel") -> bool:
    """Whether a fused Triton kernel of ``fatrain.kernels`` runs on ``x`` (RoPE's for Q and K,
    the loss's for the logits) or the model's PyTorch ops; both give the same numbers.

    "auto": the kernel for CUDA tensors, eager or under torch.compile (the kernels are torch.library
    ops that Inductor keeps: its own fusion of these ops was slower and kept float32 logits); on
    the CPU the PyTorch ops (Triton runs there only interpreted). "triton": always the kernel (an
    error off CUDA unless TRITON_INTERPRET=1). "torch": never.
    """
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    if choice != "auto":
        raise ValueError(f"{setting} must be auto, triton or torch, got {choice!r}")
    return x.is_cuda


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its own document, for (B, T) document ids."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start_idx


class KVCache:
    """Keys and values of every layer for incremental decoding: (B, max_len, Hkv, D) each,
    preallocated. ``fused``: attend through ``flash_attn_with_kvcache`` (append in place, then
    the decode kernel); None picks it for CUDA tensors."""

    def __init__(self, spec: GPTSpec, batch: int, max_len: int, device, dtype, fused: bool | None = None):
        shape = (batch, max_len, spec.kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layer)]
        self.length = 0
        self.max_len = max_len
        self.fused = torch.device(device).type == "cuda" if fused is None else fused

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: GPTSpec, layer: int):
        super().__init__()
        self.spec, self.layer = spec, layer
        D = spec.head_dim
        self.qkv = nn.Linear(spec.n_embd, (spec.n_head + 2 * spec.kv_heads) * D, bias=spec.bias)
        self.proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias)
        self.attn = get_backend(spec.attention)

    def forward(self, x, cos, sin, doc_ids=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        H, Hkv, D = self.spec.n_head, self.spec.kv_heads, self.spec.head_dim
        qkv = self.qkv(x)
        if uses_kernel(self.spec.rope_kernel, qkv):
            from fatrain.kernels.rope import rope_qkv
            q, k, v = rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, Hkv)
        else:
            q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and cache.fused:
            from fatrain.kernels.flash_attn import flash_attn_with_kvcache
            dtype = cache.k[self.layer].dtype
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            y = flash_attn_with_kvcache(q, cache.k[self.layer], cache.v[self.layer], k, v, cache_seqlens=cache.length,
                                        causal=True, window_size=self.spec.window_size, backend=self.spec.attention)
            return self.proj(y.reshape(B, T, H * D))
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        kwargs = dict(self.spec.attention_options)
        if self.spec.window_size != (-1, -1):
            kwargs["window_size"] = self.spec.window_size
        if doc_ids is not None:
            kwargs["doc_ids"] = doc_ids
        if self.training and self.spec.attn_dropout > 0:
            kwargs["dropout_p"] = self.spec.attn_dropout
        y = self.attn(q, k, v, causal=True, **kwargs)
        return self.proj(y.reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        self.swiglu = spec.mlp == "swiglu"
        self.fc = nn.Linear(spec.n_embd, (2 if self.swiglu else 1) * spec.hidden, bias=spec.bias)
        self.proj = nn.Linear(spec.hidden, spec.n_embd, bias=spec.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, spec: GPTSpec, layer: int):
        super().__init__()
        self.norm1, self.norm2 = make_norm(spec), make_norm(spec)
        self.attn = CausalSelfAttention(spec, layer)
        self.mlp = MLP(spec)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, doc_ids, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.padded_vocab, spec.n_embd)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec, i) for i in range(spec.n_layer))
        self.norm_f = make_norm(spec)
        self.lm_head = nn.Linear(spec.n_embd, spec.padded_vocab, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
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
        if non_embedding:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus the attention matmuls.

        N counts every matmul weight: the blocks and the output head (tied or not), but not
        the embedding lookup, which does no multiply-adds. Attention does QK^T and PV,
        2 * 2 * T * n_embd FLOPs per token and layer forward, x3 for forward + backward,
        halved when causal (PaLM appendix B; nanoGPT's estimate_mfu).
        """
        attn = 12 * self.spec.n_layer * self.spec.n_embd * seq_len
        if causal:
            attn //= 2
        matmul_params = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        if not self.spec.tie_embeddings:
            matmul_params -= self.lm_head.weight.numel()  # already counted in num_params
        return 6 * matmul_params + attn

    def forward(self, idx, targets=None, *, doc_ids=None, cache: KVCache | None = None, reduction="mean",
                positions=None):
        """Logits (B, T, vocab) and, with targets, the cross-entropy loss.

        doc_ids (B, T) restricts attention to each document when the model was built with
        document masking, and restarts RoPE positions when rope_reset_per_document is set.
        reduction='none' returns the per-token loss (B, T), for evaluation by position.
        positions (T,) or (B, T): the RoPE position of each token, given when idx is a shard of
        a longer sequence (context parallelism: the positions are the full sequence's).
        """
        B, T = idx.shape
        if positions is not None:
            pass
        elif self.spec.rope_reset_per_document and doc_ids is not None:
            positions = positions_from_doc_ids(doc_ids)
        else:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=idx.device)
        cos, sin = rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
        mask_ids = doc_ids if (self.spec.document_masking and cache is None) else None
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            if self.spec.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask_ids, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask_ids, cache)
        if cache is not None:
            cache.length += T
        x = self.norm_f(x)
        padded = self.lm_head(x)
        V = self.spec.vocab_size
        # NOTE: no slice when nothing is padded: a slice's backward copies the whole gradient.
        logits = padded if V == padded.shape[-1] else padded[..., :V]
        if targets is None:
            return logits, None
        if reduction == "mean" and uses_kernel(self.spec.loss_kernel, padded, "loss_kernel"):
            # One Triton pass each way over the logits in their dtype (no float32 copies of
            # tokens x vocabulary); the padding columns stay out of the softmax.
            from fatrain.kernels.cross_entropy import cross_entropy
            return logits, cross_entropy(padded, targets, V)
        loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(-1), reduction=reduction)
        if reduction == "none":
            loss = loss.view(B, T)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, fused_cache: bool | None = None):
        """Sample continuations of idx (B, T); with use_cache, one KV cache step per new token
        (``fused_cache``: through flash_attn_with_kvcache, see KVCache; None: on CUDA)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        cache = None
        if use_cache:
            dtype = self.wte.weight.dtype
            if torch.is_autocast_enabled(idx.device.type):
                # The keys and values come out of the projections in the autocast dtype: so does the cache.
                dtype = torch.get_autocast_dtype(idx.device.type)
            cache = KVCache(self.spec, idx.shape[0], idx.shape[1] + max_new_tokens, idx.device, dtype, fused_cache)
        logits, _ = self(idx, cache=cache)
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits.float(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            logits, _ = self(nxt, cache=cache) if use_cache else self(idx)
        return idx
