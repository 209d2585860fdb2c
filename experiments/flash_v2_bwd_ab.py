"""A/B of one flash_v2 kernel switch, and flash_v2's host overhead (issues 3, 7).

    python experiments/flash_v2_bwd_ab.py [--seqlens 2048 8192] [--headdims 64 128] [--rounds 3]

1. ``--switch NAME``: a module-level boolean of fatrain.kernels.flash_v2 that the kernels read
   on the host, timed True against False (backward and forward+backward, alternating rounds,
   median of rounds). Session 6 call A ran it with ``_DP_FIRST`` (the dK/dV pass issuing
   dP^T = V dO^T before the exp2s of P^T, or after the dV matmul); issuing it first won, and
   the switch was removed (commit message "flash_v2: the dK/dV pass issues dP^T before ...").
   Session 7 ran it with ``_STATS_TMA`` (the dK/dV pass reading the rows' LSE and Delta through
   1-D descriptors, or through pointer loads; call A) and ``_LSE2`` (that pass reading LSE in
   base 2, or multiplying by log2(e) each step; call B); both won and both switches were removed
   (commits after d8adee2). Skipped when the module has no such attribute.
2. Host overhead: one call on a (1, 128, 1, 64) input, where the GPU work is a few
   microseconds, timed per call with a synchronize every 200 calls, beside SDPA; and a
   cProfile of flash_v2 forward+backward calls (top functions by own time).
"""

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2


def fwdbwd(q, k, v, do, causal):
    out = flash_v2.flash_v2_attention(q, k, v, causal=causal)
    out.backward(do)


def ab(args):
    if not hasattr(flash_v2, args.switch):
        print(f"flash_v2 has no switch {args.switch!r}: A/B skipped", flush=True)
        return
    for d in args.headdims:
        for n in args.seqlens:
            for causal in map(bool, args.causal):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                do = torch.randn_like(q)
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                times = {}
                for r in range(args.rounds):
                    for setting in (True, False):
                        setattr(flash_v2, args.switch, setting)
                        out = flash_v2.flash_v2_attention(q, k, v, causal=causal)
                        bwd = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
                        both = lambda: fwdbwd(q, k, v, do, causal)  # noqa: E731
                        for mode, fn, f in (("bwd", bwd, 2.5 * flops), ("fwdbwd", both, 3.5 * flops)):
                            ms = do_bench(fn, warmup=100, rep=300, return_mode="median", grad_to_none=(q, k, v))
                            times.setdefault((setting, mode), []).append(f / ms * 1e-9)
                for (setting, mode), vals in times.items():
                    print(json.dumps(dict(test=args.switch, value=setting, mode=mode, d=d, n=n, causal=causal,
                                          tflops=round(statistics.median(vals), 1),
                                          rounds=[round(x, 1) for x in vals])), flush=True)
    setattr(flash_v2, args.switch, True)


def host_overhead():
    q, k, v = (torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    cases = {
        "flash_v2 fwd": lambda: flash_v2.flash_v2_attention(q, k, v, causal=True),
        "flash_v2 fwd no grad": lambda: flash_v2.flash_v2_attention(q.detach(), k.detach(), v.detach(), causal=True),
        "flash_v2 fwdbwd": lambda: fwdbwd(q, k, v, do, True),
        "sdpa fwd": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
        "sdpa fwdbwd": lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True).backward(do.transpose(1, 2)),
    }
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        per_call = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            per_call.append((time.perf_counter() - t0) / 200 * 1e6)
        print(json.dumps(dict(test="host_overhead", case=name, us_per_call=round(min(per_call), 1))), flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fwdbwd(q, k, v, do, True)
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--switch", default="_DP_FIRST", help="module-level boolean of flash_v2 to A/B")
    parser.add_argument("--skip-ab", action="store_true")
    parser.add_argument("--skip-host", action="store_true", help="skip the host-overhead measurement")
    args = parser.parse_args()
    if not args.skip_host:
        host_overhead()
    if not args.skip_ab:
        ab(args)


if __name__ == "__main__":
    main()
