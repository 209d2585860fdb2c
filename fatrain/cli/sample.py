"""``fatrain-sample``: text from a checkpoint, with a prompt, temperature, top-k and seed.

    fatrain-sample ckpt_path=outputs/train/<run> prompt="ROMEO:" max_new_tokens=300
    fatrain-sample ckpt_path=<ckpt.pt> temperature=0 use_cache=false attention.backend=flash_v2

Samples go to stdout; nothing is written to disk. How decoding works (KV cache or full
recompute, the same text from the same seed) is in fatrain.eval.sample.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fatrain.config import register_configs
from fatrain.eval.sample import generate_samples
from fatrain.runtime import user_errors

register_configs()


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="sample")
def main(cfg: DictConfig) -> list[str]:
    with user_errors():
        texts = generate_samples(cfg)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"----- sample {i} -----")
        print(text)
    return texts


if __name__ == "__main__":
    main()
