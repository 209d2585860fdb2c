"""Data: text -> tokens -> packed blocks with document ids -> a resumable, sharded loader.

One code path for every corpus, through Hugging Face ``datasets``:

    data.source=text   datasets.load_dataset("text", data_files=..., sample_by="document")
                       (a file is one document, or several when data.document_separator is set;
                       data.path is a file, a folder of .txt files, or a glob; None means the
                       embedded tinyshakespeare)
    data.source=hf     datasets.load_dataset(data.hf_name, data.hf_config, split=data.hf_split),
                       documents from the column data.text_field
        -> tokenise with Dataset.map(batched=True); each document's ids end with EOT
        -> the map's output is one Arrow file under <cache>/tokens/, keyed on the corpus
           (a content hash of the files, or the Hub dataset's fingerprint), the document
           separator, the text field and the tokenizer's own fingerprint; a second run memory-maps
           it and never calls the tokenizer
        -> one int32 token stream and a parallel document-index stream (EOT belongs to the
           document it ends)
        -> split by position: the last data.val_fraction of the stream is validation, so a
           single-document corpus still splits, and the split does not depend on the seed
        -> PackedBlocks: blocks of seq_len + 1 tokens at stride seq_len (input = block[:-1],
           labels = block[1:]); only the tail remainder of each split is unused
        -> BlockLoader: an infinite, seeded, rank-sharded, resumable stream of batches

<cache> is data.cache_dir, else $FATRAIN_CACHE, else ~/.cache/fatrain. The raw tables that
``datasets`` builds from local text go to <cache>/datasets; a Hub dataset stays in the
``datasets`` cache (HF_HOME), where an earlier download already lives.

Document ids in a batch are renumbered per block from 0, so ``doc_ids[b, t]`` says which of
the documents in block ``b`` token ``t`` belongs to; the attention mask and per-document RoPE
positions read them directly.

Caution / known limits: the whole token stream of a corpus is held in memory (4 bytes per
token plus 4 for its document id); a corpus far larger than RAM needs a memory-mapped stream.
Ranks that build the same corpus at the same time may both tokenise it; the cache file is
written to a temporary name and renamed, so the result is correct either way.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from fatrain import hub
from fatrain.config import DATA_SOURCES, PACKINGS, DataConfig
from fatrain.token_store import STORE_FORMAT, Pieces, StoreDocIds, StoreTokens, TokenStore, write_store

#: Special tokens tried, in order, as the end-of-text token of a Hugging Face tokenizer.
EOT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


# ----- tokenizers ------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus one end-of-text token (256). Needs no download."""

    name = "byte"
    eot_id = 256
    vocab_size = 257
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return self.encode_arrays([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self.encode_arrays(texts)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode to int32 arrays (what the data pipeline stores), without a Python list per token."""
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) for text in texts]

    def decode(self, ids) -> str:
        """Bytes to text; the EOT id (and anything >= 256) is dropped, bad UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a local tokenizer.json (file or folder) or a Hub name.

    ``encode`` adds no special tokens (the pipeline appends EOT itself); ``decode`` skips them.
    """

    def __init__(self, spec: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(
                f"data.tokenizer={spec!r} needs the 'tokenizers' package (pip install tokenizers), "
                "or use data.tokenizer=byte"
            ) from None
        self.name = spec
        self._tok = _load_hf_tokenizer(Tokenizer, spec)
        eot = next((t for t in EOT_TOKENS if self._tok.token_to_id(t) is not None), None)
        if eot is None:
            raise ValueError(
                f"data.tokenizer={spec!r} has no end-of-text token (looked for: {', '.join(EOT_TOKENS)})"
            )
        self.eot_id = self._tok.token_to_id(eot)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # The cache key hashes the tokenizer's full definition, not its name: a retrained
        # tokenizer.json at the same path must not reuse the old tokens.
        self.fingerprint = hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)


def _load_hf_tokenizer(tokenizer_cls, spec: str):
    path = Path(spec).expanduser()
    looks_like_path = path.is_absolute() or spec.startswith((".", "~")) or spec.endswith(".json")
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"data.tokenizer={spec!r} is a folder without a tokenizer.json")
        path = path / "tokenizer.json"
    elif looks_like_path and not path.exists():
        # Checked here so a mistyped path fails at once instead of being tried on the Hub.
        raise ValueError(f"data.tokenizer={spec!r} does not exist (use byte, a tokenizer.json, or a Hub name)")
    # Asked before the Hub is: without a network, from_pretrained then reads the cache at once.
    offline = None if path.is_file() else hub.offline_reason()
    try:
        if path.is_file():
            return tokenizer_cls.from_file(str(path))
        return tokenizer_cls.from_pretrained(spec)
    except Exception as err:  # tokenizers raises plain Exception for every failure
        if offline is not None:
            raise hub.not_cached_error(f"data.tokenizer={spec!r}", f"the tokenizer {spec}", hub.hub_cache(),
                                       hub.tokenizer_download_command(spec), offline,
                                       "data.tokenizer=byte or a local tokenizer.json") from None
        raise ValueError(
            f"data.tokenizer={spec!r} could not be loaded (use byte, a tokenizer.json file or folder, "
            f"or a Hub name): {_first_line(err)}"
        ) from None


def load_tokenizer(spec: str):
    """``"byte"`` -> ByteTokenizer; anything else is a tokenizer.json path or a Hub name."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


# ----- packed blocks -----------------------------------------------------------------------------


class PackedBlocks:
    """One split's token stream cut into blocks of ``seq_len + 1`` tokens.

    By default (data.packing=concat) block ``i`` covers stream positions ``[i * seq_len, (i + 1) *
    seq_len]`` (inclusive): its inputs are the first ``seq_len`` tokens, its labels the last
    ``seq_len``, so the inputs of consecutive blocks tile the stream and every token is a label
    exactly once. With ``starts`` (data.packing=doc_start) block ``i`` begins at ``starts[i]``.

    ``tokens`` and ``doc_ids`` are 1-d arrays or the token store's array-like views
    (``StoreTokens``, ``StoreDocIds``), which read the memory map only for the blocks asked for.
    """

    def __init__(self, tokens, doc_ids, seq_len: int, *, starts: Optional[np.ndarray] = None):
        if tokens.shape != doc_ids.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} and doc_ids {doc_ids.shape} must be equal 1-d arrays")
        self.tokens = tokens
        self.doc_ids = doc_ids
        self.seq_len = seq_len
        self.starts = None if starts is None else np.asarray(starts, dtype=np.int64)
        self._num_blocks = max(0, (len(tokens) - 1) // seq_len) if starts is None else len(self.starts)
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return self._num_blocks

    @property
    def num_tokens(self) -> int:
        """Tokens in this split's stream (the blocks use ``len(self) * seq_len + 1`` of them)."""
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        batch = self.gather(np.array([i % len(self)]))
        return {key: value[0] for key, value in batch.items()}

    def gather(self, indices) -> dict[str, torch.Tensor]:
        """Blocks ``indices`` as a batch: input_ids, labels, doc_ids, each int64 (len(indices), seq_len)."""
        indices = np.asarray(indices, dtype=np.int64)
        first = indices * self.seq_len if self.starts is None else self.starts[indices]
        positions = first[:, None] + self._offsets
        block = self.tokens[positions].astype(np.int64)
        docs = self.doc_ids[positions[:, :-1]].astype(np.int64)
        # Document indices are consecutive and non-decreasing along the stream, so subtracting
        # the first one renumbers each block's documents 0, 1, 2, ...
        docs -= docs[:, :1]
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(block[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(block[:, 1:])),
            "doc_ids": torch.from_numpy(docs),
        }


@dataclass
class DataBundle:
    train: PackedBlocks
    val: PackedBlocks
    tokenizer: object
    vocab_size: int


# ----- loader ------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so that neighbouring seeds and epochs give unrelated
    # permutations; the result fits torch.Generator.manual_seed.
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _pinned(batch: dict[str, torch.Tensor], device: Optional[torch.device]) -> dict[str, torch.Tensor]:
    # Pinned host memory lets the host-to-GPU copy run without blocking, overlapping GPU work.
    if device is not None and device.type == "cuda":
        return {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _to_device(batch: dict[str, torch.Tensor], device: Optional[torch.device]) -> dict[str, torch.Tensor]:
    if device is None or device.type == "cpu":
        return batch
    if device.type == "cuda":
        return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


class BlockLoader:
    """An infinite iterator of training batches over ``blocks``; resumable and rank-sharded.

    The sample order is the concatenation of one permutation per epoch, drawn from
    ``(seed, epoch)`` with a ``torch.Generator`` (or ``0..n-1`` when ``shuffle=False``). Step
    ``k`` takes the global batch of samples ``[k * B * W, (k + 1) * B * W)`` from that order
    (a batch at the end of an epoch continues into the next), and rank ``r`` keeps its slice
    ``[r * B, (r + 1) * B)``. So ranks are disjoint, all ranks together cover each epoch, and
    the global batch is the same for any ``world_size`` with ``batch_size * world_size`` fixed.

    ``state_dict()`` is ``{"epoch", "position", "num_blocks"}``: the next global sample is
    ``position`` in epoch ``epoch``'s order. It does not depend on the rank or world size.

    While a step runs, one background thread reads the next step's blocks (this rank's only)
    from the token store into pinned memory, so the next ``__next__`` only starts a
    non-blocking copy. The prefetch never moves the state: it is the batches handed out.
    """

    def __init__(self, blocks: PackedBlocks, batch_size: int, *, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, device=None):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(blocks) == 0:
            raise ValueError("the split has no blocks: lower data.seq_len")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else None
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._prefetch = None  # (state it was drawn from, state after it, future batch)
        self._executor = None

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """The index of the next sample within the current epoch's order."""
        return self._position

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.blocks)
            if self.shuffle:
                generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                self._order = torch.randperm(n, generator=generator).numpy()
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _take_global(self, count: int) -> np.ndarray:
        n = len(self.blocks)
        parts = []
        while count > 0:
            order = self._epoch_order(self._epoch)
            take = min(count, n - self._position)
            parts.append(order[self._position:self._position + take])
            self._position += take
            count -= take
            if self._position == n:
                self._epoch, self._position = self._epoch + 1, 0
        return np.concatenate(parts)

    def __iter__(self) -> "BlockLoader":
        return self

    def _next_indices(self) -> np.ndarray:
        samples = self._take_global(self.batch_size * self.world_size)
        return samples[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def _read(self, mine: np.ndarray) -> dict[str, torch.Tensor]:
        return _pinned(self.blocks.gather(mine), self.device)

    def __next__(self) -> dict[str, torch.Tensor]:
        state = (self._epoch, self._position)
        if self._prefetch is not None and self._prefetch[0] == state:
            batch = self._prefetch[2].result()
            self._epoch, self._position = self._prefetch[1]
        else:
            batch = self._read(self._next_indices())
        self._start_prefetch()
        return _to_device(batch, self.device)

    def _start_prefetch(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fatrain-prefetch")
        state = (self._epoch, self._position)
        mine = self._next_indices()  # advances the state; put back below
        after = (self._epoch, self._position)
        self._epoch, self._position = state
        self._prefetch = (state, after, self._executor.submit(self._read, mine))

    def close(self) -> None:
        """Stop the prefetch thread (it also ends with the process)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor, self._prefetch = None, None

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "num_blocks": len(self.blocks)}

    def load_state_dict(self, state: dict) -> None:
        n = len(self.blocks)
        if state.get("num_blocks", n) != n:
            raise ValueError(
                f"the loader state was saved for {state['num_blocks']} blocks but this split has {n}: "
                "the data settings (data.*) differ from the checkpoint's"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < n:
            raise ValueError(f"loader state epoch={epoch}, position={position} is invalid for {n} blocks")
        self._epoch, self._position = epoch, position
        self._prefetch = None

    def eval_batches(self, max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        """Sequential batches from the first block on (see ``iter_once``); the state is untouched."""
        return iter_once(self.blocks, self.batch_size, max_batches=max_batches, rank=self.rank,
                         world_size=self.world_size, device=self.device)


def make_train_loader(train, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, device=None):
    """The training loader for ``DataBundle.train``: a BlockLoader over packed blocks, or a
    StreamingLoader over a streamed corpus (data.streaming=true)."""
    from fatrain.streaming import StreamingCorpus, StreamingLoader

    if isinstance(train, StreamingCorpus):
        return StreamingLoader(train, batch_size, rank=rank, world_size=world_size, device=device)
    return BlockLoader(train, batch_size, seed=seed, rank=rank, world_size=world_size, device=device)


def iter_once(blocks: PackedBlocks, batch_size: int, *, max_batches: Optional[int] = None,
              rank: int = 0, world_size: int = 1, device=None) -> Iterator[dict[str, torch.Tensor]]:
    """One deterministic, sequential pass over ``blocks``, for validation.

    Rank ``r`` reads blocks ``r, r + W, r + 2W, ...`` of the first ``(n // W) * W`` blocks, in
    batches of ``batch_size`` (the last one may be smaller), at most ``max_batches`` of them.
    Every rank gets the same number of batches of the same sizes, so collectives line up.
    """
    per_rank = len(blocks) // world_size
    if per_rank == 0:
        raise ValueError(f"the split has {len(blocks)} blocks, fewer than world_size={world_size}")
    mine = np.arange(per_rank) * world_size + rank
    device = torch.device(device) if device is not None else None
    for count, start in enumerate(range(0, per_rank, batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        yield _to_device(blocks.gather(mine[start:start + batch_size]), device)


# ----- building the data -------------------------------------------------------------------------


def _root_cause(err: BaseException) -> BaseException:
    # datasets wraps failures (DatasetGenerationError); the root cause says what went wrong.
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _first_line(err: BaseException) -> str:
    err = _root_cause(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $FATRAIN_CACHE, else ~/.cache/fatrain."""
    root = cfg.cache_dir or os.environ.get("FATRAIN_CACHE") or "~/.cache/fatrain"
    return Path(root).expanduser()


def embedded_corpus() -> Path:
    """The path of the packaged tinyshakespeare (setuptools package data, a real file on disk)."""
    return Path(str(resources.files("fatrain").joinpath("data_files", "tinyshakespeare.txt")))


def resolve_text_files(path: Optional[str]) -> list[Path]:
    """data.path -> the sorted list of files it names (a file, a folder's *.txt, or a glob)."""
    if path is None:
        return [embedded_corpus()]
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = sorted(p for p in Path(expanded).glob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"data.path={path!r} is a folder with no .txt files (give a file, a folder of .txt files, or a glob)")
        return files
    if os.path.isfile(expanded):
        return [Path(expanded)]
    if glob.has_magic(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"data.path={path!r} matches no files")
        return files
    raise ValueError(f"data.path={path!r} does not exist (give a text file, a folder of .txt files, or a glob)")


def _hash_files(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0end-of-file\0")
    return digest.hexdigest()


def _load_raw(cfg: DataConfig, *, streaming: bool = False):
    """The Hugging Face dataset data.hf_name names (data.source=hf), checked for data.text_field."""
    import datasets

    if not cfg.hf_name:
        raise ValueError("data.hf_name must be set when data.source='hf' (a Hub dataset name or a local dataset folder)")
    # A Hub name (not a local folder): without a network, datasets then reads its cache at once.
    offline = None if os.path.exists(os.path.expanduser(cfg.hf_name)) else hub.offline_reason()
    try:
        raw = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=streaming)
    except Exception as err:
        if offline is not None and isinstance(_root_cause(err), (FileNotFoundError, ConnectionError)):
            what = f"the dataset {cfg.hf_name}" + (f" ({cfg.hf_config})" if cfg.hf_config else "")
            raise hub.not_cached_error(f"data.hf_name={cfg.hf_name!r}", what, hub.datasets_cache(),
                                       hub.dataset_download_command(cfg.hf_name, cfg.hf_config, cfg.hf_split),
                                       offline, "data=text with local files") from None
        raise ValueError(
            f"data.hf_name={cfg.hf_name!r} (data.hf_config={cfg.hf_config!r}, data.hf_split={cfg.hf_split!r}) "
            f"could not be loaded: {_first_line(err)}"
        ) from None
    columns = raw.column_names
    if columns is None:  # a streamed dataset whose columns are known only from its first row
        columns = list(next(iter(raw.take(1)), {}).keys())
    if cfg.text_field not in columns:
        raise ValueError(
            f"data.text_field={cfg.text_field!r} is not a column of {cfg.hf_name!r} (columns: {', '.join(columns)})"
        )
    return raw


#: The escapes a separator given on the command line may use (Hydra passes '\n' as two characters).
SEPARATOR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}


def decode_separator(value: Optional[str]) -> Optional[str]:
    """data.document_separator with its escapes (\\n, \\t, \\r, \\0, \\\\) turned into the characters."""
    if value is None:
        return None
    out, i = [], 0
    while i < len(value):
        char = value[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        escape = value[i + 1:i + 2]
        if escape not in SEPARATOR_ESCAPES:
            shown = "\\" + escape if escape else "a trailing \\"
            raise ValueError(f"data.document_separator={value!r} has the unknown escape {shown!r} "
                             "(allowed: \\n, \\t, \\r, \\0, \\\\ for a backslash)")
        out.append(SEPARATOR_ESCAPES[escape])
        i += 2
    if not out:
        raise ValueError("data.document_separator='' is empty: give a string, or null for one document per file")
    return "".join(out)


def _file_documents(path: Path, separator: Optional[str], setting: str) -> Iterator[str]:
    """The documents of one file, read in chunks when a separator splits it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        if separator is None:
            text = path.read_bytes().decode("utf-8")
            if text.strip():  # an empty or whitespace-only file is not a document
                yield text
            return
        carry = ""
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                carry += decoder.decode(chunk)
                parts = carry.split(separator)
                carry = parts.pop()
                yield from (p for p in parts if p.strip())
        carry += decoder.decode(b"", final=True)
        if carry.strip():
            yield carry
    except UnicodeDecodeError as err:
        raise ValueError(f"{setting} could not be read as UTF-8 text: {path.name}: {err.reason} at byte {err.start}") from None


def _batched(documents: Iterator[str], batch_chars: int = 1 << 22) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _text_documents(files: Sequence[Path], separator: Optional[str], setting: str) -> Iterator[str]:
    for file in files:
        yield from _file_documents(file, separator, setting)


def _split_documents(texts, separator: Optional[str]) -> list[str]:
    docs = []
    for text in texts:
        parts = [text or ""] if separator is None else (text or "").split(separator)
        # Whitespace-only pieces (an empty row, the newline after a final separator) are not documents.
        docs.extend(p for p in parts if p.strip())
    return docs


def _hf_batches(raw, text_field: str, separator: Optional[str]) -> Iterator[list[str]]:
    for batch in raw.iter(batch_size=1000):
        docs = _split_documents(batch[text_field], separator)
        if docs:
            yield docs


def default_num_proc() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def store_key(cfg: DataConfig, tokenizer) -> tuple[dict, Optional[list[Path]], object]:
    """(the key's parts, the text files or None, the loaded HF dataset or None) for ``cfg``."""
    files = resolve_text_files(cfg.path) if cfg.source == "text" else None
    raw = None
    if cfg.source == "text":
        corpus = {"files": _hash_files(files)}
    else:
        raw = _load_raw(cfg)
        # NOTE: _fingerprint is datasets' own hash of the loaded dataset (builder config,
        # revision, split); it is the identity datasets itself uses for its caches.
        corpus = {"hf": raw._fingerprint, "text_field": cfg.text_field}
    key_parts = {"format": STORE_FORMAT, "corpus": corpus, "separator": decode_separator(cfg.document_separator),
                 "tokenizer": tokenizer.fingerprint}
    return key_parts, files, raw


def store_folder(cfg: DataConfig, tokenizer, key_parts: dict) -> Path:
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{cfg.name}-{tokenizer.name}")[-80:]
    return cache_root(cfg) / "tokens" / f"{safe_name}-{key}"


def open_token_store(cfg: DataConfig, tokenizer) -> TokenStore:
    """The corpus ``cfg`` names as a token store: opened when one exists, else tokenised first."""
    key_parts, files, raw = store_key(cfg, tokenizer)
    folder = store_folder(cfg, tokenizer, key_parts)
    if not folder.exists():
        separator = decode_separator(cfg.document_separator)
        num_proc = cfg.num_proc or default_num_proc()
        if cfg.source == "text":
            setting = f"data.path={cfg.path!r}" if cfg.path is not None else "data.path=None (tinyshakespeare)"
            batches = _batched(_text_documents(files, separator, setting))
            total, unit = float(sum(f.stat().st_size for f in files)), "B"
            progress = lambda texts: float(sum(len(t) for t in texts))  # noqa: E731 (characters ~ bytes)
        else:
            batches = _hf_batches(raw, cfg.text_field, separator)
            total, unit, progress = None, "docs", None
        write_store(folder, key_parts=key_parts, batches=batches, tokenizer=tokenizer, tokenizer_spec=cfg.tokenizer,
                    load_tokenizer=load_tokenizer, num_proc=num_proc, shard_tokens=cfg.shard_tokens,
                    progress=progress, total=total, unit=unit, cache_setting="data.cache_dir")
    return TokenStore(folder, key_parts=key_parts, setting=f"data.cache_dir={str(cache_root(cfg))!r}")


def _check_settings(cfg: DataConfig) -> None:
    if cfg.source not in DATA_SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is not allowed (choose from: {', '.join(DATA_SOURCES)})")
    if cfg.seq_len <= 0:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be > 0")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if cfg.packing not in PACKINGS:
        raise ValueError(f"data.packing={cfg.packing!r} is not allowed (choose from: {', '.join(PACKINGS)})")
    if cfg.min_doc_tokens < 0:
        raise ValueError(f"data.min_doc_tokens={cfg.min_doc_tokens} must be >= 0 (0 keeps every document)")
    if cfg.num_proc is not None and cfg.num_proc <= 0:
        raise ValueError(f"data.num_proc={cfg.num_proc} must be > 0 (or null: the CPUs available)")
    if cfg.shard_tokens <= 0:
        raise ValueError(f"data.shard_tokens={cfg.shard_tokens} must be > 0")
    decode_separator(cfg.document_separator)


def _check_split_sizes(cfg: DataConfig, num_train: int, num_val: int) -> None:
    block = cfg.seq_len + 1
    if num_train >= block and num_val >= block:
        return
    total = num_train + num_val
    longest = min(num_train, num_val) - 1
    if longest < 1:
        raise ValueError(
            f"the dataset has only {total} tokens, too few for a training and a validation block "
            f"(data.val_fraction={cfg.val_fraction}); use a larger corpus"
        )
    if num_train >= block and total >= 2 * block:
        # Only validation is short, and a larger validation fraction would fix it.
        needed = math.ceil(block / total * 1e4) / 1e4
        while int(total * needed) < block:  # float rounding can land one token short
            needed = round(needed + 1e-4, 4)
        raise ValueError(
            f"data.val_fraction={cfg.val_fraction} leaves {num_val} validation tokens, fewer than one block of "
            f"data.seq_len+1={block}: raise data.val_fraction to at least {needed} or lower data.seq_len to at most {longest}"
        )
    split = "training" if num_train < num_val else "validation"
    raise ValueError(
        f"data.seq_len={cfg.seq_len} is longer than the corpus can fill: the {split} split has "
        f"{min(num_train, num_val)} tokens, so data.seq_len can be at most {longest} "
        f"(with data.val_fraction={cfg.val_fraction})"
    )


def _doc_start_blocks(pieces: Pieces, seq_len: int) -> np.ndarray:
    """Block starts for data.packing=doc_start: each document gives the blocks that fit inside it,
    the first at its first token, the next ``seq_len`` later, ...; a shorter remainder is unused."""
    counts = (pieces.lengths() - 1) // seq_len
    total = int(counts.sum())
    first_of_piece = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(pieces.vstart[:-1], counts) + seq_len * (np.arange(total, dtype=np.int64) - first_of_piece)


def _where(cfg: DataConfig) -> str:
    return f"data.path={cfg.path!r}" if cfg.source == "text" else f"data.hf_name={cfg.hf_name!r} ({cfg.text_field!r})"


def build_data(cfg: DataConfig, *, seed: int) -> DataBundle:
    """Tokenise into a token store (or open the existing one), select, split and pack the corpus.

    ``seed`` does not enter: the split is by position, so validation is the same set of
    tokens for every seed and validation losses compare across seeds. Order comes from
    ``BlockLoader(..., seed=...)``.
    """
    del seed
    _check_settings(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.streaming:
        from fatrain.streaming import build_streaming_data

        return build_streaming_data(cfg, tokenizer)
    store = open_token_store(cfg, tokenizer)
    if store.num_tokens == 0:
        raise ValueError(f"{_where(cfg)} holds no text: the dataset has no tokens")
    pieces = store.pieces(cfg.min_doc_tokens)
    if len(pieces) == 0:
        longest = int(store.document_lengths().max())
        raise ValueError(f"data.min_doc_tokens={cfg.min_doc_tokens}: no document of {_where(cfg)} is that long "
                         f"(the longest has {longest} tokens, EOT included)")
    total = pieces.num_tokens
    num_val = int(total * cfg.val_fraction)
    num_train = total - num_val
    _check_split_sizes(cfg, num_train, num_val)
    splits = {}
    for name, part in (("train", pieces.slice(0, num_train)), ("val", pieces.slice(num_train, total))):
        starts = None
        if cfg.packing == "doc_start":
            starts = _doc_start_blocks(part, cfg.seq_len)
            if len(starts) == 0:
                longest = int(part.lengths().max())
                raise ValueError(
                    f"data.packing=doc_start with data.seq_len={cfg.seq_len}: no document of the {name} split has "
                    f"data.seq_len+1={cfg.seq_len + 1} tokens (the longest has {longest}); lower data.seq_len, "
                    "or use data.packing=concat"
                )
        splits[name] = PackedBlocks(StoreTokens(store, part), StoreDocIds(store, part), cfg.seq_len, starts=starts)
    return DataBundle(train=splits["train"], val=splits["val"], tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)
