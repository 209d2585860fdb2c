"""Context parallelism on the CPU: ring and Ulysses attention on gloo ranks match one process.

- The ring's chunk-pair plan covers exactly the full sequence's mask (causal, windows,
  packed documents) at N = 2, 3 and 4, with no process group.
- The backends' backward with a given out and lse (what the ring calls) against the reference.
- Spawned gloo ranks (tests/context_parallel_runs.py): ring and Ulysses attention against
  the float64 reference (outputs and gradients, GQA, windows, documents; naive, and flash_v1
  and flash_v2 through the interpreter), and one training step's loss and gradients against
  one process.
- Real launches (``python -m torch.distributed.run``), several runs per launch: the loss
  curves of context_parallel=2 (ring and Ulysses; causal, a window, packed documents; DDP and
  FSDP2) and of context_parallel=2 x data-parallel 2 on 4 ranks equal one process's with the
  same global batch (1e-5); a checkpoint written at context_parallel=2 resumes at 1 and at 4.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module

import context_parallel_runs
from fatrain.config import register_configs, validate_train_config
from fatrain.context_parallel import check_world, pair_calls, rank_chunks, shard_index
from fatrain.kernels import get_backward, reference_attention
from fatrain.kernels._common import allowed_mask
from fatrain.trainer import run_training

register_configs()
HERE = os.path.dirname(__file__)

FAST = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=4", "model.n_kv_head=2", "model.dropout=0",
    "data.seq_len=32", "trainer.log_every=1", "trainer.eval_every=2", "trainer.eval_batches=1",
    "trainer.ckpt_every=2", "trainer.progress_bar=false", "logger.wandb.mode=disabled", "optim.warmup_steps=1",
    "optim.schedule=constant", "attention=naive", "trainer.batch_size=2", "trainer.max_steps=4",
]
WINDOW_DOCS = ["attention.window_left=5", "data.document_separator=\\n", "data.document_masking=true",
               "model.rope_reset_per_document=true"]
# name: (overrides of the single-process reference, context-parallel overrides)
CASES = {
    "causal": ([], ["trainer.strategy=ddp", "trainer.context_parallel=2", "trainer.cp_strategy=ring"]),
    "window_docs_ring": (WINDOW_DOCS, ["trainer.strategy=ddp", "trainer.context_parallel=2"]),
    "window_docs_ulysses": (WINDOW_DOCS, ["trainer.strategy=fsdp", "trainer.context_parallel=2",
                                          "trainer.cp_strategy=ulysses"]),
}


def compose_train(overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name="train", overrides=overrides)


def curve(run_dir, key="train/loss"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r[key] for r in rows if key in r}


def assert_same_curve(got, want, steps):
    assert sorted(got) == list(steps), got
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-5, rel=0), (step, got[step], want[step])


def launch(tmp_path, nproc, runs):
    """One torchrun launch that trains every run of ``runs`` ([(dir, overrides)]) in one process group."""
    spec = tmp_path / f"runs_{nproc}.json"
    spec.write_text(json.dumps([{"dir": str(d), "overrides": [*FAST, f"hydra.run.dir={d}", *o]} for d, o in runs]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "context_parallel_runs.py"), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_plan_covers_the_full_mask(n):
    """Every (query chunk, key chunk) pair's calls, drawn with the backend's own mask rules, give
    the full sequence's mask exactly once: nothing missed, nothing twice, no empty row in a call."""
    gen = torch.Generator().manual_seed(n)
    c = 5
    T, B = 2 * n * c, 3
    docs = context_parallel_runs.random_docs(B, T, gen)
    for window_left in (-1, 0, 3, c, 2 * c + 1, 3 * c - 2):
        for with_docs in (False, True):
            want = allowed_mask(T, T, causal=True, window_size=(window_left, -1),
                                doc_ids=docs if with_docs else None).expand(B, T, T)
            got = torch.zeros(B, T, T, dtype=torch.int64)
            for qa in range(2 * n):
                for kb in range(2 * n):
                    for b0, b1, q0, q1, k0, k1, causal, left, diagonal in pair_calls(
                            qa, kb, c, B, window_left, docs if with_docs else None):
                        call_docs = docs[b0:b1, kb * c:(kb + 1) * c] if with_docs and diagonal else None
                        mask = allowed_mask(q1 - q0, k1 - k0, causal=causal, window_size=(left, -1),
                                            doc_ids=call_docs).expand(b1 - b0, q1 - q0, k1 - k0)
                        assert mask.any(-1).all(), (qa, kb, window_left)  # a row seeing nothing would skew the LSE
                        rows, cols = slice(qa * c + q0, qa * c + q1), slice(kb * c + k0, kb * c + k1)
                        got[b0:b1, rows, cols] += mask
            assert torch.equal(got, want.long()), (n, window_left, with_docs)
    # The load-balanced layout: every position once, chunk i with chunk 2N-1-i.
    held = torch.cat([shard_index(T, n, r) for r in range(n)])
    assert torch.equal(held.sort().values, torch.arange(T))
    assert rank_chunks(n, 0) == (0, 2 * n - 1)


