"""Typed configuration: the dataclasses behind every Hydra config group.

Each group in ``configs/`` (model, attention, data, optim, trainer, logger) is validated
against one dataclass here, registered in Hydra's ConfigStore as ``<group>/schema``. A
misspelt key or a wrong type therefore fails at composition, before any work starts.
Value checks that a type cannot express (a precision name, a positive length) live in
``validate_train_config`` (and its eval, sample and bench siblings) so that the trainer, the
evaluator and the tests share them: every numeric setting has a ``Range`` in one table per
entry point (``TRAIN_RANGES``, ...), which also says what its sentinels (-1, 0, null) mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Optional, get_type_hints

from omegaconf import MISSING

from fatrain.runtime import PRECISIONS

# ----- fatrain-train (and the training config a checkpoint saves)


@dataclass
class RopeScalingConfig:
    """RoPE scaling for contexts past the training length (fatrain.model.RopeScaling has the formulas)."""

    type: str = "none"  # none | linear (position interpolation) | ntk (NTK-aware base) | yarn
    factor: float = 1.0  # how many times the trained context is stretched
    original_seq_len: Optional[int] = None  # yarn: the training length before extension
    beta_fast: float = 32.0  # yarn: frequencies turning more often than this over original_seq_len are kept
    beta_slow: float = 1.0  # yarn: those turning less often are interpolated by factor
    mscale: Optional[float] = None  # yarn's attention temperature on cos/sin; None: 0.1 * ln(factor) + 1


@dataclass
class ModelConfig:
    name: str = "tiny"
    # fatrain: fatrain.model.GPT; reference: the plain nanoGPT-style model of the same shapes
    # (fatrain.reference_gpt), to measure fatrain beside it
    implementation: str = "fatrain"
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
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    rope_kernel: str = "auto"  # auto: the fused Triton kernel on CUDA, PyTorch ops on the CPU | triton | torch
    loss_kernel: str = "auto"  # the training loss: auto (Triton cross-entropy on CUDA) | triton | torch
    loss_chunk_tokens: int = 0  # > 0: the output head and loss in chunks of this many tokens, never the full logits
    position: str = "rope"  # rope | alibi (the paper's slopes, in the attention call) | none
    attn_softcap: float = 0.0  # > 0: attention scores soft-capped to attn_softcap * tanh(s / attn_softcap); 0: off
    attn_sinks: bool = False  # learnable sink logits, one per head and layer (no weight decay)
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
    num_proc: Optional[int] = None  # tokenisation processes; None: the CPUs available
    shard_tokens: int = 268435456  # tokens per token-store shard file (2**28)
    min_doc_tokens: int = 0  # keep only documents with at least this many tokens (EOT included); 0: all
    packing: str = "concat"  # concat: blocks start anywhere | doc_start: blocks lie inside one document, from its start
    streaming: bool = False  # data.source=hf: tokenise a streamed IterableDataset on the fly (no token store)
    streaming_val_tokens: int = 65536  # streaming: validation is the stream's first documents up to this many tokens


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
    # With activation_checkpointing: each block's input waits for the backward in pinned host memory,
    # not on the device (a copy each way per block and step).
    activation_offload: bool = False
    # > 0: torch.profiler records steps profile_start .. profile_start + profile_steps - 1 and writes
    # <run>/profile/ (trace.json, kernels.csv, kernels.txt; fatrain.profiling)
    profile_start: int = 0
    profile_steps: int = 3
    strategy: str = "single"  # single | ddp | fsdp (launch ddp/fsdp with torchrun)
    dist_backend: str = "auto"  # auto | nccl | gloo (auto: nccl on GPUs, gloo on the CPU)
    dist_timeout_s: int = 600  # a collective waiting longer than this fails the job
    context_parallel: int = 1  # ranks that split each sequence (fatrain.context_parallel); data parallel = ranks / it
    cp_strategy: str = "ring"  # ring (K/V rotate, logsumexp merge) | ulysses (all-to-all over heads)
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
    # A step whose loss or gradient norm is not finite: stop (exit 2, status "nonfinite", no checkpoint of
    # it) | skip_step (its update is not applied; counted as train/skipped_steps).
    on_nonfinite: str = "stop"


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
class ExtensionConfig:
    """What ``fatrain-extend`` chains after training a config (fatrain-train itself ignores it): fine-tune
    the trained model at ``factor`` times its length once per RoPE scaling type (init_from), then
    evaluate the trained model and every fine-tuned one at ``eval_multiples`` of the trained length."""

    factor: float = 4.0  # the fine-tuned length is factor x data.seq_len, and the scaling's factor
    types: list[str] = field(default_factory=lambda: ["none", "linear", "ntk", "yarn"])
    finetune_steps: int = 200
    finetune_lr: float = 1e-4
    finetune_warmup_steps: int = 20
    eval_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # of data.seq_len
    eval_batches: int = 20
    eval_batch_size: Optional[int] = None  # None: each run's trainer.batch_size
    long_documents: bool = False  # loss by position on documents at least the evaluated length only
    tasks: list[str] = field(default_factory=lambda: ["passkey", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                                      "variable_tracking", "common_words", "frequent_words"])
    trials: int = 10  # prompts per task cell
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    resume: Optional[str] = None  # None: fresh start | auto: latest checkpoint in the run dir | a path
    # A fresh run from another run's weights (a checkpoint or a run folder: its newest); optimizer and
    # step start anew, and any setting that keeps the weights' shapes may differ (seq_len, rope scaling, lr).
    init_from: Optional[str] = None
    extension: ExtensionConfig = field(default_factory=ExtensionConfig)  # fatrain-extend's chain (see there)


SCHEDULES = ("cosine", "constant")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("gelu", "swiglu")
STRATEGIES = ("single", "ddp", "fsdp")
WANDB_MODES = ("online", "offline", "disabled")
DATA_SOURCES = ("text", "hf")
PACKINGS = ("concat", "doc_start")
KERNEL_CHOICES = ("auto", "triton", "torch")
NONFINITE_ACTIONS = ("stop", "skip_step")


def _choice(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed (choose from: {', '.join(allowed)})")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting allows: ``lo``..``hi`` (None: unbounded at that end), each end
    closed unless marked open, always finite (inf and nan are refused), optionally powers of two;
    ``special`` lists the values with a meaning of their own (``(-1, "unlimited")``, ``(None,
    "autotune")``), allowed whether or not they fall in the range and named in the message."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    pow2: bool = False
    special: tuple = ()

    def allows(self, value) -> bool:
        return value in [special for special, _ in self.special] or self._in_range(value)

    def _in_range(self, value) -> bool:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return not self.pow2 or (value == int(value) and int(value) & (int(value) - 1) == 0)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {self.hi}"
        else:
            text = "a finite number"
        if self.pow2:
            text = f"a power of two {text}"
        # A special value inside the range is a note on its meaning; outside it, an alternative.
        for value, meaning in self.special:
            name = "null" if value is None else value
            text += f" ({name}: {meaning})" if self._in_range(value) else f", or {name} ({meaning})"
        return text


def check_ranges(cfg, ranges: dict[str, Range]) -> None:
    """Check every ``key: Range`` of ``ranges`` in ``cfg`` (a dotted key; a list is checked element by
    element, a mapping value by value); a key that is absent or null where null has no meaning of
    its own is skipped (the schema decides whether null is allowed). Raise ValueError naming the key."""
    from omegaconf import DictConfig, OmegaConf

    for key, allowed in ranges.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        if isinstance(value, (dict, DictConfig)):
            items = [(v, f"{key}.{name}={v}") for name, v in value.items()]
        elif isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            items = [(v, f"{key}={list(value)} holds {v}, but each value") for v in value]
        else:
            items = [(value, f"{key}={value}")]
        for v, what in items:
            if not allowed.allows(v):
                finite = "finite and " if isinstance(v, float) and not math.isfinite(v) else ""
                raise ValueError(f"{what} must be {finite}{allowed.describe()}")


POSITIVE = Range(lo=0, lo_open=True)  # > 0
NON_NEGATIVE = Range(lo=0)  # >= 0
PROBABILITY = Range(lo=0.0, hi=1.0, hi_open=True)  # a dropout rate, an Adam beta: [0, 1)
#: numpy's seed range (np.random.seed, SeedSequence); torch's is wider.
SEED = Range(lo=0, hi=2**32 - 1)

#: Every numeric setting of fatrain-train and its allowed values.
TRAIN_RANGES: dict[str, Range] = {
    "model.n_layer": POSITIVE,
    "model.n_head": POSITIVE,
    "model.n_kv_head": Range(lo=0, lo_open=True, special=((None, "same as model.n_head"),)),
    "model.n_embd": POSITIVE,
    "model.vocab_size": Range(lo=0, lo_open=True, special=((None, "the tokenizer's"),)),
    "model.mlp_hidden": Range(lo=0, lo_open=True, special=((None, "from model.n_embd"),)),
    "model.dropout": PROBABILITY,
    "model.attn_dropout": PROBABILITY,
    "model.rope_theta": POSITIVE,
    "model.attn_softcap": Range(lo=0, special=((0, "off"),)),
    "model.loss_chunk_tokens": Range(lo=0, special=((0, "the full logits"),)),
    "model.rope_scaling.factor": Range(lo=1.0),
    "model.rope_scaling.original_seq_len": Range(lo=0, lo_open=True, special=((None, "unset; yarn needs it"),)),
    "model.rope_scaling.beta_fast": POSITIVE,
    "model.rope_scaling.beta_slow": POSITIVE,
    "model.rope_scaling.mscale": Range(lo=0, lo_open=True, special=((None, "0.1 * ln(factor) + 1"),)),
    "model.init_std": POSITIVE,
    "attention.window_left": Range(lo=0, special=((-1, "unlimited"),)),
    "attention.window_right": Range(lo=0, special=((-1, "unlimited"),)),
    "attention.block_m": Range(lo=16, hi=256, pow2=True, special=((None, "autotune"),)),
    "attention.block_n": Range(lo=16, hi=256, pow2=True, special=((None, "autotune"),)),
    "attention.sram_bytes": Range(lo=0, lo_open=True, special=((None, "the GPU's shared memory"),)),
    "attention.num_splits": Range(lo=0, special=((0, "from the GPU's SM count"), (None, "the backend's default"))),
    "data.seq_len": POSITIVE,
    "data.val_fraction": Range(lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    "data.num_proc": Range(lo=0, lo_open=True, special=((None, "the CPUs available"),)),
    "data.shard_tokens": POSITIVE,
    "data.min_doc_tokens": Range(lo=0, special=((0, "every document"),)),
    "data.streaming_val_tokens": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": PROBABILITY,
    "optim.beta2": PROBABILITY,
    "optim.eps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.grad_clip": Range(lo=0, special=((0, "no clipping"),)),
    "trainer.max_steps": POSITIVE,
    "trainer.profile_start": Range(lo=0, special=((0, "no profile"),)),
    "trainer.profile_steps": POSITIVE,
    "trainer.batch_size": POSITIVE,
    "trainer.tokens_per_step": Range(lo=0, lo_open=True, special=((None, "from trainer.batch_size"),)),
    "trainer.grad_accum_steps": POSITIVE,
    "trainer.dist_timeout_s": POSITIVE,
    "trainer.context_parallel": POSITIVE,
    "trainer.seed": SEED,
    "trainer.log_every": POSITIVE,
    "trainer.eval_every": Range(lo=0, special=((0, "only the final validation"),)),
    "trainer.eval_batches": POSITIVE,
    "trainer.ckpt_every": Range(lo=0, special=((0, "only the final checkpoint"),)),
    "trainer.keep_last": POSITIVE,
    "trainer.peak_tflops": Range(lo=0, lo_open=True, special=((None, "from the table of known GPUs"),)),
    "extension.factor": Range(lo=1.0, lo_open=True),
    "extension.finetune_steps": POSITIVE,
    "extension.finetune_lr": POSITIVE,
    "extension.finetune_warmup_steps": NON_NEGATIVE,
    "extension.eval_multiples": POSITIVE,
    "extension.eval_batches": POSITIVE,
    "extension.eval_batch_size": Range(lo=0, lo_open=True, special=((None, "each run's trainer.batch_size"),)),
    "extension.trials": POSITIVE,
    "extension.depths": Range(lo=0.0, hi=1.0),
}


def validate_train_config(cfg) -> None:
    """Check the values that types cannot; raise ValueError naming the key and what is allowed."""
    from fatrain.cli_help import refuse_internal_choices
    from fatrain.kernels import all_options, available_backends, check_options
    from fatrain.model import POSITIONS, check_backend_takes_variants

    refuse_internal_choices()  # attention=schema and the like: a group's dataclass, not a choice
    m, a, d, o, t = cfg.model, cfg.attention, cfg.data, cfg.optim, cfg.trainer
    _choice(a.backend, available_backends(), "attention.backend")
    _choice(m.norm, NORMS, "model.norm")
    _choice(m.mlp, MLPS, "model.mlp")
    _choice(m.rope_kernel, KERNEL_CHOICES, "model.rope_kernel")
    _choice(m.loss_kernel, KERNEL_CHOICES, "model.loss_kernel")
    _choice(m.position, POSITIONS, "model.position")
    _choice(m.implementation, ("fatrain", "reference"), "model.implementation")
    check_ranges(cfg, TRAIN_RANGES)
    if m.rope_reset_per_document and m.position != "rope":
        raise ValueError(f"model.rope_reset_per_document=true needs model.position=rope, got {m.position}")
    check_backend_takes_variants(a.backend, m.position, m.attn_softcap, m.attn_sinks)
    validate_rope_scaling(m.rope_scaling)
    if m.n_embd % m.n_head:
        raise ValueError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if m.n_kv_head is not None and m.n_head % m.n_kv_head:
        raise ValueError(f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head}")
    if o.min_lr > o.lr:
        raise ValueError(f"optim.min_lr={o.min_lr} must be <= optim.lr={o.lr} (the schedule decays to it)")
    check_options(a.backend, {key: a[key] for key in all_options() if key in a})
    _choice(d.source, DATA_SOURCES, "data.source")
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    _choice(t.precision, PRECISIONS, "trainer.precision")
    _choice(t.strategy, STRATEGIES, "trainer.strategy")
    _choice(t.on_nonfinite, NONFINITE_ACTIONS, "trainer.on_nonfinite")
    _choice(t.dist_backend, ("auto", "nccl", "gloo"), "trainer.dist_backend")
    from fatrain.context_parallel import check_context_parallel_config

    check_context_parallel_config(cfg)
    if m.implementation == "reference":
        from fatrain.reference_gpt import check_reference_config

        check_reference_config(cfg)
    if t.activation_offload and not t.activation_checkpointing:
        raise ValueError("trainer.activation_offload=true needs trainer.activation_checkpointing=true "
                         "(what moves to host memory is each checkpointed block's input)")
    if t.activation_offload and t.strategy != "single":
        # NOTE: offload rides on reentrant checkpointing, whose backward DDP's and FSDP2's hooks
        # do not expect; one process is what it is for (a context beyond one GPU's memory).
        raise ValueError(f"trainer.activation_offload=true runs with trainer.strategy=single, got {t.strategy}")
    _choice(cfg.logger.wandb.mode, WANDB_MODES, "logger.wandb.mode")


def validate_rope_scaling(r) -> None:
    """The checks of model.rope_scaling.* that a range cannot make (it runs after check_ranges)."""
    from fatrain.model import ROPE_SCALING_TYPES

    _choice(r.type, ROPE_SCALING_TYPES, "model.rope_scaling.type")
    if r.type == "yarn" and r.original_seq_len is None:
        raise ValueError("model.rope_scaling.original_seq_len is required for model.rope_scaling.type=yarn "
                         "(the training length before extension)")
    if r.type == "yarn" and r.beta_fast <= r.beta_slow:
        raise ValueError(f"model.rope_scaling.beta_fast={r.beta_fast} must be > model.rope_scaling.beta_slow="
                         f"{r.beta_slow}")


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

    from fatrain.cli_help import register_help_resolver

    register_help_resolver()  # configs/hydra/help/*.yaml list each script's groups through it
    cs = ConfigStore.instance()
    register_train_configs(cs)
    register_eval_configs(cs)
    register_bench_configs(cs)


# ----- fatrain-eval and fatrain-sample


def _overrides_of(cls):
    """A dataclass with ``cls``'s fields, each Optional and None by default: None = the checkpoint's
    (a nested dataclass becomes its own overrides, so ``model.rope_scaling.type=yarn`` sets one key)."""
    hints = get_type_hints(cls)
    members = []
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            nested = _overrides_of(hints[f.name])
            members.append((f.name, nested, field(default_factory=nested)))
        else:
            members.append((f.name, Optional[hints[f.name]], field(default=None)))
    return make_dataclass(f"{cls.__name__}Overrides", members)


ModelOverrides = _overrides_of(ModelConfig)
AttentionOverrides = _overrides_of(AttentionConfig)
DataOverrides = _overrides_of(DataConfig)

EVAL_SPLITS = ("val", "train")


@dataclass
class EvalSettings:
    split: str = "val"  # val | train: which split of the corpus to evaluate
    seq_lens: list[int] = field(default_factory=list)  # empty: data.seq_len (the checkpoint's unless overridden)
    batch_size: Optional[int] = None  # None: the checkpoint's trainer.batch_size
    batches: Optional[int] = 20  # at most this many batches per length; None: the whole split
    bucket_size: int = 64  # width of the position buckets of the loss-vs-position curve
    backends: list[str] = field(default_factory=list)  # backend agreement: registry names, e.g. [naive, sdpa]
    agreement_batches: int = 1  # batches per backend for the agreement check (always fp32)
    agreement_tolerance: float = 1e-4
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    all_checkpoints: bool = False  # run or sweep folders: every checkpoint, not only each run's newest
    plots: bool = True
    # RULER-style tasks (fatrain.eval.tasks.TASKS), scored by greedy decoding; settings under ruler.*
    tasks: list[str] = field(default_factory=list)
    # Loss by position on long documents only: blocks that lie inside one document of at least the
    # evaluated length (eval.seq_lens), so the curve measures context use, not document boundaries.
    long_documents: bool = False


@dataclass
class PasskeySettings:
    enabled: bool = False  # the probe runs when asked for: passkey.enabled=true
    context_lens: list[int] = field(default_factory=list)  # empty: the evaluated lengths
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 10  # tasks per (context, depth) cell
    seed: int = 0
    key_digits: int = 5


@dataclass
class RulerSettings:
    """The generators of eval.tasks (fatrain.eval.tasks has what each one builds)."""

    context_lens: list[int] = field(default_factory=list)  # empty: the evaluated lengths
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # the needle tasks
    trials: int = 10  # prompts per (task, context, depth) cell
    seed: int = 0
    value_digits: int = 7  # digits of the pass keys, magic numbers and variable values
    num_needles: int = 4  # niah_multikey: needles in all, one of them asked for
    num_values: int = 4  # niah_multivalue: values of the one key
    num_queries: int = 4  # niah_multiquery: keys asked for
    num_hops: int = 4  # variable_tracking: assignments after the first
    num_common: int = 4  # common_words: words asked for
    common_freq: int = 10  # common_words: times each common word is listed
    rare_freq: int = 3  # common_words: times each other word is listed
    zipf_alpha: float = 2.0  # frequent_words: exponent of the word distribution
    num_frequent: int = 3  # frequent_words: words asked for
    vocab_words: int = 200  # frequent_words: distinct words the stream draws from


@dataclass
class EvalWandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: Optional[str] = None  # None: the training run's
    entity: Optional[str] = None
    name: Optional[str] = None  # None: eval-<run>-step<N>
    group: Optional[str] = None  # None: the training run's group, so the eval job sits next to it
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalLoggerConfig:
    wandb: EvalWandbConfig = field(default_factory=EvalWandbConfig)


@dataclass
class EvalConfig:
    ckpt_path: str = MISSING  # a checkpoint file, a run folder, or a sweep (multirun) folder
    # model.*, attention.*, data.*: overrides of the checkpoint's settings; null keeps the checkpoint's.
    # attention=<name> and data=<name> select a whole group file instead (Any: either schema fits).
    model: ModelOverrides = field(default_factory=ModelOverrides)
    attention: Any = None
    data: Any = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    passkey: PasskeySettings = field(default_factory=PasskeySettings)
    ruler: RulerSettings = field(default_factory=RulerSettings)
    logger: EvalLoggerConfig = field(default_factory=EvalLoggerConfig)


@dataclass
class SampleConfig:
    ckpt_path: str = MISSING  # a checkpoint file, or a run folder (its newest checkpoint)
    prompt: str = ""  # empty: start a new document (after an end-of-text token)
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0: greedy
    top_k: Optional[int] = 200  # None: no top-k filter
    seed: int = 1337
    num_samples: int = 1
    use_cache: bool = True  # KV cache decoding; false recomputes the whole sequence each step
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16
    attention: Any = None  # attention.backend=<name>: another backend (the checkpoint's otherwise)


#: The model, attention and data overrides of fatrain-eval and fatrain-sample allow what training does.
_OVERRIDE_RANGES = {key: r for key, r in TRAIN_RANGES.items() if key.split(".")[0] in ("model", "attention", "data")}

EVAL_RANGES: dict[str, Range] = {
    **_OVERRIDE_RANGES,
    "eval.seq_lens": POSITIVE,
    "eval.batch_size": Range(lo=0, lo_open=True, special=((None, "the checkpoint's trainer.batch_size"),)),
    "eval.batches": Range(lo=0, lo_open=True, special=((None, "the whole split"),)),
    "eval.bucket_size": POSITIVE,
    "eval.agreement_batches": POSITIVE,
    "eval.agreement_tolerance": NON_NEGATIVE,
    "passkey.context_lens": POSITIVE,
    "passkey.depths": Range(lo=0.0, hi=1.0),  # a fraction of the context: 0 first, 1 right before the question
    "passkey.trials": POSITIVE,
    "passkey.seed": SEED,
    "passkey.key_digits": Range(lo=1, hi=18),  # NOTE: the key is drawn as a numpy int64
    "ruler.context_lens": POSITIVE,
    "ruler.depths": Range(lo=0.0, hi=1.0),
    "ruler.trials": POSITIVE,
    "ruler.seed": SEED,
    "ruler.value_digits": Range(lo=1, hi=18),  # NOTE: drawn as numpy int64
    "ruler.num_needles": POSITIVE,
    "ruler.num_values": POSITIVE,
    "ruler.num_queries": POSITIVE,
    "ruler.num_hops": NON_NEGATIVE,
    "ruler.num_common": POSITIVE,
    "ruler.common_freq": Range(lo=2),
    "ruler.rare_freq": POSITIVE,
    "ruler.zipf_alpha": POSITIVE,
    "ruler.num_frequent": POSITIVE,
    "ruler.vocab_words": Range(lo=2),
}

SAMPLE_RANGES: dict[str, Range] = {
    **{key: r for key, r in _OVERRIDE_RANGES.items() if key.startswith("attention.")},
    "max_new_tokens": POSITIVE,
    "temperature": Range(lo=0, special=((0, "greedy"),)),
    "top_k": Range(lo=0, lo_open=True, special=((None, "no top-k filter"),)),
    "seed": SEED,
    "num_samples": POSITIVE,
}


def validate_eval_config(cfg) -> None:
    """Value checks before any work; raise ValueError naming the key and what is allowed."""
    from omegaconf import OmegaConf

    from fatrain.cli_help import refuse_internal_choices
    from fatrain.kernels import available_backends

    refuse_internal_choices()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is required: a checkpoint file, a run folder or a sweep folder")
    e = cfg.eval
    _choice(e.split, EVAL_SPLITS, "eval.split")
    _choice(e.precision, PRECISIONS, "eval.precision")
    _choice(cfg.logger.wandb.mode, WANDB_MODES, "logger.wandb.mode")
    for name in e.backends:
        _choice(name, available_backends(), "eval.backends")
    check_ranges(cfg, EVAL_RANGES)
    from fatrain.eval.tasks import TASKS
    for name in e.tasks:
        _choice(name, TASKS, "eval.tasks")
    r = cfg.ruler
    if r.common_freq <= r.rare_freq:
        raise ValueError(f"ruler.common_freq={r.common_freq} must be > ruler.rare_freq={r.rare_freq}")
    if r.num_frequent >= r.vocab_words:
        raise ValueError(f"ruler.num_frequent={r.num_frequent} must be < ruler.vocab_words={r.vocab_words}")
    from fatrain.model import ROPE_SCALING_TYPES
    if cfg.model.rope_scaling.type is not None:
        _choice(cfg.model.rope_scaling.type, ROPE_SCALING_TYPES, "model.rope_scaling.type")


def validate_sample_config(cfg) -> None:
    """Value checks before any work; raise ValueError naming the key and what is allowed."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is required: a checkpoint file or a run folder")
    check_ranges(cfg, SAMPLE_RANGES)
    _choice(cfg.precision, PRECISIONS, "precision")


