"""The on-disk token store: round trip, dtypes, atomic writes, selection and packing, bad input, resume, ranks."""

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fatrain.config import DataConfig
from fatrain.data import BlockLoader, ByteTokenizer, build_data, decode_separator, open_token_store
from fatrain.token_store import StoreError, TokenStore, token_dtype

SEP = "\n<doc>\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))


def docs_of(rng, count, lo=1, hi=60):
    letters = list("abcdefgh ") + ["é", "日"]
    return ["".join(rng.choice(letters, size=rng.integers(lo, hi + 1))) for _ in range(count)]


def corpus(tmp_path, docs, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(SEP.join(docs), encoding="utf-8")
    return path


def config(path, **overrides):
    settings = dict(name="t", source="text", path=str(path), document_separator=SEP, seq_len=8, val_fraction=0.2,
                    num_proc=1)
    settings.update(overrides)
    return DataConfig(**settings)


def encoded(docs):
    return [np.frombuffer(d.encode(), np.uint8).astype(np.int64).tolist() + [256] for d in docs]


def stores(tmp_path):
    return sorted(p for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".lock"))


@pytest.mark.parametrize("num_proc, shard_tokens", [(1, 1 << 20), (2, 37)])
def test_round_trip_loses_nothing_and_keeps_boundaries(tmp_path, num_proc, shard_tokens):
    docs = docs_of(np.random.default_rng(num_proc), 80)
    cfg = config(corpus(tmp_path, docs), num_proc=num_proc, shard_tokens=shard_tokens)
    store = open_token_store(cfg, ByteTokenizer())
    ids = encoded(docs)
    stream = np.concatenate(ids)
    assert store.dtype == np.uint16 and store.num_documents == len(docs)
    assert np.array_equal(store.take(np.arange(store.num_tokens)), stream)
    assert np.array_equal(store.document_lengths(), [len(x) for x in ids])
    if shard_tokens == 37:
        assert len(store.manifest["shards"]) == -(-len(stream) // 37)
    data = build_data(cfg, seed=0)
    assert np.array_equal(np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val.tokens)]), stream)
    owner = np.repeat(np.arange(len(docs)), [len(x) for x in ids])
    assert np.array_equal(np.concatenate([np.asarray(data.train.doc_ids),
                                          np.asarray(data.val.doc_ids) + owner[data.train.num_tokens]]), owner)
    # each block's inputs tile the split, and doc ids restart after each EOT
    for i in range(len(data.train)):
        item = data.train[i]
        assert item["input_ids"].tolist() == stream[i * 8:(i + 1) * 8].tolist()
        ids_, d = item["input_ids"], item["doc_ids"]
        assert (d[1:] - d[:-1]).tolist() == (ids_[:-1] == 256).long().tolist()
    for name in ("doc_lengths.csv", "doc_lengths.md", "doc_lengths.png", "documents.bin", "manifest.json"):
        assert (store.folder / name).is_file()
    assert (store.folder / "documents.bin").stat().st_size == 8 * len(docs)  # one integer per document


def test_store_is_the_same_for_any_num_proc(tmp_path):
    path = corpus(tmp_path, docs_of(np.random.default_rng(5), 200))
    one = open_token_store(config(path, num_proc=1, cache_dir=str(tmp_path / "a")), ByteTokenizer())
    two = open_token_store(config(path, num_proc=2, cache_dir=str(tmp_path / "b")), ByteTokenizer())
    assert np.array_equal(one.take(np.arange(one.num_tokens)), two.take(np.arange(two.num_tokens)))
    assert np.array_equal(one.doc_starts, two.doc_starts)


def test_dtype_follows_the_vocabulary():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    class WideTokenizer(ByteTokenizer):
        name, vocab_size, eot_id, fingerprint = "wide", 70000, 69999, "wide"

        def encode_arrays(self, texts):
            return [np.frombuffer(t.encode(), np.uint8).astype(np.int32) * 271 for t in texts]

    docs = ["abc", "zz top"]
    store = open_token_store(config(corpus(tmp_path, docs)), WideTokenizer())
    assert store.dtype == np.uint32
    expected = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(np.int64) * 271 for d in docs[:1]] + [[69999]])
    assert np.array_equal(store.take(np.arange(len(expected))), expected)
    assert store.take(np.arange(store.num_tokens)).max() == 69999


