"""The longest seq_len each attention backend can train at a given batch size, on one device.

For each backend, in one process: build the model of the config, run ``trainer.max_steps``
full training steps (forward, backward, AdamW step) on random tokens at
``trainer.batch_size`` x seq_len, and

  1. aim (guided search, on one GPU with ``guide=true``): bisect on the memory model's
     predictions (``fatrain.memory_model``, about a second per length, no training) for the
     longest multiple of ``granularity`` in [start, limit] whose predicted peak is below
     ``GUIDE_MARGIN`` x the GPU's free memory; that length is the first try;
  2. grow: from the guess, gallop (guess + g, + 2g, + 4g, ... until a length runs out of
     memory, or guess - g, - 2g, - 4g, ... until one fits; g = granularity). Without a guess
     (the CPU, several ranks, ``guide=false``, or a length the memory model cannot trace),
     double instead: seq_len = start, 2 start, 4 start, ... until a length runs out of memory;
  3. bisect between the last length that fit and the first that did not, down to
     ``granularity`` tokens;

recording the last length that fit. A guess that is the answer costs two tries, where doubling
costs about log2(answer / start) tries to bracket the answer and log2(answer / granularity) to
bisect it, and at 200k-1M tokens a try is seconds to minutes of training (attention is O(N^2)).
Out-of-memory is caught in-process and the memory freed before the next try. Random tokens,
not the corpus: the longest lengths exceed what a small corpus can pack into even one
validation block, and memory does not depend on the token values. ``find_max_context`` writes
``max_context.json`` (every try, each backend's ``guide``: its predictions, capacity and guess;
the config, device and versions) and ``max_context.csv`` (one row per backend);
``fatrain-max-context`` is its entry point.

Several GPUs (launched with torchrun, trainer.strategy=ddp or fsdp): the model is wrapped as the
trainer wraps it, and with ``trainer.context_parallel=N`` every sequence is split over N ranks
(ring or Ulysses, trainer.cp_strategy), so the answer is the longest sequence N GPUs train
together; start and granularity must then be multiples of 2N. After each try the ranks agree on
its outcome (the worst status any rank saw, the highest peak), so every rank takes the same next
length; only rank 0 writes the files.

Caution / known limits: the guide trusts the predictions to grow with the length and to be
close; a guess that is far off costs about 2 log2(granules off) tries, still measured, so the
answer does not depend on the memory model. The ranks of one context group allocate the same shapes, so they run out
of memory at the same step. A rank that fails while its peers wait on it inside a ring exchange
leaves them waiting until the process group's timeout (``trainer.dist_timeout_s``), which then
ends the search with that error.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf, open_dict

from fatrain import distributed
from fatrain.config import validate_train_config
from fatrain.context_parallel import build_context_parallel
from fatrain.distributed import DistEnv, all_reduce
from fatrain.metrics import synchronize
from fatrain.progress import note_interpreter, progress_bar
from fatrain.runtime import (autocast_for, check_precision, classify, free_memory, run_info, seed_everything,
                             select_device, short)
from fatrain.trainer import attention_options, build_model, build_spec, make_optimizer, shard_model

# Tokens of the random batches when the model leaves the vocabulary to the tokenizer (the byte tokenizer's).
FALLBACK_VOCAB = 257
CSV_FIELDS = ("backend", "max_seq_len", "first_fail", "fail_status", "peak_allocated_gib", "predicted_peak_gib",
              "step_time_s",
              "tokens_per_sec", "tries",
              "batch_size", "world_size", "context_parallel", "cp_strategy", "precision", "activation_checkpointing",
              "activation_offload", "loss_chunk_tokens", "compile", "gpu", "torch", "triton", "git_sha", "date")
RUN_INFO_FIELDS = ("gpu", "torch", "triton", "git_sha", "date")
#: The settings of a search that a CPU finishes in seconds (the CPU takes trainer.precision=fp32 only).
CPU_CHECK = "backends=[naive,sdpa] trainer.precision=fp32 model=tiny start=32 granularity=32 limit=1024"
GIB = 2**30
#: The share of a GPU's free memory the guide aims a step's predicted peak at. The memory model
#: predicts the bytes tensors hold at the peak (``max_memory_allocated``), but what runs out is the
#: caching allocator's reserved memory: blocks rounded up and split, freed blocks too small to
#: reuse (fragmentation), plus cuBLAS and Triton workspaces it does not count. A step predicted
#: just under the free memory therefore still fails; 3% (2-4 GiB of an 80-140 GiB GPU) is kept
#: for that. It only places the first try: the gallop and bisection after it measure the answer
#: (how close the guess lands: experiments/2026-12-04-million-token-context/).
GUIDE_MARGIN = 0.97


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
    return _bisect(fits, last_fit, first_fail, granularity)


def guided_search(fits: Callable[[int], bool], guess: int, granularity: int, limit: int,
                  floor: Optional[int] = None) -> tuple[Optional[int], Optional[int]]:
    """(longest length that fits, shortest tried length that did not), galloping from ``guess``.

    Arguments:
        fits: ``fits(n)`` trains at length n.
        guess: the first length tried, rounded down to a multiple of ``granularity`` and clamped
            to [floor, the longest multiple of granularity <= limit].
        floor: the shortest length tried (default ``granularity``), a multiple of granularity.

    If the guess fits, it tries guess + g, guess + 2g, guess + 4g, ... (g = granularity, the last
    one capped at limit) until one fails; if not, guess - g, guess - 2g, guess - 4g, ... (the last
    one at least floor) until one fits; then it bisects that bracket down to g. A guess that is
    the answer costs 2 tries, one that is k granules off about 2 log2(k).

    Returns:
        The same pair as ``search_max_context``: (None, floor) when even floor does not fit;
        (the longest multiple of granularity <= limit, None) when that fits.
    """
    floor = granularity if floor is None else floor
    top = limit // granularity * granularity
    if floor <= 0 or floor % granularity or top < floor:
        raise ValueError(f"floor={floor} must be a positive multiple of granularity={granularity}, "
                         f"at most limit={limit}")
    guess = min(max(guess // granularity * granularity, floor), top)
    step = granularity
    if fits(guess):
        lo = guess
        while lo < top:
            n = min(guess + step, top)
            if not fits(n):
                return _bisect(fits, lo, n, granularity)
            lo, step = n, 2 * step
        return top, None
    hi = guess
    while hi > floor:
        n = max(guess - step, floor)
        if fits(n):
            return _bisect(fits, n, hi, granularity)
        hi, step = n, 2 * step
    return None, floor


def _bisect(fits: Callable[[int], bool], lo: int, hi: int, granularity: int) -> tuple[int, int]:
    """(lo, hi) narrowed to within ``granularity``, given that lo fits and hi does not."""
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def guess_from_predictions(predict_peak: Callable[[int], Optional[float]], capacity_gib: float, start: int,
                           granularity: int, limit: int) -> tuple[Optional[int], list[dict]]:
    """(the longest length predicted to fit, the predictions made), by bisection on predictions.

    Arguments:
        predict_peak: ``predict_peak(n)`` is a step's predicted peak memory at length n in GiB, or
            None when there is no prediction; it must grow with n.
        capacity_gib: what a step may take; a length fits when its predicted peak is below it.
        start, granularity, limit: as for ``search_max_context``.

    Returns:
        The longest multiple of granularity in [start, limit] whose predicted peak is below
        ``capacity_gib``; start when not even start is predicted to fit (the first try then settles
        it); None as soon as a prediction is missing. The predictions are one
        {seq_len, predicted_peak_gib} per length asked, in order.
    """
    made: list[dict] = []

    def predicted_fit(n: int) -> Optional[bool]:
        peak = predict_peak(n)
        made.append({"seq_len": n, "predicted_peak_gib": peak})
        return None if peak is None else peak < capacity_gib

    top = limit // granularity * granularity
    at_start = predicted_fit(start)
    if at_start is None:
        return None, made
    if not at_start or top == start:
        return start, made
    at_top = predicted_fit(top)
    if at_top is None:
        return None, made
    if at_top:
        return top, made
    lo, hi = start, top
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        fit = predicted_fit(mid)
        if fit is None:
            return None, made
        lo, hi = (mid, hi) if fit else (lo, mid)
    return lo, made


def build_try(cfg, device: torch.device, dist_env: Optional[DistEnv] = None, cp=None):
    """(model, the callable that runs it, optimizer, autocast factory, vocabulary) of one try, the
    model wrapped as the trainer wraps it (single device, DDP, or FSDP2's per-block sharding)."""
    t = cfg.trainer
    seed_everything(t.seed)  # the same seed on every rank: one context group holds one sequence
    vocab = cfg.model.vocab_size or FALLBACK_VOCAB
    with torch.device(device):  # built in place (a fake-tensor trace cannot move tied weights)
        model = build_model(cfg, build_spec(cfg, vocab))
    if cp is not None:
        cp.install(model)
    strategy = dist_env.strategy if dist_env is not None else "single"
    if strategy == "fsdp":
        forward = shard_model(model, compile_blocks=t.compile, world_size=dist_env.world_size,
                              param_dtype=torch.bfloat16 if t.precision == "bf16" else torch.float32)
    else:
        forward = torch.compile(model) if t.compile else model
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg.optim, device)
    model.train()
    return model, forward, optimizer, autocast_for(t.precision, device), vocab


