"""The memory model (fatrain.memory_model) against what a step really holds.

On the CPU the measure is the process's peak resident size over the step, taken in a fresh
process with glibc told to return every block above 128 KiB to the system when it is freed
(MALLOC_MMAP_THRESHOLD_): otherwise freed blocks stay in its heap and the resident size reports
the allocator's history, not the tensors alive. The GPU comparison (max_memory_allocated) is the
GPU-marked test at the end.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fatrain.cli.max_context import compose_config
from fatrain.memory_model import predict_step_memory, try_predict

BATCH = 2
BASE = ["trainer.device=cpu", "trainer.precision=fp32", "model=small", f"trainer.batch_size={BATCH}"]

# Loads torch's CPU kernels with a small model first (their code and buffers are not the step's),
# resets the process's peak resident size (VmHWM) to its resident size, and measures how far the
# peak rises over two steps of the configured model.
MEASURE = r"""
import gc, json, re, sys
import torch
from fatrain.cli.max_context import compose_config
from fatrain.max_context import build_try, train_step

def status(field):  # kB
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024

seq_len, overrides = int(sys.argv[1]), sys.argv[2:]
cpu = torch.device("cpu")
warm, _ = compose_config(overrides + ["model=tiny", "trainer.batch_size=1"])
parts = build_try(warm, cpu)
train_step(warm, 64, cpu, *parts)
del parts
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size restarts from the resident size now (Linux >= 4.0)
base = status("VmRSS")
cfg, _ = compose_config(overrides)
parts = build_try(cfg, cpu)
for _ in range(2):
    train_step(cfg, seq_len, cpu, *parts)
print(json.dumps({"grown_gib": (status("VmHWM") - base) / 2**30, "base_gib": base / 2**30}))
"""


def measure(overrides, seq_len) -> dict:
    """{grown_gib, base_gib} of two steps in a fresh process, and its console's last lines (``log``)."""
    # NOTE: a fixed environment, not the test process's (earlier tests may have changed that one).
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR", "FATRAIN_CACHE") if k in os.environ}
    env.update(MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="2", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(seq_len), *overrides], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["log"] = out.stderr[-2000:]
    return result


@pytest.mark.parametrize("seq_len,extra", [
    (3072, ["attention.backend=sdpa"]),
    (1024, ["attention.backend=naive"]),  # S and P of every layer: memory quadratic in the length
    (3072, ["attention.backend=sdpa", "trainer.activation_checkpointing=true"]),
    (3072, ["attention.backend=sdpa", "trainer.activation_checkpointing=true", "model.loss_chunk_tokens=1000"]),
    (3072, ["attention.backend=sdpa", "trainer.activation_checkpointing=true", "trainer.activation_offload=true"]),
], ids=["sdpa", "naive", "checkpointing", "checkpointing-chunked-loss", "checkpointing-offload"])
def test_prediction_within_15_percent_of_peak_rss(seq_len, extra):
    overrides = BASE + extra
    cfg, _ = compose_config(overrides)
    predicted = predict_step_memory(cfg, seq_len, torch.device("cpu"))
    run = measure(overrides, seq_len)
    measured = run["grown_gib"]
    assert predicted["peak_gib"] > 0.1  # the step's tensors dominate what is measured
    assert abs(predicted["peak_gib"] - measured) <= 0.15 * measured, (predicted, run)


def test_a_failed_trace_is_a_reason_not_an_error():
    cfg, _ = compose_config(BASE + ["attention.backend=sdpa"])
    prediction, why = try_predict(cfg, 0, torch.device("cpu"))  # no tokens: the trace fails
    assert prediction is None and why


GPU_BASE = ["model=gpt2-small", "trainer.precision=bf16", "trainer.batch_size=1", "attention.backend=flash_v2"]


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [
    [],
    ["trainer.activation_checkpointing=true"],
    ["trainer.activation_checkpointing=true", "model.loss_chunk_tokens=8192"],
    ["trainer.activation_checkpointing=true", "model.loss_chunk_tokens=8192", "trainer.activation_offload=true"],
], ids=["none", "checkpointing", "checkpointing-chunked-loss", "checkpointing-chunked-loss-offload"])
def test_prediction_within_15_percent_of_max_memory_allocated_on_the_gpu(extra):
    from fatrain.max_context import build_try, train_step
    from fatrain.runtime import free_memory

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    seq_len, device = 32768, torch.device("cuda")
    cfg, _ = compose_config(GPU_BASE + extra)
    predicted = predict_step_memory(cfg, seq_len, device)
    free_memory(device, reset_peak=True)
    before = torch.cuda.memory_allocated(device)
    parts = build_try(cfg, device)
    for _ in range(2):
        train_step(cfg, seq_len, device, *parts)
    measured = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    del parts
    free_memory(device, reset_peak=True)
    assert abs(predicted["peak_gib"] - measured) <= 0.15 * measured, (predicted, measured)
    if "trainer.activation_offload=true" in extra:
        # 12 block inputs of 32k x 768 float32 wait in host memory
        assert predicted["host_gib"] >= 12 * seq_len * 768 * 4 / 2**30 * 0.9