def register_eval_configs(cs) -> None:
    """fatrain-eval's and fatrain-sample's schemas, and the ``checkpoint`` options of the attention
    and data groups (every field None: the checkpoint's value)."""
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(group="attention", name="checkpoint", node=AttentionOverrides, package="attention")
    cs.store(group="data", name="checkpoint", node=DataOverrides, package="data")


# ----- fatrain-bench

BENCH_MODES = ("fwd", "bwd", "fwdbwd")


@dataclass
class BenchSummaryConfig:
    """The ratio table printed after a sweep: ``numerator``'s TFLOP/s over each denominator's."""

    numerator: Optional[str] = None  # None: no ratio table
    denominators: list[str] = field(default_factory=list)
    targets: dict[str, float] = field(default_factory=dict)  # denominator -> least ratio; a ratio below is marked !
    target_modes: list[str] = field(default_factory=lambda: ["fwd", "fwdbwd"])  # where the targets apply
    target_min_seqlen: int = 2048  # and from which seqlen


@dataclass
class DecodeBenchConfig:
    """``bench=decode``: one query per sequence against a KV cache (fatrain.bench.decode)."""

    impls: list[str] = field(default_factory=lambda: ["flash_v2", "sdpa_flash", "sdpa_cudnn"])
    cache_lens: list[int] = field(default_factory=lambda: [4096, 16384, 32768, 65536, 131072])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    nheads: int = 32
    nheads_k: int = 8
    headdim: int = 128
    dtype: str = "bf16"
    num_splits: int = 0  # flash_v2's decode kernel; 0: its heuristic
    copy_mib: int = 1024  # size of the copy that measures the device bandwidth
    name: str = "decode_bench"  # file stem of the CSV and JSONL


