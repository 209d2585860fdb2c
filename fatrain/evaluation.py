"""Checkpoint evaluation: loss by context length and position, passkey, backend agreement.

``fatrain-eval`` (fatrain/evaluate.py) is the thin entry point; everything it does is here.

    checkpoint -> its saved training config, merged with the eval overrides
               -> GPT built from the saved spec (runtime fields such as the attention backend
                  may change; anything else must match, or the eval stops with the reason)
    data       -> the checkpoint's corpus (or data=... / data.*), one split's token stream,
                  repacked into blocks of each length in eval.seq_lens
    numbers    -> per length: loss, perplexity, bits per byte (byte tokenizer) or bits per
                  token (any other tokenizer, whose tokens have no fixed byte count), and
                  the mean loss of each position bucket [0, b), [b, 2b), ...
               -> passkey accuracy over passkey.context_lens x passkey.depths
               -> backend agreement: the same batches with each of eval.backends, in fp32
    outputs    -> eval.json (every number), loss_vs_position.png, passkey.png, a W&B eval
                  job in the training run's group, and table.csv / table.md with one row
                  per evaluated checkpoint (several when ckpt_path is a run or sweep folder)

Bits per byte: total nats / (ln 2 * bytes of text). With the byte tokenizer every label
token is one byte except the end-of-text token, which decodes to no text; its loss still
counts in the numerator (predicting where a document ends is part of modelling the text).

Position buckets count positions inside a block. Blocks are packed from consecutive
documents, so with several documents per block a late position is not always a late
position in its document; on a single long document (tinyshakespeare) the two agree.

Caution / known limits: each length reads blocks from the start of the split, so at a
fixed ``eval.batches`` the longer lengths cover more text; the shorter lengths' text is a
prefix of the longer ones'. Evaluation runs on one device (no DDP/FSDP).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass, field, fields, make_dataclass, replace
from typing import Any, Optional, get_type_hints

import torch
from omegaconf import MISSING, OmegaConf

from fatrain.checkpoint import CheckpointError, is_sharded, list_checkpoints, load_checkpoint
from fatrain.config import AttentionConfig, DataConfig, ModelConfig, PRECISIONS, TrainerConfig, WANDB_MODES
from fatrain.data import PackedBlocks, build_data, iter_once
from fatrain.model import GPT, GPTSpec
from fatrain.passkey import run_passkey
from fatrain.trainer import PRECISION_DTYPES, build_spec, check_precision, check_spec_compatible, select_device

SPLITS = ("val", "train")

# ----- configuration ---------------------------------------------------------------------------


def _overrides_of(cls):
    """A dataclass with ``cls``'s fields, each Optional and None by default: None = the checkpoint's."""
    hints = get_type_hints(cls)
    return make_dataclass(f"{cls.__name__}Overrides",
                          [(f.name, Optional[hints[f.name]], field(default=None)) for f in fields(cls)])


ModelOverrides = _overrides_of(ModelConfig)
AttentionOverrides = _overrides_of(AttentionConfig)
DataOverrides = _overrides_of(DataConfig)


@dataclass
class EvalSettings:
    split: str = "val"  # val | train: which split of the corpus to evaluate
    seq_lens: list[int] = field(default_factory=list)  # empty: data.seq_len (the checkpoint's unless overridden)
    batch_size: Optional[int] = None  # None: the checkpoint's trainer.batch_size
    batches: Optional[int] = 20  # at most this many batches per length; None: the whole split
    bucket_size: int = 64  # width of the position buckets of the loss-vs-position curve
    backends: list[str] = field(default_factory=list)  # backend agreement: e.g. [naive, flash_v1, flash_v2, sdpa]
    agreement_batches: int = 1  # batches per backend for the agreement check (always fp32)
    agreement_tolerance: float = 1e-4
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    all_checkpoints: bool = False  # run or sweep folders: every checkpoint, not only each run's newest
    plots: bool = True


@dataclass
class PasskeySettings:
    enabled: bool = True
    context_lens: list[int] = field(default_factory=list)  # empty: the evaluated lengths
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 10  # tasks per (context, depth) cell
    seed: int = 0
    key_digits: int = 5


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
    logger: EvalLoggerConfig = field(default_factory=EvalLoggerConfig)


def register_eval_configs() -> None:
    """Register the eval schema and the ``checkpoint`` options of the attention and data groups."""
    from hydra.core.config_store import ConfigStore

    from fatrain.config import register_configs

    register_configs()
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(group="attention", name="checkpoint", node=AttentionOverrides, package="attention")
    cs.store(group="data", name="checkpoint", node=DataOverrides, package="data")


def _choice(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed (choose from: {', '.join(map(str, allowed))})")


def validate_eval_config(cfg) -> None:
    """Value checks before any work; raise ValueError naming the key and what is allowed."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is required: a checkpoint file, a run folder or a sweep folder")
    e, p = cfg.eval, cfg.passkey
    _choice(e.split, SPLITS, "eval.split")
    _choice(e.precision, PRECISIONS, "eval.precision")
    _choice(cfg.logger.wandb.mode, WANDB_MODES, "logger.wandb.mode")
    from fatrain.kernels import available_backends

    for name in e.backends:
        _choice(name, available_backends(), "eval.backends")
    for length in list(e.seq_lens) + list(p.context_lens):
        if length <= 0:
            raise ValueError(f"eval.seq_lens / passkey.context_lens: {length} must be > 0")
    for key in ("batch_size", "batches"):
        if e[key] is not None and e[key] <= 0:
            raise ValueError(f"eval.{key}={e[key]} must be > 0 (or null)")
    for key in ("bucket_size", "agreement_batches"):
        if e[key] <= 0:
            raise ValueError(f"eval.{key}={e[key]} must be > 0")
    if p.trials <= 0 or p.key_digits <= 0:
        raise ValueError(f"passkey.trials={p.trials} and passkey.key_digits={p.key_digits} must be > 0")
    for depth in p.depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey.depths: {depth} is not a fraction of the context (allowed: 0.0 .. 1.0)")


