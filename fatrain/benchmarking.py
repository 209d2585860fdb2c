"""The attention kernel benchmark behind ``fatrain-bench``: one timed row per measurement.

A sweep is the product impl x dtype x head dim x causal x window x documents x dropout x
seqlen x mode. Each case builds q, k, v as (batch, seqlen, nheads, headdim) with
batch = tokens_per_batch // seqlen (at least 1) and nheads = hidden // headdim, as in the
FlashAttention papers (16k tokens, hidden 2048). ``impl`` is a registry name
(``fatrain.kernels.get_backend``) or ``flex``: PyTorch's FlexAttention compiled with
``torch.compile``, with its block mask built outside the timed call.

Modes (training-style: inputs require grad, so the forward saves what its backward needs):
    fwd     out = attention(q, k, v)
    bwd     out.backward(dout) on a graph built once before timing
    fwdbwd  attention(q, k, v).backward(dout)

Timing is the median of ``triton.testing.do_bench`` on CUDA (which flushes L2 between
calls) and a wall-clock median of ``cpu_reps`` calls on the CPU (for tests only: the
Triton kernels run in the interpreter there). Peak extra memory is
max_memory_allocated during one call minus memory_allocated before it, measured after
timing so that compilation and autotuning are not counted. With ``rounds`` > 1 every
(impl, mode) of a case is timed that many times, round-robin after the first pass, and
its row holds the median (``ms``), ``rounds`` and ``ms_spread`` = (max - min) / median:
all backends then see the same stretch of the GPU's clock and power history (session 5
saw one kernel time 5-7% apart alone and inside a long sweep, experiments/README.md).

FLOPs, as in STYLE.md: forward 4 * B * H * Nq * Nk * D, halved when causal; backward 2.5x
forward (the recompute of S and P); forward+backward 3.5x. With a window or documents the
count is of the (query, key) pairs actually attended, so TFLOP/s stays a measure of
useful work; compare such rows by ``ms``.

Every failure becomes a row, never a crash: status ``unavailable`` (import failed: the
backend does not exist yet, or flex is missing), ``unsupported`` (the backend raised
NotImplementedError, or SDPA has no kernel for the inputs on this device), ``oom``
(memory is freed and larger seqlens of the same series are skipped), ``error`` (anything else; the
message is in ``note``). Rows reach the CSV as they finish, so a run cut short keeps them;
``append=true`` then resumes it, measuring only what the CSV lacks (and a sweep too long for
one job can be split, e.g. by head dim, into one CSV).

Caution / known limits: a CUDA error that corrupts the context (an illegal address)
makes every later row fail; the rows say so. The window is symmetric, (w, w), without
causal and (w, 0) with it. Documents have lengths drawn uniformly from
[doc_len / 2, 3 doc_len / 2] with a fixed seed, the last one cut at seqlen.
"""

from __future__ import annotations

import csv
import datetime
import functools
import gc
import inspect
import itertools
import os
import platform
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

MODES = ("fwd", "bwd", "fwdbwd")
#: FLOPs of a mode relative to the forward: the backward recomputes S and P (2.5x).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Bench-only names: FlexAttention; flash_v2 with its dQ added by atomics (deterministic=False);
#: flash_v1 on the paper's grid, one program per (batch, head) (num_splits=1).
EXTRA_IMPLS = ("flex", "flash_v2_atomic", "flash_v1_bh")
COLUMNS = ["impl", "mode", "causal", "seqlen", "headdim", "batch", "nheads", "dtype", "tflops", "ms",
           "peak_mem_mib", "status", "window", "doc_len", "dropout_p", "modelled_hbm_gb", "rounds", "ms_spread",
           "gpu", "torch", "triton", "git_sha", "date", "note"]