@pytest.mark.parametrize("backend", ["naive", "flash_v1", "flash_v2"])
def test_backward_with_given_out_and_lse_matches_the_reference(backend):
    """get_backward(name) with the forward's out and lse given: the reference's gradients, with
    GQA, seqlen_q != seqlen_k, a window and packed documents (fresh inputs, awkward sizes)."""
    gen = torch.Generator().manual_seed(3)
    B, Nq, Nk, H, Hkv, D = 2, 19, 27, 4, 2, 16
    q = torch.randn(B, Nq, H, D, generator=gen)
    k, v = torch.randn(B, Nk, Hkv, D, generator=gen), torch.randn(B, Nk, Hkv, D, generator=gen)
    dout = torch.randn(B, Nq, H, D, generator=gen)
    kw = dict(causal=True, window_size=(6, -1), doc_ids=context_parallel_runs.random_docs(B, Nk, gen))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, return_lse=True, **kw)
    want = torch.autograd.grad(out, leaves, dout.double())
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    yard = torch.autograd.grad(reference_attention(*low, upcast=False, **kw), low, dout)
    got = get_backward(backend)(dout, q, k, v, out.float(), lse.float(), **kw)
    for g, w, y, name in zip(got, want, yard, "qkv"):
        assert g.dtype == torch.float32 and g.shape == w.shape
        err, base = (g.double() - w).abs().max().item(), (y.double() - w).abs().max().item()
        assert err <= 3 * base + 1e-6, (backend, name, err, base)
    with pytest.raises(ValueError, match="attention backend 'sdpa' exposes no backward with a given logsumexp"):
        get_backward("sdpa")


