"""Streaming (data.streaming=true): a Hugging Face IterableDataset tokenised on the fly and packed.

For corpora that do not fit on disk. Nothing is tokenised ahead of time and no token store is
written:

    datasets.load_dataset(data.hf_name, data.hf_config, split=data.hf_split, streaming=True)
        -> validation: the stream's first examples, up to data.streaming_val_tokens tokens, read
           the same way on every rank and held in memory (the same tokens for every seed)
        -> training: the examples after those, split across ranks with
           datasets.distributed.split_dataset_by_node (whole shards per rank where the shard
           count allows, else every world_size-th example), so ranks never share an example
        -> each example's documents (data.document_separator, data.min_doc_tokens) tokenised
           and ended with EOT, appended to a small buffer, cut into blocks of seq_len + 1
           tokens at stride seq_len (data.packing=concat), document ids renumbered per block

The resume state is ``{"pass", "dataset", "offset"}``: datasets' own ``state_dict()`` taken
just before the oldest example still in the buffer, and how many of that example's tokens
were already used, so a resumed run continues at the same token. When the stream ends it starts
again from its first training example (``pass`` counts the passes).

Caution / known limits: no shuffling beyond the stream's own order; data.packing=doc_start is
not offered here; the state is per rank (resume with the same number of ranks).
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Optional

import numpy as np
import torch

from fatrain.config import DataConfig


def _example_documents(cfg: DataConfig, text) -> list[str]:
    from fatrain.data import _split_documents, decode_separator

    return _split_documents([text], decode_separator(cfg.document_separator))


def _encode_example(cfg: DataConfig, tokenizer, text) -> list[np.ndarray]:
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    docs = [np.concatenate([ids.astype(np.int64), eot]) for ids in tokenizer.encode_arrays(_example_documents(cfg, text))]
    return [d for d in docs if len(d) >= max(1, cfg.min_doc_tokens)]


class StreamingCorpus:
    """The training side of a streamed corpus: the examples after the validation ones."""

    def __init__(self, cfg: DataConfig, tokenizer, skip_examples: int):
        self.cfg, self.tokenizer, self.skip_examples = cfg, tokenizer, skip_examples
        self.seq_len = cfg.seq_len

    def dataset(self, rank: int, world_size: int):
        from datasets.distributed import split_dataset_by_node

        from fatrain.data import _load_raw

        ds = _load_raw(self.cfg, streaming=True).skip(self.skip_examples)
        return split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds


class StreamingLoader:
    """An infinite iterator of training batches from a ``StreamingCorpus``; resumable at the token."""

    def __init__(self, corpus: StreamingCorpus, batch_size: int, *, rank: int = 0, world_size: int = 1, device=None):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        self.corpus, self.batch_size, self.rank, self.world_size = corpus, batch_size, rank, world_size
        self.device = torch.device(device) if device is not None else None
        self._restart(pass_=0, dataset_state=None, offset=0)

    def _restart(self, *, pass_: int, dataset_state: Optional[dict], offset: int) -> None:
        self._ds = self.corpus.dataset(self.rank, self.world_size)
        if dataset_state is not None:
            self._ds.load_state_dict(copy.deepcopy(dataset_state))
        self._iter = iter(self._ds)
        self._pass, self._last_state = pass_, dataset_state
        self._buffer: deque = deque()  # (tokens, doc ids, dataset state before the example, pass)
        self._offset = offset  # tokens of the buffer's first example already used
        self._next_doc = 0
        self._empty_passes = 0

    def _pull(self) -> None:
        try:
            example = next(self._iter)
        except StopIteration:
            self._empty_passes += 1
            if self._empty_passes > 1:
                raise ValueError(f"data.hf_name={self.corpus.cfg.hf_name!r}: the stream has no training documents "
                                 f"after the validation ones (data.streaming_val_tokens="
                                 f"{self.corpus.cfg.streaming_val_tokens})") from None
            buffer, offset = self._buffer, self._offset
            self._restart(pass_=self._pass + 1, dataset_state=None, offset=0)
            self._buffer, self._offset = buffer, offset
            return
        state_before = self._last_state
        self._last_state = self._ds.state_dict()
        docs = _encode_example(self.corpus.cfg, self.corpus.tokenizer, example[self.corpus.cfg.text_field])
        if docs:
            self._empty_passes = 0
        tokens = np.concatenate(docs) if docs else np.empty(0, dtype=np.int64)
        ids = np.repeat(np.arange(self._next_doc, self._next_doc + len(docs)), [len(d) for d in docs])
        self._next_doc += len(docs)
        # An example with no document used is dropped when nothing is buffered (the state moves past it).
        if len(tokens) or self._buffer:
            self._buffer.append((tokens, ids, state_before, self._pass))

    def _available(self) -> int:
        return sum(len(t) for t, *_ in self._buffer) - self._offset

    def _block(self) -> tuple[np.ndarray, np.ndarray]:
        need = self.corpus.seq_len + 1
        while self._available() < need:
            self._pull()
        parts_t, parts_d, have = [], [], -self._offset
        for tokens, ids, *_ in self._buffer:
            parts_t.append(tokens)
            parts_d.append(ids)
            have += len(tokens)
            if have >= need:
                break
        tokens = np.concatenate(parts_t)[self._offset:self._offset + need]
        ids = np.concatenate(parts_d)[self._offset:self._offset + need]
        # Stride seq_len: the block's last token is the next block's first input.
        self._offset += self.corpus.seq_len
        while self._buffer and self._offset >= len(self._buffer[0][0]):
            self._offset -= len(self._buffer.popleft()[0])
        return tokens, ids

    def __iter__(self) -> "StreamingLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        from fatrain.data import _to_device

        blocks = [self._block() for _ in range(self.batch_size)]
        tokens = np.stack([t for t, _ in blocks])
        docs = np.stack([d[:-1] for _, d in blocks])
        docs -= docs[:, :1]
        batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
                 "labels": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])),
                 "doc_ids": torch.from_numpy(docs)}
        return _to_device(batch, self.device)

    def state_dict(self) -> dict:
        if self._buffer:
            _, _, state_before, pass_ = self._buffer[0]
            return {"streaming": True, "pass": pass_, "dataset": copy.deepcopy(state_before), "offset": self._offset}
        return {"streaming": True, "pass": self._pass, "dataset": copy.deepcopy(self._last_state), "offset": 0}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("streaming"):
            raise ValueError("the loader state was saved without data.streaming=true: the data settings (data.*) "
                             "differ from the checkpoint's")
        self._restart(pass_=int(state["pass"]), dataset_state=state["dataset"], offset=int(state["offset"]))

    def close(self) -> None:
        """Nothing runs in the background; here for the same interface as BlockLoader."""


def build_streaming_data(cfg: DataConfig, tokenizer):
    """DataBundle whose train is a StreamingCorpus and whose val is in-memory PackedBlocks."""
    from fatrain.data import DataBundle, PackedBlocks, _load_raw

    if cfg.source != "hf":
        raise ValueError(f"data.streaming=true needs data.source=hf, not {cfg.source!r} (local files: "
                         "data=hf data.hf_name=<folder of .jsonl, .parquet or .txt files>)")
    if cfg.packing != "concat":
        raise ValueError(f"data.packing={cfg.packing!r} is not offered with data.streaming=true (use data.packing=concat)")
    if cfg.streaming_val_tokens < cfg.seq_len + 1:
        raise ValueError(f"data.streaming_val_tokens={cfg.streaming_val_tokens} is less than one block of "
                         f"data.seq_len+1={cfg.seq_len + 1}")
    val_docs, val_tokens, examples = [], 0, 0
    for example in _load_raw(cfg, streaming=True):
        examples += 1
        docs = _encode_example(cfg, tokenizer, example[cfg.text_field])
        val_docs.extend(docs)
        val_tokens += sum(len(d) for d in docs)
        if val_tokens >= cfg.streaming_val_tokens:
            break
    if val_tokens < cfg.seq_len + 1:
        raise ValueError(f"data.hf_name={cfg.hf_name!r}: the stream has {val_tokens} tokens in documents of at least "
                         f"data.min_doc_tokens={cfg.min_doc_tokens}, fewer than one validation block of "
                         f"data.seq_len+1={cfg.seq_len + 1}")
    tokens = np.concatenate(val_docs)
    doc_ids = np.repeat(np.arange(len(val_docs)), [len(d) for d in val_docs])
    return DataBundle(train=StreamingCorpus(cfg, tokenizer, skip_examples=examples),
                      val=PackedBlocks(tokens, doc_ids, cfg.seq_len), tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)
