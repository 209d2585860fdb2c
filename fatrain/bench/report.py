"""What a sweep's CSV becomes: console lines and table, plots, and the ratio summaries.

``summarize`` prints one backend's TFLOP/s over each of several others' per case, with the
target ratios of the bench config's ``summary`` marked where missed; ``summarize_features``
prints how much faster each window / documents / dropout / variant case runs than the plain one.
Both read one CSV or several (a sweep split over runs).
"""

from __future__ import annotations

import csv
import itertools
import os
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Optional, Union

from fatrain.config import BENCH_MODES
from fatrain.plotting import (date_span, describe, device_names, plain_numbers, pyplot, seq_len_axis, short_length,
                              value_axis)
from fatrain.plotting import title as wrapped_title

COLUMNS = ["impl", "mode", "causal", "seqlen", "headdim", "batch", "nheads", "dtype", "tflops", "ms",
           "peak_mem_mib", "status", "window", "doc_len", "dropout_p", "variant", "modelled_hbm_gb", "rounds", "ms_spread",
           "gpu", "torch", "triton", "git_sha", "date", "note"]

CsvPaths = Union[str, os.PathLike, Iterable[str]]


def csv_header(csv_path: str) -> list[str]:
    with open(csv_path, newline="") as f:
        return next(csv.reader(f), None) or COLUMNS


def read_rows(csv_path: str) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _read_all(csv_path: CsvPaths) -> list[dict]:
    paths = [csv_path] if isinstance(csv_path, (str, os.PathLike)) else list(csv_path)
    return [row for path in paths for row in read_rows(path)]


def _fmt(value, spec: str) -> str:
    if value in (None, ""):
        return "-"
    try:
        return format(float(value), spec)
    except ValueError:
        return str(value)


def feature_label(row: dict) -> str:
    parts = []
    if int(row["window"]) >= 0:
        parts.append(f" window={row['window']}")
    if int(row["doc_len"]) > 0:
        parts.append(f" doc={row['doc_len']}")
    if float(row["dropout_p"]) > 0:
        parts.append(f" p={float(row['dropout_p']):g}")
    if row.get("variant", "none") not in ("none", ""):
        parts.append(f" {row['variant']}")
    return "".join(parts)


def format_row(row: dict) -> str:
    """One console line per measurement, printed as the sweep goes."""
    features = feature_label(row)
    return (f"{row['impl']:>11} {row['mode']:>6} causal={str(row['causal']):<5} d={row['headdim']:<4} "
            f"N={row['seqlen']:<6}{features} {_fmt(row.get('ms'), '9.3f')} ms {_fmt(row.get('tflops'), '7.4g')} "
            f"TFLOP/s {_fmt(row.get('peak_mem_mib'), '9.1f')} MiB  {row['status']} {row.get('note', '')}")