# ----- checkpoint -> model ---------------------------------------------------------------------


# The groups of the saved training config that building the model and its data reads.
SAVED_GROUPS = {"model": ModelConfig, "attention": AttentionConfig, "data": DataConfig, "trainer": TrainerConfig}


def _on_schema(schema, values: dict):
    """``values`` on today's schema: keys it no longer has are dropped, keys it gained get their defaults.

    Checkpoints outlive config changes; an old checkpoint must still load after a field is
    added or removed (data.num_workers was).
    """
    node = OmegaConf.structured(schema)
    known = {f.name for f in fields(schema)}
    for key, value in values.items():
        if key in known:
            node[key] = value
    return node


def _set_values(node, overrides) -> None:
    """Copy the non-null values of ``overrides`` onto ``node``."""
    for key, value in (overrides or {}).items():
        if value is not None:
            node[key] = value


@dataclass
class LoadedCheckpoint:
    """A model ready for evaluation and what it came from."""

    path: str
    model: GPT
    spec: GPTSpec
    config: Any  # the checkpoint's training config merged with the overrides (DictConfig)
    saved_config: dict  # the checkpoint's training config as saved
    state: dict  # the checkpoint's metadata: step, tokens_seen, spec (without model weights)
    device: torch.device
    notes: list[str]


