"""The on-disk token store: a corpus tokenised once, memory-mapped by every run that trains on it.

One store is one folder ``<cache>/tokens/<name>-<key>/``:

    manifest.json        format version, the key's parts (corpus, tokenizer fingerprint, separator),
                         token dtype, vocab size, EOT id, token and document counts, the shards
    tokens-00000.bin     raw little-endian tokens, ``shard_tokens`` per shard (the last one shorter):
    tokens-00001.bin     uint16 when the vocabulary fits in 16 bits, uint32 otherwise
    documents.bin        int64, one per document: the stream offset of its first token
    doc_lengths.csv      the document-length distribution (how many documents reach each
    doc_lengths.md       context length), as a table and as a histogram, for the user to read
    doc_lengths.png

A store is written into a temporary folder beside its final name and renamed into place when
every file is complete, so a store that exists under its final name is whole; an interrupted
tokenisation leaves only a ``.tmp-`` folder that no run reads (and the next build removes when
the process that wrote it is gone). Opening a store checks the manifest against the key and
every file's size against the manifest, so a store from another tokenizer or format, or a
truncated shard, fails with one line instead of training on wrong tokens.

Tokenisation runs in ``num_proc`` worker processes over batches of documents; the results are
written in input order, so the store is the same for any ``num_proc``.

Reading: ``StoreTokens`` and ``StoreDocIds`` are array-like views of a run of document pieces
(all documents, the documents at least ``min_doc_tokens`` long, or one split of those). A view
maps stream positions to store positions through one ``searchsorted`` over per-piece offsets, so
it costs memory per document, never per token; tokens are read from the memory map only when
indexed.

Caution / known limits: a document is tokenised as one string, so a single document must fit in
memory (split a huge file with data.document_separator). Two processes that build the same store
at the same time serialise on a lock file; the second one opens what the first wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import multiprocessing
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

#: Bump when the files of a store change meaning, so a store of another layout is refused.
STORE_FORMAT = 2

#: Default tokens per shard file (512 MiB of uint16).
DEFAULT_SHARD_TOKENS = 1 << 28

#: Context lengths the document-length table reports.
LENGTH_EDGES = (1, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)


class StoreError(ValueError):
    """A store that cannot be written or used; the message is one line naming the setting."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ----- writing -----------------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(load: Callable, spec: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_TOKENIZER = load(spec)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _WORKER_TOKENIZER.encode_arrays(texts)


