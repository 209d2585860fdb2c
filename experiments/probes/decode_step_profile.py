"""Milliseconds per sampled token of GPT.generate with the KV cache, and where a decoding step's host time goes.

    python experiments/probes/decode_step_profile.py [--backends sdpa flash_v2] [--rope-kernels auto torch]
        [--batches 1 16] [--tokens 300] [--profile-tokens 30] [--out decode.jsonl]

A GPT-2-small-shaped model (12 layers, 12 heads of 64, byte vocabulary; random weights: the cost per
token does not depend on them) in bf16 autocast on CUDA. For each backend and ``model.rope_kernel``
choice: a warm-up of 40 tokens, then ``--tokens`` tokens timed with a device synchronisation at
both ends, per batch size. With ``--profile-tokens`` > 0 (RoPE kernel ``auto`` only), that many
tokens at batch 1 run under torch.profiler and the ops with the most host time are printed. One row
per backend, RoPE choice and batch (gpu, versions, git sha, date) to ``--out`` (.csv or .jsonl).

A cache length in a new power-of-two class of the decode kernel's tuner is tuned inside the timed
window, as in a real run's first process.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import Rows
from fatrain.model import GPT, GPTSpec


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["sdpa", "flash_v2"])
    parser.add_argument("--rope-kernels", nargs="+", default=["auto", "torch"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--profile-tokens", type=int, default=30)
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    args = parser.parse_args()
    rows = Rows(args.out)
    torch.manual_seed(0)
    for backend in args.backends:
        for rope in args.rope_kernels:
            spec = GPTSpec(vocab_size=256, attention=backend, n_layer=12, n_head=12, n_embd=768, rope_kernel=rope)
            model = GPT(spec).cuda().eval()
            for batch in args.batches:
                prompt = torch.zeros(batch, 8, dtype=torch.long, device="cuda")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    model.generate(prompt, 40, temperature=0.8, top_k=50)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    model.generate(prompt, args.tokens, temperature=0.8, top_k=50)
                    torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                rows.add(backend=backend, rope_kernel=rope, batch=batch, tokens=args.tokens,
                         ms_per_token=seconds / args.tokens * 1e3)
            if rope == "auto" and args.profile_tokens > 0:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        model.generate(torch.zeros(1, 8, dtype=torch.long, device="cuda"), args.profile_tokens,
                                       temperature=0.8, top_k=50)
                        torch.cuda.synchronize()
                print(f"=== {backend}: by self CPU time", flush=True)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                max_name_column_width=70))
            del model
            torch.cuda.empty_cache()
    rows.close()


if __name__ == "__main__":
    main()
