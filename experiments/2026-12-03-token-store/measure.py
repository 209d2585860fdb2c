"""Token-store study: tokenisation throughput, warm start, loader speed, and the corpus for the RSS runs.

    python experiments/2026-12-03-token-store/measure.py corpus /tmp/fatrain-2gb/corpus.txt --gb 2
    python experiments/2026-12-03-token-store/measure.py throughput /tmp/fatrain-2gb/corpus.txt --mb 64
    python experiments/2026-12-03-token-store/measure.py warm /tmp/fatrain-2gb/corpus.txt
    python experiments/2026-12-03-token-store/measure.py loader

Public APIs only (fatrain.data, fatrain.config); results are printed as JSON lines.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from fatrain.config import DataConfig
from fatrain.data import BlockLoader, PackedBlocks, build_data, embedded_corpus

SEP = "\n<doc>\n"


def make_corpus(path: str, gb: float, seed: int = 0) -> None:
    """Documents of 1-64 KB cut from tinyshakespeare at random offsets, joined by SEP."""
    text = embedded_corpus().read_text()
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    target, written = int(gb * 1e9), 0
    with open(path, "w") as f:
        while written < target:
            parts = []
            for _ in range(256):
                length = int(rng.integers(1_000, 64_000))
                start = int(rng.integers(0, len(text) - length))
                parts.append(text[start:start + length])
            chunk = SEP.join(parts) + SEP
            f.write(chunk)
            written += len(chunk)
    print(json.dumps({"corpus": path, "bytes": os.path.getsize(path)}))


def bpe_tokenizer(folder: str) -> str:
    """A 4096-token byte-level BPE trained on tinyshakespeare with the tokenizers package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(embedded_corpus())], trainer)
    path = os.path.join(folder, "bpe4096.json")
    tok.save(path)
    return path


def throughput(corpus: str, mb: int) -> None:
    work = tempfile.mkdtemp(prefix="fatrain-tp-")
    sample = os.path.join(work, "sample.txt")
    with open(corpus) as src, open(sample, "w") as dst:
        dst.write(src.read(mb * 1_000_000))
    size = os.path.getsize(sample)
    tokenizers = {"byte": "byte", "bpe4096": bpe_tokenizer(work)}
    for name, spec in tokenizers.items():
        for num_proc in (1, 2):
            cfg = DataConfig(name="tp", source="text", path=sample, document_separator=SEP, tokenizer=spec,
                             num_proc=num_proc, cache_dir=os.path.join(work, f"{name}-{num_proc}"))
            start = time.perf_counter()
            data = build_data(cfg, seed=0)
            seconds = time.perf_counter() - start
            print(json.dumps({"tokenizer": name, "num_proc": num_proc, "mb": size / 1e6, "seconds": round(seconds, 2),
                              "mb_per_s": round(size / 1e6 / seconds, 2),
                              "tokens": data.train.num_tokens + data.val.num_tokens}), flush=True)
    shutil.rmtree(work)


def warm(corpus: str) -> None:
    cfg = DataConfig(name="text", source="text", path=corpus, document_separator=SEP, seq_len=256)
    start = time.perf_counter()
    data = build_data(cfg, seed=0)
    print(json.dumps({"warm_build_data_s": round(time.perf_counter() - start, 2),
                      "tokens": data.train.num_tokens + data.val.num_tokens, "train_blocks": len(data.train)}))


def loader() -> None:
    """Batches/s of the loader: the token store's views against in-RAM arrays of the same tokens."""
    data = build_data(DataConfig(seq_len=256), seed=0)
    in_ram = PackedBlocks(np.asarray(data.train.tokens).astype(np.int32),
                          np.asarray(data.train.doc_ids).astype(np.int32), 256)
    for name, blocks in (("in_ram", in_ram), ("store", data.train)):
        it = BlockLoader(blocks, 16, seed=0)
        next(it)
        start = time.perf_counter()
        for _ in range(2000):
            next(it)
        print(json.dumps({"blocks": name, "batches_per_s": round(2000 / (time.perf_counter() - start), 1),
                          "batch": "16 x 256"}))
        it.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["corpus", "throughput", "warm", "loader"])
    parser.add_argument("path", nargs="?")
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--mb", type=int, default=64)
    args = parser.parse_args()
    if args.what == "corpus":
        make_corpus(args.path, args.gb)
    elif args.what == "throughput":
        throughput(args.path, args.mb)
    elif args.what == "warm":
        warm(args.path)
    else:
        loader()
