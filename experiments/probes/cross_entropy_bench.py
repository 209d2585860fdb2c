"""Time the Triton cross-entropy against the model's PyTorch loss at GPT-2 small's output (GPU).

    python experiments/probes/cross_entropy_bench.py [--tokens 32768] [--vocab 50304] [--out ce.jsonl]

Forward, and forward+backward, of the mean loss over bf16 logits (tokens x vocab):
``fatrain.kernels.cross_entropy.cross_entropy`` against ``F.cross_entropy(logits.float(), ...)``
(what ``model.loss_kernel=torch`` runs), with the peak memory each adds on top of the logits.
One row per implementation (gpu, versions, git sha, date) to ``--out`` (.csv or .jsonl).
"""

import argparse

import torch
import torch.nn.functional as F

from common import Rows, time_ms
from fatrain.kernels.cross_entropy import cross_entropy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    args = parser.parse_args()
    rows = Rows(args.out)
    logits = torch.randn(args.tokens, args.vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    impls = {"triton": lambda: cross_entropy(logits, targets),
             "torch": lambda: F.cross_entropy(logits.float(), targets)}
    for name, fn in impls.items():
        fwd = time_ms(fn, warmup=20, rep=100)
        both = time_ms(lambda: torch.autograd.grad(fn(), logits), warmup=20, rep=100)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.autograd.grad(fn(), logits)
        extra = torch.cuda.max_memory_allocated() - base
        rows.add(impl=name, tokens=args.tokens, vocab=args.vocab, fwd_ms=round(fwd, 3), fwdbwd_ms=round(both, 3),
                 extra_peak_gib=round(extra / 2**30, 3))
    rows.close()


if __name__ == "__main__":
    main()
