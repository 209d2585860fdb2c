"""fatrain-sample: deterministic from the seed, KV cache and full recompute agree, bad input exits 2."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from fatrain.config import register_configs
from fatrain.eval.sample import generate_samples
from fatrain.trainer import run_training as run

register_configs()

TRAIN = [
    "model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.n_kv_head=2", "data.seq_len=32",
    "trainer.max_steps=3", "trainer.batch_size=2", "trainer.eval_every=0", "trainer.eval_batches=1",
    "trainer.ckpt_every=0", "trainer.progress_bar=false", "logger.wandb.mode=disabled", "optim.warmup_steps=1",
]


def compose_config(name, overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a 2-layer GQA model trained for 3 steps."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FATRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        folder = tmp_path_factory.mktemp("run")
        run(compose_config("train", TRAIN), str(folder))
        yield str(folder)


def sample(run_dir, *overrides):
    return generate_samples(compose_config("sample", [f"ckpt_path={run_dir}", "max_new_tokens=24", *overrides]))


def test_same_seed_same_text_and_prompt_kept(run_dir):
    first = sample(run_dir, "prompt=ROMEO:", "seed=5", "num_samples=2", "temperature=1.0", "top_k=null")
    assert first == sample(run_dir, "prompt=ROMEO:", "seed=5", "num_samples=2", "temperature=1.0", "top_k=null")
    assert first != sample(run_dir, "prompt=ROMEO:", "seed=6", "num_samples=2", "temperature=1.0", "top_k=null")
    assert all(text.startswith("ROMEO:") for text in first)


@pytest.mark.parametrize("decoding", [["temperature=0"], ["temperature=0.8", "top_k=20", "seed=3"]])
def test_kv_cache_and_full_recompute_agree(run_dir, decoding):
    cached = sample(run_dir, "prompt=To be", "use_cache=true", *decoding)
    recomputed = sample(run_dir, "prompt=To be", "use_cache=false", *decoding)
    assert cached == recomputed


def test_kv_cache_through_another_backend(run_dir):
    naive = sample(run_dir, "prompt=To be", "temperature=0")
    assert sample(run_dir, "prompt=To be", "temperature=0", "attention.backend=sdpa") == naive


@pytest.mark.parametrize("override, match", [
    ("temperature=-1", "temperature=-1.0 must be >= 0"),
    ("top_k=0", "top_k=0 must be > 0"),
    ("attention.backend=flash_v9", "attention.backend='flash_v9' is not allowed"),
])
def test_bad_settings_name_the_setting(run_dir, override, match):
    with pytest.raises(ValueError, match=match):
        sample(run_dir, override)


def test_cli_prints_text_and_bad_checkpoint_exits_2(run_dir, tmp_path):
    cmd = [sys.executable, "-m", "fatrain.cli.sample", f"ckpt_path={run_dir}", "prompt=ROMEO:", "max_new_tokens=10"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ROMEO:")
    assert list(tmp_path.iterdir()) == [], "sampling must not write files"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "fatrain.cli.sample", f"ckpt_path={bad}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        next(line for line in proc.stderr.splitlines() if "unreadable" in line)]


@pytest.mark.parametrize("backend,variants", [
    ("flash_v2", {}), ("naive", {}),
    ("flash_v2", {"position": "alibi", "attn_softcap": 3.0, "attn_sinks": True}),
    ("flash_v2", {"attn_sinks": True}),
    ("naive", {"position": "alibi", "attn_sinks": True}),
])
def test_cache_through_flash_attn_with_kvcache_gives_the_recomputed_text(backend, variants):
    """The fused cache (in-place append, flash_decode on flash_v2, with ALiBi, the soft-cap and sinks
    where the model has them), forced on the CPU, samples the same tokens from one seed as
    recomputing the whole sequence at every step."""
    import torch

    from fatrain.model import GPT, GPTSpec

    torch.manual_seed(0)
    model = GPT(GPTSpec(vocab_size=50, attention=backend, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                        **variants)).eval()
    if model.blocks[0].attn.sinks is not None:
        for block in model.blocks:  # sinks large enough to change the distribution
            torch.nn.init.normal_(block.attn.sinks, std=2.0)
    prompt = torch.randint(0, 50, (2, 5))

    def draw(**kwargs):
        gen = torch.Generator().manual_seed(7)
        return model.generate(prompt, 6, temperature=1.0, generator=gen, **kwargs)

    fused = draw(use_cache=True, fused_cache=True)
    assert torch.equal(fused, draw(use_cache=False))
    assert torch.equal(fused, draw(use_cache=True, fused_cache=False))
