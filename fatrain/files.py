"""Writing a run's files so that a failed write says which file and why, and leaves nothing torn.

A full disk, a quota or a read-only folder shows up deep inside torch.save, a JSON dump or
W&B as a chained traceback (torch's ``[enforce fail at inline_container.cc]`` hides the
``No space left on device`` in its context). ``RunWriteError`` is the one line instead: the
file and the OS error. The training entry point prints it, records ``"status": "error"`` in
result.json where that can still be written, and exits with ``WRITE_ERROR_EXIT``.
"""

from __future__ import annotations

import json
import os
import tempfile

WRITE_ERROR_EXIT = 1


class RunWriteError(RuntimeError):
    """A file of the run could not be written; ``path`` and the ``OSError`` behind it."""

    def __init__(self, path: str, error: BaseException):
        self.path, self.error = path, error
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        code = f"[Errno {error.errno}] " if isinstance(error, OSError) and error.errno else ""
        super().__init__(f"cannot write {path}: {code}{reason}")


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError that caused ``exc`` (itself, or one in its __cause__ / __context__ chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def as_write_error(path: str, exc: BaseException) -> BaseException:
    """``RunWriteError(path, ...)`` when an OS error is behind ``exc``; else ``exc`` itself (a bug keeps its traceback)."""
    if isinstance(exc, RunWriteError):
        return exc
    os_error = os_error_in(exc)
    return RunWriteError(path, os_error) if os_error is not None else exc


def append_line(fd: int, path: str, line: str) -> None:
    """Append one whole line to the file open as ``fd`` (O_APPEND): a write that fails part-way
    is cut back off, so the file never ends in a torn line that this process wrote."""
    data = line.encode("utf-8")
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as e:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise RunWriteError(path, e) from None


def default_mode(fd: int) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode ``open`` would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as strict JSON into ``path`` through a temporary file and a rename: the old file or the
    new one, never half of one. Raises RunWriteError."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        default_mode(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise RunWriteError(path, e) from None
