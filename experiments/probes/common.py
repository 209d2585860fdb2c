"""Shared pieces of the probes: inputs, timing, FLOP counts and result rows with run information.

Every probe writes one row per measurement (CSV or JSON lines, chosen by the ``--out`` suffix)
with the GPU, torch and triton versions, the git SHA and the date of ``fatrain.runtime.run_info``.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Callable, Optional

import torch

import fatrain  # noqa: F401  (sets up Triton before it is imported)
from fatrain.runtime import run_info


def qkv(batch: int, seqlen: int, heads: int, head_dim: int, dtype=torch.bfloat16, grad: bool = True):
    """Fresh random q, k, v in the (batch, seqlen, heads, head_dim) layout, and a dO like q."""
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype, requires_grad=grad)
               for _ in range(3))
    return q, k, v, torch.randn_like(q)


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, mode: str) -> float:
    """Forward 4*B*H*N*N*D, halved when causal; backward 2.5x the forward (recompute included),
    forward+backward 3.5x."""
    fwd = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]


def time_ms(fn: Callable[[], object], warmup: int = 100, rep: int = 300) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 100,
                   rep: int = 300) -> dict[str, float]:
    """Each callable timed once per round, round-robin, for ``rounds`` rounds; the median of its
    rounds, so that every candidate sees the same stretch of the GPU's clocks and temperature."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, warmup, rep))
    return {name: statistics.median(ts) for name, ts in times.items()}


def config_label(config: Optional[dict]) -> str:
    """(BLOCK_M, BLOCK_N, warps, stages[, maxnreg]) of a flash_v2 config dict; 'autotuned' for None."""
    if config is None:
        return "autotuned"
    fields = [config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], config["num_stages"]]
    if config.get("maxnreg"):
        fields.append(config["maxnreg"])
    return "(" + ", ".join(map(str, fields)) + ")"


def config_dict(row: tuple) -> dict:
    """A config dict from (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])."""
    return {"BLOCK_M": row[0], "BLOCK_N": row[1], "num_warps": row[2], "num_stages": row[3],
            "maxnreg": row[4] if len(row) > 4 else None}


class Rows:
    """Collects measurement rows, each with the run information, prints them as JSON lines (``echo``), and
    writes them to ``path`` (.csv or .jsonl) on ``close``."""

    def __init__(self, path: Optional[str], echo: bool = True):
        self.path, self.echo = path, echo
        self.rows: list[dict] = []
        self.info = run_info(torch.device("cuda"))

    def add(self, **row) -> dict:
        row = {**row, **{k: self.info[k] for k in ("gpu", "torch", "triton", "git_sha", "date")}}
        self.rows.append(row)
        if self.echo:
            print(json.dumps(row), flush=True)
        return row

    def close(self) -> None:
        if not self.path or not self.rows:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.path.endswith(".csv"):
            fields = list(dict.fromkeys(key for row in self.rows for key in row))
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with open(self.path, "w") as f:
                for row in self.rows:
                    f.write(json.dumps(row) + "\n")
