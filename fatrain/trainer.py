"""The training loop, the pieces it is built from (model spec, optimizer, schedule, sharding),
and one run in its folder (``run_training``: folder checks, resume, loggers, the result).

Device, precision and seeding come from ``fatrain.runtime``; which attention options a
backend takes and what it reports of a run come from the registry (``fatrain.kernels``).

The step loop reads top to bottom like nanoGPT's: set the learning rate -> periodic
validation and checkpoint -> micro-steps with gradient accumulation -> clip -> optimizer
step (left out where the loss or gradient norm is not finite: trainer.on_nonfinite stops the
run there or skips the step) -> zero_grad -> timing, tokens/s, MFU -> loggers. Sinks (loggers,
checkpoint manager) live outside; the trainer's own state is ``state_dict()``: step, tokens
seen, RNG states and the data loader's position, so a resumed run continues the same curve.

Distributed (``trainer.strategy=ddp|fsdp``, see fatrain.distributed): every rank runs this
same loop on its own shard of each global batch (``trainer.batch_size`` is per rank). The
model is wrapped in DDP, or sharded with FSDP2's ``fully_shard`` (each block, then the root);
gradients are synchronised only on the last micro-step of an accumulation. Logged numbers
are global (loss averaged over ranks, tokens/s of all ranks, memory the maximum of any
rank, MFU over all GPUs) and only rank 0 writes them. Checkpoints: rank 0 writes one
``.pt`` file for single and DDP; FSDP writes a sharded ``.dcp`` folder from every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import MISSING, asdict, fields

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from fatrain import distributed
from fatrain.checkpoint import (CheckpointError, CheckpointManager, DamagedCheckpointError, is_sharded,
                                list_checkpoints, load_checkpoint, load_metadata)
from fatrain.checkpoint import check_dcp_metadata, dcp_cause, dcp_exception_type, safe_load_planner
from fatrain.config import validate_train_config
from fatrain.context_parallel import build_context_parallel
from fatrain.data import BlockLoader, build_data, make_train_loader
from fatrain.distributed import DistEnv
from fatrain.interrupt import StopSignals, signal_name
from fatrain.kernels import autotune_seconds, check_options, run_info
from fatrain.files import RunWriteError, append_line, write_json_atomic
from fatrain.metrics import (ConsoleLogger, JsonlLogger, MultiLogger, StepTimer, WandbLogger, memory_metrics,
                             peak_flops, read_jsonl, strict_json)
from fatrain.model import GPT, GPTSpec
from fatrain.runlock import RunDirLocked, RunLock
from fatrain.runtime import autocast_for, check_precision, free_memory, seed_everything, select_device
from fatrain.runtime import run_info as environment_info

# attention.* settings that every backend takes; the others are the backend's own options.
ATTENTION_CALL_FIELDS = ("backend", "window_left", "window_right")


def attention_options(attention_cfg) -> dict:
    """The backend's own tuning keywords that are set (attention.block_m, ...), after the registry
    checked that attention.backend takes each one."""
    options = {k: v for k, v in attention_cfg.items() if k not in ATTENTION_CALL_FIELDS}
    return check_options(attention_cfg.backend, options)


def micro_batch_size(t, seq_len: int, world_size: int = 1) -> int:
    """trainer.batch_size, or the one that trainer.tokens_per_step implies."""
    if t.tokens_per_step is None:
        return t.batch_size
    per_batch = seq_len * t.grad_accum_steps * world_size
    if t.tokens_per_step % per_batch:
        raise ValueError(f"trainer.tokens_per_step={t.tokens_per_step} must be a multiple of data.seq_len x "
                         f"trainer.grad_accum_steps x ranks = {per_batch}")
    return t.tokens_per_step // per_batch


# GPTSpec fields that come from outside the model group, by where they come from.
_SPEC_FROM_ELSEWHERE = ("vocab_size", "attention", "attention_options", "window_size", "document_masking",
                        "activation_checkpointing", "activation_offload")


def build_spec(cfg, vocab_size: int) -> GPTSpec:
    """The model a run config asks for: each GPTSpec field named like a model.* setting comes from
    it; the vocabulary from the tokenizer (unless model.vocab_size pads it), the attention call from
    attention.*, document masking from data.*, activation checkpointing from trainer.*."""
    m, a = cfg.model, cfg.attention
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})")
    from_model = {f.name: m[f.name] for f in fields(GPTSpec) if f.name not in _SPEC_FROM_ELSEWHERE}
    from_model["rope_scaling"] = dict(m.rope_scaling)  # a plain mapping; GPTSpec makes it a RopeScaling
    return GPTSpec(
        **from_model, vocab_size=m.vocab_size or vocab_size, attention=a.backend,
        attention_options=attention_options(a), window_size=(a.window_left, a.window_right),
        document_masking=cfg.data.document_masking, activation_checkpointing=cfg.trainer.activation_checkpointing,
        activation_offload=cfg.trainer.activation_offload,
    )


def build_model(cfg, spec: GPTSpec) -> torch.nn.Module:
    """fatrain's GPT of ``spec``, or (model.implementation=reference) the plain nanoGPT-style model
    of the same shapes and weights' names (fatrain.reference_gpt)."""
    if cfg.model.get("implementation", "fatrain") == "reference":
        from fatrain.reference_gpt import ReferenceGPT

        return ReferenceGPT(spec)
    return GPT(spec)