def test_attention_and_one_step_gradients_on_two_gloo_ranks(tmp_path):
    mp.spawn(context_parallel_runs.attention_and_gradient_checks, args=(2, str(tmp_path / "store")), nprocs=2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ring_and_ulysses_flash_v2_bf16_on_two_gpus(tmp_path):
    mp.spawn(context_parallel_runs.attention_and_gradient_checks, args=(2, str(tmp_path / "store"), "cuda"),
             nprocs=2)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.strategy=ddp", "trainer.context_parallel=3"], "data.seq_len=32 must be divisible by 2 x"),
    (["trainer.context_parallel=2"], "needs trainer.strategy=ddp or fsdp"),
    (["trainer.strategy=ddp", "trainer.context_parallel=2", "attention=sdpa"], "attention.backend=sdpa does not"),
    (["trainer.strategy=ddp", "trainer.context_parallel=4", "trainer.cp_strategy=ulysses"],
     "model.n_head=4 and its KV heads (2) must be divisible by trainer.context_parallel=4"),
    (["trainer.strategy=ddp", "trainer.context_parallel=2", "model.attn_dropout=0.1"], "model.attn_dropout=0.1"),
    (["trainer.strategy=ddp", "trainer.context_parallel=2", "model.attn_softcap=30"], "model.attn_softcap=30"),
    (["trainer.context_parallel=0"], "trainer.context_parallel"),
    (["trainer.cp_strategy=zigzag"], "trainer.cp_strategy='zigzag' is not allowed"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=None) as e:
        validate_train_config(compose_train([*FAST, *overrides]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_context_parallel_must_divide_the_ranks():
    with pytest.raises(ValueError, match=r"trainer.context_parallel=4 must divide the number of ranks \(2\)"):
        check_world(4, 2)
    with pytest.raises(ValueError, match=r"must divide the number of ranks \(6\)"):
        check_world(4, 6)


def test_loss_curves_match_one_process_and_resume_at_another_degree(tmp_path):
    singles = {}
    for name, (common, _) in CASES.items():
        run_dir = tmp_path / f"single_{name}"
        run_training(compose_train([*FAST, *common]), str(run_dir))
        singles[name] = curve(run_dir), curve(run_dir, "val/loss")

    launch(tmp_path, 2, [(tmp_path / f"cp2_{name}", [*common, *cp]) for name, (common, cp) in CASES.items()])
    for name in CASES:
        assert_same_curve(curve(tmp_path / f"cp2_{name}"), singles[name][0], range(1, 5))
        assert curve(tmp_path / f"cp2_{name}", "val/loss")[4] == pytest.approx(singles[name][1][4], abs=1e-5)

    # The step-2 checkpoint of the ring run (cp=2, DDP) resumes at cp=4 on 4 ranks and at cp=1 in one process.
    common = CASES["window_docs_ring"][0]
    for degree in (1, 4):
        resumed = tmp_path / f"resume_cp{degree}"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "cp2_window_docs_ring" / "checkpoints" / "ckpt_00000002.pt", resumed / "checkpoints")
    run_training(compose_train([*FAST, *common, f"hydra.run.dir={tmp_path / 'resume_cp1'}", "resume=auto"]),
                 str(tmp_path / "resume_cp1"))
    launch(tmp_path, 4, [
        (tmp_path / "resume_cp4", [*common, "trainer.strategy=ddp", "trainer.context_parallel=4", "resume=auto"]),
        # context_parallel=2 x data parallel 2: one sequence per data-parallel rank, the same global batch.
        (tmp_path / "cp2_dp2", [*common, "trainer.strategy=ddp", "trainer.context_parallel=2",
                                "trainer.batch_size=1"]),
    ])
    want = singles["window_docs_ring"][0]
    for degree in (1, 4):
        assert_same_curve(curve(tmp_path / f"resume_cp{degree}"), {s: want[s] for s in (3, 4)}, range(3, 5))
    assert_same_curve(curve(tmp_path / "cp2_dp2"), want, range(1, 5))
    assert curve(tmp_path / "cp2_dp2", "train/tokens_seen")[4] == 4 * 2 * 32  # tokens_per_step kept its meaning


def test_max_context_searches_one_sequence_over_two_ranks(tmp_path):
    """fatrain-max-context under torchrun with trainer.context_parallel=2: every length is trained by
    both ranks together (ring), they agree on each try, and rank 0 alone writes the result."""
    out = tmp_path / "max_context"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "fatrain.cli.max_context", "backends=[naive]", "trainer.strategy=ddp", "trainer.context_parallel=2",
           "trainer.device=cpu", "trainer.precision=fp32", "model=tiny", "start=32", "granularity=32", "limit=128",
           "trainer.max_steps=1", f"out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("naive: 128") == 1  # rank 0 reports; rank 1 prints nothing
    result = json.loads((out / "max_context.json").read_text())
    assert (result["world_size"], result["context_parallel"], result["cp_strategy"]) == (2, 2, "ring")
    (row,) = result["results"]
    assert row["max_seq_len"] == 128 and row["first_fail"] is None  # nothing runs out of memory on the CPU
    assert [a["seq_len"] for a in row["attempts"]] == [32, 64, 128]
    assert all(a["status"] == "ok" and a["step_time_s"] > 0 for a in row["attempts"])
    # One context group of two ranks trains one sequence: tokens/s counts it once.
    assert all(a["tokens_per_sec"] == pytest.approx(a["seq_len"] / a["step_time_s"]) for a in row["attempts"])
    assert "context_parallel" in (out / "max_context.csv").read_text().splitlines()[0]


def test_max_context_refuses_lengths_that_do_not_split_into_2n_chunks(tmp_path):
    from fatrain.cli.max_context import main

    code = main(["backends=[naive]", "trainer.strategy=ddp", "trainer.context_parallel=2", "trainer.device=cpu",
                 "trainer.precision=fp32", "model=tiny", "start=30", "granularity=30", f"out={tmp_path}"])
    assert code == 2 and not any(tmp_path.iterdir())
