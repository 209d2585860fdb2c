"""Stopping a run cleanly: Ctrl-C, a scheduler's SIGTERM, SLURM's SIGUSR1 before preemption.

While the step loop runs, SIGINT, SIGTERM and SIGUSR1 only raise a flag (``StopSignals``);
the loop reads it at the end of the step it is in, writes a checkpoint of that step, and
returns ``"status": "interrupted"``. The entry point prints one line with the command that
resumes the run and exits ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM, 138 for
SIGUSR1), as a shell reports a process the signal ended. A second SIGINT stops at once
(KeyboardInterrupt: no checkpoint of the step in flight; the last one written stays whole).

A handler that was installed before the loop (SLURM's submitit installs one for SIGUSR1 and
SIGTERM, which requeues the job) is not lost: once the checkpoint is written, the signal is
delivered to it again (``deliver_to_previous``), so a preempted job is requeued and, run with
``resume=auto`` in a fixed folder, continues from that checkpoint.

Under torchrun every rank receives the signal; the flag goes into the per-step all-reduce the
loop makes anyway, so all ranks stop at the same step. Handlers can only be installed from
the main thread; elsewhere (a run started from a worker thread) the signals keep their handlers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class StopSignals:
    """Context manager: the stop signals raise ``requested`` instead of ending the process."""

    def __init__(self, announce=None):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._announce = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            self._announce(f"{signal_name(signum)}: stopping at the end of this step, after a checkpoint{again}")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def deliver_to_previous(signum: int) -> None:
    """Send ``signum`` again to the handler now installed, if that is a Python callable other than
    the default Ctrl-C one (e.g. submitit's requeue on SIGUSR1/SIGTERM). Call once the run's files
    are written and StopSignals has restored the handlers it replaced."""
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        os.kill(os.getpid(), signum)