@dataclass
class BenchConfig:
    kind: str = "attention"  # attention: the sweep below | decode: the decode benchmark (decode.*)
    decode: DecodeBenchConfig = field(default_factory=DecodeBenchConfig)
    impls: list[str] = field(default_factory=list)  # registry names (variants too); the presets list them
    modes: list[str] = field(default_factory=lambda: list(BENCH_MODES))
    seqlens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    headdims: list[int] = field(default_factory=lambda: [64, 128])
    dtypes: list[str] = field(default_factory=lambda: ["bf16"])  # fp32 | bf16 | fp16
    tokens_per_batch: int = 16384  # batch = max(1, tokens_per_batch // seqlen)
    hidden: int = 2048  # nheads = hidden // headdim
    windows: list[int] = field(default_factory=lambda: [-1])  # left window; -1: unlimited
    doc_lens: list[int] = field(default_factory=lambda: [0])  # mean document length; 0: one document
    dropout_ps: list[float] = field(default_factory=lambda: [0.0])
    # Attention variants: none | alibi | softcap | sinks, each on the first window / doc_len / dropout
    variants: list[str] = field(default_factory=lambda: ["none"])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    warmup_ms: int = 25  # do_bench on CUDA
    rep_ms: int = 100
    # Timings per measurement, taken round-robin over every (impl, mode) of a case; the row gets
    # their median (``ms``), their number (``rounds``) and (max - min) / median (``ms_spread``).
    # With 1 each measurement is one do_bench right after its own compilation/autotuning.
    rounds: int = 1
    cpu_reps: int = 3  # wall-clock repetitions on the CPU
    seed: int = 0
    skip_after_oom: bool = True  # an OOM at seqlen N marks larger N of the same series as oom
    out_dir: Optional[str] = None  # None: the Hydra run directory
    name: str = "attention_bench"  # file stem of the CSV and the plots
    append: bool = False  # add rows to an existing CSV, skipping measurements it already holds (resume)
    plot: bool = True
    summary: BenchSummaryConfig = field(default_factory=BenchSummaryConfig)


