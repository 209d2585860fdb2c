"""Loss by context length and by position in the sequence.

Per length: loss, perplexity, bits per byte (byte tokenizer) or bits per token (any other
tokenizer, whose tokens have no fixed byte count), and the mean loss of each position
bucket [0, b), [b, 2b), ...

Bits per byte: total nats / (ln 2 * bytes of text). With the byte tokenizer every label
token is one byte except the end-of-text token, which decodes to no text; its loss still
counts in the numerator (predicting where a document ends is part of modelling the text).

Position buckets count positions inside a block. Blocks are packed from consecutive
documents, so with several documents per block a late position is not always a late
position in its document; on a single long document (tinyshakespeare) the two agree.
``eval.long_documents=true`` keeps only blocks that lie inside one document of at least
seq_len + 1 tokens (consecutive blocks from each such document's start), so position p of a
block is position p of its document and the curve measures the use of context alone.

Caution / known limits: each length reads blocks from the start of the split, so at a
fixed ``eval.batches`` the longer lengths cover more text; the shorter lengths' text is a
prefix of the longer ones'.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from fatrain.data import PackedBlocks, build_data, iter_once
from fatrain.model import GPT
from fatrain.progress import progress


def split_stream(data_cfg, split: str):
    """(tokens, doc_ids, tokenizer) of one split of the corpus ``data_cfg`` names."""
    # seq_len=1 asks the least of the corpus: the eval lengths are packed from the stream below.
    cfg = OmegaConf.merge(data_cfg, {"seq_len": 1})
    bundle = build_data(cfg, seed=0)
    blocks = bundle.val if split == "val" else bundle.train
    return blocks.tokens, blocks.doc_ids, bundle.tokenizer


@torch.no_grad()
def evaluate_blocks(model: GPT, blocks: PackedBlocks, *, batch_size: int, max_batches: Optional[int],
                    bucket_size: int, device, autocast, count_bytes: bool) -> dict:
    """Loss, perplexity, bits and per-position-bucket loss of ``model`` on the first batches of ``blocks``."""
    seq_len = blocks.seq_len
    position_sum = torch.zeros(seq_len, dtype=torch.float64)
    sequences, num_bytes, batches = 0, 0, 0
    for batch in iter_once(blocks, batch_size, max_batches=max_batches, device=device):
        with autocast():
            _, loss = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], reduction="none")
        position_sum += loss.double().sum(dim=0).cpu()
        sequences += loss.shape[0]
        batches += 1
        if count_bytes:
            # Byte tokenizer: ids 0..255 are one byte each; the end-of-text id decodes to nothing.
            num_bytes += int((batch["labels"] < 256).sum())
    tokens = sequences * seq_len
    nats = position_sum.sum().item()
    mean = nats / tokens
    buckets = []
    for start in range(0, seq_len, bucket_size):
        end = min(seq_len, start + bucket_size)
        buckets.append({"start": start, "end": end - 1,
                        "loss": position_sum[start:end].sum().item() / (sequences * (end - start))})
    result = {"seq_len": seq_len, "batches": batches, "tokens": tokens, "loss": mean,
              "perplexity": math.exp(min(mean, 700.0)), "bits_per_token": mean / math.log(2), "buckets": buckets}
    if count_bytes:
        result["bytes"] = num_bytes
        result["bits_per_byte"] = nats / (math.log(2) * num_bytes) if num_bytes else None
    return result


def long_document_blocks(tokens, doc_ids, seq_len: int) -> tuple[PackedBlocks, int]:
    """Blocks of ``seq_len + 1`` tokens inside single documents of at least that many tokens, from each
    document's start; and how many documents are that long."""
    ids = np.asarray(doc_ids) if isinstance(doc_ids, np.ndarray) else np.asarray(doc_ids[np.arange(len(doc_ids))])
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]))
    starts, long_docs = [], 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b - a >= seq_len + 1:
            long_docs += 1
            starts.extend(range(a, b - seq_len, seq_len))
    return PackedBlocks(tokens, doc_ids, seq_len, starts=np.array(starts, dtype=np.int64)), long_docs


def multi_length_eval(model, tokens, doc_ids, lengths, *, train_len: int, split: str, batch_size: int,
                      max_batches, bucket_size: int, device, autocast, count_bytes: bool,
                      long_documents: bool = False) -> list[dict]:
    """One result per length; a length the split cannot fill once is recorded as skipped, not raised.
    ``long_documents``: only blocks inside one document of at least the length (see the module docstring)."""
    results = []
    for length in progress(lengths, desc=f"evaluating {split} loss by length", unit="length"):
        if long_documents:
            blocks, long_docs = long_document_blocks(tokens, doc_ids, length)
            if len(blocks) == 0:
                results.append({"seq_len": length, "skipped": f"the {split} split has no document of at least "
                                                              f"seq_len+1={length + 1} tokens"})
                continue
        else:
            blocks = PackedBlocks(tokens, doc_ids, length)
        if len(blocks) == 0:
            results.append({"seq_len": length, "skipped": f"the {split} split has {len(tokens)} tokens, "
                                                          f"fewer than one block of seq_len+1={length + 1}"})
            continue
        result = evaluate_blocks(model, blocks, batch_size=batch_size, max_batches=max_batches,
                                 bucket_size=bucket_size, device=device, autocast=autocast, count_bytes=count_bytes)
        result["beyond_training_length"] = length > train_len
        if long_documents:
            result["long_documents"] = long_docs
        results.append(result)
    return results