def train_step(cfg, seq_len: int, device: torch.device, model, forward, optimizer, autocast, vocab: int, cp=None):
    """One optimizer step (forward, backward, AdamW) on random tokens at (trainer.batch_size, seq_len);
    returns the loss tensor (detached, not synchronised)."""
    idx = torch.randint(0, vocab, (cfg.trainer.batch_size, seq_len), device=device)
    targets = torch.randint(0, vocab, (cfg.trainer.batch_size, seq_len), device=device)
    kwargs = {}
    if cp is not None:
        shard = cp.shard_batch({"input_ids": idx, "labels": targets, "doc_ids": torch.zeros_like(idx)}, model.spec)
        idx, targets, kwargs = shard["idx"], shard["targets"], {"positions": shard["positions"]}
    with autocast():
        _, loss = forward(idx, targets, **kwargs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


#: A step at least this long is logged as it ends, so a try of minutes shows its progress.
LOG_STEP_S = 30.0


def _train_steps(cfg, seq_len: int, device: torch.device, dist_env: Optional[DistEnv] = None, cp=None,
                 log: Callable[[str], None] = lambda _: None) -> dict:
    """trainer.max_steps optimizer steps at (batch_size, seq_len): peak memory, the last step's time,
    and every step's time and loss (``step_times_s``, ``losses``; a try whose loss is not finite
    gets status "nonfinite", see try_seq_len).

    Under torchrun (``dist_env`` distributed) the model is wrapped as the trainer wraps it (DDP, or
    FSDP2's per-block sharding), and with trainer.context_parallel=N each rank holds its
    load-balanced shard of every sequence (2 of 2N chunks) and attends through its context group."""
    model, forward, optimizer, autocast, vocab = build_try(cfg, device, dist_env, cp)
    step_time = None
    times, losses = [], []
    for i in range(cfg.trainer.max_steps):
        synchronize(device)
        start = time.perf_counter()
        loss = train_step(cfg, seq_len, device, model, forward, optimizer, autocast, vocab, cp)
        synchronize(device)
        step_time = time.perf_counter() - start
        times.append(step_time)
        losses.append(float(loss))
        if step_time >= LOG_STEP_S:
            log(f"{cfg.attention.backend:>12} seq_len {seq_len:>8}: step {i + 1}/{cfg.trainer.max_steps} "
                f"in {step_time:.1f} s, loss {losses[-1]:.4f}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_allocated_gib": peak, "step_time_s": step_time, "step_times_s": times, "losses": losses}


def predict(cfg, seq_len: int, device: torch.device, dist_env: Optional[DistEnv]) -> tuple[Optional[dict], str]:
    """The memory model's prediction of a try (fatrain.memory_model), or None and why there is none."""
    if dist_env is not None and dist_env.distributed:
        return None, "the memory model covers one device"
    from fatrain.memory_model import try_predict

    return try_predict(cfg, seq_len, device)


#: A try's statuses in the order ranks agree on them: the worst any rank saw is every rank's.
STATUS_ORDER = ("ok", "oom", "unsupported", "nonfinite", "error")


def try_seq_len(cfg, seq_len: int, device: torch.device, dist_env: Optional[DistEnv] = None, cp=None,
                log: Callable[[str], None] = lambda _: None) -> dict:
    """One try: {seq_len, status (ok | oom | unsupported | nonfinite | error), peak memory, step time,
    every step's time and loss, error}. A loss that is not finite fails the try (status nonfinite):
    a length that fits in memory but trains to NaN is not one to report.

    With several ranks, every rank ends the try with the same status (the worst any rank saw), the
    highest peak and the slowest step, so that all of them take the same next length."""
    free_memory(device, reset_peak=True)
    if cfg.trainer.compile:
        torch._dynamo.reset()  # a fresh model per try; stale guards would hit the recompile limit
    attempt = {"seq_len": seq_len, "status": "ok", "peak_allocated_gib": None, "step_time_s": None, "error": ""}
    try:
        attempt.update(_train_steps(cfg, seq_len, device, dist_env, cp, log))
        bad = [i + 1 for i, x in enumerate(attempt["losses"]) if not math.isfinite(x)]
        if bad:
            attempt["status"] = "nonfinite"
            attempt["error"] = f"loss {attempt['losses'][bad[0] - 1]} at step {bad[0]}"
    except Exception as e:  # noqa: BLE001 (one backend's failure at one length must not end the search)
        # Some allocations (cuBLAS workspaces, Triton launches) report OOM as a plain RuntimeError.
        status = classify(e)
        attempt["status"] = "oom" if status == "error" and "out of memory" in str(e) else status
        attempt["error"] = short(e)
    # Freed here, after the except block: until it ends the traceback keeps the model's frames alive.
    free_memory(device, reset_peak=True)
    if dist_env is not None and dist_env.distributed:
        agreed = torch.tensor([STATUS_ORDER.index(attempt["status"]), attempt["peak_allocated_gib"] or -1.0,
                               attempt["step_time_s"] or -1.0], dtype=torch.float64, device=device)
        all_reduce(agreed, dist_env, op="max")
        attempt["status"] = STATUS_ORDER[int(agreed[0])]
        attempt["peak_allocated_gib"], attempt["step_time_s"] = (None if v < 0 else v for v in agreed[1:].tolist())
        if attempt["status"] != "ok" and not attempt["error"]:
            attempt["error"] = "another rank of the job failed this length"
    # The whole job's tokens per second at this length (the slowest rank's step; every data-parallel
    # group trains its own batch_size sequences).
    groups = (dist_env.world_size // cfg.trainer.context_parallel) if dist_env is not None else 1
    step = attempt["step_time_s"]
    attempt["tokens_per_sec"] = cfg.trainer.batch_size * seq_len * groups / step if step else None
    return attempt


def guide_capacity(device: torch.device, dist_env: Optional[DistEnv]) -> tuple[Optional[dict], str]:
    """({free_gib, margin, capacity_gib}, "") that the guide aims at, or (None, why there is none).

    The free memory is read after freeing what earlier tries left, so it is what the next try can
    allocate (the CUDA context and other processes already taken out)."""
    if device.type != "cuda":
        return None, "the CPU has no memory capacity to aim at"
    if dist_env is not None and dist_env.distributed:
        # Also what keeps the ranks together: each would read its own free memory and aim elsewhere.
        return None, "the memory model covers one device"
    free_memory(device, reset_peak=True)
    free = torch.cuda.mem_get_info(device)[0] / GIB
    return {"free_gib": free, "margin": GUIDE_MARGIN, "capacity_gib": free * GUIDE_MARGIN}, ""


def unguided(why: str) -> dict:
    """The guide record of a search that doubles from start, and why."""
    return {"search": "doubling", "why": why, "guess": None, "capacity_gib": None, "free_gib": None,
            "margin": GUIDE_MARGIN, "predictions": []}


def aim_first_try(backend: str, device: torch.device, predicted: Callable[[int], tuple[Optional[dict], str]], *,
                  start: int, granularity: int, limit: int, log: Callable[[str], None],
                  dist_env: Optional[DistEnv] = None) -> dict:
    """The guide of one backend's search: {search (guided | doubling), why (doubling), guess,
    capacity_gib, free_gib, margin, predictions}, each prediction logged."""
    capacity, why = guide_capacity(device, dist_env)
    guide = unguided(why)
    if capacity is None:
        log(f"{backend:>12}: doubling from start={start} ({why})")
        return guide
    guide.update(capacity)
    capacity_gib = capacity["capacity_gib"]

    def predict_peak(n: int) -> Optional[float]:
        prediction, why = predicted(n)
        if prediction is None:
            guide["why"] = f"no prediction at seq_len {n}: {why}"
            log(f"{backend:>12} seq_len {n:>8}: no prediction ({why})")
            return None
        peak = prediction["peak_gib"]
        verdict = "fits" if peak < capacity_gib else "does not fit"
        log(f"{backend:>12} seq_len {n:>8}: predicted {peak:.2f} GiB, {verdict} in {capacity_gib:.2f} GiB (guide)")
        return peak

    guess, guide["predictions"] = guess_from_predictions(predict_peak, capacity_gib, start, granularity, limit)
    if guess is None:
        log(f"{backend:>12}: doubling from start={start} ({guide['why']})")
        return guide
    guide.update(search="guided", why="", guess=guess)
    log(f"{backend:>12}: first try at seq_len {guess}, the longest predicted to fit in {capacity_gib:.2f} GiB "
        f"({GUIDE_MARGIN} x {capacity['free_gib']:.2f} GiB free)")
    return guide


def search_backend(cfg, backend: str, device: torch.device, *, start: int, granularity: int, limit: int,
                   guide: bool = True, log: Callable[[str], None] = print, dist_env: Optional[DistEnv] = None,
                   cp=None) -> dict:
    """One backend's search: guided by the memory model (``guide`` on one GPU), else doubling."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.attention.backend = backend
    attempts = []
    if device.type == "cpu":
        note_interpreter(backend)
    # The number of tries is not known in advance (galloping or doubling until a length fails, then bisection).
    main = dist_env is None or dist_env.is_main
    bar = progress_bar(f"max context {backend}", unit="try") if main else progress_bar("", total=0)
    # seq_len -> (prediction, why): a try at a length the guide predicted reuses its prediction.
    predictions: dict[int, tuple[Optional[dict], str]] = {}

    def predicted(n: int) -> tuple[Optional[dict], str]:
        if n not in predictions:
            bar.set_postfix_str(f"predicting seq_len {n}")
            predictions[n] = predict(cfg, n, device, dist_env)
        return predictions[n]

    def fits(n: int) -> bool:
        bar.set_postfix_str(f"seq_len {n}")
        prediction, why = predicted(n)
        attempt = try_seq_len(cfg, n, device, dist_env, cp, log)
        attempt["predicted_peak_gib"] = prediction["peak_gib"] if prediction else None
        attempt["predicted_host_gib"] = prediction["host_gib"] if prediction else None
        attempt["prediction"] = prediction or {"unavailable": why}
        attempts.append(attempt)
        bar.update()
        peak = attempt["peak_allocated_gib"]
        rate = attempt["tokens_per_sec"]
        log(f"{backend:>12} seq_len {n:>8}: {attempt['status']}"
            + (f", peak {peak:.2f} GiB" if peak is not None else "")
            + (f" (predicted {prediction['peak_gib']:.2f} GiB" + (
                f", {prediction['host_gib']:.2f} GiB in host memory" if prediction["host_gib"] else "") + ")"
               if prediction else "")
            + (f", {rate:,.0f} tokens/s" if rate and attempt["status"] == "ok" else "")
            + (f" ({attempt['error']})" if attempt["status"] not in ("ok", "oom") else ""))
        return attempt["status"] == "ok"

    with bar:
        if guide:
            aim = aim_first_try(backend, device, predicted, start=start, granularity=granularity, limit=limit,
                                log=log, dist_env=dist_env)
        else:
            aim = unguided("guide=false")
        if aim["guess"] is None:
            best, first_fail = search_max_context(fits, start, granularity, limit)
        else:
            best, first_fail = guided_search(fits, aim["guess"], granularity, limit, floor=start)
    at_best = next((a for a in attempts if a["seq_len"] == best), {})
    at_fail = next((a for a in attempts if a["seq_len"] == first_fail), {})
    return {"backend": backend, "max_seq_len": best, "first_fail": first_fail, "fail_status": at_fail.get("status"),
            "peak_allocated_gib": at_best.get("peak_allocated_gib"), "step_time_s": at_best.get("step_time_s"),
            "tokens_per_sec": at_best.get("tokens_per_sec"),
            "predicted_peak_gib": at_best.get("predicted_peak_gib"),
            "tries": len(attempts), "guide": aim, "attempts": attempts}


def find_max_context(cfg, backends: list[str], out_dir: str, *, start: int, granularity: int, limit: int,
                     guide: bool = True, log: Callable[[str], None] = print) -> dict:
    """Search every backend; write max_context.json and max_context.csv into out_dir; return the JSON.

    ``guide``: on one GPU, aim the first try at the longest length the memory model predicts fits
    (then gallop and bisect); without it, or where there is no prediction, double from start."""
    if granularity <= 0:
        raise ValueError(f"granularity={granularity} must be > 0")
    if start % granularity or start <= 0:
        raise ValueError(f"start={start} must be a positive multiple of granularity={granularity}")
    if limit < start:
        raise ValueError(f"limit={limit} must be >= start={start}")
    t = cfg.trainer
    n = t.context_parallel
    if n > 1 and (start % (2 * n) or granularity % (2 * n)):
        raise ValueError(f"start={start} and granularity={granularity} must be multiples of 2 x "
                         f"trainer.context_parallel = {2 * n} (each rank holds two of 2N equal chunks)")
    device = select_device(t.device) if t.strategy == "single" else None
    for backend in backends:
        with open_dict(cfg):
            cfg.attention.backend = backend
            cfg.data.seq_len = start  # the length the config checks see (context parallelism's 2N rule)
        validate_train_config(cfg)
        attention_options(cfg.attention)
    if t.strategy == "single":
        return _find(cfg, backends, out_dir, device, None, start=start, granularity=granularity, limit=limit,
                     guide=guide, log=log)
    dist_env = distributed.init_distributed(t)
    with distributed.process_group(dist_env):
        return _find(cfg, backends, out_dir, dist_env.device, dist_env, start=start, granularity=granularity,
                     limit=limit, guide=guide, log=log if dist_env.is_main else (lambda _: None))


def _find(cfg, backends: list[str], out_dir: str, device: torch.device, dist_env: Optional[DistEnv], *, start: int,
          granularity: int, limit: int, guide: bool, log: Callable[[str], None]) -> dict:
    main = dist_env is None or dist_env.is_main
    if device.type == "cpu" and cfg.trainer.precision != "fp32":
        # Refused before any backend's own precision check, so the line says what to run instead. On
        # the CPU nothing runs out of memory the way a GPU does (the search would swap, then be killed),
        # and bf16 matmuls there are slow emulations: the CPU search is a functional check.
        raise ValueError(f"trainer.precision={cfg.trainer.precision} with model {cfg.model.name} is not searched on "
                         f"the CPU: for a functional check there use {CPU_CHECK}, or run on a GPU")
    for backend in backends:
        check_precision(cfg.trainer.precision, device, backend)
    # One (data x context) mesh for the whole search: its groups are made once, not per try.
    cp = build_context_parallel(cfg, dist_env) if dist_env is not None else None
    if main:
        os.makedirs(out_dir, exist_ok=True)
    info = run_info(device)
    t = cfg.trainer
    ranks = dist_env.world_size if dist_env is not None else 1
    layout = (f", {ranks} ranks ({t.strategy}), context_parallel={t.context_parallel} ({t.cp_strategy})"
              if dist_env is not None else "")
    log(f"max context at batch {t.batch_size}, {t.max_steps} steps per try, {t.precision}, "
        f"model {cfg.model.name}, activation_checkpointing={t.activation_checkpointing}"
        + (", activation_offload=true" if t.activation_offload else "")
        + (f", loss_chunk_tokens={cfg.model.loss_chunk_tokens}" if cfg.model.loss_chunk_tokens else "")
        + f", device {info['gpu']}{layout}")
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "trainer", "optim")}
    out = {"results": [], "search": {"start": start, "granularity": granularity, "limit": limit, "guide": guide},
           "world_size": ranks, "context_parallel": t.context_parallel, "cp_strategy": t.cp_strategy,
           "config": config, **info}
    for backend in backends:
        with open_dict(cfg):
            cfg.attention.backend = backend
        out["results"].append(search_backend(cfg, backend, device, start=start, granularity=granularity,
                                             limit=limit, guide=guide, log=log, dist_env=dist_env, cp=cp))
        log(f"{backend:>12}: max seq_len {out['results'][-1]['max_seq_len']}")
        if main:
            write_results(out, out_dir)  # after every backend, so a run cut short keeps what it found
    return out


def plan_max_context(cfg, backends: list[str], *, start: int, limit: int, granularity: Optional[int] = None,
                     capacity_gib: Optional[float] = None, log: Callable[[str], None] = print) -> list[dict]:
    """The memory model's prediction for each backend at start, 2 start, ... up to limit, on the
    device the config selects; nothing is trained. Returns one row per (backend, seq_len).

    With a capacity (on a GPU, ``GUIDE_MARGIN`` x its total memory, the total rather than the free
    memory so that other processes on the GPU do not move the plan; or ``capacity_gib``) and a
    ``granularity``, each backend also gets the longest multiple of granularity in [start, limit]
    predicted to fit (``guess_from_predictions``, the guided search's first try), one more row
    {backend, longest_predicted, capacity_gib}."""
    t = cfg.trainer
    if t.strategy != "single" or t.context_parallel > 1:
        raise ValueError("plan=true predicts one device's step: it needs trainer.strategy=single and "
                         "trainer.context_parallel=1")
    if start <= 0 or limit < start:
        raise ValueError(f"start={start} must be > 0 and limit={limit} >= start")
    device = select_device(t.device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    log(f"predicted peak memory of one step at batch {t.batch_size}, {t.precision}, model {cfg.model.name}, "
        f"activation_checkpointing={t.activation_checkpointing}, activation_offload={t.activation_offload}, "
        f"loss_chunk_tokens={cfg.model.loss_chunk_tokens}, on {run_info(device)['gpu']}"
        + (f" ({total:.1f} GiB)" if total else ""))
    if capacity_gib is None and total is not None:
        capacity_gib = GUIDE_MARGIN * total
    rows = []
    for backend in backends:
        with open_dict(cfg):
            cfg.attention.backend = backend
            cfg.data.seq_len = start
        validate_train_config(cfg)
        attention_options(cfg.attention)
        cache: dict[int, tuple[Optional[dict], str]] = {}

        def predicted(n: int) -> tuple[Optional[dict], str]:
            if n not in cache:
                cache[n] = predict(cfg, n, device, None)
            return cache[n]

        n = start
        while n <= limit:
            prediction, why = predicted(n)
            rows.append({"backend": backend, "seq_len": n, "prediction": prediction, "unavailable": why})
            if prediction is None:
                log(f"{backend:>12} seq_len {n:>8}: no prediction ({why})")
            else:
                kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(prediction["by_kind"].items(), key=lambda kv: -kv[1]))
                host = f", {prediction['host_gib']:.2f} GiB in host memory" if prediction["host_gib"] else ""
                verdict = "" if total is None else (" fits" if prediction["peak_gib"] < total else " does not fit")
                log(f"{backend:>12} seq_len {n:>8}: {prediction['peak_gib']:.2f} GiB{verdict} ({kinds}){host}")
            n *= 2
        if granularity and capacity_gib is not None and start % granularity == 0:
            longest, _ = guess_from_predictions(lambda m: (predicted(m)[0] or {}).get("peak_gib"), capacity_gib,
                                                start, granularity, limit)
            rows.append({"backend": backend, "longest_predicted": longest, "capacity_gib": capacity_gib})
            if longest is None:
                log(f"{backend:>12}: no longest length predicted (a length without a prediction)")
            else:
                at = predicted(longest)[0]["peak_gib"]
                fits = at < capacity_gib
                log(f"{backend:>12}: longest predicted to fit in {capacity_gib:.2f} GiB"
                    + (f" ({GUIDE_MARGIN} x {total:.1f} GiB)" if total else "")
                    + (f": {longest} tokens ({at:.2f} GiB)" if fits
                       else f": none from {start} ({longest} tokens predicted at {at:.2f} GiB)")
                    + (" (the limit)" if fits and longest == limit // granularity * granularity else ""))
    return rows


def write_results(out: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "max_context.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    t = out["config"]["trainer"]
    with open(os.path.join(out_dir, "max_context.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in out["results"]:
            row = {**r, "batch_size": t["batch_size"], "precision": t["precision"], "world_size": out.get("world_size", 1),
                   "context_parallel": t.get("context_parallel", 1), "cp_strategy": t.get("cp_strategy"),
                   "activation_checkpointing": t["activation_checkpointing"],
                   "activation_offload": t.get("activation_offload", False),
                   "loss_chunk_tokens": out["config"]["model"].get("loss_chunk_tokens", 0), "compile": t["compile"],
                   **{k: out.get(k) for k in RUN_INFO_FIELDS}}
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})