@dataclass
class BenchConfig:
    impls: list[str] = field(
        default_factory=lambda: ["naive", "flash_v1", "flash_v2", "sdpa_flash", "sdpa_cudnn", "flex"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seqlens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    headdims: list[int] = field(default_factory=lambda: [64, 128])
    dtypes: list[str] = field(default_factory=lambda: ["bf16"])
    tokens_per_batch: int = 16384  # batch = max(1, tokens_per_batch // seqlen)
    hidden: int = 2048  # nheads = hidden // headdim
    windows: list[int] = field(default_factory=lambda: [-1])  # left window; -1: unlimited
    doc_lens: list[int] = field(default_factory=lambda: [0])  # mean document length; 0: one document
    dropout_ps: list[float] = field(default_factory=lambda: [0.0])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    warmup_ms: int = 25  # do_bench on CUDA
    rep_ms: int = 100
    # Timings per measurement, taken round-robin over every (impl, mode) of a case; the row gets
    # their median (``ms``), their number (``rounds``) and (max - min) / median (``ms_spread``).
    # With 1 each measurement is one do_bench right after its own compilation/autotuning.
    rounds: int = 1
    cpu_reps: int = 3  # wall-clock repetitions on the CPU
    seed: int = 0
    skip_after_oom: bool = True  # an OOM at seqlen N marks larger N of the same series as oom
    out_dir: Optional[str] = None  # None: the Hydra run directory
    name: str = "attention_bench"  # file stem of the CSV and the plots
    append: bool = False  # add rows to an existing CSV, skipping measurements it already holds (resume)
    plot: bool = True


@dataclass(frozen=True)
class Case:
    dtype: str
    headdim: int
    causal: bool
    window: int
    doc_len: int
    dropout_p: float
    seqlen: int
    batch: int
    nheads: int


def register_bench_config() -> None:
    """Register the schema as ``bench_schema`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def valid_impls() -> list[str]:
    from fatrain.kernels import available_backends

    return available_backends() + list(EXTRA_IMPLS)


def validate_bench_config(cfg) -> None:
    """Check the values a type cannot; raise ValueError naming the key and what is allowed."""
    checks = [("impls", cfg.impls, valid_impls()), ("modes", cfg.modes, MODES), ("dtypes", cfg.dtypes, DTYPES)]
    for key, values, allowed in checks:
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"{key}={list(values)} has {bad or 'nothing'}: choose from {', '.join(allowed)}")
    for key in ("seqlens", "headdims", "causal", "windows", "doc_lens", "dropout_ps"):
        if not getattr(cfg, key):
            raise ValueError(f"{key} must list at least one value")
    if min(cfg.seqlens) <= 0 or min(cfg.headdims) <= 0:
        raise ValueError(f"seqlens={list(cfg.seqlens)} and headdims={list(cfg.headdims)} must be > 0")
    for d in cfg.headdims:
        if cfg.hidden % d:
            raise ValueError(f"hidden={cfg.hidden} must be divisible by every head dim, got {d}")
    if cfg.tokens_per_batch <= 0:
        raise ValueError(f"tokens_per_batch={cfg.tokens_per_batch} must be > 0")
    if min(cfg.windows) < -1 or min(cfg.doc_lens) < 0:
        raise ValueError(f"windows must be >= -1 and doc_lens >= 0, got {list(cfg.windows)}, {list(cfg.doc_lens)}")
    if not all(0.0 <= p < 1.0 for p in cfg.dropout_ps):
        raise ValueError(f"dropout_ps={list(cfg.dropout_ps)} must be in [0, 1)")
    if isinstance(cfg.rounds, bool) or not isinstance(cfg.rounds, int) or cfg.rounds < 1:
        raise ValueError(f"rounds={cfg.rounds!r} must be an integer >= 1")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ValueError(f"device={cfg.device!r} is not allowed (choose from: auto, cpu, cuda, cuda:N)")


# --- FLOPs --------------------------------------------------------------------------------

def attention_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, *, causal: bool,
                    mode: str = "fwd") -> float:
    """FLOPs of one call: forward 4 B H Nq Nk D (halved when causal), backward 2.5x, both 3.5x."""
    fwd = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    if causal:
        fwd /= 2
    return fwd * MODE_FLOP_FACTOR[mode]


def attended_pairs(seqlen: int, *, causal: bool, window: int, doc_ids: Optional[torch.Tensor]) -> float:
    """Number of (query, key) pairs a square (seqlen_q == seqlen_k) mask keeps, summed over the batch."""
    i = torch.arange(seqlen, dtype=torch.int64)
    lo = torch.zeros(seqlen, dtype=torch.int64)
    hi = i.clone() if causal else torch.full((seqlen,), seqlen - 1, dtype=torch.int64)
    if window >= 0:
        lo = torch.clamp(i - window, min=0)
        hi = torch.minimum(hi, i + window)
    if doc_ids is None:
        return float((hi - lo + 1).sum())
    ids = doc_ids.cpu().to(torch.int64)
    starts = torch.searchsorted(ids, ids, right=False)  # first index of each token's document
    ends = torch.searchsorted(ids, ids, right=True) - 1
    counts = torch.minimum(hi, ends) - torch.maximum(lo, starts) + 1
    return float(counts.clamp(min=0).sum())


def case_flops(case: Case, mode: str, doc_ids: Optional[torch.Tensor]) -> float:
    if case.window < 0 and doc_ids is None:
        return attention_flops(case.batch, case.nheads, case.seqlen, case.seqlen, case.headdim,
                               causal=case.causal, mode=mode)
    pairs = attended_pairs(case.seqlen, causal=case.causal, window=case.window, doc_ids=doc_ids)
    if doc_ids is None:
        pairs *= case.batch
    return 4.0 * case.nheads * pairs * case.headdim * MODE_FLOP_FACTOR[mode]


def tflops(case: Case, mode: str, doc_ids: Optional[torch.Tensor], ms: float) -> float:
    """TFLOP/s of one (case, mode) call that took ``ms`` milliseconds."""
    return case_flops(case, mode, doc_ids) / (ms * 1e-3) / 1e12


# --- cases and inputs --------------------------------------------------------------------

def make_cases(cfg) -> list[Case]:
    """Every case of the sweep, seqlen ascending within a series (so an OOM can skip the rest)."""
    cases = []
    for dtype, d, causal, window, doc_len, p, n in itertools.product(
            cfg.dtypes, cfg.headdims, cfg.causal, cfg.windows, cfg.doc_lens, cfg.dropout_ps, sorted(cfg.seqlens)):
        cases.append(Case(dtype, d, bool(causal), int(window), int(doc_len), float(p), n,
                          max(1, cfg.tokens_per_batch // n), cfg.hidden // d))
    return cases


def make_doc_ids(batch: int, seqlen: int, mean_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seqlen) document ids, lengths uniform in [mean_len / 2, 3 mean_len / 2]."""
    rows = []
    lo, hi = max(1, mean_len // 2), max(1, (3 * mean_len) // 2)
    for _ in range(batch):
        lengths, total = [], 0
        while total < seqlen:
            lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)))
            total += lengths[-1]
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seqlen]
        rows.append(ids)
    return torch.stack(rows).to(torch.int32)