def test_interrupted_tokenisation_is_not_reused(tmp_path, monkeypatch):
    path = corpus(tmp_path, docs_of(np.random.default_rng(2), 50))
    calls = []

    def fail_midway(self, texts):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ByteTokenizer, "encode_arrays", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        build_data(config(path), seed=0)
    monkeypatch.undo()
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".")]
    assert not list((tmp_path / "cache" / "tokens").glob(".tmp-*"))  # removed on the way out
    data = build_data(config(path), seed=0)
    assert data.train.num_tokens + data.val.num_tokens == sum(map(len, encoded(
        [d for d in path.read_text().split(SEP) if d.strip()])))


def test_a_sigkilled_tokenisation_leaves_nothing_a_run_uses(tmp_path):
    path = corpus(tmp_path, docs_of(np.random.default_rng(3), 50))
    code = ("import os, signal; from fatrain.data import ByteTokenizer, build_data; from fatrain.config import DataConfig\n"
            "ByteTokenizer.encode_arrays = lambda self, t: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"build_data(DataConfig(name='t', source='text', path={str(path)!r}, document_separator={SEP!r}, seq_len=8, num_proc=1), seed=0)")
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FATRAIN_CACHE": str(tmp_path / "cache")},
                           capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL
    leftovers = list((tmp_path / "cache" / "tokens").glob(".tmp-*"))
    assert len(leftovers) == 1 and not (leftovers[0] / "manifest.json").exists()
    data = build_data(config(path), seed=0)  # tokenises afresh and clears the dead process's folder
    assert len(data.train) > 0
    assert not list((tmp_path / "cache" / "tokens").glob(".tmp-*"))


def test_disk_full_names_the_setting_and_leaves_nothing(tmp_path, monkeypatch):
    import fatrain.token_store as ts

    path = corpus(tmp_path, docs_of(np.random.default_rng(4), 30))

    def full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ts._ShardWriter, "_write_tokens", full)
    with pytest.raises(StoreError, match=r"^data.cache_dir='.*cache': the disk filled while writing the token store"):
        build_data(config(path), seed=0)
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".")]
    assert not list((tmp_path / "cache" / "tokens").glob(".tmp-*"))


def test_truncated_shard_and_foreign_store_are_refused(tmp_path):
    path = corpus(tmp_path, docs_of(np.random.default_rng(6), 40))
    cfg = config(path, shard_tokens=64)
    store = open_token_store(cfg, ByteTokenizer())
    shard = store.folder / "tokens-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(StoreError, match=r"^data.cache_dir=.*tokens-00001.bin holds 122 bytes, its manifest says 128 "
                                         r"\(truncated or changed\); delete .* to tokenise again$"):
        build_data(cfg, seed=0)

    other = config(path, cache_dir=str(tmp_path / "other"))
    folder = open_token_store(other, ByteTokenizer()).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["key"]["tokenizer"] = "another tokenizer's fingerprint"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"^data.tokenizer: the token store .* was written for another tokenizer"):
        build_data(other, seed=0)
    manifest["format"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"has format 1, this fatrain reads format 2"):
        TokenStore(folder, key_parts=manifest["key"], setting="data.cache_dir")


def test_min_doc_tokens_keeps_only_long_documents(tmp_path):
    docs = ["a" * 3, "b" * 30, "c" * 5, "d" * 40, "e" * 12, "f" * 25]
    data = build_data(config(corpus(tmp_path, docs), min_doc_tokens=25, val_fraction=0.3), seed=0)
    kept = np.concatenate([x for x in encoded(docs) if len(x) >= 25])
    assert np.array_equal(np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val.tokens)]), kept)
    with pytest.raises(ValueError, match=r"^data.min_doc_tokens=100: no document of data.path=.* is that long "
                                         r"\(the longest has 41 tokens"):
        build_data(config(corpus(tmp_path, docs), min_doc_tokens=100), seed=0)


