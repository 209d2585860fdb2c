"""Throwaway timing of flash_v2 against SDPA's flash kernel (the real benchmark is fatrain-bench).

    python experiments/flash_v2_timing.py [--out DIR] [--seqlens 2048 8192] [--headdims 64 128]

bf16, batch x seqlen = 16k tokens, hidden 2048 (nheads = 2048 / headdim); median of
triton.testing.do_bench. TFLOP/s: forward 4*B*H*N*N*D (halved when causal), fwd+bwd 3.5x that.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2


def sdpa_flash(q, k, v, causal):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal)
    return out.transpose(1, 2)


def ours(q, k, v, causal):
    return flash_v2.flash_v2_attention(q, k, v, causal=causal)


def check_against_sdpa(q, k, v, causal):
    """Relative error of flash_v2's output and gradients against SDPA flash (both bf16)."""
    dout = torch.randn_like(q)
    errs = []
    results = []
    for fn in (ours, sdpa_flash):
        out = fn(q, k, v, causal)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*results):
        errs.append(((a.float() - b.float()).norm() / b.float().norm()).item())
    print("rel err vs sdpa (out, dq, dk, dv):", " ".join(f"{e:.2e}" for e in errs), flush=True)
    if not all(e < 2e-2 for e in errs):
        print("MISMATCH against sdpa flash", flush=True)


def bench(fn, q, k, v, causal, mode):
    if mode == "fwd":
        return do_bench(lambda: fn(q, k, v, causal), warmup=100, rep=400, return_mode="median")
    out = fn(q, k, v, causal)
    dout = torch.randn_like(out)

    def step():
        o = fn(q, k, v, causal)
        torch.autograd.grad(o, (q, k, v), dout)

    return do_bench(step, warmup=100, rep=400, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
    args = parser.parse_args()
    rows = []
    gpu = torch.cuda.get_device_name()
    start = time.time()
    cases = [(N, D, causal) for N in args.seqlens for D in args.headdims for causal in (False, True)]
    for N, D, causal in cases:
        if time.time() - start > args.budget_s:
            print(f"budget spent: skipping N={N} D={D} causal={causal}", flush=True)
            continue
        B, H = 16384 // N, 2048 // D
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        check_against_sdpa(q, k, v, causal)
        flops_fwd = 4 * B * H * N * N * D / (2 if causal else 1)
        for mode in ("fwd", "fwdbwd"):
            flops = flops_fwd * (1 if mode == "fwd" else 3.5)
            for name, fn in (("sdpa_flash", sdpa_flash), ("flash_v2", ours)):
                t0 = time.time()
                ms = bench(fn, q, k, v, causal, mode)
                row = dict(impl=name, mode=mode, causal=causal, seqlen=N, headdim=D, batch=B, nheads=H,
                           ms=ms, tflops=flops / ms * 1e-9, gpu=gpu, wall_s=time.time() - t0)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for name, (launcher, _) in flash_v2._LAUNCHERS.items():
        for key, cfg in getattr(launcher, "cache", {}).items():
            print(name, key, cfg, flush=True)
    with open(os.path.join(args.out, "flash_v2_timing.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\n{'hd':>4} {'N':>6} {'causal':>6} {'mode':>7} {'sdpa':>7} {'ours':>7} {'ratio':>6}")
    rows.sort(key=lambda r: (r["headdim"], r["seqlen"], r["causal"], r["mode"], r["impl"] != "sdpa_flash"))
    for i in range(0, len(rows), 2):
        s, o = rows[i], rows[i + 1]
        print(f"{s['headdim']:>4} {s['seqlen']:>6} {str(s['causal']):>6} {s['mode']:>7} "
              f"{s['tflops']:7.1f} {o['tflops']:7.1f} {o['tflops'] / s['tflops']:6.2f}")


if __name__ == "__main__":
    main()
