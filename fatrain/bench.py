"""``fatrain-bench``: time every attention backend over a sweep and write CSV, plots and a table.

    fatrain-bench                                   # the paper sweep (bench=paper), on the GPU
    fatrain-bench bench=smoke                       # tiny CPU sweep
    fatrain-bench bench=targets                     # only the cases flash_v2's speed targets compare
    fatrain-bench bench=features                    # windows, packed documents, dropout
    fatrain-bench impls=[flash_v2,sdpa_flash] headdims=[128] out_dir=experiments/results
    fatrain-bench headdims=[64] out_dir=DIR append=true  # add to (or resume) DIR/attention_bench.csv

The sweep, the timing and the FLOP formula are documented in ``fatrain.benchmarking``.
``summarize(csv_path)`` prints the speed ratios the flash_v2 issue sets targets for;
``summarize_features(csv_path)`` the speedups of windows and documents (and dropout's cost).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable, Union

import hydra
from omegaconf import DictConfig, OmegaConf

import fatrain  # noqa: F401  (selects the Triton interpreter on CPU machines before triton is imported)
from fatrain.benchmarking import read_rows, register_bench_config, report, run_sweep, validate_bench_config

register_bench_config()

#: flash_v2 issue targets: at least 1.25x SDPA flash and 1.0x FlexAttention, fwd and fwdbwd, seqlen >= 2048.
TARGETS = {"sdpa_flash": 1.25, "flex": 1.0}
TARGET_MIN_SEQLEN = 2048


def output_dir(cfg) -> str:
    if cfg.out_dir:
        return cfg.out_dir
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="bench")
def main(cfg: DictConfig) -> str:
    validate_bench_config(cfg)  # a bad value fails before any work
    print(OmegaConf.to_yaml(cfg))
    csv_path = run_sweep(cfg, output_dir(cfg))
    plots = report(csv_path, make_plots=cfg.plot)
    print(f"\nwrote {csv_path}" + "".join(f"\nwrote {p}" for p in plots))
    if "flash_v2" in cfg.impls:
        summarize(csv_path)
        if len(cfg.windows) > 1 or len(cfg.doc_lens) > 1 or len(cfg.dropout_ps) > 1:
            summarize_features(csv_path)
    return csv_path


def summarize(csv_path: Union[str, Iterable[str]], numerator: str = "flash_v2",
              denominators: Iterable[str] = ("sdpa_flash", "flex", "sdpa_cudnn")) -> list[dict]:
    """Print a Markdown table of TFLOP/s ratios numerator / each denominator per case; return its rows.

    csv_path may be one CSV or several (a sweep split over runs). A case is (dtype, mode,
    head dim, causal, window, documents, dropout, seqlen); a ratio is blank where either side
    has no ``ok`` row. Ratios below the issue's targets (``TARGETS``, seqlen >= 2048) are
    marked with ``!``.
    """
    paths = [csv_path] if isinstance(csv_path, (str, os.PathLike)) else list(csv_path)
    denominators = list(denominators)
    tflops: dict[tuple, dict[str, float]] = defaultdict(dict)
    for path in paths:
        for r in read_rows(path):
            if r["status"] == "ok":
                key = (r["dtype"], r["mode"], int(r["headdim"]), r["causal"], int(r["window"]), int(r["doc_len"]),
                       float(r["dropout_p"]), int(r["seqlen"]))
                tflops[key][r["impl"]] = float(r["tflops"])
    table = []
    for key in sorted(tflops):
        if numerator not in tflops[key]:
            continue
        dtype, mode, d, causal, window, doc_len, p, n = key
        row = {"dtype": dtype, "mode": mode, "headdim": d, "causal": causal, "window": window, "doc_len": doc_len,
               "dropout_p": p, "seqlen": n, numerator: tflops[key][numerator]}
        for den in denominators:
            row[den] = tflops[key][numerator] / tflops[key][den] if den in tflops[key] else None
        table.append(row)
    header = ["dtype", "mode", "d", "causal", "window", "doc", "p", "N", f"{numerator} TFLOP/s"]
    header += [f"/ {den}" for den in denominators]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    misses = 0
    for row in table:
        cells = [row["dtype"], row["mode"], str(row["headdim"]), row["causal"], str(row["window"]),
                 str(row["doc_len"]), f"{row['dropout_p']:g}", str(row["seqlen"]), f"{row[numerator]:.4g}"]
        for den in denominators:
            ratio = row[den]
            target = TARGETS.get(den) if numerator == "flash_v2" else None
            miss = (ratio is not None and target is not None and row["seqlen"] >= TARGET_MIN_SEQLEN
                    and row["mode"] in ("fwd", "fwdbwd") and ratio < target)
            misses += miss
            cells.append("" if ratio is None else f"{ratio:.2f}{'!' if miss else ''}")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if numerator == "flash_v2":
        print(f"\n{misses} ratio(s) below target (marked !): flash_v2 >= {TARGETS['sdpa_flash']}x sdpa_flash and "
              f">= {TARGETS['flex']}x flex, fwd and fwdbwd, seqlen >= {TARGET_MIN_SEQLEN}")
    return table


def summarize_features(csv_path: Union[str, Iterable[str]], impl: str = "flash_v2") -> list[dict]:
    """Print how much faster (or slower) each window / documents / dropout case runs than the plain one.

    speedup = ms(plain) / ms(case), the plain case having the same impl, mode, dtype, head dim,
    causal and seqlen with no window, one document and no dropout. The long-sequence issue asks
    for >= 5x with window (1024, 0) at 32k, >= 3x with documents of mean 2048 at 16k, and
    >= 1 / 1.2 with dropout 0.1 (forward+backward, causal, head dim 128).
    """
    paths = [csv_path] if isinstance(csv_path, (str, os.PathLike)) else list(csv_path)
    ms: dict[tuple, float] = {}
    for path in paths:
        for r in read_rows(path):
            if r["status"] == "ok" and r["impl"] == impl:
                key = (r["dtype"], r["mode"], int(r["headdim"]), r["causal"], int(r["seqlen"]))
                ms[key + (int(r["window"]), int(r["doc_len"]), float(r["dropout_p"]))] = float(r["ms"])
    table = []
    for key in sorted(ms):
        plain = ms.get(key[:5] + (-1, 0, 0.0))
        if key[5:] != (-1, 0, 0.0) and plain is not None:
            table.append(dict(zip(("dtype", "mode", "headdim", "causal", "seqlen", "window", "doc_len", "dropout_p"),
                                  key), ms=ms[key], plain_ms=plain, speedup=plain / ms[key]))
    lines = ["| dtype | mode | d | causal | N | window | doc | p | ms | plain ms | speedup |", "|" + "---|" * 11]
    lines += [f"| {r['dtype']} | {r['mode']} | {r['headdim']} | {r['causal']} | {r['seqlen']} | {r['window']} | "
              f"{r['doc_len']} | {r['dropout_p']:g} | {r['ms']:.3f} | {r['plain_ms']:.3f} | {r['speedup']:.2f} |"
              for r in table]
    print(f"{impl}: feature cases against the plain case\n" + "\n".join(lines))
    return table


if __name__ == "__main__":
    main()
