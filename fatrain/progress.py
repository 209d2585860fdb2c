"""Progress bars for the long commands, and the one-time note that Triton runs interpreted.

``progress(iterable, desc=..., total=...)`` wraps an iterable in a tqdm bar on stderr (what
is being done, how far, an ETA), so stdout stays the command's output. The bar is left out

  * when ``FATRAIN_PROGRESS=0`` (``FATRAIN_PROGRESS=1`` forces it on, even without a terminal);
  * when stderr is not a terminal (a log file or a pipe would fill with carriage returns);
  * when there is at most one item (nothing to show progress through).

``note_interpreter(backend)`` prints one line, once per backend and process, when that
backend's Triton kernels will run through the Triton interpreter (no CUDA GPU): correct, but
orders of magnitude slower than on a GPU, which is what a user waiting on the CPU needs to know.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

_noted_backends: set[str] = set()


def progress_enabled(total: Optional[int] = None) -> bool:
    """Whether a bar over ``total`` items is shown (see the module docstring)."""
    setting = os.environ.get("FATRAIN_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if total is not None and total <= 1:
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str = "", total: Optional[int] = None, unit: str = "it") -> Iterator[T]:
    """``iterable``, with a tqdm bar on stderr labelled ``desc`` where one is useful."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not progress_enabled(total):
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
              leave=False) as bar:
        yield from bar


class _NoBar:
    """What ``progress_bar`` returns when no bar is shown: the same calls, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "") -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(desc: str, total: Optional[int] = None, unit: str = "it"):
    """A bar to ``update()`` by hand, for loops whose steps are not an iterable (a search that
    decides its next try from the last); a do-nothing object where no bar is useful. ``total``
    None: the number of steps is not known in advance (the bar counts and times them)."""
    if not progress_enabled(total):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


def runs_interpreted(backend: str) -> bool:
    """True when ``backend`` runs Triton kernels and they go through the interpreter here."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    from fatrain.kernels import backend_info

    try:
        return backend_info(backend).triton
    except (KeyError, ValueError):
        return False  # an unknown name is the registry's error to raise, where it is used


def note_interpreter(backend: str) -> bool:
    """Print once per process that ``backend`` runs through the Triton interpreter; True if printed now."""
    if backend in _noted_backends or not runs_interpreted(backend):
        return False
    _noted_backends.add(backend)
    print(f"note: {backend} runs its Triton kernels through the Triton interpreter on the CPU "
          "(TRITON_INTERPRET=1, no CUDA GPU): exact in fp32/fp16 but far slower than on a GPU",
          file=sys.stderr, flush=True)
    return True
