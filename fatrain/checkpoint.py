"""Atomic checkpoints: save, keep the last k, find the latest, load with clear errors.

Two kinds, one folder, one step numbering:

- ``ckpt_<step>.pt``: one ``torch.save`` file (single and DDP runs; rank 0 writes it),
  written to a temporary file in the same folder, flushed and fsynced, then renamed over
  its final name.
- ``ckpt_<step>.dcp/``: a sharded ``torch.distributed.checkpoint`` folder (FSDP runs; every
  rank writes its own shards) plus ``fatrain_meta.pt`` inside, holding everything but the
  model and optimizer tensors. All ranks write into ``ckpt_<step>.dcp.tmp/``; after a
  barrier rank 0 writes the metadata and renames the folder to its final name.

A rename within a folder is atomic, so a crash mid-write leaves the previous checkpoints
intact and at worst a stray ``*.tmp`` file or folder, which is ignored and cleaned up on
the next save. ``load_checkpoint`` reads either kind into one plain dict on the CPU, with
no process group, so the evaluation tools need not know how a run was trained.

Loading never runs code from the file. A checkpoint holds only tensors and plain containers
(dicts, lists, tuples, numbers, strings; the RNG states are stored that way too, see
``fatrain.trainer.rng_state``), so every ``.pt`` file is read with ``torch.load(...,
weights_only=True)``. A ``.dcp`` folder is read through DCP with two guards: its ``.metadata``
pickle is first unpickled against an allow-list of DCP's own metadata classes
(``_DCP_METADATA_GLOBALS``), and every non-tensor entry is read with ``weights_only=True``
(``SafeLoadPlanner``). A file that needs anything else (a crafted pickle, or a checkpoint of
an older fatrain that pickled numpy's RNG state) is refused with a one-line CheckpointError
naming the file and the global it asked for; there is no unsafe fallback.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import re
import shutil
import tempfile

import torch

from fatrain.files import RunWriteError, as_write_error, default_mode

_NAME = re.compile(r"ckpt_(\d+)\.(pt|dcp)$")
DCP_SUFFIX = ".dcp"
DCP_META = "fatrain_meta.pt"  # inside a .dcp folder: step, spec, config, RNG, data position, ...
FORMAT = "fatrain-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, foreign or does not fit the run."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that cannot be read whole: truncated, half-written, missing its parts or not
    fatrain's. ``resume=auto`` falls back to the one before it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose unpickling needs a global outside the allow-list: it could run code.

    Not a damaged file but a foreign or tampered one, so a resume stops at it rather than
    falling back to an older checkpoint.
    """


def atomic_save(obj, path: str) -> None:
    """torch.save into a temporary file, fsync, rename: ``path`` is the old file or the whole new one.

    A write that fails (full disk, quota) removes the temporary file and raises RunWriteError naming
    ``path`` and the OS error (torch reports it as ``[enforce fail at inline_container.cc]``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        default_mode(fd)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        error = as_write_error(path, e) if isinstance(e, Exception) else e
        if not isinstance(error, RunWriteError):
            raise
        raise error from None
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def is_sharded(path: str) -> bool:
    """True for a ``.dcp`` checkpoint folder (FSDP), False for a ``.pt`` file."""
    return os.path.isdir(path) and path.rstrip(os.sep).endswith(DCP_SUFFIX)


def is_checkpoint(path: str) -> bool:
    """A ``.pt`` file or a finished ``.dcp`` folder (one with its metadata file)."""
    if is_sharded(path):
        return os.path.isfile(os.path.join(path, DCP_META))
    return os.path.isfile(path)


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoints in ``folder`` (``.pt`` files and ``.dcp`` folders), oldest step first."""
    found = []
    for path in glob.glob(os.path.join(folder, "ckpt_*")):
        m = _NAME.search(path)
        if m and is_checkpoint(path):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


# torch's weights_only messages: "Unsupported global: GLOBAL numpy...", "unsupported GLOBAL posix.system whose ..."
_UNSAFE_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")


def _refuse_unsafe(path: str, e: Exception) -> UnsafeCheckpointError:
    """The one-line error for a file whose unpickling asks for a global outside the allow-list."""
    m = _UNSAFE_GLOBAL.search(str(e))
    name = m.group(1) if m else "a global outside the allow-list"
    if name.startswith("numpy"):
        why = (f"it needs {name}: the format of an older fatrain version, which pickled numpy objects and "
               "cannot be loaded safely (only with torch.load(weights_only=False), i.e. trusting the file)")
    else:
        why = f"it needs {name}, which is not a tensor or plain container (loading it could run code from the file)"
    return UnsafeCheckpointError(f"checkpoint {path} refused: {why}")


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's weights_only message that says what failed ("Unsupported operand 110")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _read(path: str, map_location) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if _UNSAFE_GLOBAL.search(str(e)):
            raise _refuse_unsafe(path, e) from None
        raise DamagedCheckpointError(f"checkpoint {path} is unreadable (truncated or not a fatrain checkpoint): "
                                     f"{_unpickler_reason(e)}") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise DamagedCheckpointError(f"checkpoint {path} is unreadable (truncated or not a fatrain checkpoint): "
                                     f"{type(e).__name__}: {e}") from None


