"""The sweep: every (impl, mode) of every case, one CSV row per measurement as it finishes.

``impl`` is any name of the attention registry, variants included (``available_backends(
variants=True)``): a variant is a backend run with fixed options. With ``rounds`` > 1 every
(impl, mode) of a case is timed that many times, round-robin after the first pass, and its
row holds the median (``ms``), ``rounds`` and ``ms_spread`` = (max - min) / median: all
backends then see the same stretch of the GPU's clock and power history (one kernel timed
alone and inside a long sweep came out 5-7% apart).

Every failure becomes a row, never a crash: status ``unavailable`` (the backend's module
cannot be imported), ``unsupported`` (the backend raised NotImplementedError, or SDPA has no
kernel for the inputs on this device), ``oom`` (memory is freed and larger seqlens of the
same series are skipped), ``error`` (anything else; the message is in ``note``). Rows reach
the CSV as they finish, so a run cut short keeps them; ``append=true`` then resumes it,
measuring only what the CSV lacks (and a sweep too long for one job can be split, e.g. by
head dim, into one CSV).

Caution / known limits: a CUDA error that corrupts the context (an illegal address)
makes every later row fail; the rows say so.
"""

from __future__ import annotations

import csv
import datetime
import importlib
import inspect
import itertools
import os
import statistics
import time
import warnings
from typing import Callable, Optional

import torch

from fatrain.bench.cases import (DTYPES, Case, make_cases, make_doc_ids, sdpa_alibi_bias_call, tflops, variant_kwargs,
                                 window_pair)
from fatrain.bench.report import COLUMNS, csv_header, format_row, read_rows
from fatrain.bench.timing import mode_fn, peak_extra_mib, time_ms
from fatrain.config import validate_bench_config
from fatrain.kernels import backend_info, get_backend
from fatrain.progress import note_interpreter, progress
from fatrain.runtime import classify, free_memory, run_info, select_device, short

# ----- backends ----------------------------------------------------------------------------------


def resolve_impl(name: str):
    """The registry function for ``name``, or the ImportError that says why there is none."""
    try:
        return get_backend(name)
    except ImportError as exc:
        return exc


def make_call(fn: Callable, q, k, v, case: Case, doc_ids, name: str = "") -> Callable:
    """fn(q, k, v) with the case's features; only those the case uses are passed, so a backend
    without them still runs plain cases. ALiBi on a PyTorch SDPA backend (which has no slopes)
    is SDPA with the bias materialised, the alternative its users have."""
    # NOTE: only the plain sdpa entry (PyTorch picks the kernel); the pinned ones have no float mask.
    if (case.variant == "alibi" and name and backend_info(name).module == "sdpa" and not backend_info(name).fixed
            and doc_ids is None and case.dropout_p == 0):
        return sdpa_alibi_bias_call(q, k, v, case)
    kwargs = {"causal": case.causal, **variant_kwargs(case, q.device)}
    if case.dropout_p > 0:
        kwargs["dropout_p"] = case.dropout_p
    if case.window >= 0:
        kwargs["window_size"] = window_pair(case.window, case.causal)
    if doc_ids is not None:
        kwargs["doc_ids"] = doc_ids
    return lambda: fn(q, k, v, **kwargs)