def test_doc_start_packing_starts_every_block_inside_one_document(tmp_path):
    docs = ["x" * 20, "y" * 3, "z" * 16, "w" * 8, "v" * 30]
    seq_len = 8
    data = build_data(config(corpus(tmp_path, docs), packing="doc_start", seq_len=seq_len, val_fraction=0.3), seed=0)
    blocks = [data.train[i] for i in range(len(data.train))]
    for item in blocks:
        assert item["doc_ids"].max() == 0  # never crosses into the next document
        assert int(item["input_ids"][0]) in {ord(c) for c in "xyzwv"}
        assert len(set(item["input_ids"][item["input_ids"] < 256].tolist())) == 1
    # x: 21 tokens (EOT included) -> blocks at 0 and 8; y: too short; z: 17 -> two; w: 9 -> one (inputs w*8)
    firsts = [chr(int(item["input_ids"][0])) for item in blocks]
    assert firsts == ["x", "x", "z", "z", "w"]
    with pytest.raises(ValueError, match=r"^data.packing=doc_start with data.seq_len=22: no document of the train split "
                                         r"has data.seq_len\+1=23 tokens \(the longest has 21\)"):
        build_data(config(corpus(tmp_path, docs), packing="doc_start", seq_len=22, val_fraction=0.3), seed=0)


def test_validation_is_the_same_tokens_for_every_seed(tmp_path):
    path = corpus(tmp_path, docs_of(np.random.default_rng(8), 60))
    a, b = build_data(config(path), seed=1), build_data(config(path), seed=2)
    assert np.array_equal(np.asarray(a.val.tokens), np.asarray(b.val.tokens))


@pytest.mark.parametrize("given, decoded", [
    (r"\n\n", "\n\n"), (r"\t", "\t"), (r"a\\n", "a\\n"), (r"\r\n", "\r\n"), (r"\0", "\0"), ("<doc>", "<doc>"),
])
def test_separator_escapes_are_decoded(given, decoded):
    assert decode_separator(given) == decoded


