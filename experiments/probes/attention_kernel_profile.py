"""Which GPU kernels an attention backend's forward and backward launch, and how long each takes.

    python experiments/probes/attention_kernel_profile.py [--backends flash_v2 flash_v2_atomic sdpa_cudnn
        sdpa_flash] [--seqlens 8192 16384] [--tokens 32768] [--heads 12] [--headdim 64] [--iters 20]
        [--out profile.jsonl]

For each backend (registry names, called through ``fatrain.kernels.get_backend``) and sequence
length, ``--iters`` forward+backward calls (causal, bf16, batch = tokens / seqlen) run under
torch.profiler after a warm-up (autotuning, compilation); every CUDA kernel's total GPU time
is divided by the iterations and printed per backend, so the passes of one backward (flash_v2:
dQ pass, dK/dV pass; cuDNN: its kernels) can be compared one by one. One row per backend, length
and kernel (gpu, versions, git sha, date) to ``--out`` (.csv or .jsonl).
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from common import Rows, attention_flops, qkv
from fatrain.kernels import get_backend


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["flash_v2", "flash_v2_atomic", "sdpa_cudnn", "sdpa_flash"])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    args = parser.parse_args()
    rows = Rows(args.out, echo=False)
    for n in args.seqlens:
        b, h, d = max(1, args.tokens // n), args.heads, args.headdim
        q, k, v, do = qkv(b, n, h, d)
        for name in args.backends:
            attn = get_backend(name)

            def call(q, k, v, attn=attn):
                return attn(q, k, v, causal=True)

            for _ in range(5):  # warm-up: autotuning, compilation
                torch.autograd.grad(call(q, k, v), (q, k, v), do)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    torch.autograd.grad(call(q, k, v), (q, k, v), do)
                torch.cuda.synchronize()
            totals = collections.Counter()
            counts = collections.Counter()
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    totals[ev.name] += ev.device_time
                    counts[ev.name] += 1
            all_us = sum(totals.values()) / args.iters
            print(f"\n{name} N={n} B={b} H={h} d={d}: {all_us / 1e3:.3f} ms of kernels per forward+backward "
                  f"({attention_flops(b, h, n, d, True, 'fwdbwd') / all_us * 1e-6:.1f} TFLOP/s)", flush=True)
            for kname, us in totals.most_common():
                per = us / args.iters
                rows.add(backend=name, seqlen=n, batch=b, heads=h, head_dim=d, kernel=kname[:160],
                         ms=round(per / 1e3, 4), launches_per_iter=counts[kname] / args.iters,
                         share=round(per / all_us, 4))
                print(f"  {per / 1e3:8.3f} ms  {counts[kname] / args.iters:4.1f}x  {per / all_us:6.1%}  {kname[:110]}",
                      flush=True)
    rows.close()


if __name__ == "__main__":
    main()