def modelled_hbm_gb(name: str, case: Case, mode: str, device: torch.device) -> Optional[float]:
    """The modelled HBM traffic of one call in GB (1e9 bytes), or None where there is no model.

    A model is the function ``<module>_hbm_traffic`` of ``fatrain.bench.traffic``, named after
    the backend's kernel module in the registry; it returns the forward and backward bytes.
    Its arguments are matched by name: the case's shapes, the backend's own keywords as the
    registry's function takes them (a variant's fixed options included), and for a keyword
    left at None the device's value, from the kernel module's ``device_<keyword>(device)``
    (the on-chip budget ``sram_bytes``, say). A model that does not fit leaves the column
    empty rather than stopping the sweep.
    """
    try:
        from fatrain.bench import traffic
    except ImportError:  # NOTE: the traffic models are optional; without them the column stays empty
        return None
    module = backend_info(name).module
    model = getattr(traffic, f"{module}_hbm_traffic", None)
    if model is None:
        return None
    dtype = DTYPES[case.dtype]
    values = {"batch": case.batch, "nheads": case.nheads, "seqlen_q": case.seqlen, "seqlen_k": case.seqlen,
              "head_dim": case.headdim, "causal": case.causal, "dtype_bytes": dtype.itemsize, "device": device}
    try:
        kernels = importlib.import_module(f"fatrain.kernels.{module}")
        for key, param in inspect.signature(get_backend(name)).parameters.items():
            if param.kind != param.KEYWORD_ONLY or key in values:
                continue
            if param.default is not None:
                values[key] = param.default
            elif hasattr(kernels, f"device_{key}"):
                values[key] = getattr(kernels, f"device_{key}")(device)
        params = inspect.signature(model).parameters
        result = model(**{key: values[key] for key in params if key in values})
    except Exception as exc:  # noqa: BLE001  (a model that does not fit these arguments leaves the column empty)
        warnings.warn(f"modelled_hbm_gb left empty: {model.__name__} failed with {short(exc)}", stacklevel=2)
        return None
    fwd, bwd = getattr(result, "forward", None), getattr(result, "backward", None)
    total = {"fwd": fwd, "bwd": bwd, "fwdbwd": None if fwd is None or bwd is None else fwd + bwd}[mode]
    return None if total is None else float(total) / 1e9


# ----- the sweep ---------------------------------------------------------------------------------


