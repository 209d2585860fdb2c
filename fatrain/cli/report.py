"""``fatrain-report <sweep dir>``: turn a training sweep into the tables and plots of a paper.

    fatrain-train -m experiment=ablate_backends
    fatrain-report multirun/ablate_backends/<date>                      # writes into the sweep dir
    fatrain-report multirun/ablate_backends/<date> --baseline sdpa_flash  # + throughput relative to it
    fatrain-report multirun/ablate_backends/<date> --max-context max_context/<date>/max_context.json

What is read and written is described in ``fatrain.sweep_report``. A folder without jobs, or
one run's folder (not a sweep), exits with one line and code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, report_user_error
from fatrain.sweep_report import write_report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fatrain-report", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("sweep_dir", help="the folder a multirun wrote (hydra.sweep.dir)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep dir)")
    parser.add_argument("--warmup-steps", type=int, default=10,
                        help="steps excluded from tokens/s and MFU (compilation, autotuning; default 10)")
    parser.add_argument("--baseline", default=None, metavar="LABEL",
                        help="a row of the tables (a backend, or a backend and its variant) to divide every "
                             "row's throughput by, per seq_len (default: no relative table; also left out "
                             "when the sweep has no such row)")
    parser.add_argument("--max-context", default=None, metavar="JSON",
                        help="a fatrain-max-context max_context.json (default: <sweep dir>/max_context.json, "
                             "if present)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.sweep_dir, args.out, warmup_steps=args.warmup_steps, baseline=args.baseline,
                               max_context_path=args.max_context)
    except (*USER_ERRORS, KeyError) as e:  # KeyError: a job config without the keys a training run writes
        report_user_error(e)
        return USER_ERROR_EXIT
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
