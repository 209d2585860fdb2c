"""flash_v2's three passes, one launch configuration at a time (issue 3: what the autotuner should pick).

    python experiments/flash_v2_pass_configs.py --passes fwd dkdv dq [--seqlens 2048 8192] [--headdims 128]

For each pass and each (BLOCK_M, BLOCK_N, num_warps, num_stages) in its autotune list plus a
few candidates outside it, that pass's launcher is replaced by one pinned to the configuration
(the other passes keep the autotuner, whose pick is fixed after the first call) and the pass's
host function is timed: the forward (``_flash_v2_fwd``) or the whole backward
(``_flash_v2_bwd``: preprocess, dK/dV, dQ), so the dK/dV and dQ rows of one shape differ only
by the pinned pass. bf16, 16k tokens, hidden 2048, do_bench median. Each configuration's
result is checked against the autotuned one (max abs difference). ``TRITON_PRINT_AUTOTUNING=1``
prints the autotuner's own picks. Prints one JSON line per measurement and a table last.
"""

import argparse
import json

import torch
import triton
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2

LISTS = {"fwd": "_FWD_CONFIGS", "dkdv": "_DKDV_CONFIGS", "dq": "_DQ_CONFIGS"}
KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv", "dq": "_bwd_dq"}
EXTRA = {"fwd": [(128, 64, 8, 5), (256, 64, 16, 3), (128, 32, 4, 4), (64, 64, 4, 3)],
         "dkdv": [(32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 8, 5)],
         "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 128, 8, 3)]}


def configs(name):
    listed = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
              for c in getattr(flash_v2, LISTS[name])]
    return listed + [c for c in EXTRA[name] if c not in listed]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", nargs="+", default=["fwd", "dkdv", "dq"], choices=list(LISTS))
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[128])
    parser.add_argument("--causal", type=int, nargs="+", default=[1, 0])
    args = parser.parse_args()
    defaults = dict(flash_v2._LAUNCHERS)
    table = {}
    for d in args.headdims:
        for n in args.seqlens:
            for causal in map(bool, args.causal):
                b, h = max(1, 16384 // n), 2048 // d  # as fatrain-bench: batch 1 from 16k up
                q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                scale = d ** -0.5
                window = (-1, 0) if causal else (-1, -1)
                out, lse = flash_v2._flash_v2_fwd(q, k, v, None, scale, *window, 0.0, 0, -1, -1)

                def run(name):
                    if name == "fwd":
                        return flash_v2._flash_v2_fwd(q, k, v, None, scale, *window, 0.0, 0, -1, -1)[0]
                    return torch.cat(flash_v2._flash_v2_bwd(do, q, k, v, out, lse, None, scale, *window, 0.0, 0,
                                                            -1, -1), dim=1)

                for name in args.passes:
                    ref = run(name)
                    mode = "fwd" if name == "fwd" else "bwd"
                    pass_flops = 4 * b * h * n * n * d / (2 if causal else 1) * (1 if mode == "fwd" else 2.5)
                    for cfg in configs(name) + [None]:
                        label = f"{name} {cfg}" if cfg else f"{name} autotuned"
                        row = dict(impl=label, d=d, n=n, causal=causal, mode=mode)
                        try:
                            if cfg is not None:
                                kernel = getattr(flash_v2, KERNELS[name])
                                flash_v2._LAUNCHERS[name] = (flash_v2._autotuned(kernel, flash_v2._configs(cfg)),
                                                             defaults[name][1])
                            res = run(name)
                            row["max_diff_vs_autotuned"] = (res.float() - ref.float()).abs().max().item()
                            ms = do_bench(lambda: run(name), warmup=100, rep=300, return_mode="median")
                            row.update(ms=round(ms, 4), tflops=round(pass_flops / ms * 1e-9, 1))
                            table[(label, d, n, causal)] = row["tflops"]
                        except (triton.runtime.errors.OutOfResources, RuntimeError) as exc:
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                        flash_v2._LAUNCHERS[name] = defaults[name]
                        print(json.dumps(row), flush=True)
    shapes = sorted({key[1:] for key in table})
    names = list(dict.fromkeys(key[0] for key in table))
    print("TFLOP/s of the pass (fwd: 4BHN^2D, bwd: 2.5x that; halved when causal)")
    print("| config | " + " | ".join(f"d{d} N{n} {'c' if c else 'nc'}" for d, n, c in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for name in names:
        print(f"| {name} | " + " | ".join(str(table.get((name, *s), "")) for s in shapes) + " |")


if __name__ == "__main__":
    main()
