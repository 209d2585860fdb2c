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

CASES = {
    "sdpa": (3072, ["attention.backend=sdpa"]),
    "naive": (1024, ["attention.backend=naive"]),  # S and P of every layer: memory quadratic in the length
    "checkpointing": (3072, ["attention.backend=sdpa", "trainer.activation_checkpointing=true"]),
    "checkpointing-chunked-loss": (3072, ["attention.backend=sdpa", "trainer.activation_checkpointing=true",
                                          "model.loss_chunk_tokens=1000"]),
    "checkpointing-offload": (3072, ["attention.backend=sdpa", "trainer.activation_checkpointing=true",
                                     "trainer.activation_offload=true"]),
}

# One process for every case: it loads torch's CPU kernels with a small model first (their code
# and buffers are not a step's); then, per case, it resets the process's peak resident size
# (VmHWM) to its resident size, runs two steps of the case's model, and records how far the peak
# rose. A case's tensors are freed (and, with the mmap threshold, returned) before the next.
MEASURE = r"""
import gc, json, re, sys
import torch
from fatrain.cli.max_context import compose_config
from fatrain.max_context import build_try, train_step

def status(field):  # kB
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024

cases = json.loads(sys.argv[1])
cpu = torch.device("cpu")
warm, _ = compose_config(cases[0][1] + ["model=tiny", "trainer.batch_size=1"])
parts = build_try(warm, cpu)
train_step(warm, 64, cpu, *parts)
grown = []
for seq_len, overrides in cases:
    del parts
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size restarts from the resident size now (Linux >= 4.0)
    base = status("VmRSS")
    cfg, _ = compose_config(overrides)
    parts = build_try(cfg, cpu)
    for _ in range(2):
        train_step(cfg, seq_len, cpu, *parts)
    grown.append((status("VmHWM") - base) / 2**30)
print(json.dumps(grown))
"""


@pytest.fixture(scope="module")
def measured():
    """{case: GiB the peak resident size rose by over its two steps}, from one fresh process."""
    # NOTE: a fixed environment, not the test process's (earlier tests may have changed that one).
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR", "FATRAIN_CACHE") if k in os.environ}
    env.update(MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="2", TRITON_INTERPRET="1")
    cases = [(n, BASE + extra) for n, extra in CASES.values()]
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cases)], env=env, check=True,
                         capture_output=True, text=True, timeout=900)
    return dict(zip(CASES, json.loads(out.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_within_15_percent_of_peak_rss(case, measured):
    seq_len, extra = CASES[case]
    cfg, _ = compose_config(BASE + extra)
    predicted = predict_step_memory(cfg, seq_len, torch.device("cpu"))
    assert predicted["peak_gib"] > 0.1  # the step's tensors dominate what is measured
    assert abs(predicted["peak_gib"] - measured[case]) <= 0.15 * measured[case], (predicted, measured)


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