def run_sweep(cfg, out_dir: str, log: Callable[[str], None] = print) -> str:
    """Run every case, write one CSV row per measurement as it finishes; return the CSV's path."""
    validate_bench_config(cfg)
    device = select_device(cfg.device, "device")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{cfg.name}.csv")
    info = run_info(device)
    impls = {name: resolve_impl(name) for name in cfg.impls}
    oom_at: dict[tuple, int] = {}  # series -> smallest seqlen that ran out of memory
    new_file = not (cfg.append and os.path.exists(csv_path))
    done = set() if new_file else {row_key(r) for r in read_rows(csv_path)}
    # NOTE: appending keeps the file's own header (a CSV from before a column was added gets
    # rows without it, not rows shifted under the wrong names).
    columns = COLUMNS if new_file else csv_header(csv_path)
    with open(csv_path, "w" if new_file else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        if device.type == "cpu":
            for name in cfg.impls:
                note_interpreter(name)
        for case in progress(make_cases(cfg), desc=f"bench {cfg.name}", unit="case"):
            todo = [(name, mode) for name, mode in itertools.product(cfg.impls, cfg.modes)
                    if row_key(case_row(name, mode, case)) not in done]
            if not todo:
                continue
            doc_ids = None
            if case.doc_len:
                doc_ids = make_doc_ids(case.batch, case.seqlen, case.doc_len, torch.Generator().manual_seed(cfg.seed))
            q = k = v = None
            try:
                shape = (case.batch, case.seqlen, case.nheads, case.headdim)
                generator = torch.Generator(device).manual_seed(cfg.seed)
                q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=DTYPES[case.dtype])
                           .requires_grad_() for _ in range(3))
                doc_ids = doc_ids.to(device) if doc_ids is not None else None
            except torch.cuda.OutOfMemoryError:
                pass  # every row of this case records the OOM below
            calls: dict[str, Callable] = {}  # impl -> its call on these inputs, shared by the modes
            rows = []
            for name, mode in todo:
                start = time.perf_counter()
                row = measure(name, impls[name], mode, case, q, k, v, doc_ids, cfg, device, oom_at, calls)
                row.update(info, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                rows.append(row)
                if cfg.rounds == 1:
                    writer.writerow(row)
                    f.flush()  # a sweep cut short still leaves every finished row on disk
                    log(f"{format_row(row)} [{time.perf_counter() - start:.1f} s]")
            if cfg.rounds > 1:
                retime(rows, calls, case, q, k, v, doc_ids, cfg, device)
                for row in rows:
                    writer.writerow(row)
                    log(format_row(row))
                f.flush()
            del q, k, v, doc_ids, calls
            free_memory(device)
    return csv_path


def case_row(name: str, mode: str, case: Case) -> dict:
    return {"impl": name, "mode": mode, "causal": case.causal, "seqlen": case.seqlen, "headdim": case.headdim,
            "batch": case.batch, "nheads": case.nheads, "dtype": case.dtype, "window": case.window,
            "doc_len": case.doc_len, "dropout_p": case.dropout_p, "variant": case.variant, "status": "ok",
            "note": ""}


def row_key(row: dict) -> tuple:
    """What identifies a measurement, as the CSV spells it (so rows read back compare equal)."""
    return tuple(str(row[c]) for c in ("impl", "mode", "dtype", "headdim", "causal", "window", "doc_len",
                                       "dropout_p", "seqlen", "batch", "nheads")) + (row.get("variant") or "none",)


def measure(name: str, impl, mode: str, case: Case, q, k, v, doc_ids, cfg, device, oom_at: dict,
            calls: dict) -> dict:
    """One row: time, TFLOP/s and peak extra memory of (impl, mode, case), or the status that stopped it.

    ``calls`` keeps each impl's call on these inputs across modes, so a backend that prepares
    its inputs (a mask, a compiled graph) does so once per case rather than once per mode.
    """
    row = case_row(name, mode, case)
    row["modelled_hbm_gb"] = modelled_hbm_gb(name, case, mode, device)
    series = (name, mode, case.dtype, case.headdim, case.causal, case.window, case.doc_len, case.dropout_p,
              case.variant)
    if isinstance(impl, Exception):
        return {**row, "status": classify(impl), "note": short(impl)}
    if q is None:
        return {**row, "status": "oom", "note": "inputs did not fit"}
    if cfg.skip_after_oom and series in oom_at and case.seqlen > oom_at[series]:
        return {**row, "status": "oom", "note": f"skipped: seqlen {oom_at[series]} already ran out of memory"}
    fn = None
    try:
        if name not in calls:
            calls[name] = make_call(impl, q, k, v, case, doc_ids, name)
        fn = mode_fn(calls[name], mode, q)
        ms = time_ms(fn, device, cfg, grad_to_none=[q, k, v])
        for t in (q, k, v):
            t.grad = None
        row["peak_mem_mib"] = peak_extra_mib(fn, device)
        row.update(ms=ms, rounds=1, ms_spread=0.0, tflops=tflops(case, mode, doc_ids, ms))
    except Exception as exc:  # noqa: BLE001  (any failure is a row; the sweep goes on)
        row.update(status=classify(exc), note=short(exc))
        if row["status"] == "oom":
            oom_at[series] = min(case.seqlen, oom_at.get(series, case.seqlen))
    del fn
    for t in (q, k, v):
        t.grad = None
    if row["status"] in ("oom", "error"):
        free_memory(device)
    return row


def retime(rows: list[dict], calls: dict, case: Case, q, k, v, doc_ids, cfg, device) -> None:
    """Rounds 2..cfg.rounds of one case: every measured (impl, mode) timed again, round-robin, so
    all see the same stretch of the GPU's clock, power and thermal history; each row then holds
    the median of its rounds. (Round 1, in ``measure``, also compiled, autotuned and took the
    peak memory.) A retiming that fails keeps the rounds that ran and says so in the note."""
    times = {id(row): [row["ms"]] for row in rows if row["status"] == "ok"}
    stopped = set()
    for _ in range(cfg.rounds - 1):
        for row in rows:
            if id(row) not in times or id(row) in stopped:
                continue
            try:
                fn = mode_fn(calls[row["impl"]], row["mode"], q)
                times[id(row)].append(time_ms(fn, device, cfg, grad_to_none=[q, k, v]))
                del fn
            except Exception as exc:  # noqa: BLE001  (keep the rounds that ran)
                row["note"] = f"retiming stopped: {short(exc)}"
                stopped.add(id(row))
                free_memory(device)
            for t in (q, k, v):
                t.grad = None
    for row in rows:
        if id(row) not in times:
            continue
        ms = times[id(row)]
        median = statistics.median(ms)
        row.update(ms=median, rounds=len(ms), ms_spread=(max(ms) - min(ms)) / median)
        row["tflops"] = tflops(case, row["mode"], doc_ids, median)
