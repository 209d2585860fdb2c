"""Which GPU kernels an attention backend's forward and backward launch, and how long each takes
(issue 7: where flash_v2's backward loses to cuDNN's at the training shapes).

    python experiments/attention_kernel_profile.py [--seqlens 8192 16384] [--tokens 32768] [--heads 12]
        [--headdim 64] [--iters 20] [--out profile.jsonl]

For each backend (flash_v2 deterministic, flash_v2 deterministic=False, SDPA cuDNN, SDPA flash) and
sequence length, ``--iters`` forward+backward calls (causal, bf16, batch = tokens / seqlen) run
under torch.profiler after a warm-up; every CUDA kernel's total device time is divided by the
iterations and printed per backend, so the passes of one backward (flash_v2: dQ pass, dK/dV pass;
cuDNN: its kernels) can be compared one by one. TFLOP/s per kernel use the FLOPs of its phase
(forward 4BHN^2D/2, backward 2.5x that) and are only comparable between single-kernel phases.
"""

import argparse
import collections
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2


def backends():
    def v2(deterministic):
        def call(q, k, v):
            return flash_v2.flash_v2_attention(q, k, v, causal=True, deterministic=deterministic)
        return call

    def sdpa(backend):
        def call(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
        return call

    return {"flash_v2": v2(True), "flash_v2_atomic": v2(False), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    rows = []
    for n in args.seqlens:
        b, h, d = max(1, args.tokens // n), args.heads, args.headdim
        flops_fwd = 4 * b * h * n * n * d / 2
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for name, call in backends().items():
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
                  f"({3.5 * flops_fwd / all_us * 1e-6:.1f} TFLOP/s)", flush=True)
            for kname, us in totals.most_common():
                per = us / args.iters
                row = dict(backend=name, n=n, b=b, h=h, d=d, kernel=kname[:160], ms=round(per / 1e3, 4),
                           launches_per_iter=counts[kname] / args.iters, share=round(per / all_us, 4))
                rows.append(row)
                print(f"  {per / 1e3:8.3f} ms  {counts[kname] / args.iters:4.1f}x  {per / all_us:6.1%}  {kname[:110]}",
                      flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