def console_table(rows: list[dict]) -> str:
    header = ["impl", "mode", "causal", "d", "N", "features", "dtype", "ms", "TFLOP/s", "peak MiB", "status"]
    body = [[r["impl"], r["mode"], str(r["causal"]), str(r["headdim"]), str(r["seqlen"]),
             feature_label(r).strip() or "-", r["dtype"], _fmt(r.get("ms"), ".3f"), _fmt(r.get("tflops"), ".4g"),
             _fmt(r.get("peak_mem_mib"), ".1f"), r["status"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header] + body]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def run_description(rows: list[dict]) -> str:
    """'NVIDIA H100 80GB HBM3, bf16, batch x seqlen = 16k-32k, heads x d = 2048, torch 2.11.0, triton 3.6.0,
    2026-11-26': what ran where, from the rows' own columns (a plot's title)."""
    def span(values: set) -> str:
        low, high = min(values), max(values)
        return short_length(low) if low == high else f"{short_length(low)}-{short_length(high)}"

    sized = [r for r in rows if r.get("batch") and r.get("nheads")]
    tokens = {int(r["batch"]) * int(r["seqlen"]) for r in sized}
    widths = {int(r["nheads"]) * int(r["headdim"]) for r in sized}
    return describe(device_names(r.get("gpu") for r in rows), device_names(r.get("dtype") for r in rows),
                    tokens and f"batch x seqlen = {span(tokens)}",
                    widths and f"heads x d = {', '.join(map(str, sorted(widths)))}",
                    device_names(r.get("torch") and f"torch {r['torch']}" for r in rows),
                    device_names(r.get("triton") and f"triton {r['triton']}" for r in rows),
                    date_span(r.get("date") for r in rows))


def plot(rows: list[dict], path: str, column: str = "tflops", ylabel: str = "attention throughput (TFLOP/s)",
         title: str = "Attention throughput") -> Optional[str]:
    """One subplot per (mode, head dim, causal[, dtype]): ``column`` vs seqlen, one line per impl.

    A panel whose values span more than 10x (naive's TFLOP/s beside the flash kernels') has a
    log value axis; the figure's title says what ran where (GPU, dtype, shapes, versions, date).
    """
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok" and r.get(column) not in (None, "")]
    if not ok:
        return None
    modes = [m for m in BENCH_MODES if any(r["mode"] == m for r in ok)]
    several_dtypes = len({r["dtype"] for r in ok}) > 1
    panels = sorted({(int(r["headdim"]), r["causal"], r["dtype"] if several_dtypes else "") for r in ok})
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(4.2 * len(panels), 3.4 * len(modes) + 0.5),
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
        seq_len_axis(ax, sorted({n for points in lines.values() for n, _ in points}), label="seqlen (tokens)")
        if value_axis(ax, [v for points in lines.values() for _, v in points]) == "linear":
            ax.yaxis.set_major_formatter(plain_numbers())
        ax.set_title(f"{mode}, d={d}, {'causal' if causal == 'True' else 'non-causal'} {dtype}".strip(), fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        if lines:
            ax.legend(fontsize=7)
    where = run_description(ok)
    fig.suptitle(wrapped_title(title, where, width=45 * len(panels)), fontsize=11)
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
    paths = [plot(rows, stem + ".png"),
             plot(rows, stem + "_memory.png", "peak_mem_mib", "peak memory beyond the inputs (MiB)",
                  "Attention peak GPU memory allocated during one call, beyond its inputs")]
    return [p for p in paths if p]


# ----- ratio summaries ---------------------------------------------------------------------------


def summarize(csv_path: CsvPaths, numerator: str, denominators: Iterable[str],
              targets: Optional[Mapping[str, float]] = None, target_modes: Iterable[str] = ("fwd", "fwdbwd"),
              target_min_seqlen: int = 0, log: Callable[[str], None] = print) -> list[dict]:
    """Print a Markdown table of TFLOP/s ratios numerator / each denominator per case; return its rows.

    A case is (dtype, mode, head dim, causal, window, documents, dropout, variant, seqlen); a ratio is
    blank where either side has no ``ok`` row. A ratio below ``targets[denominator]``, in one
    of ``target_modes`` at seqlen >= ``target_min_seqlen``, is marked with ``!``.
    """
    denominators, targets, target_modes = list(denominators), dict(targets or {}), set(target_modes)
    tflops: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in _read_all(csv_path):
        if r["status"] == "ok":
            key = (r["dtype"], r["mode"], int(r["headdim"]), r["causal"], int(r["window"]), int(r["doc_len"]),
                   float(r["dropout_p"]), _variant(r), int(r["seqlen"]))
            tflops[key][r["impl"]] = float(r["tflops"])
    table = []
    for key in sorted(tflops):
        if numerator not in tflops[key]:
            continue
        dtype, mode, d, causal, window, doc_len, p, variant, n = key
        row = {"dtype": dtype, "mode": mode, "headdim": d, "causal": causal, "window": window, "doc_len": doc_len,
               "dropout_p": p, "variant": variant, "seqlen": n, numerator: tflops[key][numerator]}
        for den in denominators:
            row[den] = tflops[key][numerator] / tflops[key][den] if den in tflops[key] else None
        table.append(row)
    header = ["dtype", "mode", "d", "causal", "window", "doc", "p", "variant", "N", f"{numerator} TFLOP/s"]
    header += [f"/ {den}" for den in denominators]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    misses = 0
    for row in table:
        cells = [row["dtype"], row["mode"], str(row["headdim"]), row["causal"], str(row["window"]),
                 str(row["doc_len"]), f"{row['dropout_p']:g}", row["variant"], str(row["seqlen"]),
                 f"{row[numerator]:.4g}"]
        for den in denominators:
            ratio, target = row[den], targets.get(den)
            miss = (ratio is not None and target is not None and row["seqlen"] >= target_min_seqlen
                    and row["mode"] in target_modes and ratio < target)
            misses += miss
            cells.append("" if ratio is None else f"{ratio:.2f}{'!' if miss else ''}")
        lines.append("| " + " | ".join(cells) + " |")
    if targets:
        wanted = " and ".join(f">= {t}x {den}" for den, t in targets.items())
        lines.append(f"\n{misses} ratio(s) below target (marked !): {numerator} {wanted}, "
                     f"{' and '.join(sorted(target_modes))}, seqlen >= {target_min_seqlen}")
    log("\n".join(lines))
    return table


def _variant(row: dict) -> str:
    """A row's attention variant (none, alibi, softcap, sinks); rows from before the column: none."""
    return row.get("variant") or "none"


def summarize_features(csv_path: CsvPaths, impl: str, log: Callable[[str], None] = print) -> list[dict]:
    """Print how much faster (or slower) each window / documents / dropout / variant case runs than the plain one.

    speedup = ms(plain) / ms(case), the plain case having the same impl, mode, dtype, head dim,
    causal and seqlen with no window, one document, no dropout and no variant (a variant's
    cost over plain attention is 1 / speedup).
    """
    ms: dict[tuple, float] = {}
    for r in _read_all(csv_path):
        if r["status"] == "ok" and r["impl"] == impl:
            key = (r["dtype"], r["mode"], int(r["headdim"]), r["causal"], int(r["seqlen"]))
            ms[key + (int(r["window"]), int(r["doc_len"]), float(r["dropout_p"]), _variant(r))] = float(r["ms"])
    table = []
    for key in sorted(ms):
        plain = ms.get(key[:5] + (-1, 0, 0.0, "none"))
        if key[5:] != (-1, 0, 0.0, "none") and plain is not None:
            table.append(dict(zip(("dtype", "mode", "headdim", "causal", "seqlen", "window", "doc_len", "dropout_p",
                                   "variant"), key), ms=ms[key], plain_ms=plain, speedup=plain / ms[key]))
    lines = ["| dtype | mode | d | causal | N | window | doc | p | variant | ms | plain ms | speedup |",
             "|" + "---|" * 12]
    lines += [f"| {r['dtype']} | {r['mode']} | {r['headdim']} | {r['causal']} | {r['seqlen']} | {r['window']} | "
              f"{r['doc_len']} | {r['dropout_p']:g} | {r['variant']} | {r['ms']:.3f} | {r['plain_ms']:.3f} | "
              f"{r['speedup']:.2f} |" for r in table]
    log(f"{impl}: feature cases against the plain case\n" + "\n".join(lines))
    return table

