"""The longest seq_len each attention backend can train at a given batch size, on one device.

For each backend, in one process: build the model of the config, run ``trainer.max_steps``
full training steps (forward, backward, AdamW step) on random tokens at
``trainer.batch_size`` x seq_len, and

  1. grow: seq_len = start, 2 start, 4 start, ... until a length runs out of memory;
  2. bisect between the last length that fit and the first that did not, down to
     ``granularity`` tokens;

recording the last length that fit. Out-of-memory is caught in-process and the memory
freed before the next try. Random tokens, not the corpus: the longest lengths exceed what
a small corpus can pack into even one validation block, and memory does not depend on the
token values. ``find_max_context`` writes ``max_context.json`` (every try, the config,
device and versions) and ``max_context.csv`` (one row per backend); ``fatrain-max-context``
is its entry point.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import time
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf, open_dict

from fatrain.config import validate_train_config
from fatrain.metrics import synchronize
from fatrain.model import GPT
from fatrain.progress import note_interpreter, progress_bar
from fatrain.runtime import (autocast_for, check_precision, classify, free_memory, run_info, seed_everything,
                             select_device, short)
from fatrain.trainer import attention_options, build_spec, make_optimizer

# Tokens of the random batches when the model leaves the vocabulary to the tokenizer (the byte tokenizer's).
FALLBACK_VOCAB = 257
CSV_FIELDS = ("backend", "max_seq_len", "first_fail", "fail_status", "peak_allocated_gib", "step_time_s", "tries",
              "batch_size", "precision", "activation_checkpointing", "compile", "gpu", "torch", "triton", "git_sha", "date")
RUN_INFO_FIELDS = ("gpu", "torch", "triton", "git_sha", "date")
#: The settings of a search that a CPU finishes in seconds (the CPU takes trainer.precision=fp32 only).
CPU_CHECK = "backends=[naive,sdpa] trainer.precision=fp32 model=tiny start=32 granularity=32 limit=1024"


def search_max_context(fits: Callable[[int], bool], start: int, granularity: int,
                       limit: int) -> tuple[Optional[int], Optional[int]]:
    """(longest length that fits, shortest tried length that did not), by doubling then bisection.

    ``fits(n)`` trains at length n. Lengths tried are multiples of ``granularity`` (``start``
    should be one); the answer is exact to within ``granularity``. (None, start) when even
    ``start`` does not fit; (last, None) when every length up to ``limit`` fits.
    """
    last_fit, first_fail = None, None
    n = start
    while n <= limit:
        if not fits(n):
            first_fail = n
            break
        last_fit = n
        n *= 2
    if last_fit is None or first_fail is None:
        return last_fit, first_fail
    lo, hi = last_fit, first_fail
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _train_steps(cfg, seq_len: int, device: torch.device) -> dict:
    """trainer.max_steps optimizer steps at (batch_size, seq_len); peak memory and the last step's time."""
    t = cfg.trainer
    seed_everything(t.seed)
    vocab = cfg.model.vocab_size or FALLBACK_VOCAB
    model = GPT(build_spec(cfg, vocab)).to(device)
    optimizer = make_optimizer(model, cfg.optim, device)
    forward = torch.compile(model) if t.compile else model
    autocast = autocast_for(t.precision, device)
    model.train()
    step_time = None
    for _ in range(t.max_steps):
        idx = torch.randint(0, vocab, (t.batch_size, seq_len), device=device)
        targets = torch.randint(0, vocab, (t.batch_size, seq_len), device=device)
        synchronize(device)
        start = time.perf_counter()
        with autocast():
            _, loss = forward(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step_time = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_allocated_gib": peak, "step_time_s": step_time}


def try_seq_len(cfg, seq_len: int, device: torch.device) -> dict:
    """One try: {seq_len, status (ok | oom | unsupported | error), peak memory, step time, error}."""
    free_memory(device, reset_peak=True)
    if cfg.trainer.compile:
        torch._dynamo.reset()  # a fresh model per try; stale guards would hit the recompile limit
    attempt = {"seq_len": seq_len, "status": "ok", "peak_allocated_gib": None, "step_time_s": None, "error": ""}
    try:
        attempt.update(_train_steps(cfg, seq_len, device))
    except Exception as e:  # noqa: BLE001 (one backend's failure at one length must not end the search)
        # Some allocations (cuBLAS workspaces, Triton launches) report OOM as a plain RuntimeError.
        status = classify(e)
        attempt["status"] = "oom" if status == "error" and "out of memory" in str(e) else status
        attempt["error"] = short(e)
    # Freed here, after the except block: until it ends the traceback keeps the model's frames alive.
    free_memory(device, reset_peak=True)
    return attempt


def search_backend(cfg, backend: str, device: torch.device, *, start: int, granularity: int, limit: int,
                   log: Callable[[str], None] = print) -> dict:
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.attention.backend = backend
    attempts = []
    if device.type == "cpu":
        note_interpreter(backend)
    # The number of tries is not known in advance (doubling until a length fails, then bisection).
    bar = progress_bar(f"max context {backend}", unit="try")

    def fits(n: int) -> bool:
        bar.set_postfix_str(f"seq_len {n}")
        attempt = try_seq_len(cfg, n, device)
        attempts.append(attempt)
        bar.update()
        peak = attempt["peak_allocated_gib"]
        log(f"{backend:>12} seq_len {n:>8}: {attempt['status']}"
            + (f", peak {peak:.2f} GiB" if peak is not None else "")
            + (f" ({attempt['error']})" if attempt["status"] not in ("ok", "oom") else ""))
        return attempt["status"] == "ok"

    with bar:
        best, first_fail = search_max_context(fits, start, granularity, limit)
    at_best = next((a for a in attempts if a["seq_len"] == best), {})
    at_fail = next((a for a in attempts if a["seq_len"] == first_fail), {})
    return {"backend": backend, "max_seq_len": best, "first_fail": first_fail, "fail_status": at_fail.get("status"),
            "peak_allocated_gib": at_best.get("peak_allocated_gib"), "step_time_s": at_best.get("step_time_s"),
            "tries": len(attempts), "attempts": attempts}


def find_max_context(cfg, backends: list[str], out_dir: str, *, start: int, granularity: int, limit: int,
                     log: Callable[[str], None] = print) -> dict:
    """Search every backend; write max_context.json and max_context.csv into out_dir; return the JSON."""
    if granularity <= 0:
        raise ValueError(f"granularity={granularity} must be > 0")
    if start % granularity or start <= 0:
        raise ValueError(f"start={start} must be a positive multiple of granularity={granularity}")
    if limit < start:
        raise ValueError(f"limit={limit} must be >= start={start}")
    device = select_device(cfg.trainer.device)
    for backend in backends:
        with open_dict(cfg):
            cfg.attention.backend = backend
        validate_train_config(cfg)
        attention_options(cfg.attention)
    if device.type == "cpu" and cfg.trainer.precision != "fp32":
        # Refused before any backend's own precision check, so the line says what to run instead. On
        # the CPU nothing runs out of memory the way a GPU does (the search would swap, then be killed),
        # and bf16 matmuls there are slow emulations: the CPU search is a functional check.
        raise ValueError(f"trainer.precision={cfg.trainer.precision} with model {cfg.model.name} is not searched on "
                         f"the CPU: for a functional check there use {CPU_CHECK}, or run on a GPU")
    for backend in backends:
        check_precision(cfg.trainer.precision, device, backend)
    os.makedirs(out_dir, exist_ok=True)
    info = run_info(device)
    t = cfg.trainer
    log(f"max context at batch {t.batch_size}, {t.max_steps} steps per try, {t.precision}, "
        f"model {cfg.model.name}, activation_checkpointing={t.activation_checkpointing}, device {info['gpu']}")
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "trainer", "optim")}
    out = {"results": [], "search": {"start": start, "granularity": granularity, "limit": limit},
           "config": config, **info}
    for backend in backends:
        out["results"].append(search_backend(cfg, backend, device, start=start, granularity=granularity,
                                             limit=limit, log=log))
        log(f"{backend:>12}: max seq_len {out['results'][-1]['max_seq_len']}")
        write_results(out, out_dir)  # after every backend, so a run cut short keeps what it found
    return out


def write_results(out: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "max_context.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    t = out["config"]["trainer"]
    with open(os.path.join(out_dir, "max_context.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in out["results"]:
            row = {**r, "batch_size": t["batch_size"], "precision": t["precision"],
                   "activation_checkpointing": t["activation_checkpointing"], "compile": t["compile"],
                   **{k: out.get(k) for k in RUN_INFO_FIELDS}}
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})
