"""``fatrain-extend``: the context-extension study in one command (fatrain.eval.extension).

    fatrain-extend experiment=context_extension                 # GPU: train at 1k, extend to 4k, evaluate 1k-16k
    fatrain-extend experiment=context_extension_cpu out=runs/ext  # the CPU-sized twin, in about a minute
    fatrain-extend experiment=context_extension extension.types=[none,yarn] extension.finetune_steps=400

Every argument but ``out=<dir>`` (default outputs/extend/<date_time>) is a fatrain-train override of
the base run; ``extension.*`` says how the chain goes on from it. A bad setting exits 2 with one
line naming it; given the same ``out=``, an interrupted chain reuses the stages it finished.
"""

from __future__ import annotations

import os
import sys
import time

from fatrain.runtime import user_errors


def run(argv: list[str] | None = None) -> dict:
    """The chain for ``argv`` (the command line's arguments); returns its summary (summary.json)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return {}
    out = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    overrides = [a for a in args if not a.startswith("out=")]
    out_dir = out[-1] if out else os.path.join("outputs", "extend", time.strftime("%Y-%m-%d_%H-%M-%S"))
    from fatrain.eval.extension import run_chain

    with user_errors():
        summary = run_chain(overrides, out_dir)
    print(f"wrote {os.path.join(out_dir, 'summary.md')}, summary.json and extension_*.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    """The console script: exit status 0 once the chain is done (a bad setting exits 2 in run)."""
    run(argv)
    return 0


if __name__ == "__main__":
    main()