def test_unknown_separator_escape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^data.document_separator='\\\\q' has the unknown escape '\\\\q' \(allowed: "):
        decode_separator(r"\q")
    with pytest.raises(ValueError, match=r"data.document_separator='' is empty"):
        build_data(config(corpus(tmp_path, ["a" * 50]), document_separator=""), seed=0)


def test_escaped_separator_from_the_command_line_splits_documents(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_text("first paragraph here\n\nsecond one\n\nthird and last\n")
    store = open_token_store(config(path, document_separator=r"\n\n"), ByteTokenizer())
    assert store.num_documents == 3


@pytest.mark.parametrize("overrides, message", [
    (dict(packing="random"), r"data.packing='random' is not allowed \(choose from: concat, doc_start\)"),
    (dict(min_doc_tokens=-1), r"data.min_doc_tokens=-1 must be >= 0"),
    (dict(num_proc=0), r"data.num_proc=0 must be > 0"),
])
def test_bad_store_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_data(config(corpus(tmp_path, ["abc"] * 30), **overrides), seed=0)


def test_loader_prefetch_keeps_the_state_exact(tmp_path):
    data = build_data(config(corpus(tmp_path, docs_of(np.random.default_rng(9), 120))), seed=0)
    loader = BlockLoader(data.train, 3, seed=4)
    first = [next(loader)["input_ids"] for _ in range(5)]
    state = loader.state_dict()
    rest = [next(loader)["input_ids"] for _ in range(4)]
    again = BlockLoader(data.train, 3, seed=4)
    again.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(rest, [next(again)["input_ids"] for _ in range(4)]))
    assert state["position"] == 15 % len(data.train) or state["epoch"] > 0
    loader.close()
    again.close()
    assert len(first) == 5


def test_two_gloo_ranks_read_disjoint_blocks_whose_union_is_the_epoch(tmp_path):
    data_cfg = config(corpus(tmp_path, docs_of(np.random.default_rng(10), 90)))
    num_blocks = len(build_data(data_cfg, seed=0).train)
    script = tmp_path / "ranks.py"
    script.write_text(
        "import json, os, sys, torch.distributed as dist\n"
        "from fatrain.data import BlockLoader, build_data\n"
        "from fatrain.config import DataConfig\n"
        "dist.init_process_group('gloo')\n"
        "rank, world = dist.get_rank(), dist.get_world_size()\n"
        f"cfg = DataConfig(**json.loads({json.dumps(json.dumps(vars(data_cfg)))}))\n"
        "data = build_data(cfg, seed=0)\n"
        "loader = BlockLoader(data.train, 2, seed=3, rank=rank, world_size=world)\n"
        "seen = []\n"
        f"for _ in range({num_blocks} // 4):\n"
        "    seen += [row.tolist() for row in next(loader)['input_ids']]\n"
        "out = [None] * world\n"
        "dist.all_gather_object(out, seen)\n"
        "if rank == 0: print(json.dumps(out))\n"
        "dist.destroy_process_group()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "FATRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = json.loads(proc.stdout.strip().splitlines()[-1])
    one = BlockLoader(build_data(data_cfg, seed=0).train, 4, seed=3)
    expected = [row.tolist() for _ in range(num_blocks // 4) for row in next(one)["input_ids"]]
    r0, r1 = per_rank
    assert len(r0) == len(r1) == len(expected) // 2
    # rank r holds rows [2r, 2r + 2) of every global batch of 4: disjoint, and together the epoch's order
    for step in range(num_blocks // 4):
        assert r0[2 * step:2 * step + 2] + r1[2 * step:2 * step + 2] == expected[4 * step:4 * step + 4]
    assert sorted(map(tuple, r0 + r1)) == sorted(map(tuple, expected))
    assert len(set(map(tuple, r0)) & set(map(tuple, r1))) == 0


def test_sigkill_and_resume_on_the_store_path_is_exact(tmp_path):
    path = corpus(tmp_path, docs_of(np.random.default_rng(11), 300, lo=20, hi=200))
    common = [f"data.path={path}", "data.document_separator='\\n<doc>\\n'",  # escapes as typed on a command line
              "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32", "trainer.max_steps=40",
              "trainer.batch_size=2", "trainer.log_every=1", "trainer.eval_every=20", "trainer.eval_batches=2",
              "trainer.ckpt_every=10", "trainer.progress_bar=false", "logger.wandb.mode=disabled",
              "optim.warmup_steps=1", "data=text", "attention=sdpa"]
    env = {**os.environ, "FATRAIN_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}

    def cli(run_dir, *extra):
        return [sys.executable, "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *common, *extra]

    full = tmp_path / "full"
    subprocess.run(cli(full), check=True, capture_output=True, timeout=300, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not glob.glob(str(killed / "checkpoints" / "ckpt_*.pt")):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cli(killed, "resume=auto"), check=True, capture_output=True, timeout=300, env=env)

    def curve(run_dir):
        with open(run_dir / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

    assert [s for s, _ in curve(killed)] == list(range(1, 41))
    assert curve(killed) == curve(full)


# ----- streaming ---------------------------------------------------------------------------------


def jsonl_folder(tmp_path, docs, files=2):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for f in range(files):
        with open(folder / f"part-{f}.jsonl", "w") as out:
            for doc in docs[f::files]:
                out.write(json.dumps({"text": doc}) + "\n")
    return folder


def streaming_config(folder, **overrides):
    settings = dict(name="s", source="hf", hf_name=str(folder), streaming=True, seq_len=8, streaming_val_tokens=40)
    settings.update(overrides)
    return DataConfig(**settings)


def rows(batches):
    return [row.tolist() for batch in batches for row in batch["input_ids"]]


def test_streaming_packs_the_documents_after_validation(tmp_path):
    from fatrain.data import make_train_loader

    docs = docs_of(np.random.default_rng(12), 40, lo=5, hi=30)
    data = build_data(streaming_config(jsonl_folder(tmp_path, docs, files=1)), seed=0)
    assert data.val.num_tokens >= 40
    loader = make_train_loader(data.train, 2, seed=0)
    got = rows([next(loader) for _ in range(3)])
    ids = encoded(docs)
    val_docs = next(n for n in range(1, len(ids) + 1) if sum(map(len, ids[:n])) >= 40)
    stream = np.concatenate(ids[val_docs:])
    assert got == [stream[i * 8:(i + 1) * 8].tolist() for i in range(6)]


def test_streaming_resume_continues_at_the_same_token(tmp_path):
    from fatrain.data import make_train_loader

    docs = docs_of(np.random.default_rng(13), 60, lo=3, hi=25)
    data = build_data(streaming_config(jsonl_folder(tmp_path, docs)), seed=0)
    loader = make_train_loader(data.train, 3, seed=0)
    for _ in range(4):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # plain data, as a checkpoint keeps it
    expected = rows([next(loader) for _ in range(5)])  # long enough to wrap around the stream once
    resumed = make_train_loader(data.train, 3, seed=0)
    resumed.load_state_dict(state)
    assert rows([next(resumed) for _ in range(5)]) == expected


def test_streaming_ranks_read_disjoint_examples(tmp_path):
    from fatrain.data import make_train_loader

    docs = [f"doc{i:03d} " * 3 for i in range(40)]
    data = build_data(streaming_config(jsonl_folder(tmp_path, docs, files=4), seq_len=4, streaming_val_tokens=5), seed=0)
    seen = []
    for rank in (0, 1):
        loader = make_train_loader(data.train, 1, seed=0, rank=rank, world_size=2)
        text = "".join(bytes([t for t in row if t < 256]).decode() for row in rows([next(loader) for _ in range(20)]))
        seen.append({word for word in text.split() if len(word) == 6})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_streaming_bad_settings(tmp_path):
    folder = jsonl_folder(tmp_path, ["short"] * 4, files=1)
    with pytest.raises(ValueError, match=r"data.streaming=true needs data.source=hf"):
        build_data(config(corpus(tmp_path, ["a" * 40]), streaming=True), seed=0)
    with pytest.raises(ValueError, match=r"data.packing='doc_start' is not offered with data.streaming=true"):
        build_data(streaming_config(folder, packing="doc_start"), seed=0)
    with pytest.raises(ValueError, match=r"the stream has 24 tokens in documents of at least data.min_doc_tokens=0"):
        build_data(streaming_config(folder, seq_len=30, streaming_val_tokens=100), seed=0)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_local_parquet_and_jsonl_folders_go_through_the_hub_path(tmp_path, fmt):
    """A folder of Parquet or JSONL shards with a ``text`` column (the formats PG-19 and
    FineWeb-Edu ship in) loads through ``data=hf data.hf_name=<folder>`` into the token store,
    every document in file order, no network asked (a local path)."""
    docs = docs_of(np.random.default_rng(5), 30, lo=3, hi=40)
    folder = tmp_path / fmt
    folder.mkdir()
    for part in range(2):
        chunk = docs[part * 15:(part + 1) * 15]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": chunk, "id": list(range(len(chunk)))}), folder / f"part-{part}.parquet")
        else:
            with open(folder / f"part-{part}.jsonl", "w") as out:
                out.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(chunk))
    cfg = DataConfig(name="local", source="hf", hf_name=str(folder), seq_len=8, val_fraction=0.2, num_proc=1)
    store = open_token_store(cfg, ByteTokenizer())
    assert store.num_documents == len(docs)
    assert np.array_equal(store.take(np.arange(store.num_tokens)), np.concatenate(encoded(docs)))
