"""Work that tests/test_context_parallel.py runs on several gloo ranks.

``attention_and_gradient_checks`` runs in processes spawned by the test (one gloo group over a
file store): ring and Ulysses attention against the float64 reference, outputs and gradients,
and one training step's model gradients against one process. Run as a script under torchrun
(``python -m torch.distributed.run ... tests/context_parallel_runs.py OUT RUNS.json``) it
trains each run of RUNS.json (a list of {"dir", "overrides"}) through ``run_training`` in one
process group, one launch for several runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import fatrain  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
import torch
import torch.distributed as dist

from fatrain.context_parallel import ContextParallel, shard_index
from fatrain.kernels import reference_attention

# (name, backend, strategy, B, seq_len, H, Hkv, D, window_left, docs)
ATTENTION_CASES = [
    ("ring-causal-gqa", "naive", "ring", 2, 28, 4, 2, 8, -1, False),
    ("ring-window", "naive", "ring", 2, 28, 2, 2, 8, 9, False),
    ("ring-window-docs", "naive", "ring", 3, 28, 4, 1, 8, 11, True),
    ("ulysses-window-docs-gqa", "naive", "ulysses", 2, 28, 4, 2, 8, 9, True),
    ("ring-flash_v2-window-docs", "flash_v2", "ring", 1, 36, 2, 1, 16, 13, True),
    ("ring-flash_v1-window-docs", "flash_v1", "ring", 1, 20, 2, 1, 16, 7, True),
]


def random_docs(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Non-decreasing document ids with a few boundaries per row (some rows one document)."""
    starts = (torch.rand(B, T, generator=gen) < 0.12).long()
    starts[:, 0] = 0
    starts[0] = 0  # row 0: one document across every chunk
    return starts.cumsum(1)


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_attention(cp: ContextParallel, case, seed: int, device="cpu", dtype=torch.float32) -> None:
    from fatrain.context_parallel import context_attention

    name, backend, strategy, B, T, H, Hkv, D, left, with_docs = case
    cp.strategy = strategy
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, T, Hkv, D, generator=gen)
    v = torch.randn(B, T, Hkv, D, generator=gen)
    dout = torch.randn(B, T, H, D, generator=gen)
    docs = random_docs(B, T, gen) if with_docs else None
    kw = dict(causal=True, window_size=(left, -1), doc_ids=docs)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    # torch's own error in the run's dtype on its device, the yardstick
    docs = None if docs is None else docs.to(device)
    kw["doc_ids"] = docs
    low = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    low_out = reference_attention(*low, upcast=False, **kw)
    low_grads = [g.cpu() for g in torch.autograd.grad(low_out, low, dout.to(device, dtype))]
    low_out = low_out.cpu()

    index = shard_index(T, cp.degree, cp.cp_rank)
    cp.set_documents(docs)
    local = [t[:, index].to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = context_attention(cp, backend, *local, causal=True, window_size=(left, -1),
                            doc_ids=None if docs is None else docs[:, index.to(device)])
    grads = [g.cpu() for g in torch.autograd.grad(out, local, dout[:, index].to(device, dtype))]
    out = out.cpu()
    pairs = [(out, ref[:, index], low_out[:, index], "out", 2)]
    pairs += [(g, r[:, index], w[:, index], f"d{n}", 3) for g, r, w, n in zip(grads, ref_grads, low_grads, "qkv")]
    for got, want, yard, what, factor in pairs:
        err, base = _max_err(got, want), _max_err(yard, want)
        assert err <= factor * base + 1e-6, f"{name} rank {cp.cp_rank} {what}: err {err:.3g} vs torch fp32 {base:.3g}"


def check_model_gradients(cp: ContextParallel, strategy: str) -> None:
    """One step of a tiny GPT (packed documents, RoPE reset per document, a window, GQA): the
    context-parallel loss and the mean of the ranks' gradients equal one process's."""
    from fatrain.model import GPT, GPTSpec

    cp.strategy = strategy
    spec = GPTSpec(vocab_size=61, attention="naive", n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                   window_size=(10, -1), document_masking=True, rope_reset_per_document=True)
    torch.manual_seed(0)
    model = GPT(spec)
    gen = torch.Generator().manual_seed(7)
    B, T = 2, 28
    batch = {"input_ids": torch.randint(0, 61, (B, T), generator=gen),
             "labels": torch.randint(0, 61, (B, T), generator=gen), "doc_ids": random_docs(B, T, gen)}
    _, loss = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"])
    want = torch.autograd.grad(loss, list(model.parameters()))

    cp.install(model)
    _, local_loss = model(**cp.shard_batch(batch, spec))
    grads = torch.autograd.grad(local_loss, list(model.parameters()))
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=cp.group)
    assert abs(total.item() / cp.degree - loss.item()) < 1e-5, (strategy, total.item() / cp.degree, loss.item())
    for (name, _), got, ref in zip(model.named_parameters(), grads, want):
        got = got.clone()
        dist.all_reduce(got, group=cp.group)
        assert _max_err(got / cp.degree, ref) < 1e-5, (strategy, name, _max_err(got / cp.degree, ref))


# GPU: flash_v2 in bf16 over NCCL, long enough for several key blocks per chunk pair.
GPU_CASES = [
    ("ring-flash_v2-bf16-window-docs", "flash_v2", "ring", 2, 2048, 8, 2, 64, 700, True),
    ("ring-flash_v2-bf16-causal", "flash_v2", "ring", 1, 4096, 8, 8, 128, -1, False),
    ("ulysses-flash_v2-bf16-docs", "flash_v2", "ulysses", 2, 2048, 8, 2, 64, -1, True),
]


def attention_and_gradient_checks(rank: int, world_size: int, store_path: str, device_type: str = "cpu") -> None:
    """CPU: every case of ATTENTION_CASES in fp32 and the model gradients, on gloo. CUDA: GPU_CASES
    in bf16 on NCCL, one GPU per rank."""
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store_path}",
                            rank=rank, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (1, world_size), mesh_dim_names=("dp", "cp"))
        cp = ContextParallel(world_size, "ring", mesh=mesh, rank=rank, world_size=world_size)
        if device_type == "cuda":
            for i, case in enumerate(GPU_CASES):
                check_attention(cp, case, seed=200 + i, device=torch.device("cuda", rank), dtype=torch.bfloat16)
            return
        for i, case in enumerate(ATTENTION_CASES):
            check_attention(cp, case, seed=100 + i)
        for strategy in ("ring", "ulysses"):
            check_model_gradients(cp, strategy)
    finally:
        dist.destroy_process_group()


def train_runs(spec_path: str) -> None:
    """Every run of the list in ``spec_path``, one after another, in this launch's process group."""
    from hydra import compose, initialize_config_module

    from fatrain.config import register_configs
    from fatrain.distributed import init_distributed, shutdown
    from fatrain.trainer import run_training

    register_configs()
    with open(spec_path) as f:
        runs = json.load(f)
    env = None
    for run in runs:
        with initialize_config_module(config_module="fatrain.configs", version_base=None):
            cfg = compose(config_name="train", overrides=run["overrides"])
        if env is None:
            env = init_distributed(cfg.trainer)
        # One group for every run; each run names its own engine (ddp or fsdp) over it.
        result = run_training(cfg, run["dir"], dataclasses.replace(env, strategy=cfg.trainer.strategy))
        assert result["status"] == "ok", result
    shutdown(env)


if __name__ == "__main__":
    train_runs(sys.argv[1])