def load_model(path: str, *, model_overrides=None, attention_overrides=None, data_overrides=None,
               device: str = "auto", device_key: str = "eval.device") -> LoadedCheckpoint:
    """Load ``path`` and build its GPT with the overrides applied; raise CheckpointError if they do not fit.

    Only GPTSpec's runtime fields (``RUNTIME_SPEC_FIELDS``: the attention backend and
    window among them) may differ from the checkpoint; a model override that changes a
    shape (``model.n_head=8`` for a 4-head checkpoint) is an error naming both values.
    The tokenizer and document masking are the checkpoint's: the model was trained with them.
    """
    state = load_checkpoint(path)
    saved_cfg = state["config"]
    if not isinstance(saved_cfg, dict) or not {"model", "attention", "data", "trainer"} <= set(saved_cfg):
        raise CheckpointError(f"checkpoint {path} holds no fatrain training config (model, attention, data, trainer)")
    try:
        cfg = OmegaConf.create({group: _on_schema(schema, saved_cfg[group]) for group, schema in SAVED_GROUPS.items()})
    except Exception as e:  # omegaconf's validation errors: a saved value of the wrong type
        raise CheckpointError(f"checkpoint {path}: its saved config does not fit today's schema: "
                              f"{str(e).splitlines()[0]}") from None
    notes = []
    _set_values(cfg.model, model_overrides)
    _set_values(cfg.attention, attention_overrides)
    trained_with = {"tokenizer": cfg.data.tokenizer, "document_masking": cfg.data.document_masking}
    _set_values(cfg.data, data_overrides)
    for key, value in trained_with.items():
        if cfg.data[key] != value:
            notes.append(f"data.{key}={cfg.data[key]!r} ignored: the checkpoint was trained with {value!r}")
            cfg.data[key] = value

    from fatrain.kernels import available_backends

    _choice(cfg.attention.backend, available_backends(), "attention.backend")
    saved_spec = dict(state["spec"])
    spec = build_spec(cfg, saved_spec["vocab_size"])
    check_spec_compatible(saved_spec, spec, f"evaluating {path}")
    spec = replace(spec, activation_checkpointing=False)
    torch_device = _renamed(select_device, "trainer.device", device_key, device)
    model = GPT(spec)
    try:
        model.load_state_dict(_plain_state_dict(state["model"]))
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: the weights do not fit the saved spec: "
                              f"{str(e).splitlines()[0]}") from None
    model.to(torch_device).eval()
    meta = {k: v for k, v in state.items() if k in ("step", "tokens_seen", "spec", "wandb_id")}
    return LoadedCheckpoint(path=path, model=model, spec=spec, config=cfg, saved_config=saved_cfg, state=meta,
                            device=torch_device, notes=notes)


def _plain_state_dict(state_dict: dict) -> dict:
    # NOTE: weights saved from a torch.compile'd or DDP-wrapped module carry these prefixes.
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def with_backend(loaded: LoadedCheckpoint, backend: str) -> GPT:
    """The same weights with another attention backend (a fresh GPT; the original is untouched)."""
    model = GPT(replace(loaded.spec, attention=backend))
    model.load_state_dict(loaded.model.state_dict())
    return model.to(loaded.device).eval()


def autocast_for(precision: str, device: torch.device):
    dtype = PRECISION_DTYPES[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _renamed(check, trainer_key: str, key: str, *args):
    """Run one of the trainer's checks; its error names the trainer's key, so name ours instead."""
    try:
        return check(*args)
    except ValueError as e:
        raise ValueError(str(e).replace(trainer_key, key)) from None


def check_eval_precision(precision: str, device: torch.device, backend: str, key: str = "eval.precision") -> None:
    _renamed(check_precision, "trainer.precision", key, precision, device, backend)


# ----- loss by length and position ---------------------------------------------------------------


def split_stream(data_cfg, split: str):
    """(tokens, doc_ids, tokenizer) of one split of the corpus ``data_cfg`` names."""
    # seq_len=1 asks the least of the corpus: the eval lengths are packed from the stream below.
    cfg = OmegaConf.merge(data_cfg, {"seq_len": 1})
    bundle = build_data(cfg, seed=0)
    blocks = bundle.val if split == "val" else bundle.train
    return blocks.tokens, blocks.doc_ids, bundle.tokenizer


@torch.no_grad()
def evaluate_blocks(model: GPT, blocks: PackedBlocks, *, batch_size: int, max_batches: Optional[int],
                    bucket_size: int, device, autocast, count_bytes: bool) -> dict:
    """Loss, perplexity, bits and per-position-bucket loss of ``model`` on the first batches of ``blocks``."""
    seq_len = blocks.seq_len
    position_sum = torch.zeros(seq_len, dtype=torch.float64)
    sequences, num_bytes, batches = 0, 0, 0
    for batch in iter_once(blocks, batch_size, max_batches=max_batches, device=device):
        with autocast():
            _, loss = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], reduction="none")
        position_sum += loss.double().sum(dim=0).cpu()
        sequences += loss.shape[0]
        batches += 1
        if count_bytes:
            # Byte tokenizer: ids 0..255 are one byte each; the end-of-text id decodes to nothing.
            num_bytes += int((batch["labels"] < 256).sum())
    tokens = sequences * seq_len
    nats = position_sum.sum().item()
    mean = nats / tokens
    buckets = []
    for start in range(0, seq_len, bucket_size):
        end = min(seq_len, start + bucket_size)
        buckets.append({"start": start, "end": end - 1,
                        "loss": position_sum[start:end].sum().item() / (sequences * (end - start))})
    result = {"seq_len": seq_len, "batches": batches, "tokens": tokens, "loss": mean,
              "perplexity": math.exp(min(mean, 700.0)), "bits_per_token": mean / math.log(2), "buckets": buckets}
    if count_bytes:
        result["bytes"] = num_bytes
        result["bits_per_byte"] = nats / (math.log(2) * num_bytes) if num_bytes else None
    return result


