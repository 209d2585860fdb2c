"""How one call is timed and its memory measured.

Timing is the median of ``triton.testing.do_bench`` on CUDA (which flushes L2 between
calls) and a wall-clock median of ``cpu_reps`` calls on the CPU (for tests only: the
Triton kernels run in the interpreter there). Peak extra memory is max_memory_allocated
during one call minus memory_allocated before it, measured after timing so that
compilation and autotuning are not counted.

Modes (training-style: inputs require grad, so the forward saves what its backward needs):
    fwd     out = attention(q, k, v)
    bwd     out.backward(dout) on a graph built once before timing
    fwdbwd  attention(q, k, v).backward(dout)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def mode_fn(call: Callable, mode: str, q) -> Callable:
    """The function a mode times; for bwd the forward graph is built here, once."""
    if mode == "fwd":
        return call
    dout = torch.randn_like(q)
    if mode == "fwdbwd":
        return lambda: call().backward(dout)
    out = call()
    return lambda: out.backward(dout, retain_graph=True)


def time_ms(fn: Callable, device: torch.device, cfg, grad_to_none: list[torch.Tensor]) -> float:
    """Median milliseconds of fn(): do_bench on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(max(1, cfg.cpu_reps)):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """max_memory_allocated during one call of fn minus memory_allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
