"""Text from a checkpoint, with a prompt, temperature, top-k and seed (``fatrain-sample``).

Decoding uses ``GPT.generate``: with ``use_cache=true`` (the default) the prompt fills a
KV cache once and each new token is one query attending to every cached key (the
attention call's bottom-right-aligned ``seqlen_q != seqlen_k`` path); ``use_cache=false``
recomputes the whole sequence at every step. The same seed gives the same text, with or
without the cache. A sample ends at its first end-of-text token.
"""

from __future__ import annotations

import sys
import time

import torch

from fatrain.config import validate_sample_config
from fatrain.data import load_tokenizer
from fatrain.eval.loading import load_model, one_checkpoint
from fatrain.runtime import autocast_for, check_precision


def generate_samples(cfg) -> list[str]:
    """``cfg.num_samples`` continuations of ``cfg.prompt``, prompt included, as text."""
    validate_sample_config(cfg)
    loaded = load_model(one_checkpoint(cfg.ckpt_path), attention_overrides=cfg.attention, device=cfg.device,
                        device_key="device")
    check_precision(cfg.precision, loaded.device, loaded.spec.attention, key="precision")
    tokenizer = load_tokenizer(loaded.config.data.tokenizer)
    prompt = tokenizer.encode(cfg.prompt) if cfg.prompt else [tokenizer.eot_id]
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=loaded.device)
    generator = torch.Generator(device=loaded.device).manual_seed(cfg.seed)
    start = time.perf_counter()
    with autocast_for(cfg.precision, loaded.device)():
        out = loaded.model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                    generator=generator, use_cache=cfg.use_cache)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    seconds = time.perf_counter() - start
    made = out.shape[0] * (out.shape[1] - len(prompt))
    # NOTE: on stderr, so stdout stays the samples alone. The first call of a process includes
    # compiling (and, for a new shape class, tuning) the kernels.
    print(f"sampled {out.shape[0]} x {out.shape[1] - len(prompt)} tokens in {seconds:.2f} s "
          f"({made / max(seconds, 1e-9):,.0f} tokens/s, attention={loaded.spec.attention}, "
          f"{'KV cache' if cfg.use_cache else 'no cache'}, {loaded.device.type})", file=sys.stderr)
    texts = []
    for row in out.tolist():
        new = row[len(prompt):]
        if tokenizer.eot_id in new:
            new = new[:new.index(tokenizer.eot_id)]
        # Decoding prompt and continuation together keeps a character split across them intact.
        texts.append(tokenizer.decode((prompt if cfg.prompt else []) + new))
    return texts
