"""One run per folder: an advisory lock that a training run holds on its run directory.

A run takes ``<run_dir>/.fatrain.lock`` before it writes anything there (checkpoints, metrics,
W&B) and gives it up when it ends. The lock is ``fcntl.flock`` on that file; the file also holds
the holder's pid, host and start time, so a second run in the folder can say who holds it:

    error: <run_dir> is in use by another run (pid 4242 on host gpu-7, started 2026-12-02T18:40:01Z,
    lock file <run_dir>/.fatrain.lock): wait for it to end or choose another hydra.run.dir

The kernel releases a flock when its holder dies, however it dies (SIGKILL, OOM killer, a node
that loses power and reboots), so a lock file left behind by a killed run holds no lock: the next
run takes it over, rewrites the holder line, and says whose lock it took over. No pid is probed and
no timeout guessed, so a live run is never mistaken for a dead one.

Caution / known limits: the lock is advisory (only fatrain runs honour it). On NFS, Linux
emulates flock with POSIX byte-range locks (since 2.6.12), which the server keeps; other network
file systems may not lock at all. On platforms without ``fcntl`` (Windows) the run is not locked,
and says so once. Under torchrun only rank 0 holds the lock (the other ranks never write the
folder); the entry point's own files (Hydra's ``.hydra/`` and job log, written before the task
starts) are outside it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import warnings

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".fatrain.lock"


class RunDirLocked(ValueError):
    """Another live run holds the folder (a user error: one line, exit code 2)."""


def _holder_line() -> str:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"pid {os.getpid()} on host {socket.gethostname()}, started {started}"


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    return text.splitlines()[0] if text else ""


class RunLock:
    """The lock on one run folder; ``acquire`` raises RunDirLocked naming the holder."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: int | None = None
        self.took_over: str | None = None  # the holder line a dead run left in the file

    def acquire(self) -> "RunLock":
        if fcntl is None:
            warnings.warn(f"{self.run_dir} is not locked against a second run: this platform has no fcntl "
                          "(run one training run per folder)", stacklevel=2)
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd) or "holder not yet recorded"
                os.close(fd)
                raise RunDirLocked(f"{self.run_dir} is in use by another run ({holder}, lock file {self.path}): "
                                   "wait for it to end or choose another hydra.run.dir") from None
            except BaseException:
                os.close(fd)
                raise
            # NOTE: a holder that was ending may have removed the file between our open and our flock;
            # the lock we hold is then on an unlinked file, and a third run could lock a new one. Lock
            # again until the file we hold is the one at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.took_over = _read_holder(fd) or None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (_holder_line() + "\n").encode())
        os.fsync(fd)
        if self.took_over:
            print(f"note: took over {self.path} from a run that is no longer running ({self.took_over})",
                  file=sys.stderr)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # Removed while still locked, so no run ever sees a finished run's holder line as current.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
