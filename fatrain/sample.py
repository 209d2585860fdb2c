"""``fatrain-sample``: text from a checkpoint, with a prompt, temperature, top-k and seed.

    fatrain-sample ckpt_path=outputs/train/<run> prompt="ROMEO:" max_new_tokens=300
    fatrain-sample ckpt_path=<ckpt.pt> temperature=0 use_cache=false attention.backend=flash_v2

Decoding uses ``GPT.generate``: with ``use_cache=true`` (the default) the prompt fills a
KV cache once and each new token is one query attending to every cached key (the
attention call's bottom-right-aligned ``seqlen_q != seqlen_k`` path); ``use_cache=false``
recomputes the whole sequence at every step. The same seed gives the same text, with or
without the cache. A sample ends at its first end-of-text token. Samples go to stdout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import hydra
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from fatrain.checkpoint import CheckpointError
from fatrain.config import PRECISIONS
from fatrain.data import load_tokenizer
from fatrain.evaluation import autocast_for, check_eval_precision, find_checkpoints, load_model, register_eval_configs
from fatrain.train import USER_ERRORS


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


def register_sample_configs() -> None:
    from hydra.core.config_store import ConfigStore

    register_eval_configs()  # the attention group's 'checkpoint' option
    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def validate_sample_config(cfg) -> None:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is required: a checkpoint file or a run folder")
    if cfg.max_new_tokens <= 0 or cfg.num_samples <= 0:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} and num_samples={cfg.num_samples} must be > 0")
    if cfg.temperature < 0:
        raise ValueError(f"temperature={cfg.temperature} must be >= 0 (0 is greedy)")
    if cfg.top_k is not None and cfg.top_k <= 0:
        raise ValueError(f"top_k={cfg.top_k} must be > 0 (or null for no filter)")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r} is not allowed (choose from: {', '.join(PRECISIONS)})")


def resolve_checkpoint(path: str) -> str:
    found = find_checkpoints(path)
    if len(found) > 1:
        runs = ", ".join(name for name, _ in found[:5])
        raise CheckpointError(f"ckpt_path={path} holds {len(found)} runs ({runs}, ...): name one run or checkpoint")
    return found[0][1]


def generate_samples(cfg) -> list[str]:
    """``cfg.num_samples`` continuations of ``cfg.prompt``, prompt included, as text."""
    validate_sample_config(cfg)
    loaded = load_model(resolve_checkpoint(cfg.ckpt_path), attention_overrides=cfg.attention, device=cfg.device,
                        device_key="device")
    check_eval_precision(cfg.precision, loaded.device, loaded.spec.attention, key="precision")
    tokenizer = load_tokenizer(loaded.config.data.tokenizer)
    prompt = tokenizer.encode(cfg.prompt) if cfg.prompt else [tokenizer.eot_id]
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=loaded.device)
    generator = torch.Generator(device=loaded.device).manual_seed(cfg.seed)
    with autocast_for(cfg.precision, loaded.device)():
        out = loaded.model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                    generator=generator, use_cache=cfg.use_cache)
    texts = []
    for row in out.tolist():
        new = row[len(prompt):]
        if tokenizer.eot_id in new:
            new = new[:new.index(tokenizer.eot_id)]
        # Decoding prompt and continuation together keeps a character split across them intact.
        texts.append(tokenizer.decode((prompt if cfg.prompt else []) + new))
    return texts


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="sample")
def main(cfg: DictConfig) -> list[str]:
    try:
        texts = generate_samples(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"----- sample {i} -----")
        print(text)
    return texts


register_sample_configs()

if __name__ == "__main__":
    main()