def window_pair(window: int, causal: bool) -> tuple[int, int]:
    return (-1, -1) if window < 0 else (window, 0 if causal else window)


# --- backends ----------------------------------------------------------------------------

def _registry_call(fn: Callable, q, k, v, case: Case, doc_ids) -> Callable:
    # Only features the case uses are passed, so a backend without them still runs plain cases.
    kwargs = {"causal": case.causal}
    if case.dropout_p > 0:
        kwargs["dropout_p"] = case.dropout_p
    if case.window >= 0:
        kwargs["window_size"] = window_pair(case.window, case.causal)
    if doc_ids is not None:
        kwargs["doc_ids"] = doc_ids
    return lambda: fn(q, k, v, **kwargs)


_FLEX_COMPILED = None


def _compiled_flex():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # NOTE: every (shape, mask) of the sweep is a new graph; the default recompile limit (8)
        # would silently fall back to eager FlexAttention, which materialises S.
        config = torch._dynamo.config
        for names in (("recompile_limit", "cache_size_limit"),  # the newer name first (torch >= 2.7)
                      ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
            name = next((n for n in names if hasattr(config, n)), None)
            if name is not None:
                setattr(config, name, max(getattr(config, name), 4096))
        # NOTE: the bwd mode calls backward(retain_graph=True) repeatedly on one graph, which
        # AOTAutograd refuses for a backward compiled with donated buffers (a memory-reuse
        # optimisation; the kernels are the same without it).
        import torch._functorch.config

        torch._functorch.config.donated_buffer = False
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def _flex_call(q, k, v, case: Case, doc_ids) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask

    from fatrain.kernels._common import unsupported

    if case.dropout_p > 0:
        raise unsupported("flex", "dropout_p > 0", "FlexAttention has no attention dropout")
    left, right = window_pair(case.window, case.causal)
    causal, ids = case.causal, (doc_ids.to(torch.int64) if doc_ids is not None else None)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= 0  # all true, with the shape and type the other terms need
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if left >= 0:
            keep = keep & (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right)
        if ids is not None:
            keep = keep & (ids[b, q_idx] == ids[b, kv_idx])
        return keep

    block_mask = None
    if causal or left >= 0 or ids is not None:
        block_mask = create_block_mask(mask_mod, case.batch if ids is not None else None, None, case.seqlen,
                                       case.seqlen, device=q.device)
    flex = _compiled_flex()
    return lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        block_mask=block_mask).transpose(1, 2)


