"""``fatrain-report sweep_dir=<sweep dir>``: turn a training sweep into the tables and plots of a paper.

    fatrain-train -m experiment=ablate_backends
    fatrain-report sweep_dir=multirun/ablate_backends/<date>                       # writes into the sweep dir
    fatrain-report sweep_dir=multirun/ablate_backends/<date> baseline=sdpa_flash   # + throughput relative to it
    fatrain-report sweep_dir=multirun/ablate_backends/<date> max_context=max_context/<date>/max_context.json
    fatrain-report sweep_dir=experiments/<study>/results device_name="NVIDIA H100 80GB HBM3"  # re-plot a report.csv
    fatrain-report max_context=max_context/<date>/max_context.json                # only max_context.png

What is read and written is described in ``fatrain.sweep_report``; a folder that holds a
report.csv and no job folders (a study's committed results) gets its tokens/s and memory plots
redrawn from the CSV. A folder without jobs, or
one run's folder (not a sweep), exits with one line and code 2, and nothing is written. The
old spellings (``fatrain-report DIR --baseline X``) still work, with a line saying how to write
them now.
"""

from __future__ import annotations

import sys
from typing import Optional

from fatrain.cli_help import Setting, parse_settings, settings_help
from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, report_user_error
from fatrain.sweep_report import write_report

SETTINGS = [
    Setting("sweep_dir", str, None, "the folder a multirun wrote (hydra.sweep.dir); required"),
    Setting("out", str, None, "where to write the report (default: the sweep dir)", flag="--out"),
    Setting("warmup_steps", int, 10, "steps excluded from tokens/s and MFU (compilation, autotuning)",
            flag="--warmup-steps"),
    Setting("baseline", str, None, "a row of the tables (a backend, or a backend and its variant) to divide "
            "every row's throughput by, per seq_len (no such row: no relative table)", flag="--baseline"),
    Setting("max_context", str, None, "a fatrain-max-context max_context.json (default: "
            "<sweep dir>/max_context.json, if present); alone, only its plot is drawn", flag="--max-context"),
    Setting("device_name", str, None, "the GPU (or CPU) the plot titles name for jobs that did not record it "
            "(sweeps from before result.json held run information)"),
    Setting("date", str, None, "the date the plot titles give for jobs that did not record one"),
]
HELP = settings_help(
    "fatrain-report",
    "fatrain-report: the tables (report.md, report.csv) and plots (tokens/s, peak memory, max context) of a\n"
    "training sweep, from every job's config, metrics.jsonl and result.json; no W&B account needed.",
    ["fatrain-report sweep_dir=multirun/ablate_backends/<date>",
     "fatrain-report sweep_dir=multirun/ablate_backends/<date> baseline=sdpa_flash",
     "fatrain-report sweep_dir=multirun/ablate_backends/<date> max_context=max_context/<date>/max_context.json",
     "fatrain-report sweep_dir=experiments/<study>/results device_name=\"NVIDIA H100 80GB HBM3\" date=2026-11-26",
     "fatrain-report max_context=max_context/<date>/max_context.json"],
    SETTINGS)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, _ = parse_settings(argv, SETTINGS, prog="fatrain-report", help_text=HELP, positional="sweep_dir")
        if not args["sweep_dir"] and not args["max_context"]:
            raise ValueError("fatrain-report: sweep_dir=<the folder a multirun wrote> is required")
        written = write_report(args["sweep_dir"] or None, args["out"], warmup_steps=args["warmup_steps"],
                               baseline=args["baseline"], max_context_path=args["max_context"],
                               device_name=args["device_name"], date=args["date"])
    except (*USER_ERRORS, KeyError) as e:  # KeyError: a job config without the keys a training run writes
        report_user_error(e)
        return USER_ERROR_EXIT
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
