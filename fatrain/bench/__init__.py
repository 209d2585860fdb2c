"""The attention kernel benchmark behind ``fatrain-bench``: one timed row per measurement.

    cases.py    the sweep's cases, their inputs, the FLOP formulas
    timing.py   how one call is timed (do_bench on CUDA) and its peak memory measured
    sweep.py    the sweep: every (impl, mode) of every case, failures as rows, resume, rounds
    report.py   the CSV's columns, console table, plots, ratio summaries
    traffic.py  modelled HBM traffic of the kernels that have a model (a CSV column)

Every row carries GPU name, versions, git SHA and date (``fatrain.runtime.run_info``).
"""

from fatrain.bench.cases import Case, attended_pairs, attention_flops, make_cases, make_doc_ids
from fatrain.bench.report import COLUMNS, read_rows, report, summarize, summarize_features
from fatrain.bench.sweep import run_sweep

__all__ = ["COLUMNS", "Case", "attended_pairs", "attention_flops", "make_cases", "make_doc_ids", "read_rows",
           "report", "run_sweep", "summarize", "summarize_features"]