BENCH_RANGES: dict[str, Range] = {
    "seqlens": POSITIVE,
    "headdims": POSITIVE,
    "tokens_per_batch": POSITIVE,
    "hidden": POSITIVE,
    "windows": Range(lo=0, special=((-1, "unlimited"),)),
    "doc_lens": Range(lo=0, special=((0, "one document"),)),
    "dropout_ps": PROBABILITY,
    "warmup_ms": NON_NEGATIVE,
    "rep_ms": POSITIVE,
    "rounds": POSITIVE,
    "cpu_reps": POSITIVE,
    "seed": SEED,
    "summary.targets": POSITIVE,
    "summary.target_min_seqlen": NON_NEGATIVE,
    "decode.cache_lens": POSITIVE,
    "decode.batches": POSITIVE,
    "decode.nheads": POSITIVE,
    "decode.nheads_k": POSITIVE,
    "decode.headdim": POSITIVE,
    "decode.num_splits": Range(lo=0, special=((0, "from the SM count and the cache length"),)),
    "decode.copy_mib": POSITIVE,
}


def validate_bench_config(cfg) -> None:
    """Check the values a type cannot; raise ValueError naming the key and what is allowed."""
    from fatrain.kernels import available_backends

    if cfg.get("kind", "attention") not in ("attention", "decode"):
        raise ValueError(f"kind={cfg.kind!r} must be attention or decode")
    if cfg.get("kind") == "decode":
        from fatrain.bench.decode import validate_decode_config
        check_ranges(cfg, {k: r for k, r in BENCH_RANGES.items() if k.startswith("decode.")})
        validate_decode_config(cfg.decode)
        return
    impls = available_backends(variants=True)
    for key, values, allowed in [("impls", cfg.impls, impls), ("modes", cfg.modes, BENCH_MODES),
                                 ("dtypes", cfg.dtypes, PRECISIONS)]:
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"{key}={list(values)} has {bad or 'nothing'}: choose from {', '.join(allowed)}")
    from fatrain.bench.cases import VARIANTS
    bad = [v for v in cfg.get("variants", ["none"]) if v not in VARIANTS]
    if bad:
        raise ValueError(f"variants={list(cfg.variants)} has {bad}: choose from {', '.join(VARIANTS)}")
    for key in ("seqlens", "headdims", "causal", "windows", "doc_lens", "dropout_ps", "variants"):
        if not cfg[key]:
            raise ValueError(f"{key} must list at least one value")
    check_ranges(cfg, BENCH_RANGES)
    for d in cfg.headdims:
        if cfg.hidden % d:
            raise ValueError(f"hidden={cfg.hidden} must be divisible by every head dim, got {d}")
    # NOTE: the summary's names are not checked against the registry: one the sweep did not time
    # is a blank column, as when a backend failed.
    untargeted = [name for name in cfg.summary.targets if name not in cfg.summary.denominators]
    if untargeted:
        raise ValueError(f"summary.targets names {untargeted}, which summary.denominators "
                         f"{list(cfg.summary.denominators)} does not list")


def register_bench_configs(cs) -> None:
    """fatrain-bench's schema (the presets in configs/bench/ are diffs of it)."""
    cs.store(name="bench_schema", node=BenchConfig)