def multi_length_eval(model, tokens, doc_ids, lengths, *, train_len: int, split: str, batch_size: int,
                      max_batches, bucket_size: int, device, autocast, count_bytes: bool) -> list[dict]:
    """One result per length; a length the split cannot fill once is recorded as skipped, not raised."""
    results = []
    for length in lengths:
        blocks = PackedBlocks(tokens, doc_ids, length)
        if len(blocks) == 0:
            results.append({"seq_len": length, "skipped": f"the {split} split has {len(tokens)} tokens, "
                                                          f"fewer than one block of seq_len+1={length + 1}"})
            continue
        result = evaluate_blocks(model, blocks, batch_size=batch_size, max_batches=max_batches,
                                 bucket_size=bucket_size, device=device, autocast=autocast, count_bytes=count_bytes)
        result["beyond_training_length"] = length > train_len
        results.append(result)
    return results


def backend_agreement(loaded: LoadedCheckpoint, backends, blocks: PackedBlocks, *, batch_size: int,
                      batches: int, tolerance: float) -> dict:
    """Mean loss of the same batches with each backend, in fp32, and the largest difference.

    ``max_abs_diff`` is max - min over the backends' mean losses; ``max_token_abs_diff`` the
    largest difference of any single token's loss from the first backend's. A backend that
    cannot run this model (a missing feature) is listed under ``errors``.
    """
    device = loaded.device
    losses, errors, token_losses = {}, {}, {}
    for name in backends:
        try:
            check_eval_precision("fp32", device, name)
            model = with_backend(loaded, name)
            per_token = []
            with torch.no_grad():
                for batch in iter_once(blocks, batch_size, max_batches=batches, device=device):
                    _, loss = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], reduction="none")
                    per_token.append(loss.double().cpu())
        except (NotImplementedError, ValueError, RuntimeError) as e:
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        token_losses[name] = torch.cat(per_token)
        losses[name] = token_losses[name].mean().item()
    result = {"seq_len": blocks.seq_len, "batches": batches, "precision": "fp32", "losses": losses,
              "errors": errors, "tolerance": tolerance}
    if losses:
        first = next(iter(token_losses.values()))
        result["max_abs_diff"] = max(losses.values()) - min(losses.values())
        result["max_token_abs_diff"] = max((t - first).abs().max().item() for t in token_losses.values())
        result["agree"] = result["max_abs_diff"] <= tolerance and not errors
    return result


# ----- one checkpoint ----------------------------------------------------------------------------


