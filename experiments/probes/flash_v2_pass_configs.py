"""flash_v2's passes one launch configuration at a time: which config each pass should run.

    python experiments/probes/flash_v2_pass_configs.py --passes fwd dkdv dq [--seqlens 8192 16384]
        [--headdims 64] [--causal 1] [--tokens 32768] [--heads 12] [--only-extra] [--cudnn]
        [--out pass_configs.csv]

For each pass (fwd, dkdv, dq, dkdv_atomic) and each config of its autotune list
(``flash_v2.configs(pass, head_dim=d)``) plus the candidates in ``EXTRA``, the pass is pinned to
the config (``flash_v2.pin``; the other passes keep the autotuner) and timed: the forward call,
or the backward alone (``torch.autograd.grad`` of a saved forward), so the dkdv and dq rows of
one shape differ only in the pinned pass. A config is (BLOCK_M, BLOCK_N, num_warps, num_stages
[, maxnreg]); maxnreg caps the registers per thread so that more programs share an SM.
``--only-extra`` times the default config and the extra candidates only; ``--cudnn`` adds SDPA's
cuDNN backend on the same inputs. Each result is compared with the autotuned one (max abs diff).
bf16, do_bench median; TFLOP/s of the pass (forward 4BHN^2D, halved causal; backward 2.5x).
One row per measurement (gpu, versions, git sha, date) to ``--out`` (.csv or .jsonl).
"""

import argparse

import torch
import triton

from common import Rows, attention_flops, config_dict, config_label, qkv, time_ms
from fatrain.kernels import flash_v2, get_backend

EXTRA = {
    "fwd": [(128, 64, 8, 5), (256, 64, 16, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2, 128),
            (128, 128, 8, 3, 128), (256, 64, 16, 2), (256, 128, 16, 2), (64, 64, 4, 3, 128), (64, 128, 4, 2)],
    "dkdv": [(32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 8, 5), (32, 128, 8, 3, 128), (32, 128, 8, 2, 128),
             (32, 128, 8, 4, 128), (32, 64, 4, 3, 128), (32, 64, 4, 4, 128), (16, 128, 8, 3, 128),
             (64, 128, 16, 3), (32, 128, 16, 3),
             # three 4-warp programs per SM
             (64, 64, 4, 3, 168), (64, 64, 4, 2, 168), (32, 64, 4, 3, 168), (32, 64, 4, 2, 168)],
    "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (64, 128, 8, 3), (128, 32, 4, 3, 168), (128, 32, 4, 4, 168),
           (128, 64, 8, 3, 120), (256, 32, 8, 3), (256, 64, 16, 3), (256, 64, 16, 2), (64, 64, 4, 3, 128),
           (64, 32, 4, 4, 128), (64, 64, 4, 4)],
    # deterministic=False: the dK/dV pass that also adds dQ
    "dkdv_atomic": [(64, 128, 8, 4), (32, 128, 8, 3, 128), (32, 64, 4, 3, 128), (32, 64, 4, 2), (64, 64, 4, 2),
                    (16, 128, 8, 3), (64, 128, 8, 3, 232)],
}


def candidates(pass_name: str, head_dim: int, only_extra: bool) -> list:
    listed = flash_v2.configs(pass_name, head_dim=head_dim)
    labels = {config_label(c) for c in listed}
    extra = [c for c in map(config_dict, EXTRA[pass_name]) if config_label(c) not in labels]
    return (listed[:1] if only_extra else listed) + extra + [None]


def cudnn_ms(q, k, v, do, causal):
    """SDPA's cuDNN backend on the same inputs: forward, and backward alone."""
    attn = get_backend("sdpa_cudnn")
    out = attn(q, k, v, causal=causal)
    fwd = time_ms(lambda: attn(q, k, v, causal=causal))
    bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    return fwd, bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", nargs="+", default=["fwd", "dkdv", "dq"], choices=list(EXTRA))
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64])
    parser.add_argument("--causal", type=int, nargs="+", default=[1])
    parser.add_argument("--tokens", type=int, default=32768, help="batch x seqlen (batch at least 1)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--only-extra", action="store_true")
    parser.add_argument("--cudnn", action="store_true")
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    args = parser.parse_args()
    rows = Rows(args.out)
    for d in args.headdims:
        for n in args.seqlens:
            for causal in map(bool, args.causal):
                b, h = max(1, args.tokens // n), args.heads
                q, k, v, do = qkv(b, n, h, d)
                shape = dict(batch=b, seqlen=n, heads=h, head_dim=d, causal=causal)
                if args.cudnn:
                    for mode, ms in zip(("fwd", "bwd"), cudnn_ms(q, k, v, do, causal)):
                        rows.add(impl="sdpa_cudnn", pass_name=mode, config="", **shape, ms=round(ms, 4),
                                 tflops=round(attention_flops(b, h, n, d, causal, mode) / ms * 1e-9, 1))
                for pass_name in args.passes:
                    impl = "flash_v2_atomic" if pass_name == "dkdv_atomic" else "flash_v2"
                    attn = get_backend(impl)
                    mode = "fwd" if pass_name == "fwd" else "bwd"

                    def run():
                        out = attn(q, k, v, causal=causal)
                        return out if mode == "fwd" else torch.cat(torch.autograd.grad(out, (q, k, v), do), 1)

                    reference = run().float()
                    for config in candidates(pass_name, d, args.only_extra):
                        row = dict(impl=impl, pass_name=pass_name, config=config_label(config), **shape)
                        try:
                            with flash_v2.pin(pass_name, config, head_dim=d):
                                row["max_diff_vs_autotuned"] = (run().float() - reference).abs().max().item()
                                if mode == "fwd":
                                    ms = time_ms(lambda: attn(q, k, v, causal=causal))
                                else:
                                    out = attn(q, k, v, causal=causal)
                                    ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
                            row.update(ms=round(ms, 4),
                                       tflops=round(attention_flops(b, h, n, d, causal, mode) / ms * 1e-9, 1))
                        except (triton.runtime.errors.OutOfResources, RuntimeError) as exc:
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                        rows.add(**row)
    rows.close()


if __name__ == "__main__":
    main()