class _ShardWriter:
    """Appends documents to shard files and their start offsets to documents.bin."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, eot_id: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.eot = np.array([eot_id], dtype=dtype)
        self.shards: list[list] = []  # [name, tokens]
        self.num_tokens = 0
        self.num_documents = 0
        self._file = None
        self._documents = open(folder / "documents.bin", "wb")

    def _write_tokens(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1][1] == self.shard_tokens:
                if self._file is not None:
                    self._file.close()
                name = f"tokens-{len(self.shards):05d}.bin"
                self._file = open(self.folder / name, "wb")
                self.shards.append([name, 0])
            room = self.shard_tokens - self.shards[-1][1]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.tobytes())
            self.shards[-1][1] += len(part)
            self.num_tokens += len(part)

    def add(self, documents: Sequence[np.ndarray]) -> None:
        starts = np.empty(len(documents), dtype=np.int64)
        for i, ids in enumerate(documents):
            starts[i] = self.num_tokens
            self._write_tokens(np.concatenate([ids.astype(self.dtype, copy=False), self.eot]))
        self._documents.write(starts.astype("<i8").tobytes())
        self.num_documents += len(documents)

    def close(self) -> None:
        for f in (self._file, self._documents):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._file = None


def _encoded_batches(batches: Iterable[list[str]], tokenizer, tokenizer_spec: str, load: Callable,
                     num_proc: int) -> Iterator[list[np.ndarray]]:
    if num_proc <= 1:
        for texts in batches:
            yield tokenizer.encode_arrays(texts)
        return
    # NOTE: fork keeps start-up cheap (no re-import of torch); each worker loads its own tokenizer
    # so no tokenizer state (or thread pool) crosses the fork.
    context = multiprocessing.get_context("fork")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(load, tokenizer_spec)) as pool:
        yield from pool.imap(_encode_in_worker, batches, chunksize=1)


def _remove_stale_temps(parent: Path, final_name: str) -> None:
    for tmp in parent.glob(f".tmp-{final_name}-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _build_lock(parent: Path, final_name: str):
    with open(parent / f".{final_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_store(final: Path, *, key_parts: dict, batches: Iterable[list[str]], tokenizer, tokenizer_spec: str,
                load_tokenizer: Callable, num_proc: int, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                progress: Optional[Callable[[list[str]], float]] = None, total: Optional[float] = None,
                unit: str = "B", cache_setting: str = "data.cache_dir") -> Path:
    """Tokenise ``batches`` (lists of document texts) into the store folder ``final``, atomically.

    ``progress(texts)`` says how much of ``total`` a batch is (bytes by default) for the bar.
    Nothing is written under ``final`` unless every file is complete; any failure removes the
    temporary folder. A full disk raises StoreError naming ``cache_setting``.
    """
    from tqdm.auto import tqdm

    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(parent, final.name):
        if final.exists():  # another process built it while this one waited
            return final
        _remove_stale_temps(parent, final.name)
        tmp = parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.perf_counter()
        try:
            dtype = token_dtype(tokenizer.vocab_size)
            writer = _ShardWriter(tmp, dtype, shard_tokens, tokenizer.eot_id)
            bar = tqdm(total=total, unit=unit, unit_scale=True, desc="tokenising", dynamic_ncols=True)
            batches = _measured(batches, progress, bar)
            for encoded in _encoded_batches(batches.iterator, tokenizer, tokenizer_spec, load_tokenizer, num_proc):
                writer.add(encoded)
            bar.close()
            writer.close()
            manifest = {
                "format": STORE_FORMAT, "key": key_parts, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                "eot_id": tokenizer.eot_id, "num_tokens": writer.num_tokens, "num_documents": writer.num_documents,
                "shard_tokens": shard_tokens, "shards": writer.shards,
            }
            lengths = document_lengths(np.fromfile(tmp / "documents.bin", dtype="<i8"), writer.num_tokens)
            write_length_distribution(lengths, tmp)
            _write_json(tmp / "manifest.json", manifest)
            os.rename(tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(parent).free
                raise StoreError(
                    f"{cache_setting}={str(parent.parent)!r}: the disk filled while writing the token store "
                    f"({free / 1e6:.0f} MB free); free space or point {cache_setting} at a larger disk"
                ) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    seconds = time.perf_counter() - started
    size = store_size(final)
    rate = f", {total / 1e6 / seconds:.1f} MB/s" if unit == "B" and total and seconds > 0 else ""
    print(f"token store: {manifest['num_tokens']:,} tokens, {manifest['num_documents']:,} documents, "
          f"{size / 1e6:.1f} MB on disk, {seconds:.1f} s{rate} -> {final}", flush=True)
    return final


class _measured:
    """Wraps the batch iterator to advance the progress bar as the input is consumed."""

    def __init__(self, batches, progress, bar):
        def iterator():
            for texts in batches:
                bar.update(progress(texts) if progress else len(texts))
                yield texts

        self.iterator = iterator()


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def store_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ----- document-length distribution ---------------------------------------------------------------


def document_lengths(starts: np.ndarray, num_tokens: int) -> np.ndarray:
    """Tokens per document (EOT included) from the start offsets."""
    return np.diff(np.append(np.asarray(starts, dtype=np.int64), num_tokens))


def length_table(lengths: np.ndarray) -> list[dict]:
    """Per context length L: how many documents (and what share of tokens) have at least L tokens."""
    lengths = np.sort(np.asarray(lengths, dtype=np.int64))
    total_docs, total_tokens = len(lengths), int(lengths.sum())
    suffix_tokens = np.concatenate([np.cumsum(lengths[::-1])[::-1], [0]])
    rows = []
    for edge in LENGTH_EDGES:
        first = int(np.searchsorted(lengths, edge, side="left"))
        docs = total_docs - first
        rows.append({"min_tokens": edge, "documents": docs,
                     "documents_pct": 100.0 * docs / total_docs if total_docs else 0.0,
                     "tokens_pct": 100.0 * int(suffix_tokens[first]) / total_tokens if total_tokens else 0.0})
        if docs == 0:
            break
    return rows


def write_length_distribution(lengths: np.ndarray, folder: Path) -> None:
    """doc_lengths.csv, doc_lengths.md and the histogram doc_lengths.png in ``folder``."""
    rows = length_table(lengths)
    with open(folder / "doc_lengths.csv", "w") as f:
        f.write("min_tokens,documents,documents_pct,tokens_pct\n")
        for r in rows:
            f.write(f"{r['min_tokens']},{r['documents']},{r['documents_pct']:.3f},{r['tokens_pct']:.3f}\n")
    stats = (f"{len(lengths):,} documents, {int(lengths.sum()):,} tokens; median "
             f"{int(np.median(lengths)) if len(lengths) else 0:,}, longest {int(lengths.max()) if len(lengths) else 0:,} tokens")
    with open(folder / "doc_lengths.md", "w") as f:
        f.write(f"# Document lengths\n\n{stats}\n\n| documents with >= tokens | documents | % of documents | % of tokens |\n"
                "|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['min_tokens']:,} | {r['documents']:,} | {r['documents_pct']:.1f} | {r['tokens_pct']:.1f} |\n")
    _plot_lengths(lengths, folder / "doc_lengths.png", stats)


def _plot_lengths(lengths: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(lengths):
        top = max(2.0, float(lengths.max()))
        bins = np.unique(np.logspace(0, np.log10(top), 40).astype(np.int64))
        ax.hist(lengths, bins=np.append(bins, bins[-1] + 1))
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens, EOT included)")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----- reading -----------------------------------------------------------------------------------


class TokenStore:
    """An opened, checked store: its manifest, a memory map per shard, the document offsets."""

    def __init__(self, folder: Path, *, key_parts: dict, setting: str):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"{setting}: the token store {self.folder} has no readable manifest.json "
                             f"({type(err).__name__}); delete the folder to tokenise again") from None
        m = self.manifest
        if m.get("format") != STORE_FORMAT:
            raise StoreError(f"{setting}: the token store {self.folder} has format {m.get('format')}, this fatrain reads "
                             f"format {STORE_FORMAT}; delete the folder to tokenise again")
        if m.get("key") != key_parts:
            theirs, ours = m.get("key", {}), key_parts
            what = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
            name = "data.tokenizer" if "tokenizer" in what else setting
            raise StoreError(f"{name}: the token store {self.folder} was written for another {', '.join(what)} "
                             f"than these settings give; delete the folder to tokenise again")
        self.dtype = np.dtype(m["dtype"])
        self.num_tokens = int(m["num_tokens"])
        self.num_documents = int(m["num_documents"])
        self.vocab_size = int(m["vocab_size"])
        self.shard_tokens = int(m["shard_tokens"])
        self._check_size("documents.bin", self.num_documents * 8, setting)
        for name, count in m["shards"]:
            self._check_size(name, count * self.dtype.itemsize, setting)
        counts = [count for _, count in m["shards"]]
        if sum(counts) != self.num_tokens or any(c != self.shard_tokens for c in counts[:-1]):
            raise StoreError(f"{setting}: the token store {self.folder} lists shards that do not add up to its "
                             f"{self.num_tokens} tokens; delete the folder to tokenise again")
        self._shards = [np.memmap(self.folder / name, dtype=self.dtype, mode="r", shape=(count,))
                        for name, count in m["shards"] if count]
        starts = (np.memmap(self.folder / "documents.bin", dtype="<i8", mode="r", shape=(self.num_documents,))
                  if self.num_documents else np.empty(0, dtype=np.int64))
        # One integer per document, held in memory: the views below search it every step.
        self.doc_starts = np.array(starts, dtype=np.int64)

    def _check_size(self, name: str, expected: int, setting: str) -> None:
        path = self.folder / name
        actual = path.stat().st_size if path.exists() else None
        if actual != expected:
            raise StoreError(f"{setting}: the token store file {path} holds {actual} bytes, its manifest says "
                             f"{expected} (truncated or changed); delete {self.folder} to tokenise again")

    def document_lengths(self) -> np.ndarray:
        return document_lengths(self.doc_starts, self.num_tokens)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at store positions ``positions`` (any shape), as int64."""
        flat = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty(flat.shape, dtype=np.int64)
        if flat.size == 0:
            return out.reshape(np.shape(positions))
        shard = flat // self.shard_tokens
        first, last = int(shard.min()), int(shard.max())
        if first == last:  # the common case: a batch inside one shard
            out[:] = self._shards[first][flat - first * self.shard_tokens]
        else:
            for s in np.unique(shard):
                mask = shard == s
                out[mask] = self._shards[s][flat[mask] - int(s) * self.shard_tokens]
        return out.reshape(np.shape(positions))

    def pieces(self, min_doc_tokens: int = 0) -> "Pieces":
        """Every document at least ``min_doc_tokens`` long (EOT included), as one stream."""
        lengths = self.document_lengths()
        keep = np.flatnonzero(lengths >= max(1, min_doc_tokens))
        return Pieces(np.concatenate([[0], np.cumsum(lengths[keep])]), self.doc_starts[keep])