def resolve_impl(name: str):
    """The registry function for ``name``, ``'flex'``, or the exception that says why not."""
    if name == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as exc:
            return exc
        return "flex"
    from fatrain.kernels import get_backend

    try:
        if name == "flash_v2_atomic":
            return functools.partial(get_backend("flash_v2"), deterministic=False)
        if name == "flash_v1_bh":
            return functools.partial(get_backend("flash_v1"), num_splits=1)
        return get_backend(name)
    except ImportError as exc:
        return exc


def make_call(impl, q, k, v, case: Case, doc_ids) -> Callable:
    if impl == "flex":
        return _flex_call(q, k, v, case, doc_ids)
    return _registry_call(impl, q, k, v, case, doc_ids)


def modelled_hbm_gb(case: Case, mode: str, device: torch.device, num_splits: int = 0) -> Optional[float]:
    """flash_v1's modelled HBM traffic of one call in GB (1e9 bytes), or None where there is no model.

    Calls ``kernels.flash_v1.flash_v1_hbm_traffic`` (forward and backward bytes, with the
    on-chip budget of ``device_sram_bytes`` and the ``num_splits`` the impl runs with: 0 the
    heuristic for ``device``, 1 the paper's grid), matching its arguments by name so that a
    change of signature leaves the column empty rather than stopping the sweep.
    """
    try:
        from fatrain.kernels import flash_v1
    except ImportError:
        return None
    traffic = getattr(flash_v1, "flash_v1_hbm_traffic", None)
    if traffic is None:
        return None
    dtype = DTYPES[case.dtype]
    values = {"batch": case.batch, "nheads": case.nheads, "seqlen_q": case.seqlen, "seqlen_k": case.seqlen,
              "seqlen": case.seqlen, "head_dim": case.headdim, "headdim": case.headdim, "causal": case.causal,
              "dtype": dtype, "dtype_bytes": dtype.itemsize, "element_size": dtype.itemsize,
              "num_splits": num_splits, "device": device}
    try:
        if hasattr(flash_v1, "device_sram_bytes"):
            values["sram_bytes"] = flash_v1.device_sram_bytes(device)
        params = inspect.signature(traffic).parameters
        result = traffic(**{name: values[name] for name in params if name in values})
    except Exception as exc:  # noqa: BLE001  (a model that does not fit these arguments leaves the column empty)
        warnings.warn(f"modelled_hbm_gb left empty: flash_v1_hbm_traffic failed with {short(exc)}", stacklevel=2)
        return None
    if isinstance(result, dict):
        fwd, bwd = result.get("forward", result.get("fwd")), result.get("backward", result.get("bwd"))
    elif isinstance(result, (int, float)):
        fwd, bwd = result, None
    else:
        fwd, bwd = getattr(result, "forward", None), getattr(result, "backward", None)
    total = {"fwd": fwd, "bwd": bwd, "fwdbwd": None if fwd is None or bwd is None else fwd + bwd}[mode]
    return None if total is None else float(total) / 1e9


