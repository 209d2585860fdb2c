"""GPT decoder: token embedding, rotary positions, pre-norm blocks, tied output head.

Each block is ``x + attn(norm(x))`` then ``x + mlp(norm(x))``. The attention module owns
the QKV projection, RoPE and the head layout; the inner attention call comes from the
registry in ``fatrain.kernels`` (``attention.backend``), so backends are swapped without
touching the model. Q, K and V stay in the (batch, seqlen, heads, head_dim) layout the
kernels take, so the projection output is never transposed or copied.

Positions (``position``): rotary embeddings (``rope``, the default), ALiBi's linear distance
bias inside the attention call (``alibi``: the paper's slopes for any head count, no RoPE), or
none; no learned positions, so evaluation runs past the training length. With
``rope_reset_per_document`` RoPE positions restart at each document of a packed sequence.
``attn_softcap`` soft-caps the attention scores (c tanh(s / c), Gemma 2) and ``attn_sinks``
gives each layer one learnable sink logit per head (gpt-oss): all three are arguments of the
registry's attention call, and a backend without one is refused when the model is built.
``rope_scaling`` extends a context past the training length (``RopeScaling``: position
interpolation, NTK-aware base scaling, YaRN); it only changes the cos/sin tables, so the
fused kernel and the PyTorch path rotate by the same scaled tables.
A ``KVCache`` serves incremental decoding: new queries attend to every cached key
through the backends' bottom-right-aligned causal mask (seqlen_q != seqlen_k). On CUDA the
cache goes through ``fatrain.kernels.flash_attn.flash_attn_with_kvcache``: the new keys are
written into the preallocated buffers in place and flash_v2 decodes with its split-K kernel
(``kernels/decode.py``); elsewhere, and for a model with an attention variant (which the fused
cache path does not take yet), the backend is called on views of the valid prefix.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fatrain.kernels import available_backends, backend_info, get_backend
from fatrain.kernels._common import alibi_slopes_for

#: model.position: rotary embeddings, ALiBi's distance bias, or no position signal at all.
POSITIONS = ("rope", "alibi", "none")


ROPE_SCALING_TYPES = ("none", "linear", "ntk", "yarn")


@dataclass
class RopeScaling:
    """How RoPE's frequencies are stretched for contexts longer than ``original_seq_len``.

    none:   theta_i = theta^(-2i/d), the trained frequencies.
    linear: position interpolation (Chen et al., 2023): every frequency divided by ``factor``.
    ntk:    NTK-aware scaling (bloc97, 2023): base theta * factor^(d / (d - 2)), so the lowest
            frequency is interpolated by ``factor`` and the highest is kept.
    yarn:   YaRN (Peng et al., 2023, section 3.2 and 3.3; HF transformers'
            ``_compute_yarn_parameters``): frequencies with fewer than ``beta_slow`` rotations over
            ``original_seq_len`` are interpolated by ``factor``, those with more than
            ``beta_fast`` are kept, a linear ramp between; cos and sin are multiplied by the
            attention temperature ``mscale`` (None: 0.1 ln(factor) + 1), which scales the
            logits q.k by mscale^2 (the paper's 1/t with sqrt(1/t) = 0.1 ln(s) + 1).
    """

    type: str = "none"
    factor: float = 1.0
    original_seq_len: int | None = None  # yarn: the training length before extension
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None  # yarn: None is 0.1 * ln(factor) + 1

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"model.rope_scaling.type={self.type!r} is not allowed "
                             f"(choose from: {', '.join(ROPE_SCALING_TYPES)})")
        if self.type == "yarn" and not self.original_seq_len:
            raise ValueError("model.rope_scaling.original_seq_len is required for type=yarn "
                             "(the training length before extension)")

    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (YaRN's temperature; 1 for the other types)."""
        if self.type != "yarn":
            return 1.0
        if self.mscale is not None:
            return float(self.mscale)
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_kernel: str = "auto"  # auto | triton | torch: how Q and K are rotated (same numbers, see uses_kernel)
    position: str = "rope"  # rope | alibi | none (POSITIONS)
    attn_softcap: float = 0.0  # > 0: attention scores become attn_softcap * tanh(s / attn_softcap); 0: off
    attn_sinks: bool = False  # one learnable sink logit per head and layer in each softmax denominator
    loss_kernel: str = "auto"  # auto | triton | torch: how the training loss is computed (the same)
    loss_chunk_tokens: int = 0  # > 0: output head and loss in chunks of this many tokens (no full logits)
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention_options: dict = field(default_factory=dict)  # the backend's own tuning keywords (BackendInfo.options)
    window_size: tuple[int, int] = (-1, -1)
    document_masking: bool = False
    activation_checkpointing: bool = False
    activation_offload: bool = False  # with checkpointing: each block's input waits in host memory

    def __post_init__(self):
        # A spec read back from a checkpoint or a config holds the scaling as a plain mapping.
        if not isinstance(self.rope_scaling, RopeScaling):
            self.rope_scaling = RopeScaling(**dict(self.rope_scaling or {}))

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


def variant_settings(position: str, attn_softcap: float, attn_sinks: bool) -> dict[str, str]:
    """{registry feature: the model setting that asks for it} for the attention variants these
    settings turn on (features of ``fatrain.kernels.FEATURES``)."""
    asked = {}
    if position == "alibi":
        asked["alibi"] = "model.position=alibi"
    if attn_softcap > 0:
        asked["softcap"] = f"model.attn_softcap={attn_softcap}"
    if attn_sinks:
        asked["sinks"] = "model.attn_sinks=true"
    return asked


def check_backend_takes_variants(backend: str, position: str, attn_softcap: float, attn_sinks: bool) -> None:
    """ValueError naming the model setting and the backend when ``backend`` lacks a variant they ask for."""
    info = backend_info(backend)
    for feature, setting in variant_settings(position, attn_softcap, attn_sinks).items():
        if not info.supports(feature):
            takers = [b if "cpu" in backend_info(b).devices else f"{b} (CUDA only)"
                      for b in available_backends() if backend_info(b).supports(feature)]
            raise ValueError(f"{setting} needs an attention backend with {feature}: attention.backend={backend} "
                             f"does not have it (backends with it: {', '.join(takers)})")


def make_norm(spec: GPTSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.n_embd, eps=1e-6)
    return nn.LayerNorm(spec.n_embd, bias=spec.bias)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, device=None) -> torch.Tensor:
    """The (head_dim / 2,) float32 rotation frequencies, with ``scaling`` applied (see RopeScaling)."""
    scaling = scaling or RopeScaling()
    d, s = head_dim, float(scaling.factor)
    if scaling.type == "ntk":
        theta = theta * s ** (d / (d - 2)) if d > 2 else theta * s
    exponents = torch.arange(0, d, 2, device=device, dtype=torch.float32) / d
    inv_freq = 1.0 / (theta ** exponents)
    if scaling.type == "linear":
        inv_freq = inv_freq / s
    elif scaling.type == "yarn":
        low, high = yarn_correction_range(scaling.beta_fast, scaling.beta_slow, d, theta, scaling.original_seq_len)
        if low == high:
            high += 0.001  # NOTE: HF's guard against a zero-width ramp
        ramp = ((torch.arange(d // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolated = 1.0 - ramp  # 1: keep the trained frequency, 0: interpolate it by the factor
        inv_freq = inv_freq / s * (1 - extrapolated) + inv_freq * extrapolated
    return inv_freq


def yarn_correction_range(beta_fast: float, beta_slow: float, head_dim: int, theta: float,
                          original_seq_len: int) -> tuple[float, float]:
    """YaRN's ramp ends: the dimension index (of head_dim / 2 pairs) where a frequency turns
    ``beta_fast`` and ``beta_slow`` times over ``original_seq_len``, floored and ceiled (HF's truncate)."""
    def dim_of(rotations):
        return head_dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = math.floor(dim_of(beta_fast)), math.ceil(dim_of(beta_slow))
    return max(low, 0), min(high, head_dim - 1)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """cos and sin for rotary embeddings at integer positions: (..., T) -> (..., T, 1, head_dim/2),
    with ``scaling``'s frequencies and (YaRN) its attention temperature multiplied in."""
    scaling = scaling or RopeScaling()
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = torch.cos(angles), torch.sin(angles)
    factor = scaling.attention_factor()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos[..., None, :], sin[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, T, H, D); computed in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def uses_kernel(choice: str, x: torch.Tensor, setting: str = "rope_kernel") -> bool:
    """Whether a fused Triton kernel of ``fatrain.kernels`` runs on ``x`` (RoPE's for Q and K,
    the loss's for the logits) or the model's PyTorch ops; both give the same numbers.

    "auto": the kernel for CUDA tensors in float16, bfloat16 or float32, eager or under torch.compile
    (the kernels are torch.library ops that Inductor keeps: its own fusion of these ops was slower
    and kept float32 logits); on the CPU, and for float64 (which the kernels do not take), the
    PyTorch ops (Triton runs on the CPU only interpreted). "triton": always the kernel (an error
    off CUDA unless TRITON_INTERPRET=1). "torch": never.
    """
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    if choice != "auto":
        raise ValueError(f"{setting} must be auto, triton or torch, got {choice!r}")
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


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
    the decode kernel, with the model's ALiBi, soft-cap and sinks); None picks it for CUDA tensors
    of a flash_v2 model (the backend with a decode kernel; other backends attend over the cache's
    valid prefix through their own call)."""

    def __init__(self, spec: GPTSpec, batch: int, max_len: int, device, dtype, fused: bool | None = None):
        shape = (batch, max_len, spec.kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layer)]
        self.length = 0
        self.max_len = max_len
        if fused is None:
            # ALiBi, the soft-cap and sinks go through too (the decode kernel applies them).
            decodes = spec.attention in ("flash_v2", "flash_v2_atomic")
            fused = torch.device(device).type == "cuda" and decodes
        self.fused = fused

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
        # Not saved (persistent=False): the slopes follow from n_head.
        slopes = alibi_slopes_for(spec.n_head) if spec.position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        # float32 whatever the training precision; initialised by GPT._init_weights.
        self.sinks = nn.Parameter(torch.empty(spec.n_head)) if spec.attn_sinks else None

    def variant_kwargs(self) -> dict:
        """The attention call's alibi_slopes, softcap and sink_logits this layer uses."""
        kwargs = {}
        if self.alibi_slopes is not None:
            kwargs["alibi_slopes"] = self.alibi_slopes.float()
        if self.spec.attn_softcap > 0:
            kwargs["softcap"] = self.spec.attn_softcap
        if self.sinks is not None:
            # NOTE: .float() is a no-op for float32 weights; FSDP's bf16 params are cast back here.
            kwargs["sink_logits"] = self.sinks.float()
        return kwargs

    def forward(self, x, cos, sin, doc_ids=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        H, Hkv, D = self.spec.n_head, self.spec.kv_heads, self.spec.head_dim
        qkv = self.qkv(x)
        if cos is None:  # no RoPE (model.position=alibi or none)
            q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        elif uses_kernel(self.spec.rope_kernel, qkv):
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
                                        causal=True, window_size=self.spec.window_size, backend=self.spec.attention,
                                        **self.variant_kwargs())
            return self.proj(y.reshape(B, T, H * D))
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        kwargs = dict(self.spec.attention_options, **self.variant_kwargs())
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


def offloaded_checkpoint(block: nn.Module, x: torch.Tensor, *args):
    """``block(x, *args)`` checkpointed (nothing inside it kept for the backward, which recomputes
    it), with its input ``x`` kept in host memory until then instead of on the device.

    Activation checkpointing alone keeps one (tokens x n_embd) input per block on the device: at a
    million tokens of GPT-2 small, 3 GiB a block in float32. Here that input is copied to pinned
    host memory as the forward passes it (one device-to-host copy a block, ordered on the current
    stream, so the device memory is reused only after the copy), and back to the device when the
    backward reaches the block. Only ``x`` moves: the RoPE tables and masks in ``args``, shared by
    every block, stay where they are.

    NOTE: the reentrant form of torch.utils.checkpoint, because it keeps its inputs through
    ``save_for_backward``, which saved-tensor hooks can move; the non-reentrant form holds them in
    a closure. The reentrant form supports ``loss.backward()`` (what the trainer calls), not
    ``torch.autograd.grad``.
    """
    # NOTE: a weak reference: autograd keeps the pack hook with each saved tensor until the
    # backward, so a pack closing over x itself would keep the device copy alive beside the host one.
    block_input = weakref.ref(x)

    def pack(t):
        if t is not block_input() or t.device.type == "cpu":  # on the CPU the input is in host memory already
            return t
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        host.copy_(t, non_blocking=True)
        return (t.device, host)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return checkpoint(block, x, *args, use_reentrant=True)


class GPT(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        if spec.position not in POSITIONS:
            raise ValueError(f"model.position={spec.position!r} is not allowed (choose from: {', '.join(POSITIONS)})")
        check_backend_takes_variants(spec.attention, spec.position, spec.attn_softcap, spec.attn_sinks)
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
        if isinstance(module, CausalSelfAttention) and module.sinks is not None:
            # As gpt-oss's Hugging Face port initialises its sinks: normal(0, initializer_range).
            nn.init.normal_(module.sinks, mean=0.0, std=self.spec.init_std)

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
        """Logits (B, T, vocab) and, with targets, the cross-entropy loss (with loss_chunk_tokens > 0
        and reduction='mean', the head and loss go chunk by chunk and the logits returned are None).

        doc_ids (B, T) restricts attention to each document when the model was built with
        document masking, and restarts RoPE positions when rope_reset_per_document is set.
        reduction='none' returns the per-token loss (B, T), for evaluation by position.
        positions (T,) or (B, T): the RoPE position of each token, given when idx is a shard of
        a longer sequence (context parallelism: the positions are the full sequence's).
        """
        B, T = idx.shape
        cos = sin = None  # ALiBi or no positions: nothing is rotated
        if self.spec.position == "rope":
            if positions is not None:
                pass
            elif self.spec.rope_reset_per_document and doc_ids is not None:
                positions = positions_from_doc_ids(doc_ids)
            else:
                start = cache.length if cache is not None else 0
                positions = torch.arange(start, start + T, device=idx.device)
            cos, sin = rope_tables(positions, self.spec.head_dim, self.spec.rope_theta, self.spec.rope_scaling)
        mask_ids = doc_ids if (self.spec.document_masking and cache is None) else None
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            if self.spec.activation_checkpointing and self.training:
                x = (offloaded_checkpoint(block, x, cos, sin, mask_ids, None) if self.spec.activation_offload
                     else checkpoint(block, x, cos, sin, mask_ids, None, use_reentrant=False))
            else:
                x = block(x, cos, sin, mask_ids, cache)
        if cache is not None:
            cache.length += T
        x = self.norm_f(x)
        V = self.spec.vocab_size
        if targets is not None and reduction == "mean" and self.spec.loss_chunk_tokens > 0:
            # The head and the loss a chunk of tokens at a time, forward and backward: the full
            # (tokens x vocabulary) logits never exist, so none are returned.
            from fatrain.kernels.chunked_loss import linear_cross_entropy
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, V, self.spec.loss_chunk_tokens)
        padded = self.lm_head(x)
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
        (``fused_cache``: through flash_attn_with_kvcache, see KVCache; None: on CUDA for a flash_v2
        model)."""
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
