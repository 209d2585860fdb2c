"""Where a training run's peak GPU memory comes from: what is allocated at the peak, and by whom.

    python experiments/memory_peak.py --out DIR --label flash_v2 -- experiment=ablate_backends \
        attention=flash_v2 data.seq_len=8192 trainer.max_steps=4

Runs ``fatrain.train.run`` on the composed config with PyTorch's allocator history on
(``torch.cuda.memory._record_memory_history``), replays the allocation trace to the moment the
allocated bytes peak (what ``torch.cuda.max_memory_allocated`` reports), and writes
``<label>.json`` and prints: the peak, the allocation that reached it and its Python stack, and
the live blocks at that moment grouped by the innermost fatrain frame that allocated them.
Two labels side by side show what one backend holds at its peak that another does not
(issue 7's "peak memory no higher than sdpa's"). GPU only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch
from hydra import compose, initialize_config_module

import fatrain  # noqa: F401
from fatrain.train import run


def where(frames) -> str:
    """The innermost frame in fatrain's own files (else the innermost frame), as file:line name."""
    for fr in frames:
        name = fr.get("filename", "")
        if "/fatrain/" in name or "/kernels/" in name or "/experiments/" in name:
            return f"{os.path.basename(name)}:{fr.get('line')} {fr.get('name')}"
    if frames:
        fr = frames[0]
        return f"{os.path.basename(fr.get('filename', '?'))}:{fr.get('line')} {fr.get('name')}"
    return "?"


def stack(frames, depth=12):
    return [f"{os.path.basename(f.get('filename', '?'))}:{f.get('line')} {f.get('name')}" for f in frames[:depth]]


def replay(events):
    """Allocated bytes after each event; the index of the (first) maximum."""
    cur, best, best_i = 0, -1, -1
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            cur += ev["size"]
            if cur > best:
                best, best_i = cur, i
        elif ev["action"] == "free_requested":
            cur -= ev["size"]
    return best, best_i


def live_at(events, stop):
    live = {}
    for ev in events[:stop + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_requested":
            live.pop(ev["addr"], None)
    return live


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--max-entries", type=int, default=2_000_000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name="train", overrides=args.overrides)
    torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks="python")
    with tempfile.TemporaryDirectory() as run_dir:
        result = run(cfg, run_dir)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][0]
    peak, i = replay(events)
    live = live_at(events, i)
    groups = collections.defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[where(ev.get("frames", []))]
        g[0] += ev["size"]
        g[1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])
    report = {
        "label": args.label, "overrides": args.overrides,
        "max_memory_allocated": torch.cuda.max_memory_allocated(), "replayed_peak": peak,
        "events": len(events), "peak_event": i, "trace_complete": len(events) < args.max_entries,
        "peak_allocation": {"size": events[i]["size"], "stack": stack(events[i].get("frames", []), 25)},
        "live_at_peak": [{"where": w, "bytes": b, "count": n} for w, (b, n) in top],
        "result": {k: v for k, v in result.items() if isinstance(v, (int, float, str))},
    }
    with open(os.path.join(args.out, f"{args.label}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{args.label}: max_memory_allocated {report['max_memory_allocated']} B, replayed {peak} B "
          f"(event {i} of {len(events)})")
    print("  reached by:", " <- ".join(report["peak_allocation"]["stack"][:8]))
    for row in report["live_at_peak"][:25]:
        print(f"  {row['bytes']:>14,d} B  {row['count']:>5d}  {row['where']}")


if __name__ == "__main__":
    main()
