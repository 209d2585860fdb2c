"""``python -m fatrain.cli.bench_report csv=<results.csv>``: a fatrain-bench CSV's table and plots, again.

    python -m fatrain.cli.bench_report csv=experiments/<study>/results/<name>.csv

Prints the console table and writes ``<stem>.png`` (TFLOP/s) and ``<stem>_memory.png`` beside
the CSV (``fatrain.bench.report``), e.g. to redraw a study's committed results without a GPU.
A missing file exits with one line and code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from fatrain.bench.report import report
from fatrain.cli_help import Setting, parse_settings, settings_help
from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, report_user_error

PROG = "python -m fatrain.cli.bench_report"
SETTINGS = [Setting("csv", str, None, "a CSV that fatrain-bench wrote; the plots go beside it; required")]
HELP = settings_help(PROG, f"{PROG}: the table and plots of a fatrain-bench CSV, drawn again from the CSV.",
                     [f"{PROG} csv=experiments/<study>/results/<name>.csv"], SETTINGS)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args, _ = parse_settings(sys.argv[1:] if argv is None else argv, SETTINGS, prog=PROG, help_text=HELP,
                                 positional="csv")
        if not args["csv"]:
            raise ValueError(f"{PROG}: csv=<a fatrain-bench CSV> is required")
        if not os.path.isfile(args["csv"]):
            raise FileNotFoundError(f"csv={args['csv']}: no such file")
        paths = report(args["csv"])
    except USER_ERRORS as e:
        report_user_error(e)
        return USER_ERROR_EXIT
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
