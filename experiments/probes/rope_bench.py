"""Time the fused RoPE kernel against the model's PyTorch ops at GPT-2 small's shapes (GPU).

    python experiments/probes/rope_bench.py [--tokens 32768] [--heads 12] [--head-dim 64] [--out rope.jsonl]

Forward, and forward+backward, of splitting the QKV projection into Q, K, V and rotating Q and K:
``fatrain.kernels.rope.rope_qkv`` (one launch each way) against the split + ``apply_rope`` path
(what ``model.rope_kernel=torch`` runs), at seq_len 1024 and 8192. One row per case (gpu,
versions, git sha, date) to ``--out`` (.csv or .jsonl): milliseconds (median of do_bench) and the
bandwidth of the fused kernel's minimal traffic (read qkv once, write q, k, v once; the same
backward).
"""

import argparse

import torch

from common import Rows, time_ms
from fatrain.kernels.rope import rope_qkv
from fatrain.model import apply_rope, rope_tables


def torch_path(qkv, cos, sin, H, D):
    B, T, _ = qkv.shape
    q, k, v = qkv.split((H * D, H * D, H * D), dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, H, D), v.view(B, T, H, D)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    args = parser.parse_args()
    rows = Rows(args.out)
    H, D = args.heads, args.head_dim
    for T in (1024, 8192):
        B = args.tokens // T
        qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cos, sin = rope_tables(torch.arange(T, device="cuda"), D, 10000.0)
        grads = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        fused = lambda: rope_qkv(qkv, cos.squeeze(-2), sin.squeeze(-2), H, H)  # noqa: E731
        plain = lambda: torch_path(qkv, cos, sin, H, D)  # noqa: E731
        traffic = 2 * qkv.numel() * qkv.element_size()  # read once, write once
        for name, fn in (("fused", fused), ("torch", plain)):
            fwd = time_ms(fn, warmup=50, rep=200)
            both = time_ms(lambda: torch.autograd.grad(fn(), qkv, grads), warmup=50, rep=200)
            rows.add(impl=name, batch=B, seqlen=T, heads=H, head_dim=D, fwd_ms=round(fwd, 4),
                     fwdbwd_ms=round(both, 4), fwd_GBps_of_min_traffic=round(traffic / fwd * 1e-6, 1),
                     fwdbwd_GBps_of_min_traffic=round(2 * traffic / both * 1e-6, 1))
    rows.close()


if __name__ == "__main__":
    main()