# --- timing and memory -------------------------------------------------------------------

def time_ms(fn: Callable, device: torch.device, cfg, grad_to_none: list[torch.Tensor]) -> float:
    """Median milliseconds of fn(): do_bench on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(max(1, cfg.cpu_reps)):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """max_memory_allocated during one call of fn minus memory_allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def mode_fn(call: Callable, mode: str, q) -> Callable:
    """The function a mode times; for bwd the forward graph is built here, once."""
    if mode == "fwd":
        return call
    dout = torch.randn_like(q)
    if mode == "fwdbwd":
        return lambda: call().backward(dout)
    out = call()
    return lambda: out.backward(dout, retain_graph=True)


_SDPA_NO_KERNEL = ("No available kernel", "No viable backend")


def classify(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    if isinstance(exc, ImportError):
        return "unavailable"
    # SDPA says so when the pinned kernel cannot take these inputs (dtype, mask, device).
    if isinstance(exc, NotImplementedError) or any(m in str(exc) for m in _SDPA_NO_KERNEL):
        return "unsupported"
    return "error"


def short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def free_memory(device: torch.device) -> None:
    """Release what a failed or finished case left behind (GPU only: gc.collect alone costs ~0.4 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# --- the sweep ---------------------------------------------------------------------------

def run_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "git_sha": git_sha()}


def git_sha() -> str:
    """HEAD of the checkout this package runs from, '+dirty' with uncommitted changes to tracked files.

    ``FATRAIN_GIT_SHA`` overrides it: a copy of the tree run elsewhere (a lent GPU machine) can
    carry a stale ``.git``, so the scripts that run there pass the commit they were started from.
    """
    if os.environ.get("FATRAIN_GIT_SHA"):
        return os.environ["FATRAIN_GIT_SHA"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_sweep(cfg, out_dir: str, log: Callable[[str], None] = print) -> str:
    """Run every case, write one CSV row per measurement as it finishes; return the CSV's path."""
    validate_bench_config(cfg)
    device = pick_device(cfg.device)
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
        for case in make_cases(cfg):
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
            "doc_len": case.doc_len, "dropout_p": case.dropout_p, "status": "ok", "note": ""}


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


def row_key(row: dict) -> tuple:
    """What identifies a measurement, as the CSV spells it (so rows read back compare equal)."""
    return tuple(str(row[c]) for c in ("impl", "mode", "dtype", "headdim", "causal", "window", "doc_len",
                                       "dropout_p", "seqlen", "batch", "nheads"))


def measure(name: str, impl, mode: str, case: Case, q, k, v, doc_ids, cfg, device, oom_at: dict,
            calls: dict) -> dict:
    """One row: time, TFLOP/s and peak extra memory of (impl, mode, case), or the status that stopped it.

    ``calls`` keeps each impl's call on these inputs across modes, so FlexAttention builds its
    block mask and compiles once per case rather than once per mode.
    """
    row = case_row(name, mode, case)
    if name in ("flash_v1", "flash_v1_bh"):
        splits = getattr(impl, "keywords", {}).get("num_splits", 0)  # flash_v1_bh is a partial with num_splits=1
        row["modelled_hbm_gb"] = modelled_hbm_gb(case, mode, device, num_splits=splits)
    series = (name, mode, case.dtype, case.headdim, case.causal, case.window, case.doc_len, case.dropout_p)
    if isinstance(impl, Exception):
        return {**row, "status": classify(impl), "note": short(impl)}
    if q is None:
        return {**row, "status": "oom", "note": "inputs did not fit"}
    if cfg.skip_after_oom and series in oom_at and case.seqlen > oom_at[series]:
        return {**row, "status": "oom", "note": f"skipped: seqlen {oom_at[series]} already ran out of memory"}
    fn = None
    try:
        if name not in calls:
            calls[name] = make_call(impl, q, k, v, case, doc_ids)
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


