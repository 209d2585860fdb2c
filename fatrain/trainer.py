"""The training loop, and the pieces it is built from (device, precision, optimizer, schedule).

The step loop reads top to bottom like nanoGPT's: set the learning rate -> periodic
validation and checkpoint -> micro-steps with gradient accumulation -> clip -> optimizer
step -> zero_grad -> timing, tokens/s, MFU -> loggers. Sinks (loggers, checkpoint
manager) live outside; the trainer's own state is ``state_dict()``: step, tokens seen,
RNG states and the data loader's position, so a resumed run continues the same curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import asdict

import numpy as np
import torch
from omegaconf import OmegaConf

from fatrain.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from fatrain.data import BlockLoader, build_data
from fatrain.metrics import StepTimer, memory_metrics, peak_flops
from fatrain.model import GPT, GPTSpec

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRITON_BACKENDS = ("flash_v1", "flash_v2")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but no CUDA GPU is available (allowed here: auto, cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"trainer.device={name} is not supported (allowed: auto, cpu, cuda, cuda:N)")
    return device


def check_precision(precision: str, device: torch.device, backend: str) -> None:
    """Refuse precisions the device cannot run, before any work starts."""
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("trainer.precision=fp16 needs a CUDA GPU (allowed on the CPU: fp32, bf16)")
        if precision == "bf16" and backend in TRITON_BACKENDS:
            raise ValueError(f"trainer.precision=bf16 with attention.backend={backend} is not supported on the CPU: "
                             "the Triton interpreter computes bfloat16 wrongly (use fp32 on the CPU)")
    elif precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"trainer.precision=bf16 is not supported by {torch.cuda.get_device_name(device)} "
                         "(allowed: fp32, fp16)")


# Attention settings that tune one backend, passed to its function only when set.
BACKEND_OPTIONS = {"block_m": ("flash_v2",), "block_n": ("flash_v2",), "sram_bytes": ("flash_v1",)}


def backend_options(attention_cfg) -> dict:
    options = {}
    for key, backends in BACKEND_OPTIONS.items():
        value = attention_cfg.get(key)
        if value is None:
            continue
        if attention_cfg.backend not in backends:
            raise ValueError(f"attention.{key} is used only by {', '.join(backends)}, "
                             f"not by attention.backend={attention_cfg.backend}")
        options[key] = value
    return options


def micro_batch_size(t, seq_len: int, world_size: int = 1) -> int:
    """trainer.batch_size, or the one that trainer.tokens_per_step implies."""
    if t.tokens_per_step is None:
        return t.batch_size
    per_batch = seq_len * t.grad_accum_steps * world_size
    if t.tokens_per_step % per_batch:
        raise ValueError(f"trainer.tokens_per_step={t.tokens_per_step} must be a multiple of data.seq_len x "
                         f"trainer.grad_accum_steps x ranks = {per_batch}")
    return t.tokens_per_step // per_batch


def build_spec(cfg, vocab_size: int) -> GPTSpec:
    m, a = cfg.model, cfg.attention
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})")
    return GPTSpec(
        vocab_size=m.vocab_size or vocab_size, n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head,
        n_embd=m.n_embd, norm=m.norm, mlp=m.mlp, mlp_hidden=m.mlp_hidden, bias=m.bias, dropout=m.dropout,
        attn_dropout=m.attn_dropout, rope_theta=m.rope_theta, rope_reset_per_document=m.rope_reset_per_document,
        tie_embeddings=m.tie_embeddings, init_std=m.init_std, attention=a.backend,
        attention_options=backend_options(a),
        window_size=(a.window_left, a.window_right), document_masking=cfg.data.document_masking,
        activation_checkpointing=cfg.trainer.activation_checkpointing,
    )


# Fields of GPTSpec that may differ between a checkpoint and the run resuming or evaluating it.
RUNTIME_SPEC_FIELDS = ("attention", "attention_options", "window_size", "document_masking", "activation_checkpointing", "dropout",
                       "attn_dropout")


def check_spec_compatible(saved: dict, spec: GPTSpec, what: str) -> None:
    for key, value in asdict(spec).items():
        if key in RUNTIME_SPEC_FIELDS:
            continue
        old = saved.get(key)
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
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds data, model and optimizer from a resolved config and runs the step loop."""

    def __init__(self, cfg, run_dir: str, logger, *, progress=None):
        self.cfg, self.run_dir, self.logger = cfg, run_dir, logger
        t = cfg.trainer
        self.device = select_device(t.device)
        check_precision(t.precision, self.device, cfg.attention.backend)
        self.dtype = PRECISION_DTYPES[t.precision]
        seed_everything(t.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.batch_size = micro_batch_size(t, cfg.data.seq_len)
        self.data = build_data(cfg.data, seed=t.seed)
        self.train_loader = BlockLoader(self.data.train, self.batch_size, seed=t.seed, device=self.device)
        self.spec = build_spec(cfg, self.data.vocab_size)
        self.model = GPT(self.spec).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        self.checkpoints = CheckpointManager(os.path.join(run_dir, "checkpoints"), keep_last=t.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.wandb_id = None
        self.progress = progress
        self.tokens_per_step = self.batch_size * t.grad_accum_steps * cfg.data.seq_len
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len, causal=True)
        self.peak_flops = peak_flops(self.device, t.precision, t.peak_tflops)

    # ----- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng": rng_state(),
            "data": self.train_loader.state_dict(),
            "spec": asdict(self.spec),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "wandb_id": self.wandb_id,
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        check_spec_compatible(state["spec"], self.spec, f"resume from {source}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"resume from {source}: the checkpoint does not fit this model: {e}") from None
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.wandb_id = state.get("wandb_id")

    def save_checkpoint(self) -> str:
        return self.checkpoints.save(self.state_dict(), self.step)

    # ----- evaluation ----------------------------------------------------------------------
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        loader = BlockLoader(self.data.val, self.batch_size, seed=0, shuffle=False, device=self.device)
        for batch in loader.eval_batches(self.cfg.trainer.eval_batches):
            with self.autocast():
                _, loss = self.forward_model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"])
            total += loss.item() * batch["input_ids"].numel()
            count += batch["input_ids"].numel()
        self.model.train()
        return total / count

    # ----- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        timer = StepTimer(self.device)
        batches = iter(self.train_loader)
        self.model.train()
        losses = []
        start_step = self.step  # a resumed run already evaluated and saved at this step
        while self.step < t.max_steps:
            lr = learning_rate(self.step, cfg.optim, t.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if t.eval_every and self.step > start_step and self.step % t.eval_every == 0:
                self.logger.log({"val/loss": self.evaluate()}, self.step)
            if t.ckpt_every and self.step > start_step and self.step % t.ckpt_every == 0:
                self.save_checkpoint()

            timer.start()
            step_loss = torch.zeros((), device=self.device)
            for _ in range(t.grad_accum_steps):
                batch = next(batches)
                with self.autocast():
                    _, loss = self.forward_model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"])
                    loss = loss / t.grad_accum_steps
                self.scaler.scale(loss).backward()
                step_loss += loss.detach()
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            timer.stop(self.tokens_per_step)

            self.step += 1
            self.tokens_seen += self.tokens_per_step
            losses.append(step_loss)
            if self.progress is not None:
                self.progress.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                # .item() syncs the device once per log step, not once per step.
                metrics = {
                    "train/loss": torch.stack(losses).mean().item(),
                    "train/lr": lr,
                    "train/grad_norm": grad_norm.item(),
                    "train/tokens_seen": self.tokens_seen,
                    **timer.read_and_reset(),
                    **memory_metrics(self.device),
                }
                losses = []
                if self.peak_flops and "perf/tokens_per_sec" in metrics:
                    metrics["perf/mfu"] = metrics["perf/tokens_per_sec"] * self.flops_per_token / self.peak_flops
                self.logger.log(metrics, self.step)

        val_loss = self.evaluate()
        self.logger.log({"val/loss": val_loss}, self.step)
        path = self.save_checkpoint()
        return {"final_val_loss": val_loss, "step": self.step, "tokens_seen": self.tokens_seen, "checkpoint": path}


def resolve_resume(resume: str | None, checkpoints: CheckpointManager) -> str | None:
    """The checkpoint to resume from: None (fresh), 'auto' (latest in the run, if any) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        return checkpoints.latest()
    if not os.path.isfile(resume):
        raise CheckpointError(f"resume={resume}: no such checkpoint file (allowed: auto, or a checkpoint path)")
    return resume


def rewind_metrics(path: str, step: int) -> None:
    """On resume, move metrics rows past the checkpoint's step aside, so the series stays one curve."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = f.readlines()
    keep = [r for r in rows if json.loads(r)["step"] <= step]
    if len(keep) == len(rows):
        return
    with open(path + ".rewound", "a", encoding="utf-8") as f:
        f.writelines(r for r in rows if json.loads(r)["step"] > step)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
