"""Bad values refused before any work starts: every numeric setting of every schema has a range,
and a value outside it (inf and nan included) is one ValueError naming the key, or through a
console script one line ``error: ...`` and exit code 2 with nothing written."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing

import pytest
import torch
from hydra import compose, initialize_config_module

from fatrain import config
from fatrain.config import (BENCH_RANGES, EVAL_RANGES, SAMPLE_RANGES, TRAIN_RANGES, register_configs,
                            validate_bench_config, validate_eval_config, validate_sample_config,
                            validate_train_config)
from fatrain.kernels import available_backends, backend_info, get_backend
from fatrain.metrics import WandbLogger

register_configs()

FAST = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32", "trainer.max_steps=2",
        "trainer.batch_size=2", "trainer.eval_batches=1", "trainer.progress_bar=false", "optim.warmup_steps=1",
        "logger.wandb.mode=disabled"]


def _compose(name, overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name=name, overrides=overrides)


def _numeric(tp) -> bool:
    """int, float, Optional of either, or a list or dict of them (bool is not numeric here)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        return len(args) == 1 and _numeric(args[0])
    if typing.get_origin(tp) in (list, dict):
        return _numeric(args[-1])
    return tp in (int, float)


def _numeric_keys(schema, prefix=""):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _numeric_keys(hints[f.name], f"{prefix}{f.name}.")
        elif _numeric(hints[f.name]):
            yield f"{prefix}{f.name}"


TRAIN_GROUPS = {"model": config.ModelConfig, "attention": config.AttentionConfig, "data": config.DataConfig,
                "optim": config.OptimConfig, "trainer": config.TrainerConfig, "logger": config.LoggerConfig}


@pytest.mark.parametrize("schema, prefix, ranges", [
    *[(schema, f"{group}.", TRAIN_RANGES) for group, schema in TRAIN_GROUPS.items()],
    (config.EvalSettings, "eval.", EVAL_RANGES), (config.PasskeySettings, "passkey.", EVAL_RANGES),
    (config.RulerSettings, "ruler.", EVAL_RANGES), (config.ExtensionConfig, "extension.", TRAIN_RANGES),
    (config.SampleConfig, "", SAMPLE_RANGES), (config.BenchConfig, "", BENCH_RANGES),
])
def test_every_numeric_setting_has_a_range(schema, prefix, ranges):
    missing = [key for key in _numeric_keys(schema, prefix) if key not in ranges]
    assert not missing, f"numeric settings without a range in fatrain/config.py: {missing}"


