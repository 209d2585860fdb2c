"""Where the spread of short flash_v2 timings comes from (issue 3): host time per call and warm-up.

    python experiments/bench_noise.py [--seqlen 2048] [--headdim 128]

For flash_v2 and SDPA flash, forward and forward+backward (bf16, causal, 16k tokens, hidden
2048): (1) host milliseconds per call, enqueueing 50 calls without a sync (if this is near the
GPU time, the timing measures Python, not the kernels); (2) do_bench medians five times in a
row with the fatrain-bench settings (warm-up 25 ms, 100 ms), then five times each after 2 s of
idle GPU, then with 500 ms of warm-up after the idle. Prints a table.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--headdim", type=int, default=128)
    args = parser.parse_args()
    n, d = args.seqlen, args.headdim
    b, h = 16384 // n, 2048 // d
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def v2():
        return flash_v2.flash_v2_attention(q, k, v, causal=True)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

    rows = []
    for name, fwd in (("flash_v2", v2), ("sdpa_flash", sdpa)):
        for mode in ("fwd", "fwdbwd"):
            if mode == "fwd":
                def fn(fwd=fwd):
                    with torch.no_grad():
                        return fwd()
            else:
                def fn(fwd=fwd):
                    return torch.autograd.grad(fwd(), (q, k, v), dout)
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            host_ms = (time.perf_counter() - t0) / 50 * 1e3
            torch.cuda.synchronize()
            hot = [do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(5)]
            cold = []
            for _ in range(5):
                time.sleep(2.0)
                cold.append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            cold_long = []
            for _ in range(3):
                time.sleep(2.0)
                cold_long.append(do_bench(fn, warmup=500, rep=100, return_mode="median"))
            rows.append((name, mode, host_ms, hot, cold, cold_long))
            print(name, mode, round(host_ms, 3), [round(x, 3) for x in hot], [round(x, 3) for x in cold],
                  [round(x, 3) for x in cold_long], flush=True)
    print(f"| impl | mode | host ms/call | 5x hot (ms) | 5x after 2 s idle | 3x idle + 500 ms warm-up |  (N={n}, d={d})")
    print("|---|---|---|---|---|---|")
    for name, mode, host, hot, cold, cold_long in rows:
        fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        print(f"| {name} | {mode} | {host:.3f} | {fmt(hot)} | {fmt(cold)} | {fmt(cold_long)} |")


if __name__ == "__main__":
    main()
