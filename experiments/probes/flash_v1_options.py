"""flash_v1's public launch options timed against naive: num_splits and the on-chip budget M.

    python experiments/probes/flash_v1_options.py [--splits 1 0 2 4 8 16] [--sram-bytes 0]
        [--seqlens 2048 8192 16384] [--headdims 128 64] [--causal 0 1] [--modes fwd bwd fwdbwd]
        [--naive] [--out flash_v1_options.csv]

``num_splits`` is how many programs share one (batch, head) (1: the paper's grid; 0: flash_v1's
heuristic, S = min(ceil(16 x SMs / (B x H)), 16, blocks)); ``sram_bytes`` the budget M from which
flash_v1 derives its tiles (B_c = M / 4d; 0: the device's own). Both are registry options of
flash_v1 (``fatrain.kernels.backend_info("flash_v1").options``), passed to
``get_backend("flash_v1")``. bf16, batch x seqlen = 16k tokens, hidden 2048 (heads = 2048 / d),
median of do_bench; ms and TFLOP/s (forward 4BHN^2D, halved causal; backward 2.5x, forward+backward
3.5x). Each option set is checked against naive's output first. One row per measurement (gpu,
versions, git sha, date) to ``--out`` (.csv or .jsonl).
"""

import argparse
import functools

import torch

from common import Rows, attention_flops, qkv, time_ms
from fatrain.kernels import get_backend


def timed(fn, q, k, v, do, causal, mode):
    if mode == "fwd":
        return time_ms(lambda: fn(q, k, v, causal=causal))
    if mode == "bwd":
        out = fn(q, k, v, causal=causal)
        return time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    return time_ms(lambda: torch.autograd.grad(fn(q, k, v, causal=causal), (q, k, v), do))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", type=int, nargs="+", default=[0])
    parser.add_argument("--sram-bytes", type=int, nargs="+", default=[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--headdims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd", "fwdbwd"])
    parser.add_argument("--naive", action="store_true", help="time naive too")
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    args = parser.parse_args()
    rows = Rows(args.out)
    flash_v1, naive = get_backend("flash_v1"), get_backend("naive")
    for d in args.headdims:
        for n in args.seqlens:
            for causal in map(bool, args.causal):
                b, h = max(1, 16384 // n), 2048 // d
                q, k, v, do = qkv(b, n, h, d)
                shape = dict(batch=b, seqlen=n, heads=h, head_dim=d, causal=causal)
                impls = [(f"flash_v1 num_splits={s} sram_bytes={m or 'device'}",
                          functools.partial(flash_v1, num_splits=s, sram_bytes=m or None))
                         for s in args.splits for m in args.sram_bytes]
                if args.naive:
                    impls.append(("naive", naive))
                try:  # naive runs out of memory first; the check is then skipped
                    reference = naive(q, k, v, causal=causal).float()
                except torch.cuda.OutOfMemoryError:
                    reference = None
                    torch.cuda.empty_cache()
                for name, fn in impls:
                    try:
                        err = None
                        if name != "naive" and reference is not None:
                            err = (fn(q, k, v, causal=causal).float() - reference).abs().max().item()
                        for mode in args.modes:
                            ms = timed(fn, q, k, v, do, causal, mode)
                            rows.add(impl=name, mode=mode, **shape, max_diff_vs_naive=err, ms=round(ms, 4),
                                     tflops=round(attention_flops(b, h, n, d, causal, mode) / ms * 1e-9, 1))
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        rows.add(impl=name, mode="all", **shape, status="oom")
    rows.close()


if __name__ == "__main__":
    main()