# (override, the key the message must name): the values an adversarial user tried, then one
# outside the range of every other numeric setting.
BAD_TRAIN = [
    ("trainer.eval_every=-1", "trainer.eval_every"),
    ("trainer.ckpt_every=-1", "trainer.ckpt_every"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.min_lr=0.5", "optim.min_lr"),  # above optim.lr
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=-inf", "optim.lr"),
    ("optim.beta1=1.5", "optim.beta1"),
    ("optim.eps=-1", "optim.eps"),
    ("attention.window_left=-5", "attention.window_left"),
    ("attention.window_right=-2", "attention.window_right"),
    ("model.n_layer=0", "model.n_layer"),
    ("model.n_head=-1", "model.n_head"),
    ("model.n_kv_head=0", "model.n_kv_head"),
    ("model.n_embd=0", "model.n_embd"),
    ("model.vocab_size=0", "model.vocab_size"),
    ("model.mlp_hidden=-4", "model.mlp_hidden"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.attn_dropout=nan", "model.attn_dropout"),
    ("model.rope_theta=0", "model.rope_theta"),
    ("model.rope_theta=inf", "model.rope_theta"),
    ("model.init_std=-0.02", "model.init_std"),
    ("data.seq_len=0", "data.seq_len"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("optim.beta2=-0.1", "optim.beta2"),
    ("optim.eps=nan", "optim.eps"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.grad_clip=inf", "optim.grad_clip"),
    ("optim.min_lr=nan", "optim.min_lr"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.tokens_per_step=-64", "trainer.tokens_per_step"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps"),
    ("trainer.dist_timeout_s=0", "trainer.dist_timeout_s"),
    ("trainer.seed=-1", "trainer.seed"),
    ("trainer.seed=4294967296", "trainer.seed"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.eval_batches=0", "trainer.eval_batches"),
    ("trainer.keep_last=0", "trainer.keep_last"),
    ("trainer.peak_tflops=-1", "trainer.peak_tflops"),
    ("trainer.peak_tflops=inf", "trainer.peak_tflops"),
    ("attention=flash_v2 attention.block_m=48 attention.block_n=64", "attention.block_m"),
    ("attention=flash_v2 attention.block_m=64 attention.block_n=512", "attention.block_n"),
    ("attention=flash_v1 attention.sram_bytes=0", "attention.sram_bytes"),
    ("attention=flash_v1 attention.num_splits=-1", "attention.num_splits"),
    ("attention=naive attention.num_splits=2", "attention.num_splits"),  # a backend without the option
    ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor"),
    ("model.rope_scaling.type=yarn", "model.rope_scaling.original_seq_len"),
    ("model.rope_scaling.type=longrope", "model.rope_scaling.type"),
    ("extension.finetune_steps=0", "extension.finetune_steps"),
]


@pytest.mark.parametrize("override, key", BAD_TRAIN, ids=[o for o, _ in BAD_TRAIN])
def test_bad_train_value_is_refused_naming_the_key(override, key):
    cfg = _compose("train", [*FAST, *override.split()])
    with pytest.raises(ValueError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message, message
    if "inf" in override or "nan" in override:
        assert "must be finite" in message, message


@pytest.mark.parametrize("override", [
    "trainer.eval_every=0", "trainer.ckpt_every=0", "optim.grad_clip=0", "optim.min_lr=0", "optim.weight_decay=0",
    "optim.warmup_steps=0", "optim.beta1=0", "attention.window_left=-1", "attention.window_left=0",
    "attention.window_right=7", "model.n_kv_head=1", "trainer.seed=0", "trainer.seed=4294967295",
    "optim.min_lr=0.001", "attention=flash_v1 attention.num_splits=0", "attention=flash_v2 attention.block_m=16 "
    "attention.block_n=256",
])
def test_documented_boundary_and_sentinel_values_are_accepted(override):
    validate_train_config(_compose("train", [*FAST, *override.split()]))


def test_messages_say_what_the_sentinels_mean():
    for override, meaning in [("trainer.eval_every=-1", ">= 0 (0: only the final validation)"),
                              ("optim.grad_clip=-1", ">= 0 (0: no clipping)"),
                              ("attention.window_left=-5", ">= 0, or -1 (unlimited)")]:
        with pytest.raises(ValueError, match=meaning.replace("(", r"\(").replace(")", r"\)")):
            validate_train_config(_compose("train", [*FAST, override]))


BAD_EVAL = [
    ("eval.seq_lens=[128,0]", "eval.seq_lens"),
    ("eval.tasks=[passkey,niah]", "eval.tasks"),
    ("ruler.trials=0", "ruler.trials"),
    ("ruler.common_freq=2 ruler.rare_freq=3", "ruler.common_freq"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.batches=-1", "eval.batches"),
    ("eval.bucket_size=0", "eval.bucket_size"),
    ("eval.agreement_batches=0", "eval.agreement_batches"),
    ("eval.agreement_tolerance=nan", "eval.agreement_tolerance"),
    ("eval.agreement_tolerance=-1", "eval.agreement_tolerance"),
    ("passkey.context_lens=[-5]", "passkey.context_lens"),
    ("passkey.depths=[0.5,1.5]", "passkey.depths"),
    ("passkey.trials=0", "passkey.trials"),
    ("passkey.seed=-1", "passkey.seed"),
    ("passkey.key_digits=0", "passkey.key_digits"),
    ("passkey.key_digits=19", "passkey.key_digits"),
    ("+model.dropout=2.0", "model.dropout"),
    ("+attention.window_left=-5", "attention.window_left"),
    ("+data.seq_len=0", "data.seq_len"),
]


@pytest.mark.parametrize("override, key", BAD_EVAL, ids=[o for o, _ in BAD_EVAL])
def test_bad_eval_value_is_refused_naming_the_key(override, key):
    cfg = _compose("eval", ["ckpt_path=unused.pt", *override.split()])
    with pytest.raises(ValueError) as info:
        validate_eval_config(cfg)
    assert str(info.value).startswith(key), str(info.value)


BAD_SAMPLE = [
    ("max_new_tokens=0", "max_new_tokens"), ("temperature=-1", "temperature"), ("temperature=inf", "temperature"),
    ("temperature=nan", "temperature"), ("top_k=0", "top_k"), ("seed=-3", "seed"), ("num_samples=0", "num_samples"),
    ("+attention.window_left=-5", "attention.window_left"),
]


@pytest.mark.parametrize("override, key", BAD_SAMPLE, ids=[o for o, _ in BAD_SAMPLE])
def test_bad_sample_value_is_refused_naming_the_key(override, key):
    cfg = _compose("sample", ["ckpt_path=unused.pt", override])
    with pytest.raises(ValueError) as info:
        validate_sample_config(cfg)
    assert str(info.value).startswith(key), str(info.value)


BAD_BENCH = [
    ("impls=[bogus]", "impls"), ("impls=[]", "impls"), ("seqlens=[16,-1]", "seqlens"), ("headdims=[0]", "headdims"),
    ("tokens_per_batch=0", "tokens_per_batch"), ("hidden=-32", "hidden"), ("windows=[-2]", "windows"),
    ("doc_lens=[-1]", "doc_lens"), ("dropout_ps=[1.0]", "dropout_ps"), ("dropout_ps=[nan]", "dropout_ps"),
    ("warmup_ms=-1", "warmup_ms"), ("rep_ms=0", "rep_ms"), ("rounds=0", "rounds"), ("cpu_reps=0", "cpu_reps"),
    ("seed=-1", "seed"), ("summary.targets.sdpa_flash=inf", "summary.targets.sdpa_flash"),
    ("summary.targets.sdpa_flash=-1", "summary.targets.sdpa_flash"),
    ("summary.target_min_seqlen=-1", "summary.target_min_seqlen"),
]


@pytest.mark.parametrize("override, key", BAD_BENCH, ids=[o for o, _ in BAD_BENCH])
def test_bad_bench_value_is_refused_naming_the_key(override, key):
    cfg = _compose("bench", ["bench=smoke", override])
    with pytest.raises(ValueError) as info:
        validate_bench_config(cfg)
    assert str(info.value).startswith(key), str(info.value)


def _error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("override, key", [("optim.lr=nan", "optim.lr"),
                                           ("attention.window_left=-5", "attention.window_left")])
def test_train_cli_exits_2_with_one_line_before_any_work(tmp_path, override, key):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *FAST, override],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("impls", ["impls=[bogus]", "impls=[]"])
def test_bench_cli_bad_impl_list_exits_2_with_one_line(tmp_path, impls):
    proc = subprocess.run([sys.executable, "-m", "fatrain.cli.bench", "bench=smoke", impls, f"out_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: impls=") and "choose from" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.csv"))


def test_invalid_wandb_project_is_a_value_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^logger\.wandb\.project='a/b' refused by W&B: .*'/'") as info:
        WandbLogger(mode="offline", project="a/b", run_dir=str(tmp_path), config={})
    assert "\n" not in str(info.value)


def test_train_cli_invalid_wandb_project_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fatrain.cli.train", f"hydra.run.dir={tmp_path / 'run'}", *FAST,
                           "logger.wandb.mode=offline", "logger.wandb.project=a/b"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: logger.wandb.project='a/b'"), proc.stderr
    assert "Traceback" not in proc.stderr


# ----- kernels: softmax_scale and the device

CPU_BACKENDS = available_backends(variants=True, device="cpu")


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan"), 0.0, -1.0, "big"])
def test_softmax_scale_must_be_finite_and_positive(name, scale):
    q = torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match=r"softmax_scale must be a finite number > 0"):
        get_backend(name)(q, q, q, softmax_scale=scale)


@pytest.mark.parametrize("name", [n for n in CPU_BACKENDS if backend_info(n).triton])
def test_triton_backend_on_cpu_without_the_interpreter_names_the_device(name, monkeypatch):
    import importlib

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    module = importlib.import_module(f"fatrain.kernels.{backend_info(name).module}")
    if hasattr(module, "_INTERPRET"):  # read once at import by some modules
        monkeypatch.setattr(module, "_INTERPRET", False)
    q = torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match=r"q, k and v must be CUDA tensors \(or CPU tensors under the Triton "
                                         r"interpreter\), got cpu"):
        get_backend(name)(q, q, q)
    assert os.environ["TRITON_INTERPRET"] == "0"


@pytest.mark.parametrize("args, named", [(["granularity=0"], "granularity=0"),
                                         (["start=-1024"], "start=-1024"),
                                         (["limit=512"], "limit=512"),
                                         (["guide=maybe"], "guide=maybe must be true or false")])
def test_max_context_cli_bad_search_arguments_exit_2_with_one_line(tmp_path, capsys, args, named):
    from fatrain.cli import max_context as max_context_cli

    assert max_context_cli.main([*args, f"out={tmp_path / 'out'}", "trainer.device=cpu"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [n for n in available_backends(variants=True)
                                  if backend_info(n).module == "sdpa" and "cpu" not in backend_info(n).devices])
def test_cuda_only_sdpa_kernel_on_cpu_names_the_device(name):
    q = torch.randn(1, 32, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=rf"device cpu is not supported by {name} \(supported: cuda\): q, k and v "
                                         r"must be CUDA tensors"):
        get_backend(name)(q, q, q)
