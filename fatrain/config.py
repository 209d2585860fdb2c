"""Typed configuration: the dataclasses behind every Hydra config group.

Each group in ``configs/`` (model, attention, data, optim, trainer, logger) is validated
against one dataclass here, registered in Hydra's ConfigStore as ``<group>/schema``. A
misspelt key or a wrong type therefore fails at composition, before any work starts.
Value checks that a type cannot express (a precision name, a positive length) live in
``validate_train_config`` so that the trainer, the evaluator and the tests share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from fatrain.runtime import PRECISIONS

# ----- fatrain-train (and the training config a checkpoint saves)


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: same as n_head (MHA); 1: MQA; else GQA
    n_embd: int = 128
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "gelu"  # gelu | swiglu
    mlp_hidden: Optional[int] = None  # None: 4 * n_embd for gelu, 8/3 * n_embd (rounded) for swiglu
    bias: bool = False
    dropout: float = 0.0  # residual and embedding dropout
    attn_dropout: float = 0.0  # dropout on the attention probabilities, inside the backend
    rope_theta: float = 10000.0
    rope_reset_per_document: bool = False
    rope_kernel: str = "auto"  # auto: the fused Triton kernel on CUDA, PyTorch ops on the CPU | triton | torch
    loss_kernel: str = "auto"  # the training loss: auto (Triton cross-entropy on CUDA) | triton | torch
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class AttentionConfig:
    backend: str = MISSING  # a name from fatrain.kernels.available_backends() (configs/attention/<name>.yaml)
    window_left: int = -1  # sliding window; -1 means unlimited
    window_right: int = -1
    # The backends' own tuning keywords (fatrain.kernels.all_options()); None leaves each to the
    # backend. Which backend takes which is the registry's to say: a setting given to a backend
    # that does not take it fails before any work starts (fatrain.kernels.check_options).
    block_m: Optional[int] = None  # fixed query-block size instead of autotuning
    block_n: Optional[int] = None  # fixed key-block size instead of autotuning
    sram_bytes: Optional[int] = None  # on-chip memory budget M in bytes, from which the blocks follow
    num_splits: Optional[int] = None  # programs per (batch, head); 1 = FlashAttention-1's grid
    deterministic: Optional[bool] = None  # False: dQ accumulated with atomics (faster, not bit-reproducible)


@dataclass
class DataConfig:
    name: str = "tinyshakespeare"
    source: str = "text"  # text: local files | hf: a Hugging Face Hub dataset by name
    path: Optional[str] = None  # text: a file, a folder of .txt files, or a glob; None: the embedded corpus
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    text_field: str = "text"
    document_separator: Optional[str] = None  # text: split files into documents at this string
    tokenizer: str = "byte"  # byte | an HF tokenizer name or local path
    seq_len: int = 256
    val_fraction: float = 0.1
    cache_dir: Optional[str] = None  # None: ~/.cache/fatrain
    document_masking: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 disables clipping
    fused: Optional[bool] = None  # None: fused AdamW where the device supports it


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-step (per rank)
    tokens_per_step: Optional[int] = None  # if set, batch_size = tokens_per_step / (seq_len * grad_accum_steps * ranks)
    grad_accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "single"  # single | ddp | fsdp (launch ddp/fsdp with torchrun)
    dist_backend: str = "auto"  # auto | nccl | gloo (auto: nccl on GPUs, gloo on the CPU)
    dist_timeout_s: int = 600  # a collective waiting longer than this fails the job
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic validation (one still runs at the end)
    eval_batches: int = 20
    ckpt_every: int = 500  # 0: only at the end
    save_final: bool = True  # false: no checkpoint at the end (throughput sweeps)
    keep_last: int = 3
    peak_tflops: Optional[float] = None  # None: from the table of known GPUs
    progress_bar: bool = True


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "fatrain"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    jsonl: bool = True
    console: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    resume: Optional[str] = None  # None: fresh start | auto: latest checkpoint in the run dir | a path


SCHEDULES = ("cosine", "constant")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("gelu", "swiglu")
STRATEGIES = ("single", "ddp", "fsdp")
WANDB_MODES = ("online", "offline", "disabled")
DATA_SOURCES = ("text", "hf")
KERNEL_CHOICES = ("auto", "triton", "torch")


def _choice(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed (choose from: {', '.join(allowed)})")


def _positive(value, key, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate_train_config(cfg) -> None:
    """Check the values that types cannot; raise ValueError naming the key and what is allowed."""
    from fatrain.kernels import available_backends

    m, a, d, o, t = cfg.model, cfg.attention, cfg.data, cfg.optim, cfg.trainer
    _choice(a.backend, available_backends(), "attention.backend")
    _choice(m.norm, NORMS, "model.norm")
    _choice(m.mlp, MLPS, "model.mlp")
    _choice(m.rope_kernel, KERNEL_CHOICES, "model.rope_kernel")
    _choice(m.loss_kernel, KERNEL_CHOICES, "model.loss_kernel")
    for key in ("n_layer", "n_head", "n_embd"):
        _positive(getattr(m, key), f"model.{key}")
    if m.n_embd % m.n_head:
        raise ValueError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if m.n_kv_head is not None and (m.n_kv_head <= 0 or m.n_head % m.n_kv_head):
        raise ValueError(f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head}")
    for key in ("dropout", "attn_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ValueError(f"model.{key}={getattr(m, key)} must be in [0, 1)")
    _choice(d.source, DATA_SOURCES, "data.source")
    _positive(d.seq_len, "data.seq_len")
    if not 0.0 < d.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    _positive(o.lr, "optim.lr")
    _positive(o.warmup_steps, "optim.warmup_steps", allow_zero=True)
    _choice(t.precision, PRECISIONS, "trainer.precision")
    _choice(t.strategy, STRATEGIES, "trainer.strategy")
    _choice(t.dist_backend, ("auto", "nccl", "gloo"), "trainer.dist_backend")
    _positive(t.dist_timeout_s, "trainer.dist_timeout_s")
    for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "eval_batches", "keep_last"):
        _positive(getattr(t, key), f"trainer.{key}")
    if t.tokens_per_step is not None:
        _positive(t.tokens_per_step, "trainer.tokens_per_step")
    _choice(cfg.logger.wandb.mode, WANDB_MODES, "logger.wandb.mode")


def register_train_configs(cs) -> None:
    """fatrain-train's schemas: the composed config and one per group."""
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="schema", node=ModelConfig, package="model")
    cs.store(group="attention", name="schema", node=AttentionConfig, package="attention")
    cs.store(group="data", name="schema", node=DataConfig, package="data")
    cs.store(group="optim", name="schema", node=OptimConfig, package="optim")
    cs.store(group="trainer", name="schema", node=TrainerConfig, package="trainer")
    cs.store(group="logger", name="schema", node=LoggerConfig, package="logger")


def register_configs() -> None:
    """Register every entry point's schemas with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    register_train_configs(cs)
