"""From a checkpoint to a model ready for evaluation, and from a folder to its checkpoints.

A checkpoint holds its training config. ``load_model`` puts that config on today's schema
(keys removed since are dropped, keys added get their defaults), applies the evaluation's
overrides, and builds the GPT from it: runtime fields such as the attention backend may
change, anything that fixes a shape must match the checkpoint or the load stops with the
reason. The tokenizer and document masking are always the checkpoint's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, get_type_hints

import torch
from omegaconf import OmegaConf

from fatrain.checkpoint import CheckpointError, is_sharded, list_checkpoints, load_checkpoint
from fatrain.config import AttentionConfig, DataConfig, ModelConfig, TrainerConfig
from fatrain.kernels import available_backends
from fatrain.model import GPT, GPTSpec
from fatrain.runtime import select_device
from fatrain.trainer import build_spec, check_spec_compatible

# The groups of the saved training config that building the model and its data reads.
SAVED_GROUPS = {"model": ModelConfig, "attention": AttentionConfig, "data": DataConfig, "trainer": TrainerConfig}


@dataclass
class LoadedCheckpoint:
    """A model ready for evaluation and what it came from."""

    path: str
    model: GPT
    spec: GPTSpec
    config: Any  # the checkpoint's training config merged with the overrides (DictConfig)
    saved_config: dict  # the checkpoint's training config as saved
    state: dict  # the checkpoint's metadata: step, tokens_seen, spec, wandb_id (without model weights)
    device: torch.device
    notes: list[str]


def load_model(path: str, *, model_overrides=None, attention_overrides=None, data_overrides=None,
               device: str = "auto", device_key: str = "eval.device") -> LoadedCheckpoint:
    """Load ``path`` and build its GPT with the overrides applied; raise CheckpointError if they do not fit.

    Only GPTSpec's runtime fields (``RUNTIME_SPEC_FIELDS``: the attention backend, the
    window and the RoPE scaling among them) may differ from the checkpoint; a model override that changes a
    shape (``model.n_head=8`` for a 4-head checkpoint) is an error naming both values.
    """
    state = load_checkpoint(path)
    saved_cfg = state["config"]
    if not isinstance(saved_cfg, dict) or not set(SAVED_GROUPS) <= set(saved_cfg):
        raise CheckpointError(f"checkpoint {path} holds no fatrain training config (model, attention, data, trainer)")
    try:
        cfg = OmegaConf.create({group: _on_schema(schema, saved_cfg[group]) for group, schema in SAVED_GROUPS.items()})
    except Exception as e:  # omegaconf's validation errors: a saved value of the wrong type
        raise CheckpointError(f"checkpoint {path}: its saved config does not fit today's schema: "
                              f"{str(e).splitlines()[0]}") from None
    notes = []
    _set_values(cfg.model, model_overrides)
    scaling = cfg.model.rope_scaling
    if scaling.type == "yarn" and scaling.original_seq_len is None:
        scaling.original_seq_len = cfg.data.seq_len  # the length the checkpoint was trained at
        notes.append(f"model.rope_scaling.original_seq_len={scaling.original_seq_len}: the checkpoint's data.seq_len")
    _set_values(cfg.attention, attention_overrides)
    trained_with = {"tokenizer": cfg.data.tokenizer, "document_masking": cfg.data.document_masking}
    _set_values(cfg.data, data_overrides)
    for key, value in trained_with.items():
        if cfg.data[key] != value:
            notes.append(f"data.{key}={cfg.data[key]!r} ignored: the checkpoint was trained with {value!r}")
            cfg.data[key] = value

    if cfg.attention.backend not in available_backends():
        raise ValueError(f"attention.backend={cfg.attention.backend!r} is not allowed "
                         f"(choose from: {', '.join(available_backends())})")
    saved_spec = dict(state["spec"])
    spec = build_spec(cfg, saved_spec["vocab_size"])
    check_spec_compatible(saved_spec, spec, f"evaluating {path}")
    spec = replace(spec, activation_checkpointing=False)
    torch_device = select_device(device, device_key)
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


def with_backend(loaded: LoadedCheckpoint, backend: str) -> GPT:
    """The same weights with another attention backend (a fresh GPT; the original is untouched)."""
    model = GPT(replace(loaded.spec, attention=backend))
    model.load_state_dict(loaded.model.state_dict())
    return model.to(loaded.device).eval()


def _on_schema(schema, values: dict):
    """``values`` on today's schema: keys it no longer has are dropped, keys it gained get their defaults.

    Checkpoints outlive config changes; an old checkpoint must still load after a field is
    added or removed (data.num_workers was).
    """
    node = OmegaConf.structured(schema)
    known = {f.name: f for f in fields(schema)}
    hints = get_type_hints(schema)
    for key, value in values.items():
        if key in known:
            node[key] = _on_schema(hints[key], value) if is_dataclass(hints[key]) and isinstance(value, dict) else value
    return node


def _set_values(node, overrides) -> None:
    """Copy the non-null values of ``overrides`` onto ``node`` (a nested group key by key)."""
    for key, value in (overrides or {}).items():
        if OmegaConf.is_dict(value) and OmegaConf.is_dict(node.get(key)):
            _set_values(node[key], value)
        elif value is not None:
            node[key] = value


def _plain_state_dict(state_dict: dict) -> dict:
    # NOTE: weights saved from a torch.compile'd or DDP-wrapped module carry these prefixes.
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


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
        raise CheckpointError(f"ckpt_path={path}: no checkpoints (ckpt_<step>.pt or ckpt_<step>.dcp) "
                              "in this folder or below it")
    return found


def one_checkpoint(path: str) -> str:
    """The checkpoint a file or a run folder names (its newest); several runs are an error."""
    found = find_checkpoints(path)
    if len(found) > 1:
        runs = ", ".join(name for name, _ in found[:5])
        raise CheckpointError(f"ckpt_path={path} holds {len(found)} runs ({runs}, ...): name one run or checkpoint")
    return found[0][1]


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
