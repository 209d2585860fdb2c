"""Timing of flash_v1's variants against naive (the real benchmark is fatrain-bench).

    python experiments/flash_v1_timing.py [--stages 1 2 3] [--seqlens 4096 8192] [--headdims 64 128]
        [--sram-bytes 0 464896] [--warps 0 8] [--splits 1 0 4] [--naive]

Variants: software-pipelining depth of the inner loop, on-chip budget M, warps, and
num_splits (programs per (batch, head); 0 is flash_v1's heuristic, 1 the paper's grid).

bf16, batch x seqlen = 16k tokens, hidden 2048 (nheads = 2048 / headdim), median of
triton.testing.do_bench; forward and forward+backward in ms. Each stage count is checked
against naive's output and gradients first (a race across the pipelined loads would show
there). Prints one JSON line per measurement and a table.
"""

import argparse
import functools
import json

import torch
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v1, naive


def run(fn, q, k, v, causal, mode):
    if mode == "bwd":
        out = fn(q, k, v, causal=causal)
        dout = torch.randn_like(q)
        return do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                        warmup=50, rep=300, return_mode="median")
    if mode == "fwd":
        return do_bench(lambda: fn(q, k, v, causal=causal), warmup=50, rep=300, return_mode="median")
    dout = torch.randn_like(q)

    def step():
        out = fn(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)

    return do_bench(step, warmup=50, rep=300, return_mode="median")


def rel_errors(fn_v1, q, k, v, causal):
    dout = torch.randn_like(q)
    results = []
    for fn in (fn_v1, naive.naive_attention):
        out = fn(q, k, v, causal=causal)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    return [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(*results)]


default_warps = flash_v1._num_warps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--naive", action="store_true", help="also time naive")
    parser.add_argument("--sram-bytes", type=int, nargs="+", default=[0],
                        help="on-chip budgets M to try (bytes; 0: the GPU's own)")
    parser.add_argument("--warps", type=int, nargs="+", default=[0], help="num_warps to try (0: flash_v1's choice)")
    parser.add_argument("--splits", type=int, nargs="+", default=[1],
                        help="num_splits to try (0: flash_v1's heuristic, 1: the paper's grid)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "bwd", "fwdbwd"])
    args = parser.parse_args()
    rows = []
    for d in args.headdims:
        for n in args.seqlens:
            b, h = 16384 // n, 2048 // d
            for causal in (False, True):
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                impls = [(f"flash_v1/stages={s},sram={m},warps={w},splits={n}", (s, m, w, n)) for s in args.stages
                         for m in args.sram_bytes for w in args.warps for n in args.splits]
                if args.naive:
                    impls.append(("naive", None))
                for name, stages in impls:
                    if stages is not None:
                        flash_v1.NUM_STAGES, sram, warps, splits = stages
                        flash_v1.set_sram_bytes(sram or None)
                        flash_v1._num_warps = (lambda hd, w=warps: w) if warps else default_warps
                        fn = functools.partial(flash_v1.flash_v1_attention, num_splits=splits)
                        errs = rel_errors(fn, q, k, v, causal) if n <= 4096 else []
                    else:
                        fn, errs = naive.naive_attention, []
                    row = dict(impl=name, d=d, n=n, causal=causal, errs=[round(e, 5) for e in errs])
                    if stages is not None:
                        row["blocks"] = flash_v1._launch_blocks(n, n, d, flash_v1.device_sram_bytes("cuda"))
                        row["splits"] = flash_v1.resolve_num_splits(splits, False, b, h, h, n, n, *row["blocks"], "cuda")
                    for mode in args.modes:
                        try:
                            row[mode] = round(run(fn, q, k, v, causal, mode), 3)
                        except torch.OutOfMemoryError:
                            row[mode] = "OOM"
                        torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    modes = " | ".join(f"{m} ms" for m in args.modes)
    print(f"| impl | blocks | splits (fwd, bwd) | d | N | causal | {modes} | rel err vs naive (out, dq, dk, dv) |")
    print("|---|---|---|---|---|---|" + "---|" * len(args.modes) + "---|")
    for r in rows:
        times = " | ".join(str(r[m]) for m in args.modes)
        print(f"| {r['impl']} | {r.get('blocks', '')} | {r.get('splits', '')} | {r['d']} | {r['n']} | {r['causal']} | "
              f"{times} | {r['errs']} |")


if __name__ == "__main__":
    main()
