"""How stable flash_v2's autotuned pick for one pass is, against the same configs timed pinned.

    python experiments/probes/flash_v2_autotune_picks.py [--pass fwd] [--seqlens 8192 16384]
        [--tokens 32768] [--heads 12] [--headdim 64] [--repeats 3] [--rounds 3] [--out picks.csv]

For each shape: ``--repeats`` fresh processes each run the pass once, so that flash_v2 autotunes
it from scratch, and report ``flash_v2.autotune_picks()`` (the pick and its refining rounds);
then every config of the pass's list (``flash_v2.configs``) is pinned (``flash_v2.pin``) and
timed in ``--rounds`` interleaved rounds, median kept. The pick is stable when every repeat
names the pinned-fastest config. Causal bf16, GPT-2 small's training shapes by default; the
forward is timed as the attention call, a backward pass as ``torch.autograd.grad`` of a saved
forward. One row per autotune and per pinned config (gpu, versions, git sha, date) to ``--out``.
"""

import argparse
import json
import subprocess
import sys

import torch

from common import Rows, attention_flops, config_label, interleaved_ms, qkv
from fatrain.kernels import flash_v2, get_backend


def pass_call(pass_name, q, k, v, do):
    """The call that launches ``pass_name``: the forward, or the backward of a saved forward."""
    attn = get_backend("flash_v2_atomic" if pass_name == "dkdv_atomic" else "flash_v2")
    if pass_name == "fwd":
        return lambda: attn(q, k, v, causal=True)
    out = attn(q, k, v, causal=True)
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


def autotune_once(args, n):
    """Run in a child process: autotune the pass at one shape and print its picks as JSON."""
    q, k, v, do = qkv(max(1, args.tokens // n), n, args.heads, args.headdim)
    pass_call(args.name, q, k, v, do)()
    torch.cuda.synchronize()
    print(json.dumps(flash_v2.autotune_picks()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pass", dest="name", default="fwd", choices=list(flash_v2.PASSES))
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help=".csv or .jsonl")
    parser.add_argument("--autotune-once", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.autotune_once is not None:
        return autotune_once(args, args.autotune_once)
    rows = Rows(args.out)
    for n in args.seqlens:
        b, h, d = max(1, args.tokens // n), args.heads, args.headdim
        shape = dict(pass_name=args.name, batch=b, seqlen=n, heads=h, head_dim=d, causal=True)
        flops = attention_flops(b, h, n, d, True, "fwd" if args.name == "fwd" else "bwd")
        for repeat in range(args.repeats):
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--autotune-once", str(n)],
                                   capture_output=True, text=True, check=True)
            picks = json.loads(child.stdout.strip().splitlines()[-1])
            for pick in picks:
                rows.add(kind="autotune", repeat=repeat, **shape, kernel=pick["kernel"], key=str(pick["key"]),
                         config=str(pick["config"]), rounds_ms=json.dumps(pick.get("rounds_ms")))
        q, k, v, do = qkv(b, n, h, d)
        pinned = {}
        for config in flash_v2.configs(args.name, head_dim=d):
            def run(config=config, call=pass_call(args.name, q, k, v, do)):
                with flash_v2.pin(args.name, config, head_dim=d):
                    return call()
            pinned[config_label(config)] = run
        for label, ms in sorted(interleaved_ms(pinned, args.rounds).items(), key=lambda kv: kv[1]):
            rows.add(kind="pinned", **shape, config=label, ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 1))
    rows.close()


if __name__ == "__main__":
    main()