# The globals a DCP ``.metadata`` pickle names (torch 2.x): DCP's metadata dataclasses, the
# storage index, dtype/layout/memory-format constants and the saved checkpoint path.
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _DCP_METADATA_MODULES or (module, name) in _DCP_METADATA_GLOBALS:
            obj = super().find_class(module, name)
            if module != "torch.serialization" and not isinstance(obj, type):
                raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def check_dcp_metadata(path: str) -> None:
    """Unpickle a ``.dcp`` folder's ``.metadata`` against the allow-list before DCP reads it."""
    meta_path = os.path.join(path, ".metadata")
    try:
        with open(meta_path, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if _UNSAFE_GLOBAL.search(str(e)):
            raise _refuse_unsafe(meta_path, e) from None
        raise DamagedCheckpointError(f"checkpoint {meta_path} is unreadable: {type(e).__name__}: {e}") from None
    except Exception as e:  # missing, truncated, ...
        raise DamagedCheckpointError(f"checkpoint {meta_path} is unreadable: {type(e).__name__}: {e}") from None


def _safe_planner(base):
    """``base`` (a DCP load planner) whose non-tensor entries must pass ``torch.load(weights_only=True)``."""

    class SafeLoadPlanner(base):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            data = value.read()
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except pickle.UnpicklingError as e:
                where = f"{self._fatrain_path} (entry {read_item.dest_index.fqn})"
                if _UNSAFE_GLOBAL.search(str(e)):
                    raise _refuse_unsafe(where, e) from None
                raise DamagedCheckpointError(f"checkpoint {where} is unreadable: {_unpickler_reason(e)}") from None
            super().load_bytes(read_item, io.BytesIO(data))

    return SafeLoadPlanner


def dcp_exception_type() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def dcp_cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (a BaseException), else ``e``."""
    if isinstance(e, dcp_exception_type()) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def safe_load_planner(path: str):
    """A DefaultLoadPlanner for ``dcp.load`` that reads non-tensor entries only with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    planner = _safe_planner(DefaultLoadPlanner)()
    planner._fatrain_path = path
    return planner


def _check(state, path: str, keys=("model", "spec", "step", "config")) -> dict:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DamagedCheckpointError(f"checkpoint {path} is not a fatrain checkpoint (no 'format' marker)")
    for key in keys:
        if key not in state:
            raise DamagedCheckpointError(f"checkpoint {path} lacks '{key}'")
    return state


def load_metadata(path: str) -> dict:
    """A ``.dcp`` checkpoint's metadata (everything but the model and optimizer tensors)."""
    meta_path = os.path.join(path, DCP_META)
    if not os.path.isfile(meta_path):
        raise DamagedCheckpointError(f"checkpoint {path} lacks {DCP_META} (an unfinished or foreign DCP folder)")
    return _check(_read(meta_path, "cpu"), path, keys=("spec", "step", "config"))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and sanity-check a checkpoint of either kind into one plain dict; raise CheckpointError.

    A ``.dcp`` folder is gathered into full (unsharded) tensors on the CPU without a process
    group: the same keys as a ``.pt`` file, with the optimizer state keyed by parameter name.
    """
    if is_sharded(path):
        state = load_metadata(path)
        check_dcp_metadata(path)
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        # What dcp_to_torch_save does (torch 2.13: these two private names), without its temporary
        # file and its torch.load(weights_only=False), and with the safe planner.
        planner = _safe_planner(_EmptyStateDictLoadPlanner)()
        planner._fatrain_path = path
        tensors: dict = {}
        try:
            _load_state_dict(tensors, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
        except (Exception, dcp_exception_type()) as e:
            e = dcp_cause(e)
            if isinstance(e, CheckpointError):
                raise e from None
            raise DamagedCheckpointError(f"checkpoint {path}: the sharded tensors are unreadable: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if map_location not in (None, "cpu"):
            tensors = _to(tensors, map_location)
        return {**state, **tensors}
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return _check(_read(path, map_location), path)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _fsync_dir(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves ``ckpt_<step>.pt`` files or ``ckpt_<step>.dcp`` folders in ``folder``; keeps the newest ``keep_last``."""

    def __init__(self, folder: str, keep_last: int = 3):
        self.folder = folder
        self.keep_last = keep_last

    def path_for(self, step: int, suffix: str = ".pt") -> str:
        return os.path.join(self.folder, f"ckpt_{step:08d}{suffix}")

    def save(self, state: dict, step: int) -> str:
        """Write one ``.pt`` file (call on the one rank that writes)."""
        path = self.path_for(step)
        atomic_save({"format": FORMAT, **state}, path)
        self._prune()
        return path

    def save_sharded(self, sharded: dict, meta: dict, step: int) -> str:
        """Write a ``.dcp`` folder; every rank calls this (``dcp.save`` is a collective).

        ``sharded`` holds the DTensor state dicts (``get_state_dict``), ``meta`` the rest;
        rank 0 writes ``meta`` and publishes the folder by renaming it after all shards are in.
        """
        import torch.distributed.checkpoint as dcp

        path = self.path_for(step, DCP_SUFFIX)
        tmp = path + ".tmp"
        main = _rank() == 0
        if main:
            _remove(tmp)  # left by a crash mid-save
            os.makedirs(self.folder, exist_ok=True)
        _barrier()
        try:
            dcp.save(sharded, checkpoint_id=tmp)
        except (Exception, dcp_exception_type()) as e:
            error = as_write_error(path, dcp_cause(e))
            if not isinstance(error, RunWriteError):
                raise
            raise error from None
        _barrier()  # NOTE: dcp.save ends with its own collective; this one orders it before the rename
        if main:
            atomic_save({"format": FORMAT, **meta}, os.path.join(tmp, DCP_META))
            if os.path.lexists(path):  # the same step saved again: move the old one aside first
                os.replace(path, path + ".old.tmp")
            os.replace(tmp, path)
            _fsync_dir(self.folder)
            self._prune()
        _barrier()
        return path

    def _prune(self) -> None:
        for old in list_checkpoints(self.folder)[: -self.keep_last]:
            _remove(old)
        for stray in glob.glob(os.path.join(self.folder, "*.tmp")):
            _remove(stray)

    def latest(self) -> str | None:
        found = list_checkpoints(self.folder)
        return found[-1] if found else None