def evaluate_checkpoint(cfg, path: str, out_dir: str) -> dict:
    """Evaluate one checkpoint with the settings ``cfg``; write eval.json and plots to ``out_dir``."""
    e = cfg.eval
    loaded = load_model(path, model_overrides=cfg.model, attention_overrides=cfg.attention,
                        data_overrides=cfg.data, device=e.device)
    for note in loaded.notes:
        print(f"note: {note}")
    train_cfg, device = loaded.config, loaded.device
    check_eval_precision(e.precision, device, loaded.spec.attention)
    autocast = autocast_for(e.precision, device)
    saved_cfg = OmegaConf.create(loaded.saved_config)
    train_len = saved_cfg.data.seq_len
    lengths = list(e.seq_lens) or [train_cfg.data.seq_len]
    batch_size = e.batch_size or train_cfg.trainer.batch_size

    tokens, doc_ids, tokenizer = split_stream(train_cfg.data, e.split)
    byte_level = tokenizer.name == "byte"
    lengths_out = multi_length_eval(loaded.model, tokens, doc_ids, lengths, train_len=train_len, split=e.split,
                                    batch_size=batch_size, max_batches=e.batches, bucket_size=e.bucket_size,
                                    device=device, autocast=autocast, count_bytes=byte_level)
    result = {
        "checkpoint": os.path.abspath(path),
        "step": loaded.state.get("step"),
        "tokens_seen": loaded.state.get("tokens_seen"),
        "train": {"seq_len": train_len, "attention": saved_cfg.attention.backend,
                  "group": OmegaConf.select(saved_cfg, "logger.wandb.group"),
                  "project": OmegaConf.select(saved_cfg, "logger.wandb.project"),
                  "wandb_id": loaded.state.get("wandb_id")},
        "attention": loaded.spec.attention,
        "data": {"name": train_cfg.data.name, "source": train_cfg.data.source, "path": train_cfg.data.path,
                 "hf_name": train_cfg.data.hf_name, "split": e.split, "split_tokens": int(len(tokens))},
        "tokenizer": tokenizer.name,
        "bits_unit": "byte" if byte_level else "token",
        "precision": e.precision,
        "batch_size": batch_size,
        "bucket_size": e.bucket_size,
        "lengths": lengths_out,
        "environment": environment(device),
        "notes": loaded.notes,
    }
    if cfg.passkey.enabled:
        p = cfg.passkey
        result["passkey"] = run_passkey(loaded.model, tokenizer, context_lens=list(p.context_lens) or lengths,
                                        depths=list(p.depths), trials=p.trials, seed=p.seed, digits=p.key_digits,
                                        batch_size=batch_size, device=device, autocast=autocast)
    if e.backends:
        evaluated = [r for r in lengths_out if "skipped" not in r]
        if evaluated:
            blocks = PackedBlocks(tokens, doc_ids, evaluated[0]["seq_len"])
            result["backend_agreement"] = backend_agreement(loaded, list(e.backends), blocks, batch_size=batch_size,
                                                            batches=e.agreement_batches,
                                                            tolerance=e.agreement_tolerance)
        else:
            result["backend_agreement"] = {"skipped": "no evaluation length fits the split"}

    os.makedirs(out_dir, exist_ok=True)
    result["files"] = {"json": os.path.join(out_dir, "eval.json")}
    if e.plots:
        result["files"].update(write_plots(result, out_dir))
    result["wandb_id"] = log_to_wandb(cfg, result, loaded.saved_config, out_dir)
    write_json(result, result["files"]["json"])
    return result


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def git_sha() -> Optional[str]:
    """The checkout's commit as the benchmarks record it (``FATRAIN_GIT_SHA`` overrides), or None."""
    from .benchmarking import git_sha as checkout_sha
    sha = checkout_sha()
    return None if sha == "unknown" else sha


def write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----- plots -------------------------------------------------------------------------------------


