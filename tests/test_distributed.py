"""DDP and FSDP2 on the CPU: two gloo ranks under torchrun match one process with the same global batch.

Every torchrun job is a real launch (``python -m torch.distributed.run --standalone``), the
way a user starts one. The single-process reference trains the same global batch
(batch_size 4 against 2 per rank, or 1 per rank with 2 accumulation steps); with dropout 0
and fp32 the per-step training losses agree to 1e-5. Resumes continue the same curve,
also FSDP checkpoints written by two ranks and resumed by one (DCP reshards them).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_module

from fatrain.checkpoint import is_sharded, list_checkpoints, load_checkpoint
from fatrain.config import register_configs
from fatrain.distributed import init_distributed
from fatrain.trainer import run_training

register_configs()

FAST = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.dropout=0", "data.seq_len=32",
    "trainer.log_every=1", "trainer.eval_every=2", "trainer.eval_batches=2", "trainer.ckpt_every=2",
    "trainer.progress_bar=false", "logger.wandb.mode=disabled", "optim.warmup_steps=1",
    # A constant LR, so that a run stopped at step 2 and resumed to 4 follows a 4-step run exactly.
    "optim.schedule=constant",
]
STEPS = 6


def compose_train(overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name="train", overrides=overrides)


def curve(run_dir, key="train/loss"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r[key] for r in rows if key in r}


def torchrun(run_dir, nproc, *overrides, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *FAST, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def assert_same_curve(got, want, steps):
    assert sorted(got) == list(steps), got
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-5, rel=0), (step, got[step], want[step])


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    # One token cache for the module: every rank and every run tokenizes the same corpus.
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def single_curve(tmp_path_factory):
    """The reference: one process, global batch 4, STEPS steps."""
    run_dir = tmp_path_factory.mktemp("single")
    mp = pytest.MonkeyPatch()
    mp.setenv("FATRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    try:
        run_training(compose_train([*FAST, "trainer.batch_size=4", f"trainer.max_steps={STEPS}"]), str(run_dir))
    finally:
        mp.undo()
    return curve(run_dir), curve(run_dir, "val/loss")


def test_ddp_two_ranks_match_single_and_resume(tmp_path, single_curve):
    train, val = single_curve
    run_dir = tmp_path / "ddp"
    torchrun(run_dir, 2, "trainer.strategy=ddp", "trainer.batch_size=2", "trainer.max_steps=2")
    [ckpt] = list_checkpoints(run_dir / "checkpoints")
    state = load_checkpoint(ckpt)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    torchrun(run_dir, 2, "trainer.strategy=ddp", "trainer.batch_size=2", "trainer.max_steps=4", "resume=auto")
    assert_same_curve(curve(run_dir), train, range(1, 5))
    assert curve(run_dir, "val/loss")[4] == pytest.approx(val[4], abs=1e-5)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["step"] == 4 and result["tokens_seen"] == 4 * 4 * 32


def test_ddp_gradient_accumulation_matches_single(tmp_path, single_curve):
    train, _ = single_curve
    run_dir = tmp_path / "ddp_accum"
    torchrun(run_dir, 2, "trainer.strategy=ddp", "trainer.batch_size=1", "trainer.grad_accum_steps=2",
             "trainer.max_steps=3", "trainer.ckpt_every=0")
    assert_same_curve(curve(run_dir), train, range(1, 4))


def test_fsdp_two_ranks_match_single_and_resume_on_two_then_one(tmp_path, single_curve):
    train, val = single_curve
    run_dir = tmp_path / "fsdp"
    torchrun(run_dir, 2, "trainer.strategy=fsdp", "trainer.batch_size=2", "trainer.max_steps=2")
    torchrun(run_dir, 2, "trainer.strategy=fsdp", "trainer.batch_size=2", "trainer.max_steps=4", "resume=auto")
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [os.path.basename(p) for p in ckpts] == ["ckpt_00000002.dcp", "ckpt_00000004.dcp"]
    assert all(is_sharded(p) for p in ckpts)
    # Two ranks' shards resumed by one rank with the same global batch (DCP reshards on load).
    torchrun(run_dir, 1, "trainer.strategy=fsdp", "trainer.batch_size=4", f"trainer.max_steps={STEPS}",
             "resume=auto", "trainer.keep_last=2")
    assert_same_curve(curve(run_dir), train, range(1, STEPS + 1))
    assert curve(run_dir, "val/loss")[STEPS] == pytest.approx(val[STEPS], abs=1e-5)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [os.path.basename(p) for p in ckpts] == ["ckpt_00000004.dcp", "ckpt_00000006.dcp"]

    # A sharded checkpoint loads as one plain state dict without a process group (fatrain-eval's path).
    state = load_checkpoint(ckpts[-1])
    assert state["step"] == STEPS and state["world_size"] == 1
    assert all(isinstance(v, torch.Tensor) and not hasattr(v, "full_tensor") for v in state["model"].values())
    assert state["model"]["wte.weight"].shape[1] == 32


def test_fsdp_one_rank_without_torchrun_in_process(tmp_path, single_curve):
    """ddp/fsdp also run as one rank without torchrun (an in-memory store): same losses as single."""
    train, _ = single_curve
    cfg = compose_train([*FAST, "trainer.strategy=fsdp", "trainer.batch_size=4", "trainer.max_steps=2"])
    result = run_training(cfg, str(tmp_path))
    assert result["status"] == "ok" and is_sharded(result["checkpoint"])
    assert_same_curve(curve(tmp_path), train, range(1, 3))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("env, overrides, match", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["trainer.strategy=single"], "trainer.strategy=single but this job has "
                                                                   "WORLD_SIZE=2"),
    ({}, ["trainer.strategy=ddp", "trainer.device=cuda"], "needs CUDA GPUs"),
    ({}, ["trainer.strategy=fsdp", "trainer.device=cpu", "++trainer.dist_backend=nccl"], "nccl runs only on CUDA"),
    ({}, ["trainer.strategy=ddp", "++trainer.dist_backend=nccl"], "nccl needs CUDA GPUs"),
    ({}, ["trainer.strategy=ddp", "++trainer.dist_backend=mpi"], "trainer.dist_backend='mpi' is not allowed"),
])
def test_strategy_that_does_not_fit_names_the_setting(env, overrides, match, monkeypatch, tmp_path):
    if torch.cuda.is_available() and "CUDA" in match:
        pytest.skip("this machine has a GPU")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = compose_train([*FAST, *overrides])
    with pytest.raises(ValueError, match=match):
        init_distributed(cfg.trainer)
    with pytest.raises(ValueError, match=match):
        run_training(cfg, str(tmp_path))
    assert not torch.distributed.is_initialized()


def test_single_under_torchrun_exits_with_an_error_line(tmp_path):
    proc = torchrun(tmp_path / "r", 2, "trainer.strategy=single", "trainer.max_steps=1", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error:" in line and "strategy=single" in line]
    # Each rank says it; torchrun may stop the second rank before it prints, so at least one line.
    assert 1 <= len(lines) <= 2, proc.stderr[-3000:]


def test_submitit_slurm_tasks_become_ranks(monkeypatch):
    """Under hydra/launcher=slurm each SLURM task is a rank; submitit's helper exports torchrun's variables."""
    pytest.importorskip("submitit")
    from fatrain.distributed import launcher_env

    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234", "SLURM_PROCID": "9", "SLURM_NTASKS": "16",
             "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded as unset, so the exported values are removed afterwards
        monkeypatch.delenv(name)
    assert launcher_env() == (9, 16, 1)
    assert os.environ["MASTER_ADDR"] == "gpu001"


FAILING_RANK = """
import os

import fatrain.trainer


def fail(self):
    raise RuntimeError("rank 1 failed on purpose")


if os.environ["RANK"] == "1":
    fatrain.trainer.Trainer.fit = fail
from fatrain.cli.train import main

main()
"""


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    """Rank 0 waits in the first gradient all-reduce; rank 1 raises. torchrun must stop both, not hang."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           f"hydra.run.dir={tmp_path / 'r'}", *FAST, "trainer.strategy=ddp", "trainer.max_steps=2",
           "++trainer.dist_timeout_s=120"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr
    assert time.time() - start < 100, "the job waited for the process group's timeout instead of ending"