# --- reading and reporting ---------------------------------------------------------------

def csv_header(csv_path: str) -> list[str]:
    with open(csv_path, newline="") as f:
        return next(csv.reader(f), None) or COLUMNS


def read_rows(csv_path: str) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value, spec: str) -> str:
    if value in (None, ""):
        return "-"
    try:
        return format(float(value), spec)
    except ValueError:
        return str(value)


def format_row(row: dict) -> str:
    features = feature_label(row)
    return (f"{row['impl']:>11} {row['mode']:>6} causal={str(row['causal']):<5} d={row['headdim']:<4} "
            f"N={row['seqlen']:<6}{features} {_fmt(row.get('ms'), '9.3f')} ms {_fmt(row.get('tflops'), '7.4g')} "
            f"TFLOP/s {_fmt(row.get('peak_mem_mib'), '9.1f')} MiB  {row['status']} {row.get('note', '')}")


def feature_label(row: dict) -> str:
    parts = []
    if int(row["window"]) >= 0:
        parts.append(f" window={row['window']}")
    if int(row["doc_len"]) > 0:
        parts.append(f" doc={row['doc_len']}")
    if float(row["dropout_p"]) > 0:
        parts.append(f" p={float(row['dropout_p']):g}")
    return "".join(parts)


def console_table(rows: list[dict]) -> str:
    header = ["impl", "mode", "causal", "d", "N", "features", "dtype", "ms", "TFLOP/s", "peak MiB", "status"]
    body = [[r["impl"], r["mode"], str(r["causal"]), str(r["headdim"]), str(r["seqlen"]),
             feature_label(r).strip() or "-", r["dtype"], _fmt(r.get("ms"), ".3f"), _fmt(r.get("tflops"), ".4g"),
             _fmt(r.get("peak_mem_mib"), ".1f"), r["status"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header] + body]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def plot(rows: list[dict], path: str, column: str = "tflops", ylabel: str = "TFLOP/s") -> Optional[str]:
    """One subplot per (mode, head dim, causal[, dtype]): ``column`` vs seqlen, one line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get(column) not in (None, "")]
    if not ok:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    several_dtypes = len({r["dtype"] for r in ok}) > 1
    panels = sorted({(int(r["headdim"]), r["causal"], r["dtype"] if several_dtypes else "") for r in ok})
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(4.2 * len(panels), 3.4 * len(modes)),
                             squeeze=False, sharex=True)
    for (i, mode), (j, (d, causal, dtype)) in itertools.product(enumerate(modes), enumerate(panels)):
        ax = axes[i][j]
        sel = [r for r in ok if r["mode"] == mode and int(r["headdim"]) == d and r["causal"] == causal
               and (not dtype or r["dtype"] == dtype)]
        lines: dict[str, list] = {}
        for r in sel:
            lines.setdefault(r["impl"] + feature_label(r), []).append((int(r["seqlen"]), float(r[column])))
        for label, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        seqlens = sorted({n for points in lines.values() for n, _ in points})
        ax.set_xticks(seqlens, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in seqlens])
        ax.minorticks_off()
        ax.set_title(f"{mode}, d={d}, {'causal' if causal == 'True' else 'non-causal'} {dtype}".strip(), fontsize=10)
        ax.set_xlabel("seqlen")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(csv_path: str, make_plots: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Console table of every row in the CSV and, if asked, the plots beside it; return the plot paths."""
    rows = read_rows(csv_path)
    log(console_table(rows))
    if not make_plots:
        return []
    stem = os.path.splitext(csv_path)[0]
    paths = [plot(rows, stem + ".png"), plot(rows, stem + "_memory.png", "peak_mem_mib", "peak extra MiB")]
    return [p for p in paths if p]