class Pieces:
    """A stream made of pieces of the store: piece ``j`` is stream ``[vstart[j], vstart[j+1])``,
    stored from store position ``pstart[j]`` on. A piece is a document or a part of one."""

    def __init__(self, vstart: np.ndarray, pstart: np.ndarray):
        self.vstart = np.asarray(vstart, dtype=np.int64)
        self.pstart = np.asarray(pstart, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pstart)

    @property
    def num_tokens(self) -> int:
        return int(self.vstart[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.vstart)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(piece index, store position) of each stream position."""
        piece = np.searchsorted(self.vstart, positions, side="right") - 1
        return piece, self.pstart[piece] + (positions - self.vstart[piece])

    def slice(self, lo: int, hi: int) -> "Pieces":
        """The stream positions ``[lo, hi)`` as a stream of their own (cut pieces included)."""
        lo, hi = max(0, lo), min(self.num_tokens, hi)
        if hi <= lo:
            return Pieces(np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.int64))
        first = int(np.searchsorted(self.vstart, lo, side="right")) - 1
        last = int(np.searchsorted(self.vstart, hi, side="left"))  # one past the piece holding hi - 1
        vstart = self.vstart[first:last + 1].copy()
        pstart = self.pstart[first:last].copy()
        pstart[0] += lo - vstart[0]
        vstart[0], vstart[-1] = lo, hi
        return Pieces(vstart - lo, pstart)


class _StreamView:
    """Array-like over a ``Pieces`` stream: len, shape, slicing (a view), integer-array indexing."""

    ndim = 1

    def __init__(self, store: TokenStore, pieces: Pieces):
        self.store, self.pieces = store, pieces

    def __len__(self) -> int:
        return self.pieces.num_tokens

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a token stream view is sliced with step 1 only")
            return type(self)(self.store, self.pieces.slice(start, stop))
        positions = np.asarray(key, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"position out of range for a stream of {len(self)} tokens")
        return self._values(positions)

    def __array__(self, dtype=None, copy=None):
        values = self._values(np.arange(len(self), dtype=np.int64))
        return values if dtype is None else values.astype(dtype)


class StoreTokens(_StreamView):
    """The tokens of a stream, read from the store's memory map when indexed."""

    dtype = np.dtype(np.int64)

    def _values(self, positions: np.ndarray) -> np.ndarray:
        return self.store.take(self.pieces.locate(positions)[1])


class StoreDocIds(_StreamView):
    """The index, within the stream, of the document each position belongs to."""

    dtype = np.dtype(np.int64)

    def _values(self, positions: np.ndarray) -> np.ndarray:
        return self.pieces.locate(positions)[0]
