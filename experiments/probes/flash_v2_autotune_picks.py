"""How stable the autotuner's pick of a flash_v2 pass is, against the same configs timed pinned
(issue 7: at GPT-2 small's training shapes the autotuner kept a config that pinned timing put
4-7% behind another).

    python experiments/flash_v2_autotune_picks.py [--pass fwd] [--seqlens 8192 16384] [--tokens 32768]
        [--heads 12] [--headdim 64] [--repeats 3] [--rounds 3]

For each shape: ``--repeats`` fresh autotuners over the pass's config list (flash_v2's own timing
function and, from session 9, its refining rounds of the top three), each printing its pick,
every config's time in the first pass (as TFLOP/s of the whole pass) and the rounds' times;
then every config pinned and timed with do_bench in ``--rounds`` interleaved rounds (median of
rounds). Causal bf16.
"""

import argparse
import statistics

import torch
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2

LISTS = {"fwd": "_FWD_CONFIGS", "dkdv": "_DKDV_CONFIGS", "dq": "_DQ_CONFIGS"}


def label(c):
    return (f"({c.kwargs['BLOCK_M']}, {c.kwargs['BLOCK_N']}, {c.num_warps}, {c.num_stages}"
            + (f", {c.maxnreg})" if c.maxnreg else ")"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pass", dest="name", default="fwd", choices=list(LISTS))
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configs = getattr(flash_v2, LISTS[args.name])
    kernel = flash_v2._KERNELS[args.name]
    default = flash_v2._LAUNCHERS[args.name]
    for n in args.seqlens:
        b, h, d = max(1, args.tokens // n), args.heads, args.headdim
        flops = 4 * b * h * n * n * d / 2 * (1 if args.name == "fwd" else 2.5)
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = flash_v2._flash_v2_fwd(q, k, v, None, d ** -0.5, -1, 0, 0.0, 0, -1, -1)

        def run():
            if args.name == "fwd":
                return flash_v2._flash_v2_fwd(q, k, v, None, d ** -0.5, -1, 0, 0.0, 0, -1, -1)
            return flash_v2._flash_v2_bwd(do, q, k, v, out, lse, None, d ** -0.5, -1, 0, 0.0, 0, -1, -1)

        print(f"\n{args.name} N={n} B={b} H={h} d={d}", flush=True)
        for r in range(args.repeats):
            tuner = flash_v2._autotuned(kernel, configs)
            flash_v2._LAUNCHERS[args.name] = (tuner, default[1])
            run()
            torch.cuda.synchronize()
            timings = sorted(tuner.configs_timings.items(), key=lambda kv: kv[1][0])
            print(f"  autotune {r}: pick {label(tuner.best_config)}; " + ", ".join(
                f"{label(c)} {flops / t[0] * 1e-9:.0f}" for c, t in timings), flush=True)
            for key, rounds in getattr(tuner, "refined", {}).items():  # flash_v2's refining rounds (session 9)
                print("    refined: " + "; ".join(f"{c}: " + ", ".join(f"{t:.4f}" for t in ts)
                                               for c, ts in rounds.items()), flush=True)
        pinned = {}
        for c in configs:
            flash_v2._LAUNCHERS[args.name] = (flash_v2._autotuned(kernel, [c]), default[1])
            run()
            pinned[label(c)] = flash_v2._LAUNCHERS[args.name]
        times = {key: [] for key in pinned}
        for _ in range(args.rounds):
            for key, launcher in pinned.items():
                flash_v2._LAUNCHERS[args.name] = launcher
                times[key].append(do_bench(run, warmup=100, rep=300, return_mode="median"))
        flash_v2._LAUNCHERS[args.name] = default
        for key, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
            ms = statistics.median(ts)
            rounds = ", ".join(f"{t:.4f}" for t in ts)
            print(f"  pinned {key}: {ms:.4f} ms, {flops / ms * 1e-9:.1f} TFLOP/s (rounds {rounds})", flush=True)


if __name__ == "__main__":
    main()
