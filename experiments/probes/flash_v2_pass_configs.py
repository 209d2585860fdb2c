"""flash_v2's three passes, one launch configuration at a time (issue 3: what the autotuner should pick).

    python experiments/flash_v2_pass_configs.py --passes fwd dkdv dq [--seqlens 2048 8192] [--headdims 128]
        [--tokens 16384] [--heads H] [--only-extra] [--cudnn]

For each pass and each (BLOCK_M, BLOCK_N, num_warps, num_stages) in its autotune list plus a
few candidates outside it, that pass's launcher is replaced by one pinned to the configuration
(the other passes keep the autotuner, whose pick is fixed after the first call) and the pass's
host function is timed: the forward (``_flash_v2_fwd``) or the whole backward
(``_flash_v2_bwd``: preprocess, dK/dV, dQ), so the dK/dV and dQ rows of one shape differ only
by the pinned pass. bf16, 16k tokens, hidden 2048, do_bench median (``--tokens``, ``--heads``: the
training shapes, e.g. 32768 tokens and GPT-2 small's 12 heads). A configuration is
(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]): maxnreg caps the registers per thread, so
that more programs share an SM (session 9). ``--cudnn`` also times SDPA's cuDNN backend on
the same inputs (forward, and forward+backward minus forward). Each configuration's
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

LISTS = {"fwd": "_FWD_CONFIGS", "dkdv": "_DKDV_CONFIGS", "dq": "_DQ_CONFIGS", "dkdv_atomic": "_DKDV_CONFIGS"}
KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv", "dq": "_bwd_dq", "dkdv_atomic": "_bwd_dkdv"}
EXTRA = {"fwd": [(128, 64, 8, 5), (256, 64, 16, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                 # session 9: register caps for two 8-warp programs per SM, and 16-warp 256-row tiles
                 (128, 128, 8, 2, 128), (128, 128, 8, 3, 128), (256, 64, 16, 2), (256, 128, 16, 2),
                 (64, 64, 4, 3, 128), (64, 128, 4, 2)],
         "dkdv": [(32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 8, 5),
                  (32, 128, 8, 3, 128), (32, 128, 8, 2, 128), (32, 128, 8, 4, 128), (32, 64, 4, 3, 128),
                  (32, 64, 4, 4, 128), (16, 128, 8, 3, 128), (64, 128, 16, 3), (32, 128, 16, 3),
                  # three 4-warp programs per SM (48-56 bytes of spills at 64 x 64)
                  (64, 64, 4, 3, 168), (64, 64, 4, 2, 168), (32, 64, 4, 3, 168), (32, 64, 4, 2, 168)],
         "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 128, 8, 3),
                (128, 32, 4, 3, 168), (128, 32, 4, 4, 168), (128, 64, 8, 3, 120), (256, 32, 8, 3),
                (256, 64, 16, 3), (256, 64, 16, 2), (64, 64, 4, 3, 128), (64, 32, 4, 4, 128), (64, 64, 4, 4)],
         # deterministic=False: the dK/dV pass adding dQ (bulk reduce-add on Hopper)
         "dkdv_atomic": [(64, 128, 8, 4), (32, 128, 8, 3, 128), (32, 64, 4, 3, 128), (32, 64, 4, 2),
                         (64, 64, 4, 2), (16, 128, 8, 3), (64, 128, 8, 3, 232)]}


def configs(name, only_extra=False):
    listed = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
              + ((c.maxnreg,) if c.maxnreg else ()) for c in getattr(flash_v2, LISTS[name])]
    extra = [c for c in EXTRA[name] if c not in listed]
    return listed[:1] + extra if only_extra else listed + extra


def cudnn_ms(q, k, v, do, causal):
    """SDPA's cuDNN backend on the same (B, N, H, D) inputs as (B, H, N, D) views: forward, and
    backward as forward+backward minus forward (do_bench medians)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2)

    def fwd():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def fwdbwd():
        torch.autograd.grad(fwd(), (qt, kt, vt), dot)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        f = do_bench(fwd, warmup=100, rep=300, return_mode="median")
        fb = do_bench(fwdbwd, warmup=100, rep=300, return_mode="median")
    return f, fb - f


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", nargs="+", default=["fwd", "dkdv", "dq"], choices=list(LISTS))
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--headdims", type=int, nargs="+", default=[128])
    parser.add_argument("--causal", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seqlen (batch at least 1)")
    parser.add_argument("--heads", type=int, default=None, help="default: 2048 / headdim")
    parser.add_argument("--only-extra", action="store_true",
                        help="time the first (default) configuration of each list and the extra candidates only")
    parser.add_argument("--cudnn", action="store_true", help="also time SDPA's cuDNN backend")
    args = parser.parse_args()
    defaults = dict(flash_v2._LAUNCHERS)
    table = {}
    for d in args.headdims:
        for n in args.seqlens:
            for causal in map(bool, args.causal):
                b, h = max(1, args.tokens // n), args.heads or 2048 // d  # as fatrain-bench: batch 1 from 16k up
                q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                scale = d ** -0.5
                window = (-1, 0) if causal else (-1, -1)
                out, lse = flash_v2._flash_v2_fwd(q, k, v, None, scale, *window, 0.0, 0, -1, -1)

                def run(name):
                    if name == "fwd":
                        return flash_v2._flash_v2_fwd(q, k, v, None, scale, *window, 0.0, 0, -1, -1)[0]
                    return torch.cat(flash_v2._flash_v2_bwd(do, q, k, v, out, lse, None, scale, *window, 0.0, 0,
                                                            -1, -1, name != "dkdv_atomic"), dim=1)

                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                if args.cudnn:
                    f_ms, b_ms = cudnn_ms(q, k, v, do, causal)
                    for mode, ms, mult in (("fwd", f_ms, 1), ("bwd", b_ms, 2.5)):
                        row = dict(impl=f"cudnn {mode}", d=d, n=n, b=b, h=h, causal=causal, mode=mode,
                                   ms=round(ms, 4), tflops=round(flops * mult / ms * 1e-9, 1))
                        table[(row["impl"], d, n, causal)] = row["tflops"]
                        print(json.dumps(row), flush=True)
                for name in args.passes:
                    ref = run(name)
                    mode = "fwd" if name == "fwd" else "bwd"
                    pass_flops = flops * (1 if mode == "fwd" else 2.5)
                    for cfg in configs(name, args.only_extra) + [None]:
                        label = f"{name} {cfg}" if cfg else f"{name} autotuned"
                        row = dict(impl=label, d=d, n=n, b=b, h=h, causal=causal, mode=mode)
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
