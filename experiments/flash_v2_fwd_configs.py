"""flash_v2's forward, one launch configuration at a time (issue 3: why the forward at N=8192 dips).

    python experiments/flash_v2_fwd_configs.py [--seqlens 4096 8192 16384] [--headdims 128]

For each (BLOCK_M, BLOCK_N, num_warps, num_stages) in the forward's autotune list plus a few
wider candidates, the forward launcher is replaced by one pinned to that configuration and
timed (bf16, non-causal and causal, 16k tokens, hidden 2048, do_bench median); then the
autotuned default (with the configuration it picked) and FlexAttention, side by side.
Prints one JSON line per measurement and a table of TFLOP/s.
"""

import argparse
import json

import torch
import triton
from triton.testing import do_bench

import fatrain  # noqa: F401
from fatrain.kernels import flash_v2

EXTRA = [(256, 64, 16, 3), (256, 128, 16, 2), (128, 64, 8, 5), (128, 32, 4, 4)]


def flex_fn():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def make(q, k, v, causal):
        """The timed call; the block mask is built once, outside it."""
        N = q.shape[1]
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N, device="cuda") if causal else None
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return lambda: compiled(qt, kt, vt, block_mask=mask).transpose(1, 2)

    return make


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--headdims", type=int, nargs="+", default=[128])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    default = flash_v2._LAUNCHERS["fwd"]
    configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in flash_v2._FWD_CONFIGS]
    configs += EXTRA
    flex = flex_fn()
    rows = []
    for d in args.headdims:
        for n in args.seqlens:
            for causal in map(bool, args.causal):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                ref = flash_v2.flash_v2_attention(q, k, v, causal=causal)
                impls = [(f"pinned {c}", c) for c in configs] + [("autotuned", None), ("flex", "flex")]
                for name, cfg in impls:
                    row = dict(impl=name, d=d, n=n, causal=causal)
                    try:
                        if cfg == "flex":
                            fn = flex(q, k, v, causal)
                        else:
                            flash_v2._LAUNCHERS["fwd"] = default if cfg is None else (
                                flash_v2._autotuned(flash_v2._fwd_kernel, flash_v2._configs(cfg)), default[1])
                            fn = lambda: flash_v2.flash_v2_attention(q, k, v, causal=causal)  # noqa: E731
                        out = fn()
                        row["max_err_vs_default"] = (out.float() - ref.float()).abs().max().item()
                        ms = do_bench(fn, warmup=100, rep=500, return_mode="median")
                        row.update(ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 1))
                        if cfg is None:
                            row["picked"] = [str(c) for c in default[0].cache.values()]
                    except (triton.runtime.errors.OutOfResources, RuntimeError) as exc:
                        row["error"] = str(exc)[:120]
                    flash_v2._LAUNCHERS["fwd"] = default
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("| impl | d | N | causal | TFLOP/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['d']} | {r['n']} | {r['causal']} | {r.get('tflops', r.get('error'))} |")


if __name__ == "__main__":
    main()
