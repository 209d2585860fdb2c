"""Where the spread of short attention timings comes from: host time per call and GPU warm-up.

    python experiments/probes/timing_noise.py [--backends flash_v2 sdpa_flash] [--seqlen 2048]
        [--headdim 128] [--out noise.csv]

For each backend (registry names), forward and forward+backward (bf16, causal, 16k tokens,
hidden 2048): (1) host milliseconds per call, enqueueing 50 calls without a sync (near the GPU
time, a timing measures Python, not the kernels); (2) do_bench medians five times in a row with
fatrain-bench's settings (warm-up 25 ms, 100 ms), then five times each after 2 s of idle GPU,
then three times with 500 ms of warm-up after the idle. One row per backend and mode (gpu,
versions, git sha, date) to ``--out`` (.csv or .jsonl).
"""

import argparse
import json
import time

import torch

from common import Rows, qkv, time_ms
from fatrain.kernels import get_backend


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["flash_v2", "sdpa_flash"])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    args = parser.parse_args()
    n, d = args.seqlen, args.headdim
    b, h = max(1, 16384 // n), 2048 // d
    q, k, v, dout = qkv(b, n, h, d)
    rows = Rows(args.out)
    for name in args.backends:
        attn = get_backend(name)
        for mode in ("fwd", "fwdbwd"):
            if mode == "fwd":
                def fn(attn=attn):
                    with torch.no_grad():
                        return attn(q, k, v, causal=True)
            else:
                def fn(attn=attn):
                    return torch.autograd.grad(attn(q, k, v, causal=True), (q, k, v), dout)
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            host_ms = (time.perf_counter() - t0) / 50 * 1e3
            torch.cuda.synchronize()
            hot = [time_ms(fn, warmup=25, rep=100) for _ in range(5)]
            idle = []
            for _ in range(5):
                time.sleep(2.0)
                idle.append(time_ms(fn, warmup=25, rep=100))
            idle_long_warmup = []
            for _ in range(3):
                time.sleep(2.0)
                idle_long_warmup.append(time_ms(fn, warmup=500, rep=100))
            rows.add(impl=name, mode=mode, batch=b, seqlen=n, heads=h, head_dim=d, causal=True,
                     host_ms_per_call=round(host_ms, 3), hot_ms=json.dumps([round(x, 4) for x in hot]),
                     after_idle_ms=json.dumps([round(x, 4) for x in idle]),
                     after_idle_500ms_warmup_ms=json.dumps([round(x, 4) for x in idle_long_warmup]))
    rows.close()


if __name__ == "__main__":
    main()