def write_plots(result: dict, out_dir: str) -> dict:
    """loss_vs_position.png (one line per length) and passkey.png (context x depth heat map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    evaluated = [r for r in result["lengths"] if "skipped" not in r]
    if evaluated:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in evaluated:
            centers = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
            ax.plot(centers, [b["loss"] for b in r["buckets"]], marker=".", label=f"seq_len {r['seq_len']}")
        ax.axvline(result["train"]["seq_len"], color="grey", linestyle="--", linewidth=1, label="training length")
        ax.set_xlabel(f"position in the sequence (buckets of {result['bucket_size']})")
        ax.set_ylabel("mean loss (nats/token)")
        ax.set_title(f"step {result['step']}, attention={result['attention']}, {result['data']['split']} split")
        ax.legend()
        fig.tight_layout()
        files["loss_vs_position"] = os.path.join(out_dir, "loss_vs_position.png")
        fig.savefig(files["loss_vs_position"], dpi=120)
        plt.close(fig)
    passkey = result.get("passkey")
    if passkey and any(v is not None for row in passkey["accuracy"] for v in row):
        grid = [[float("nan") if v is None else v for v in row] for row in passkey["accuracy"]]
        fig, ax = plt.subplots(figsize=(1.2 * len(passkey["context_lens"]) + 2.5, 0.6 * len(passkey["depths"]) + 2))
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(passkey["context_lens"])), [str(c) for c in passkey["context_lens"]])
        ax.set_yticks(range(len(passkey["depths"])), [f"{d:g}" for d in passkey["depths"]])
        for i, row in enumerate(passkey["accuracy"]):
            for j, value in enumerate(row):
                color = "k" if value is None or value > 0.5 else "w"  # readable on viridis' dark and light ends
                ax.text(j, i, "-" if value is None else f"{value:.2f}", ha="center", va="center", color=color)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth of the key")
        ax.set_title(f"passkey accuracy ({passkey['trials']} trials per cell)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        files["passkey"] = os.path.join(out_dir, "passkey.png")
        fig.savefig(files["passkey"], dpi=120)
        plt.close(fig)
    return files


# ----- W&B -------------------------------------------------------------------------------------


def flat_metrics(result: dict) -> dict:
    """The scalar numbers of one eval result, W&B-style keys (eval/loss@256, passkey/acc@1024/d0.5, ...)."""
    unit = result["bits_unit"]
    out = {}
    for r in result["lengths"]:
        if "skipped" in r:
            continue
        n = r["seq_len"]
        out[f"eval/loss@{n}"] = r["loss"]
        out[f"eval/perplexity@{n}"] = r["perplexity"]
        out[f"eval/bits_per_{unit}@{n}"] = r[f"bits_per_{unit}"]
    passkey = result.get("passkey")
    if passkey:
        for i, depth in enumerate(passkey["depths"]):
            for j, length in enumerate(passkey["context_lens"]):
                if passkey["accuracy"][i][j] is not None:
                    out[f"passkey/accuracy@{length}/depth{depth:g}"] = passkey["accuracy"][i][j]
    agreement = result.get("backend_agreement", {})
    if "max_abs_diff" in agreement:
        out["eval/backend_max_abs_diff"] = agreement["max_abs_diff"]
        for name, loss in agreement["losses"].items():
            out[f"eval/backend_loss/{name}"] = loss
    return out


def log_to_wandb(cfg, result: dict, saved_cfg: dict, out_dir: str) -> Optional[str]:
    """One W&B run (job_type=eval) in the training run's group; returns its id, or None when disabled."""
    w = cfg.logger.wandb
    if w.mode == "disabled":
        return None
    from fatrain.metrics import WandbLogger

    saved_w = saved_cfg.get("logger", {}).get("wandb", {})
    run_name = saved_w.get("name") or os.path.basename(os.path.dirname(os.path.dirname(result["checkpoint"])))
    logger = WandbLogger(mode=w.mode, project=w.project or saved_w.get("project") or "fatrain",
                         entity=w.entity or saved_w.get("entity"), name=w.name or f"eval-{run_name}-step{result['step']}",
                         group=w.group or saved_w.get("group"), tags=list(w.tags), run_dir=out_dir,
                         job_type="eval", config={"eval": OmegaConf.to_container(cfg, resolve=True),
                                                  "checkpoint": result["checkpoint"], "step": result["step"],
                                                  "train_wandb_id": result["train"]["wandb_id"], "train": saved_cfg})
    try:
        metrics = flat_metrics(result)
        for key, png in result["files"].items():
            if png.endswith(".png"):
                metrics[f"plots/{key}"] = logger._wandb.Image(png)
        logger.log(metrics, result["step"] or 0)
        return logger.run_id
    finally:
        logger.close()


# ----- checkpoints, runs and sweeps ---------------------------------------------------------------


def find_checkpoints(path: str, all_checkpoints: bool = False) -> list[tuple[str, str]]:
    """(run name, checkpoint path) pairs that ``ckpt_path`` names, in a stable order.

    A file is itself; a folder is searched for ``checkpoints/`` folders (one training run, or
    every job of a Hydra sweep), and each contributes its newest checkpoint (or all of them).
    """
    if os.path.isfile(path) or is_sharded(path):
        return [("", path)]
    if not os.path.isdir(path):
        raise CheckpointError(f"ckpt_path={path}: no such checkpoint file or folder")
    found = []
    for folder, dirs, _ in os.walk(path):
        dirs.sort(key=_natural_key)
        ckpts = list_checkpoints(folder)
        if not ckpts:
            continue
        run_dir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
        name = os.path.relpath(run_dir, path)
        name = "" if name == "." else name
        for ckpt in (ckpts if all_checkpoints else ckpts[-1:]):
            found.append((name, ckpt))
    if not found:
        raise CheckpointError(f"ckpt_path={path}: no checkpoints (ckpt_<step>.pt or ckpt_<step>.dcp) in this folder or below it")
    return found


