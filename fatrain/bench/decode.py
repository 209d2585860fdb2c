"""Decode attention benchmark (``fatrain-bench bench=decode``): one query per sequence against a
KV cache, flash_v2's split-K decode kernel side by side with SDPA's kernels on the same shapes.

    fatrain-bench bench=decode                                  # Nk 4k..128k, batch 1/8/32, on the GPU
    fatrain-bench bench=decode decode.cache_lens=[16384] decode.batches=[1]

Decoding reads the whole cache once per step and does little arithmetic on it, so its speed
is a bandwidth: every row reports the bytes of K and V read per second,
    kv_bytes = 2 * batch * cache_len * nheads_k * headdim * element size
    kv_gb_per_s = kv_bytes / time
and that over the device copy bandwidth measured in the same process (a device-to-device
copy of ``copy_mib`` MiB timed the same way, counting the bytes read plus the bytes written):
    fraction_of_copy = kv_gb_per_s / copy_gb_per_s
``impls`` are ``flash_v2`` (``fatrain.kernels.decode.flash_decode``, num_splits from
``decode.num_splits``, 0 = its heuristic) and any registry backend (``sdpa_flash``,
``sdpa_cudnn``, ...) called as attention(q, k_cache, v_cache) with seqlen_q = 1. Timing is
``timing.time_ms``: do_bench medians on CUDA, wall-clock medians on the CPU (a smoke test
only). Rows go to ``<out_dir>/<decode.name>.csv`` and ``.jsonl`` with the run's device, versions,
commit and date; a failure (unsupported, out of memory, error) is a row with its status.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import os
from typing import Callable

import torch

from fatrain.bench.cases import DTYPES
from fatrain.bench.timing import time_ms
from fatrain.kernels import available_backends, get_backend
from fatrain.runtime import classify, free_memory, run_info, select_device, short

COLUMNS = ("impl", "batch", "cache_len", "nheads", "nheads_k", "headdim", "dtype", "num_splits", "ms",
           "kv_gb_per_s", "copy_gb_per_s", "fraction_of_copy", "status", "note")
#: The decode kernel's name in ``impls``: flash_v2 decodes through its split-K kernel.
DECODE_KERNEL = "flash_v2"


def validate_decode_config(d) -> None:
    """Check the decode bench's settings; ValueError naming the key and what is allowed."""
    allowed = available_backends(variants=True)
    bad = [name for name in d.impls if name not in allowed]
    if bad or not d.impls:
        raise ValueError(f"decode.impls={list(d.impls)} has {bad or 'nothing'}: choose from {', '.join(allowed)}")
    for key in ("cache_lens", "batches"):
        values = list(d[key])
        if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in values):
            raise ValueError(f"decode.{key}={values} must list integers >= 1")
    for key in ("nheads", "nheads_k", "headdim", "copy_mib"):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1:
            raise ValueError(f"decode.{key}={d[key]!r} must be an integer >= 1")
    if d.nheads % d.nheads_k:
        raise ValueError(f"decode.nheads={d.nheads} must be a multiple of decode.nheads_k={d.nheads_k}")
    if d.dtype not in DTYPES:
        raise ValueError(f"decode.dtype={d.dtype!r} must be one of {', '.join(DTYPES)}")
    if isinstance(d.num_splits, bool) or not isinstance(d.num_splits, int) or not 0 <= d.num_splits <= 128:
        raise ValueError(f"decode.num_splits={d.num_splits!r} must be an int in 0..128 (0: the kernel's heuristic)")


def _sig(x: float) -> float:
    """Four significant digits: rows stay readable without losing a small CPU number."""
    return float(f"{x:.4g}")


def copy_gb_per_s(device: torch.device, mib: int, cfg) -> float:
    """Measured device copy bandwidth: (bytes read + bytes written) / time of ``dst.copy_(src)``."""
    src = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, cfg, [])
    del src, dst
    return 2 * mib * 2 ** 20 / (ms * 1e-3) / 1e9


def decode_call(name: str, q, k, v, num_splits: int) -> Callable:
    if name == DECODE_KERNEL:
        from fatrain.kernels.decode import flash_decode
        return lambda: flash_decode(q, k, v, num_splits=num_splits)
    attn = get_backend(name)
    return lambda: attn(q, k, v)


def run_decode_bench(cfg, out_dir: str, log: Callable[[str], None] = print) -> str:
    """Time every (batch, cache_len, impl) of ``cfg.decode``; write CSV and JSONL rows; return the CSV path."""
    d = cfg.decode
    validate_decode_config(d)
    device = select_device(cfg.device, "device")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{d.name}.csv")
    info = run_info(device)
    copy_bw = copy_gb_per_s(device, d.copy_mib, cfg)
    log(f"device copy bandwidth {copy_bw:.1f} GB/s ({d.copy_mib} MiB, read + write)")
    dtype = DTYPES[d.dtype]
    with open(csv_path, "w", newline="") as f, open(os.path.join(out_dir, f"{d.name}.jsonl"), "w") as jf:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS) + sorted(info) + ["date"], extrasaction="ignore")
        writer.writeheader()
        for batch, cache_len in itertools.product(d.batches, d.cache_lens):
            q = k = v = None
            try:
                gen = torch.Generator(device).manual_seed(cfg.seed)
                q = torch.randn(batch, 1, d.nheads, d.headdim, generator=gen, device=device, dtype=dtype)
                k = torch.randn(batch, cache_len, d.nheads_k, d.headdim, generator=gen, device=device, dtype=dtype)
                v = torch.randn(batch, cache_len, d.nheads_k, d.headdim, generator=gen, device=device, dtype=dtype)
            except torch.cuda.OutOfMemoryError:
                pass  # every row of this shape records the OOM below
            kv_bytes = 2 * batch * cache_len * d.nheads_k * d.headdim * torch.finfo(dtype).bits // 8
            for name in d.impls:
                row = dict(impl=name, batch=batch, cache_len=cache_len, nheads=d.nheads, nheads_k=d.nheads_k,
                           headdim=d.headdim, dtype=d.dtype, num_splits=d.num_splits if name == DECODE_KERNEL else "",
                           copy_gb_per_s=_sig(copy_bw), status="ok", note="")
                try:
                    if q is None:
                        raise torch.cuda.OutOfMemoryError("inputs do not fit")
                    ms = time_ms(decode_call(name, q, k, v, d.num_splits), device, cfg, [])
                    gbps = kv_bytes / (ms * 1e-3) / 1e9
                    row.update(ms=_sig(ms), kv_gb_per_s=_sig(gbps), fraction_of_copy=_sig(gbps / copy_bw))
                except Exception as exc:  # noqa: BLE001 -- every failure is a row
                    row.update(status=classify(exc), note=short(exc))
                    free_memory(device)
                row.update(info, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                writer.writerow(row)
                jf.write(json.dumps(row, default=str) + "\n")
                f.flush()
                jf.flush()
                log(f"{name:>12} B={batch:<3} Nk={cache_len:<7} " + (
                    f"{row['ms']:.4g} ms {row['kv_gb_per_s']:.4g} GB/s ({row['fraction_of_copy']:.3g} of copy)"
                    if row["status"] == "ok" else f"{row['status']}: {row['note']}"))
            del q, k, v
            free_memory(device)
    return csv_path