# Fields of GPTSpec that may differ between a checkpoint and the run resuming or evaluating it.
RUNTIME_SPEC_FIELDS = ("attention", "attention_options", "window_size", "document_masking", "activation_checkpointing",
                       "activation_offload",
                       "dropout", "attn_dropout", "rope_kernel", "loss_kernel", "loss_chunk_tokens",
                       "rope_scaling")


def check_spec_compatible(saved: dict, spec: GPTSpec, what: str) -> None:
    # A field added to GPTSpec after a checkpoint was written has its default there (position=rope, ...).
    defaults = {f.name: f.default for f in fields(GPTSpec) if f.default is not MISSING}
    for key, value in asdict(spec).items():
        if key in RUNTIME_SPEC_FIELDS:
            continue
        old = saved.get(key, defaults.get(key))
        if isinstance(old, list):
            old = tuple(old)
        if old != value:
            raise CheckpointError(f"{what}: the checkpoint has model.{key}={old!r} but this run asks for {value!r}")


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (dim >= 2) only, not on norms, biases or gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def learning_rate(step: int, cfg, max_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at max_steps (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so a checkpoint loads with ``weights_only=True``.

    numpy's legacy state is a tuple holding an ndarray (624 uint32 words); the words are
    stored as an int64 tensor, the rest as a string and numbers.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shard_model(model: GPT, compile_blocks: bool, *, param_dtype: torch.dtype = torch.float32,
                world_size: int = 1) -> GPT:
    """FSDP2: shard each transformer block, then the root (embeddings, final norm, the tied head).

    Each block is one all-gather / reduce-scatter unit, so only one block's full weights
    live on a rank at a time. torch.compile goes per block, before sharding (torchtitan's
    order), so the FSDP hooks stay outside the compiled graphs; ``Module.compile`` works in
    place and keeps the parameter names (and so the checkpoints) unchanged.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 training gathers bf16 parameters (half the all-gather bytes; autocast would cast them
    # to bf16 for every matmul anyway) and reduces gradients in fp32, so the update stays fp32.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # With one rank, resharding after forward only copies the weights again for the backward.
    reshard = world_size > 1
    # NOTE: GPT.forward returns logits[..., :vocab_size], a view, and FSDP2 warns that an
    # in-place op on it would skip its pre-backward hook. The loop only backpropagates the
    # loss (not a view), so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.blocks:
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    # The root (embedding, final norm, tied head) stays gathered between forward and backward:
    # the backward starts with the head, so resharding it would only gather it again at once.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def check_strategy(t, dist_env: DistEnv) -> None:
    if dist_env.strategy == "fsdp" and t.precision == "fp16":
        raise ValueError("trainer.precision=fp16 with trainer.strategy=fsdp is not supported (GradScaler does not "
                         "agree on skipped steps across shards): use trainer.precision=bf16")


class Trainer:
    """Builds data, model and optimizer from a resolved config and runs the step loop."""

    def __init__(self, cfg, run_dir: str, logger, *, progress=None, dist_env: DistEnv | None = None):
        self.cfg, self.run_dir, self.logger = cfg, run_dir, logger
        t = cfg.trainer
        self.dist = dist_env or DistEnv()
        if self.dist.strategy != t.strategy:
            raise ValueError(f"trainer.strategy={t.strategy} but the process group was set up for "
                             f"{self.dist.strategy}: pass the DistEnv from fatrain.distributed.init_distributed")
        self.device = self.dist.device if self.dist.distributed else select_device(t.device)
        # The jobs of a Hydra sweep run one after another in one process: each logs its own peak,
        # and starts from an empty cache as a fresh process would. NOTE: the allocator counts a
        # cached block it hands out unsplit whole, so with the blocks earlier jobs left, the same
        # job's max_memory_allocated moved by up to 13 MB with its place in the sweep (H100); its
        # requested-bytes peak did not.
        free_memory(self.device, reset_peak=True)
        check_precision(t.precision, self.device, cfg.attention.backend)
        check_strategy(t, self.dist)
        self.autocast = autocast_for(t.precision, self.device)
        seed_everything(t.seed)  # the same on every rank: every rank builds the same initial model
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        world, rank = self.dist.world_size, self.dist.rank
        # Context parallelism: the ranks of one context group read the same batch, so the data is
        # sharded over the data-parallel index only.
        self.cp = build_context_parallel(cfg, self.dist)
        self.dp_rank, self.dp_size = (self.cp.dp_rank, self.cp.dp_size) if self.cp else (rank, world)
        self.batch_size = micro_batch_size(t, cfg.data.seq_len, self.dp_size)
        self.data = build_data(cfg.data, seed=t.seed)
        self.train_loader = make_train_loader(self.data.train, self.batch_size, seed=t.seed, rank=self.dp_rank,
                                              world_size=self.dp_size, device=self.device)
        self.spec = build_spec(cfg, self.data.vocab_size)
        self.model = build_model(cfg, self.spec).to(self.device)
        if self.cp:
            self.cp.install(self.model)
        if world > 1:
            seed_everything(t.seed + rank)  # different dropout masks on different ranks
        # self.model stays the bare GPT (its state_dict has plain names); forward_model is what the
        # loop calls: compiled and/or wrapped. FSDP2 shards self.model in place.
        self.ddp = None
        if self.dist.strategy == "fsdp":
            self.forward_model = shard_model(
                self.model, compile_blocks=t.compile, world_size=self.dist.world_size,
                param_dtype=torch.bfloat16 if t.precision == "bf16" else torch.float32)
        else:
            self.forward_model = torch.compile(self.model) if t.compile else self.model
            if self.dist.strategy == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                self.ddp = DistributedDataParallel(
                    self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                self.forward_model = self.ddp
        self.optimizer = make_optimizer(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.checkpoints = CheckpointManager(os.path.join(run_dir, "checkpoints"), keep_last=t.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0  # updates left out for a non-finite loss or gradient norm (on_nonfinite=skip_step)
        # Fused AdamW skips its whole update on the device when handed a found_inf flag (the path
        # GradScaler uses); elsewhere the flag is read before the step (see optimizer_step).
        self.masked_step = (bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()
                            and self.dist.strategy != "fsdp")
        self.wandb_id = None
        self.resumed = False  # set by resume_from
        self.resumed_config: dict | None = None  # the settings the checkpoint was written with
        self.progress = progress
        # Global: all ranks together. (FSDP2's DTensor parameters report their full size, so the
        # parameter counts and FLOPs are the whole model's on every rank.)
        self.tokens_per_step = self.batch_size * t.grad_accum_steps * cfg.data.seq_len * self.dp_size
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len, causal=True)
        peak = peak_flops(self.device, t.precision, t.peak_tflops)
        self.peak_flops = peak * world if peak else None

    # ----- state ---------------------------------------------------------------------------
    def _meta(self) -> dict:
        """Everything but the model and optimizer tensors; a collective (gathers every rank's RNG)."""
        rng_ranks = distributed.all_gather_object(rng_state(), self.dist)
        return {
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,
            "world_size": self.dist.world_size,
            "strategy": self.dist.strategy,
            "data": self.train_loader.state_dict(),
            "spec": asdict(self.spec),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "wandb_id": self.wandb_id,
        }

    def state_dict(self) -> dict:
        """The full state of a single or DDP run (on FSDP, see save_checkpoint)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self._meta()}

    def _restore_meta(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.train_loader.load_state_dict(state["data"])
        saved_ranks = state.get("rng_ranks") or [state["rng"]]
        if len(saved_ranks) == self.dist.world_size:
            set_rng_state(saved_ranks[self.dist.rank])
        else:
            # NOTE: a different number of ranks cannot replay the same random streams; each rank
            # gets its own deterministic stream, so dropout masks still differ between ranks.
            set_rng_state(saved_ranks[0])
            seed_everything(self.cfg.trainer.seed + 1_000_003 * self.step + self.dist.rank)
        self.wandb_id = state.get("wandb_id")
        self.resumed_config = state.get("config")

    def load_state_dict(self, state: dict, source: str) -> None:
        check_spec_compatible(state["spec"], self.spec, f"resume from {source}")
        if self.dist.strategy == "fsdp":
            raise CheckpointError(f"resume from {source}: a .pt checkpoint (trainer.strategy=single or ddp) "
                                  "cannot resume trainer.strategy=fsdp; resume it with single or ddp")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"resume from {source}: the checkpoint does not fit this model: {e}") from None
        self._restore_meta(state)

    def load_sharded(self, path: str) -> None:
        """Resume an FSDP run from a ``.dcp`` folder, resharding to this run's number of ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = load_metadata(path)
        check_spec_compatible(meta["spec"], self.spec, f"resume from {path}")
        if self.dist.strategy != "fsdp":
            raise CheckpointError(f"resume from {path}: a .dcp checkpoint (trainer.strategy=fsdp) resumes only with "
                                  f"trainer.strategy=fsdp, not {self.dist.strategy}")
        check_dcp_metadata(path)  # before DCP unpickles it
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sharded = {"model": model_sd, "optimizer": optim_sd}
        try:
            try:
                dcp.load(sharded, checkpoint_id=path, planner=safe_load_planner(path))
            except dcp_exception_type() as e:  # a BaseException: unwrap the rank's own error
                raise dcp_cause(e) from None
            set_state_dict(self.model, self.optimizer, model_state_dict=sharded["model"],
                           optim_state_dict=sharded["optimizer"])
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"resume from {path}: the checkpoint does not fit this model: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self._restore_meta(meta)

    def resume_from(self, path: str) -> None:
        if is_sharded(path):
            self.load_sharded(path)
        else:
            self.load_state_dict(load_checkpoint(path), path)
        self.resumed = True

    def save_checkpoint(self) -> str:
        if self.dist.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            return self.checkpoints.save_sharded({"model": model_sd, "optimizer": optim_sd}, self._meta(), self.step)
        state = self.state_dict()  # every rank: gathering the RNG states is a collective
        path = self.checkpoints.path_for(self.step)
        if self.dist.is_main:
            path = self.checkpoints.save(state, self.step)
        distributed.barrier(self.dist)
        return path

    # ----- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss per token over every rank's share of the validation batches."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, tokens)
        sent_before = self.cp.bytes_sent if self.cp is not None else 0
        loader = BlockLoader(self.data.val, self.batch_size, seed=0, shuffle=False, rank=self.dp_rank,
                             world_size=self.dp_size, device=self.device)
        for batch in loader.eval_batches(self.cfg.trainer.eval_batches):
            inputs = self.model_inputs(batch)
            with self.autocast():
                _, loss = self.forward_model(**inputs)
            totals[0] += loss.double() * inputs["idx"].numel()
            totals[1] += inputs["idx"].numel()
        distributed.all_reduce(totals, self.dist)
        if self.cp is not None:
            self.cp.bytes_sent = sent_before  # the training steps' traffic is counted without validation's
        self.model.train()
        return (totals[0] / totals[1]).item()

    def model_inputs(self, batch: dict) -> dict:
        """The forward's arguments for ``batch``: the whole sequences, or this rank's context shard."""
        if self.cp:
            return self.cp.shard_batch(batch, self.spec)
        return {"idx": batch["input_ids"], "targets": batch["labels"], "doc_ids": batch["doc_ids"]}

    def grad_sync(self, sync: bool):
        """Context for one micro-step's backward: all-reduce / reduce-scatter gradients only when ``sync``."""
        if self.ddp is not None and not sync:
            return self.ddp.no_sync()
        if self.dist.strategy == "fsdp":
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        if self.dist.strategy != "fsdp":
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # FSDP2 gradients are DTensor shards: the norm of the shards is a partial sum that
        # full_tensor() reduces over ranks, so every rank clips by the same global norm.
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def step_flags(self, loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> torch.Tensor:
        """[loss, gradient norm, stop]: 1.0 where this step's loss or norm is not finite on some rank,
        and where some rank received a stop signal (fatrain.interrupt), else 0.0.

        Stays on the device (no sync); the maximum over ranks, so every rank takes the same decision.
        With fp16 the GradScaler owns overflowing gradients (it skips those steps and lowers the scale,
        a normal part of loss scaling), so only the loss counts there.
        """
        grad_bad = torch.zeros_like(loss, dtype=torch.bool) if self.scaler.is_enabled() else ~torch.isfinite(grad_norm)
        stop_flag = torch.full_like(loss, float(stop), dtype=torch.float32)
        flags = torch.stack([(~torch.isfinite(loss)).float(), grad_bad.to(loss.device).float(), stop_flag])
        return distributed.all_reduce(flags, self.dist, op="max")

    def optimizer_step(self, flags: torch.Tensor) -> None:
        """The optimizer step, unless a non-finite flag is set: then neither the weights nor the optimizer state change.

        Fused AdamW (the default on CUDA, and optim.fused=true): the flag goes in as ``found_inf``, and the
        kernel leaves parameters, moments and the step count as they were, so the loop does not wait for
        the device here; it reads the flag after StepTimer.stop, which synchronises every step already.
        Otherwise (optim.fused=false, fp16's GradScaler, FSDP's sharded parameters) the flag is read before
        the step: one more sync there (GradScaler with an unfused optimizer makes it anyway; on the CPU
        nothing runs ahead to wait for).
        """
        skip = flags[:2].max()
        if self.masked_step:
            self.optimizer.found_inf = skip
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not skip.item():
            self.scaler.step(self.optimizer)
        self.scaler.update()  # fp16: halves the scale after an overflow, whether or not the step ran

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every parameter is finite on every rank (a sync: before saves and after a skipped step)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        bad = torch.stack([(~torch.isfinite(p)).any() for p in local]).any().float()
        return not distributed.all_reduce(bad, self.dist, op="max").item()

    def nonfinite_result(self, what: list[str]) -> dict:
        """The result of a run stopped at this step; no checkpoint of this state is written."""
        t = self.cfg.trainer
        last = self.checkpoints.latest()
        error = (f"non-finite {describe_nonfinite(what)} at step {self.step} (trainer.on_nonfinite={t.on_nonfinite}): "
                 f"stopped without saving it; last good checkpoint: {last or 'none'}")
        return {"status": "nonfinite", "error": error, "nonfinite": what, "step": self.step,
                "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps, "checkpoint": last}

    def interrupted_result(self, signum: int | None) -> dict:
        """A stop signal at this step boundary: checkpoint this step (unless its weights are not finite)."""
        if not self.weights_finite():
            return self.nonfinite_result(["parameters"])
        path = self.save_checkpoint()
        # Another rank may have received the signal; this one stops with it.
        name = signal_name(signum) if signum is not None else "a stop signal on another rank"
        return {"status": "interrupted", "signal": name, "signum": signum, "step": self.step,
                "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps, "checkpoint": path}

    def _say(self, msg: str) -> None:
        if self.dist.is_main:
            (self.progress.write if self.progress is not None else print)(msg)

    def global_metrics(self, losses: list[torch.Tensor]) -> dict:
        """Mean loss over steps and ranks and the peak memory of the fullest rank: one collective each."""
        loss = distributed.all_reduce(torch.stack(losses).mean().float(), self.dist, op="mean")
        memory = memory_metrics(self.device)
        if self.dist.distributed:
            peaks = torch.tensor(list(memory.values()), dtype=torch.float64, device=self.device)
            distributed.all_reduce(peaks, self.dist, op="max")
            memory = dict(zip(memory, peaks.tolist()))
        metrics = {"train/loss": loss.item(), **memory}
        if self.cp is not None:
            # The context group's traffic: what this rank sent per step since the last log (the fullest rank).
            sent = torch.tensor(self.cp.bytes_sent / max(1, len(losses)), dtype=torch.float64, device=self.device)
            metrics["comm/cp_sent_bytes_per_step"] = distributed.all_reduce(sent, self.dist, op="max").item()
            self.cp.bytes_sent = 0
        return metrics

    # ----- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        """Run the steps to trainer.max_steps (stop signals: see fatrain.interrupt)."""
        from fatrain.profiling import StepProfiler

        t = self.cfg.trainer
        self.profiler = StepProfiler(self.run_dir, t.profile_start, t.profile_steps, self.device, self.dist.is_main)
        with StopSignals(announce=self._say) as stop:
            try:
                return self._fit(stop)
            finally:
                self.profiler.close()

    def _fit(self, stop: StopSignals) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        timer = StepTimer(self.device)
        batches = iter(self.train_loader)
        self.model.train()
        losses = []
        start_step = self.step  # a resumed run already evaluated and saved at this step
        if self.resumed and self.step >= t.max_steps:
            # A finished run resumed: its final validation and checkpoint are in the folder already.
            return {"final_val_loss": self.evaluate(), "step": self.step, "tokens_seen": self.tokens_seen,
                    "checkpoint": self.checkpoints.latest(), "skipped_steps": self.skipped_steps}
        while self.step < t.max_steps:
            lr = learning_rate(self.step, cfg.optim, t.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if t.eval_every and self.step > start_step and self.step % t.eval_every == 0:
                self.logger.log({"val/loss": self.evaluate()}, self.step)
            if t.ckpt_every and self.step > start_step and self.step % t.ckpt_every == 0:
                # A finite gradient can still overflow the weights (say lr x weight decay > 1): never save them.
                if not self.weights_finite():
                    return self.nonfinite_result(["parameters"])
                self.save_checkpoint()

            self.profiler.before_step(self.step + 1)
            timer.start()
            step_loss = torch.zeros((), device=self.device)
            for micro in range(t.grad_accum_steps):
                batch = next(batches)
                # Gradients are reduced across ranks on the last micro-step only.
                inputs = self.model_inputs(batch)
                with self.grad_sync(micro == t.grad_accum_steps - 1):
                    with self.autocast():
                        _, loss = self.forward_model(**inputs)
                        loss = loss / t.grad_accum_steps
                    self.scaler.scale(loss).backward()
                step_loss += loss.detach()
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = self.clip_gradients(max_norm)
            flags = self.step_flags(step_loss, grad_norm, stop.requested)
            self.optimizer_step(flags)
            self.optimizer.zero_grad(set_to_none=True)
            timer.stop(self.tokens_per_step)

            self.step += 1
            self.tokens_seen += self.tokens_per_step
            losses.append(step_loss)
            profiled = self.profiler.after_step(self.step)
            if profiled:
                self._say(f"profile of steps {t.profile_start}-{self.step}: {_shown(profiled, self.run_dir)}/")
            if self.progress is not None:
                self.progress.update(1)
            # StepTimer.stop synchronised the device, so this read waits for nothing; the bad update was
            # already left out before the read (optimizer_step), so reading here lets none through.
            loss_bad, norm_bad, stop_now = flags.tolist()
            nonfinite = [name for name, bad in (("loss", loss_bad), ("grad_norm", norm_bad)) if bad]
            if nonfinite and t.on_nonfinite == "skip_step":
                self.skipped_steps += 1
            # A bad step is logged at once (its loss and norm as null), whatever log_every says.
            if nonfinite or self.step % t.log_every == 0 or self.step == t.max_steps:
                # .item() syncs the device once per log step, not once per step; on several ranks
                # these and the non-finite flags are the only collectives outside the backward and the
                # checkpoints.
                metrics = {
                    **self.global_metrics(losses),
                    "train/lr": lr,
                    "train/grad_norm": grad_norm.item(),
                    "train/tokens_seen": self.tokens_seen,
                    "train/skipped_steps": self.skipped_steps,
                    **timer.read_and_reset(),
                }
                losses = []
                if self.peak_flops and "perf/tokens_per_sec" in metrics:
                    metrics["perf/mfu"] = metrics["perf/tokens_per_sec"] * self.flops_per_token / self.peak_flops
                self.logger.log(metrics, self.step)
            if nonfinite:
                # Skipping cannot mend weights that are already non-finite (a finite update overflowed them).
                if t.on_nonfinite == "stop" or not self.weights_finite():
                    return self.nonfinite_result(nonfinite if t.on_nonfinite == "stop" else ["parameters"])
                self._say(f"step {self.step}: non-finite {describe_nonfinite(nonfinite)}: update skipped "
                          f"({self.skipped_steps} so far)")
            # A signal that came after this step's all-reduce stops the next step on every rank; a
            # single process stops here.
            if stop_now or (stop.requested and not (self.dist.distributed and self.dist.world_size > 1)):
                return self.interrupted_result(stop.signum)

        if not self.weights_finite():
            return self.nonfinite_result(["parameters"])
        val_loss = self.evaluate()
        self.logger.log({"val/loss": val_loss}, self.step)
        path = self.save_checkpoint() if t.save_final else None
        return {"final_val_loss": val_loss, "step": self.step, "tokens_seen": self.tokens_seen, "checkpoint": path,
                "skipped_steps": self.skipped_steps}


def describe_nonfinite(what: list[str]) -> str:
    names = {"loss": "loss", "grad_norm": "gradient norm", "parameters": "parameters after the update"}
    return " and ".join(names[w] for w in what)


def resolve_resume(resume: str | None, checkpoints: CheckpointManager) -> str | None:
    """The checkpoint to resume from: None (fresh), 'auto' (latest in the run, if any) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        return checkpoints.latest()
    if not (os.path.isfile(resume) or is_sharded(resume)):
        raise CheckpointError(f"resume={resume}: no such checkpoint file or .dcp folder "
                              "(allowed: auto, or a checkpoint path)")
    return resume


# GPTSpec fields that fix the weights' shapes (or what the weights mean): init_from keeps them.
SHAPE_SPEC_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "norm", "mlp", "mlp_hidden", "bias",
                     "tie_embeddings")


def resolve_init_from(path: str) -> str:
    """The checkpoint ``init_from`` names: a checkpoint file or .dcp folder, or a run folder (its newest)."""
    if os.path.isfile(path) or is_sharded(path):
        return path
    if os.path.isdir(path):
        found = list_checkpoints(os.path.join(path, "checkpoints")) or list_checkpoints(path)
        if found:
            return found[-1]
        raise CheckpointError(f"init_from={path}: the folder holds no checkpoints (checkpoints/ckpt_<step>.pt or .dcp)")
    raise CheckpointError(f"init_from={path}: no such checkpoint file or run folder")


def init_weights_from(trainer: Trainer, path: str) -> dict:
    """Start ``trainer``'s fresh run (step 0, a new optimizer) from the weights of another run's
    checkpoint. Settings that keep the weights' shapes may change (data.seq_len, model.rope_scaling,
    optim.*); one that does not is an error naming both values. Returns what init_from.json records."""
    from fatrain.eval.loading import _plain_state_dict

    ckpt = resolve_init_from(path)
    state = load_checkpoint(ckpt)
    saved, spec = dict(state["spec"]), asdict(trainer.spec)
    for key in SHAPE_SPEC_FIELDS:
        if saved.get(key) != spec[key]:
            raise CheckpointError(f"init_from={path}: the checkpoint has model.{key}={saved.get(key)!r} but this run asks "
                                  f"for {spec[key]!r} (only settings that keep the weights' shapes may change)")
    source_cfg = state.get("config") or {}
    source_tokenizer = (source_cfg.get("data") or {}).get("tokenizer")
    if source_tokenizer is not None and source_tokenizer != trainer.cfg.data.tokenizer:
        raise CheckpointError(f"init_from={path}: the checkpoint was trained with data.tokenizer={source_tokenizer!r} "
                              f"but this run asks for {trainer.cfg.data.tokenizer!r}")
    weights = _plain_state_dict(state["model"])
    try:
        if trainer.dist.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(trainer.model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            trainer.model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"init_from={path}: the weights do not fit this model: {str(e).splitlines()[0]}") from None
    current = OmegaConf.to_container(trainer.cfg, resolve=True)
    return {"checkpoint": os.path.abspath(ckpt), "step": state.get("step"),
            "changed": {k: v for k, v in config_changes(source_cfg, current).items() if k != "init_from"}}


def set_aside_metrics(path: str) -> str | None:
    """A fresh run in a folder that holds another run's metrics (one saved no checkpoint):
    move them to ``<path>.previous-<k>`` so the new series is one curve and nothing is lost."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    k = 1
    while os.path.exists(f"{path}.previous-{k}"):
        k += 1
    os.replace(path, f"{path}.previous-{k}")
    return f"{path}.previous-{k}"


def rewind_metrics(path: str, step: int) -> None:
    """On resume, move metrics rows past the checkpoint's step aside, so the series stays one curve."""
    if not os.path.exists(path):
        return
    rows = read_jsonl(path, keep_lines=True)  # a torn line (killed mid-write, full disk) is dropped
    keep = [line for row, line in rows if row["step"] <= step]
    with open(path, "rb") as f:
        if f.read() == "".join(keep).encode("utf-8"):
            return
    try:
        with open(path + ".rewound", "a", encoding="utf-8") as f:
            f.writelines(line for row, line in rows if row["step"] > step)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    except OSError as e:
        raise RunWriteError(path, e) from None


# ----- one run in its folder -----------------------------------------------------------------


def _shown(path: str, run_dir: str) -> str:
    """``path`` relative to the run folder when it lies inside it (``checkpoints/ckpt_00000200.pt``)."""
    rel = os.path.relpath(path, run_dir)
    return path if rel.startswith("..") else rel


def resume_newest_whole(trainer: Trainer, path: str, *, auto: bool) -> str:
    """Resume from ``path``; with ``resume=auto``, a damaged newest checkpoint (truncated, half-written:
    DamagedCheckpointError) is skipped, with a line saying so, for the one before it. A checkpoint that
    is refused as unsafe or does not fit the model stops the resume: an older one would not be better.
    Returns the checkpoint resumed from."""
    candidates = [path]
    if auto:
        older = [c for c in list_checkpoints(trainer.checkpoints.folder) if c != path]
        candidates += older[::-1]
    skipped = []
    for candidate in candidates:
        try:
            trainer.resume_from(candidate)
            return candidate
        except DamagedCheckpointError as e:
            if not auto:
                raise
            skipped.append(str(e))
            if trainer.dist.is_main:
                print(f"warning: {e}; skipped: trying the checkpoint before it", file=sys.stderr, flush=True)
    raise DamagedCheckpointError(f"resume=auto: none of the {len(candidates)} checkpoints in "
                                 f"{trainer.checkpoints.folder} can be read whole (first: {skipped[0]})")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict | None, new: dict) -> dict:
    """Settings that differ between a checkpoint's config and this run's: {key: [old, new]}.
    ``resume`` itself is left out (it is how the run was started, not what it trains)."""
    if old is None:
        return {}
    a, b = _flat(old), _flat(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
            if k != "resume" and a.get(k) != b.get(k)}


def record_resume(cfg, run_dir: str, trainer: Trainer, resume_path: str) -> None:
    """Say which settings changed since the checkpoint, keep the first run's settings as
    config.original.yaml (once) and append one row per resume to resumes.jsonl."""
    current = OmegaConf.to_container(cfg, resolve=True)
    changes = config_changes(trainer.resumed_config, current)
    if changes:
        shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in list(changes.items())[:8])
        more = f" and {len(changes) - 8} more (resumes.jsonl)" if len(changes) > 8 else ""
        print(f"settings changed since the checkpoint: {shown}{more}", flush=True)
    try:
        original = os.path.join(run_dir, "config.original.yaml")
        if trainer.resumed_config is not None and not os.path.exists(original):
            tmp = original + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.create(trainer.resumed_config)))
            os.replace(tmp, original)
        row = {"step": trainer.step, "checkpoint": _shown(resume_path, run_dir), "changed": changes,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path = os.path.join(run_dir, "resumes.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            append_line(fd, path, json.dumps(strict_json(row), allow_nan=False) + "\n")
        finally:
            os.close(fd)
    except OSError as e:
        raise RunWriteError(getattr(e, "filename", None) or run_dir, e) from None


def make_loggers(cfg, run_dir: str, trainer: Trainer, progress) -> MultiLogger:
    if not trainer.dist.is_main:
        return MultiLogger([])  # the other ranks compute the same global numbers and write nothing
    loggers = []
    if cfg.logger.jsonl:
        loggers.append(JsonlLogger(os.path.join(run_dir, "metrics.jsonl")))
    if cfg.logger.console:
        loggers.append(ConsoleLogger(write=progress.write if progress is not None else None))
    w = cfg.logger.wandb
    if w.mode != "disabled":
        wandb_logger = WandbLogger(mode=w.mode, project=w.project, entity=w.entity, name=w.name, group=w.group,
                                   tags=w.tags, run_dir=run_dir, resume_id=trainer.wandb_id,
                                   config=OmegaConf.to_container(cfg, resolve=True))
        trainer.wandb_id = wandb_logger.run_id
        loggers.append(wandb_logger)
    return MultiLogger(loggers)


def run_training(cfg, run_dir: str, dist_env: DistEnv | None = None) -> dict:
    """Train one run in ``run_dir`` (metrics.jsonl, checkpoints/, wandb/); returns its result:
    status "ok", final_val_loss, step, tokens_seen, skipped_steps, checkpoint, ``environment`` (device, versions,
    date: ``fatrain.runtime.run_info``) and ``attention_run_info``
    where the backend reports something of the run (``fatrain.kernels.run_info``: e.g. its autotuners'
    picks). A run stopped by a non-finite step returns status "nonfinite", that step, what was not
    finite, an ``error`` line and the last good checkpoint (Trainer.nonfinite_result).

    A fresh run refuses a folder that holds checkpoints; ``resume=auto`` continues from the latest.
    Any run refuses a folder that another live run holds (``fatrain.runlock``).
    Without ``dist_env``, joins (and at the end leaves) the process group that ``trainer.strategy``
    asks for; an entry point that set one up passes its own.
    """
    validate_train_config(cfg)
    if dist_env is not None:
        return _run_in(cfg, run_dir, dist_env)
    dist_env = distributed.init_distributed(cfg.trainer)
    with distributed.process_group(dist_env):
        return _run_in(cfg, run_dir, dist_env)


def _run_in(cfg, run_dir: str, dist_env: DistEnv) -> dict:
    """Hold ``run_dir``'s lock (rank 0, the one rank that writes) while the run writes there; a folder
    another live run holds is refused on every rank, before anything is written."""
    lock = RunLock(run_dir)
    refused = None
    if dist_env.is_main:
        try:
            lock.acquire()
        except RunDirLocked as e:
            refused = str(e)
    refused = distributed.broadcast_object(refused, dist_env)
    if refused is not None:
        raise RunDirLocked(refused)
    try:
        return _train_in(cfg, run_dir, dist_env)
    finally:
        lock.release()


def _train_in(cfg, run_dir: str, dist_env: DistEnv) -> dict:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if cfg.resume is None and list_checkpoints(ckpt_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass resume=auto to continue that run, "
                         "or choose another hydra.run.dir (nothing was overwritten)")
    distributed.barrier(dist_env)  # every rank checked before rank 0 may write the first checkpoint
    trainer = Trainer(cfg, run_dir, logger=None, dist_env=dist_env)
    resume_path = resolve_resume(cfg.resume, trainer.checkpoints)
    if resume_path is not None:
        resume_path = resume_newest_whole(trainer, resume_path, auto=cfg.resume == "auto")
        if dist_env.is_main:
            rewind_metrics(os.path.join(run_dir, "metrics.jsonl"), trainer.step)
            print(f"resumed from {_shown(resume_path, run_dir)} at step {trainer.step}", flush=True)
            record_resume(cfg, run_dir, trainer, resume_path)
    source = None
    if resume_path is None:
        if cfg.get("init_from"):
            source = init_weights_from(trainer, cfg.init_from)
            if dist_env.is_main:
                shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in list(source["changed"].items())[:8])
                print(f"initialised from {source['checkpoint']} (step {source['step']}), optimizer fresh, step 0"
                      + (f"; changed: {shown}" if shown else ""), flush=True)
                write_json_atomic(os.path.join(run_dir, "init_from.json"), strict_json(source))
        if dist_env.is_main:
            set_aside_metrics(os.path.join(run_dir, "metrics.jsonl"))
    t = cfg.trainer
    show = t.progress_bar and dist_env.is_main
    progress = tqdm(total=t.max_steps, initial=trainer.step, desc="train", dynamic_ncols=True) if show else None
    logger = make_loggers(cfg, run_dir, trainer, progress)
    trainer.logger, trainer.progress = logger, progress
    if resume_path is None:
        n = trainer.model.num_params()
        msg = (f"model: {n / 1e6:.2f}M parameters ({trainer.model.num_params(non_embedding=True) / 1e6:.2f}M "
               f"non-embedding), attention={cfg.attention.backend}, device={trainer.device}, "
               f"precision={t.precision}, tokens/step={trainer.tokens_per_step}")
        if dist_env.distributed:
            msg += f", strategy={dist_env.strategy} on {dist_env.world_size} ranks ({dist_env.backend})"
        if trainer.cp is not None:
            msg += (f", context_parallel={trainer.cp.degree} ({trainer.cp.strategy}) x data parallel "
                    f"{trainer.cp.dp_size}")
        if dist_env.is_main:
            (progress.write if progress is not None else print)(msg)
        logger.log({"model/params": n}, 0)
    try:
        result = trainer.fit()
    finally:
        logger.close()
        if progress is not None:
            progress.close()
    if result.get("status") in ("nonfinite", "interrupted"):
        return result
    result["status"] = "ok"
    result["environment"] = environment_info(trainer.device)  # device name, versions, date: the report's titles
    if source is not None:
        result["init_from"] = source["checkpoint"]
    # What the backend reports lives in this process, so in a multirun it covers the earlier jobs too.
    attention_info = run_info(cfg.attention.backend, cfg.data.seq_len)
    if attention_info:
        result["attention_run_info"] = attention_info
    result["autotune_seconds"] = autotune_seconds()
    return result