def _natural_key(name: str):
    # Hydra numbers sweep jobs 0_..., 1_..., 10_...: sort them as numbers.
    head = name.split("_", 1)[0]
    return (0, int(head), name) if head.isdigit() else (1, 0, name)


def sweep_overrides(run_dir: str) -> str:
    """The job's command-line overrides from Hydra's .hydra/overrides.yaml, joined; '' if absent."""
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(path):
        return ""
    return " ".join(str(o) for o in OmegaConf.load(path))


def table_rows(results: list[tuple[str, dict]], root: str) -> list[dict]:
    rows = []
    for name, r in results:
        row = {"run": name or ".", "step": r["step"], "tokens_seen": r["tokens_seen"],
               "train_attention": r["train"]["attention"], "attention": r["attention"],
               "overrides": sweep_overrides(os.path.join(root, name)) if os.path.isdir(root) else ""}
        unit = r["bits_unit"]
        for length in r["lengths"]:
            n = length["seq_len"]
            row[f"loss@{n}"] = length.get("loss")
            row[f"bits_per_{unit}@{n}"] = length.get(f"bits_per_{unit}")
        if "passkey" in r:
            p = r["passkey"]
            for j, n in enumerate(p["context_lens"]):
                cells = [row_[j] for row_ in p["accuracy"] if row_[j] is not None]
                row[f"passkey@{n}"] = sum(cells) / len(cells) if cells else None
        if "max_abs_diff" in r.get("backend_agreement", {}):
            row["backend_max_abs_diff"] = r["backend_agreement"]["max_abs_diff"]
        rows.append(row)
    return rows


def write_table(rows: list[dict], out_dir: str) -> tuple[str, str]:
    """table.csv and table.md: one row per evaluated checkpoint, columns in first-seen order."""
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    csv_path, md_path = os.path.join(out_dir, "table.csv"), os.path.join(out_dir, "table.md")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        if v is None:
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    with open(md_path, "w", encoding="utf-8") as f:
        f.write("| " + " | ".join(columns) + " |\n")
        f.write("|" + "---|" * len(columns) + "\n")
        for row in rows:
            f.write("| " + " | ".join(cell(row.get(c)) for c in columns) + " |\n")
    return csv_path, md_path


def run_eval(cfg, out_dir: str) -> dict:
    """Evaluate every checkpoint ``cfg.ckpt_path`` names; write per-checkpoint outputs and the table."""
    validate_eval_config(cfg)
    targets = find_checkpoints(cfg.ckpt_path, cfg.eval.all_checkpoints)
    results = []
    for name, path in targets:
        step_name = os.path.splitext(os.path.basename(path))[0]
        sub_dir = out_dir if len(targets) == 1 else os.path.join(out_dir, name or ".", step_name)
        result = evaluate_checkpoint(cfg, path, sub_dir)
        print(summary_line(name, result))
        results.append((name, result))
    csv_path, md_path = write_table(table_rows(results, cfg.ckpt_path), out_dir)
    print(f"wrote {csv_path} and {md_path}")
    return {"results": [r for _, r in results], "table_csv": csv_path, "table_md": md_path}


def summary_line(name: str, result: dict) -> str:
    unit = result["bits_unit"]
    parts = [f"{name or os.path.basename(result['checkpoint'])} step {result['step']}"]
    for r in result["lengths"]:
        if "skipped" in r:
            parts.append(f"L={r['seq_len']}: skipped ({r['skipped']})")
        else:
            parts.append(f"L={r['seq_len']}: loss {r['loss']:.4f} ppl {r['perplexity']:.2f} "
                         f"bits/{unit} {r[f'bits_per_{unit}']:.4f}")
    agreement = result.get("backend_agreement", {})
    if "max_abs_diff" in agreement:
        parts.append(f"backends max |loss diff| {agreement['max_abs_diff']:.2e}")
    return " | ".join(parts)
