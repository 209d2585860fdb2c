"""The data pipeline: tokenizers, the packer, document ids, the loader's order and resume, the cache, errors."""

import json

import numpy as np
import pytest
import torch

from fatrain.config import DataConfig
from fatrain.data import (
    BlockLoader,
    ByteTokenizer,
    PackedBlocks,
    build_data,
    iter_once,
    load_tokenizer,
    open_token_store,
)


def token_stream(cfg, tokenizer):
    """(tokens, document index per token) of the whole store ``cfg`` names."""
    store = open_token_store(cfg, tokenizer)
    owner = np.repeat(np.arange(store.num_documents), store.document_lengths())
    return store.take(np.arange(store.num_tokens)), owner

SEP = "\n<doc>\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    # data.source=hf keeps datasets' own cache, which datasets reads from here at each call.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def random_docs(rng, count, min_len=1, max_len=40):
    letters = list("abcdefghij ") + ["é", "ß", "→", "日"]
    return ["".join(rng.choice(letters, size=rng.integers(min_len, max_len + 1))) for _ in range(count)]


def write_docs(tmp_path, docs, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(SEP.join(docs), encoding="utf-8")
    return path


def text_config(path, **overrides):
    settings = dict(name="test", source="text", path=str(path), document_separator=SEP, seq_len=16, val_fraction=0.2)
    settings.update(overrides)
    return DataConfig(**settings)


def synthetic_blocks(num_blocks, seq_len=4):
    tokens = np.arange(num_blocks * seq_len + 1, dtype=np.int32)
    return PackedBlocks(tokens, np.zeros_like(tokens), seq_len)


def block_index(batch, seq_len=4):
    return (batch["input_ids"][:, 0] // seq_len).tolist()


# ----- tokenizers --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "Hello, wörld → 日本語 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids[:3] + [tok.eot_id] + ids[3:]) == text  # EOT is dropped
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.encode_batch(["ab", "", "é"]) == [[97, 98], [], [0xC3, 0xA9]]
    assert (tok.eot_id, tok.vocab_size, tok.name) == (256, 257, "byte")


def make_hf_tokenizer(path, special=("<|endoftext|>",)):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "to be or not to be", "wörld 日本"] * 20, trainer=trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_local_file_and_folder(tmp_path):
    path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    for spec in (str(path), str(tmp_path)):
        tok = load_tokenizer(spec)
        text = "the cat, wörld 日本 and new words"
        assert tok.decode(tok.encode(text)) == text
        assert tok.eot_id == tok._tok.token_to_id("<|endoftext|>")
        assert tok.vocab_size == tok._tok.get_vocab_size(with_added_tokens=True)
        assert tok.decode(tok.encode("the cat") + [tok.eot_id]) == "the cat"
        assert tok.encode_batch(["the cat", "mat"]) == [tok.encode("the cat"), tok.encode("mat")]


def test_hf_tokenizer_in_build_data(tmp_path):
    tokenizer_path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    docs = ["the cat sat on the mat " * 5, "to be or not to be " * 5, "wörld 日本 " * 5]
    data = build_data(text_config(write_docs(tmp_path, docs), tokenizer=str(tokenizer_path), seq_len=8), seed=0)
    tok = data.tokenizer
    assert data.vocab_size == tok.vocab_size
    expected = np.concatenate([tok.encode(d) + [tok.eot_id] for d in docs])
    assert np.array_equal(np.concatenate([data.train.tokens, data.val.tokens]), expected)


# ----- packing and document ids ------------------------------------------------------------------


def unpack(blocks):
    """The stream the blocks cover: every block's inputs, then the last block's labels' last token."""
    items = [blocks[i] for i in range(len(blocks))]
    for item in items:
        assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    return torch.cat([item["input_ids"] for item in items] + [items[-1]["labels"][-1:]]).numpy()


@pytest.mark.parametrize("seq_len", [1, 3, 16, 37])
def test_packer_loses_and_duplicates_nothing(tmp_path, seq_len):
    docs = random_docs(np.random.default_rng(seq_len), 30)
    data = build_data(text_config(write_docs(tmp_path, docs), seq_len=seq_len), seed=0)
    stream = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(np.int64).tolist() + [256] for d in docs])
    num_val = int(len(stream) * 0.2)
    for blocks, part in ((data.train, stream[:-num_val]), (data.val, stream[-num_val:])):
        assert blocks.num_tokens == len(part)
        assert len(blocks) == (len(part) - 1) // seq_len  # only the tail remainder is unused
        assert np.array_equal(unpack(blocks), part[:len(blocks) * seq_len + 1])
        assert blocks[0]["input_ids"].shape == (seq_len,) and blocks[0]["input_ids"].dtype == torch.int64


def test_document_ids_at_boundaries(tmp_path):
    docs = ["a", "bb", "ccc", "dddd", "e" * 9, "ff"]  # documents shorter and longer than a block
    seq_len = 5
    data = build_data(text_config(write_docs(tmp_path, docs), seq_len=seq_len, val_fraction=0.25), seed=0)
    owner = np.concatenate([[i] * (len(d) + 1) for i, d in enumerate(docs)])  # EOT belongs to its document
    tokens, doc_ids = token_stream(text_config(write_docs(tmp_path, docs)), ByteTokenizer())
    assert np.array_equal(doc_ids, owner)
    assert np.array_equal(tokens[owner == 3], [100] * 4 + [256])
    offset = 0
    for blocks in (data.train, data.val):
        for i in range(len(blocks)):
            item = blocks[i]
            expected = owner[offset + i * seq_len: offset + (i + 1) * seq_len]
            assert item["doc_ids"].tolist() == (expected - expected[0]).tolist()
            # a new document starts right after each EOT input
            ids, d = item["input_ids"], item["doc_ids"]
            assert torch.equal(d[1:] - d[:-1], (ids[:-1] == 256).long())
        offset += blocks.num_tokens


def test_folder_and_glob_one_document_per_file(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, text in (("b.txt", "second" * 5), ("a.txt", "first" * 5), ("c.md", "ignored")):
        (folder / name).write_text(text)
    for path in (folder, folder / "*.txt"):
        tokens, doc_ids = token_stream(text_config(path, document_separator=None), ByteTokenizer())
        assert ByteTokenizer().decode(tokens) == "first" * 5 + "second" * 5
        assert np.bincount(doc_ids).tolist() == [26, 31]


def test_embedded_tinyshakespeare_splits():
    data = build_data(DataConfig(seq_len=256), seed=0)
    total = data.train.num_tokens + data.val.num_tokens
    assert data.vocab_size == 257 and total == 1115394 + 1
    assert data.val.num_tokens == int(total * 0.1)
    assert data.tokenizer.decode(data.train[0]["input_ids"]).startswith("First Citizen:")
    assert data.train[0]["doc_ids"].max() == 0


# ----- loader ------------------------------------------------------------------------------------


def take(loader, steps):
    return [block_index(next(loader)) for _ in range(steps)]


def test_order_is_deterministic_and_depends_on_the_seed():
    blocks = synthetic_blocks(23)
    first = take(BlockLoader(blocks, 5, seed=7), 12)
    assert take(BlockLoader(blocks, 5, seed=7), 12) == first
    assert take(BlockLoader(blocks, 5, seed=8), 12) != first
    flat = sum(first, [])
    assert sorted(flat[:23]) == list(range(23)) and sorted(flat[23:46]) == list(range(23))  # epochs are permutations
    assert flat[:23] != flat[23:46]  # and differ between epochs
    assert sum(take(BlockLoader(blocks, 5, seed=7, shuffle=False), 2), []) == list(range(10))


def test_batch_contents_and_device():
    blocks = synthetic_blocks(6, seq_len=4)
    batch = next(BlockLoader(blocks, 3, seed=0, device="cpu"))
    assert set(batch) == {"input_ids", "labels", "doc_ids"}
    assert all(v.shape == (3, 4) and v.dtype == torch.int64 for v in batch.values())
    assert torch.equal(batch["labels"], batch["input_ids"] + 1)


@pytest.mark.parametrize("stop", [3, 4, 9])  # mid-epoch, exactly at an epoch's end, in a later epoch
def test_resume_yields_the_same_batches(stop):
    blocks = synthetic_blocks(20)
    reference = take(BlockLoader(blocks, 5, seed=3), 14)
    loader = BlockLoader(blocks, 5, seed=3)
    take(loader, stop)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
    resumed = BlockLoader(blocks, 5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == stop * 5 // 20
    assert take(resumed, 14 - stop) == reference[stop:]


def test_resume_with_a_batch_that_crosses_the_epoch_boundary():
    blocks = synthetic_blocks(7)
    reference = take(BlockLoader(blocks, 3, seed=1), 10)
    loader = BlockLoader(blocks, 3, seed=1)
    take(loader, 3)  # 9 samples: the third batch took 2 from epoch 1
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 2
    resumed = BlockLoader(blocks, 3, seed=1)
    resumed.load_state_dict(loader.state_dict())
    assert take(resumed, 7) == reference[3:]


def test_rank_shards_are_disjoint_cover_the_epoch_and_match_any_world_size():
    blocks = synthetic_blocks(24)
    global_batches = take(BlockLoader(blocks, 8, seed=5), 6)
    for world_size in (2, 4):
        per_rank = [take(BlockLoader(blocks, 8 // world_size, seed=5, rank=r, world_size=world_size), 6)
                    for r in range(world_size)]
        for step in range(6):
            assert sum((per_rank[r][step] for r in range(world_size)), []) == global_batches[step]
        for epoch in (0, 1):
            seen = sum((b for r in range(world_size) for b in per_rank[r][3 * epoch:3 * epoch + 3]), [])
            assert sorted(seen) == list(range(24))


def test_eval_batches_are_sequential_sharded_and_leave_the_state_alone():
    blocks = synthetic_blocks(11)
    loader = BlockLoader(blocks, 4, seed=0, shuffle=False)
    assert [block_index(b) for b in loader.eval_batches()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [block_index(b) for b in loader.eval_batches(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert loader.state_dict()["position"] == 0
    shards = [[block_index(b) for b in iter_once(blocks, 2, rank=r, world_size=3)] for r in range(3)]
    assert shards == [[[0, 3], [6]], [[1, 4], [7]], [[2, 5], [8]]]


def test_loader_state_from_other_data_is_rejected():
    loader = BlockLoader(synthetic_blocks(10), 2, seed=0)
    with pytest.raises(ValueError, match="saved for 12 blocks but this split has 10"):
        loader.load_state_dict({"epoch": 0, "position": 3, "num_blocks": 12})
    with pytest.raises(ValueError, match="position=10 is invalid"):
        loader.load_state_dict({"epoch": 0, "position": 10})


# ----- cache -------------------------------------------------------------------------------------


def test_second_build_reuses_the_token_cache(tmp_path, monkeypatch):
    path = write_docs(tmp_path, random_docs(np.random.default_rng(0), 20))
    first = build_data(text_config(path), seed=0)
    stores = [p for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()

    def refuse(self, texts):
        raise AssertionError("the tokenizer ran although the cache holds this corpus")

    monkeypatch.setattr(ByteTokenizer, "encode_arrays", refuse)
    second = build_data(text_config(path), seed=1)
    assert np.array_equal(first.train.tokens, second.train.tokens)
    assert np.array_equal(first.val.doc_ids, second.val.doc_ids)
    with pytest.raises(AssertionError, match="tokenizer ran"):  # new contents: tokenised again
        path.write_text("changed " * 40)
        build_data(text_config(path), seed=0)


def test_cache_dir_setting_wins_over_the_environment(tmp_path):
    path = write_docs(tmp_path, random_docs(np.random.default_rng(0), 20))
    build_data(text_config(path, cache_dir=str(tmp_path / "mine")), seed=0)
    assert list((tmp_path / "mine" / "tokens").glob("*/manifest.json"))
    assert not (tmp_path / "cache").exists()


def test_hf_source_through_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    docs = random_docs(np.random.default_rng(1), 25, min_len=5)
    with open(folder / "train.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"body": doc, "id": 1}) + "\n")
    cfg = DataConfig(name="hub", source="hf", hf_name=str(folder), hf_split="train", text_field="body", seq_len=8)
    data = build_data(cfg, seed=0)
    expected = np.concatenate([ByteTokenizer().encode(d) + [256] for d in docs])
    assert np.array_equal(np.concatenate([data.train.tokens, data.val.tokens]), expected)
    with pytest.raises(ValueError, match=r"data.text_field='text' is not a column .*columns: body, id"):
        build_data(DataConfig(source="hf", hf_name=str(folder), seq_len=8), seed=0)


# ----- errors ------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"data.path='.*nowhere.txt' does not exist"):
        build_data(text_config(tmp_path / "nowhere.txt"), seed=0)
    with pytest.raises(ValueError, match=r"data.path='.*\*.txt' matches no files"):
        build_data(text_config(tmp_path / "*.txt"), seed=0)


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "notes.md").write_text("not a txt")
    with pytest.raises(ValueError, match="is a folder with no .txt files"):
        build_data(text_config(tmp_path), seed=0)


@pytest.mark.parametrize("content", ["", "  \n\n", SEP + SEP])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="holds no text: the dataset has no tokens"):
        build_data(text_config(path), seed=0)


def test_seq_len_longer_than_the_corpus(tmp_path):
    path = write_docs(tmp_path, ["x" * 99])  # 100 tokens: 80 train, 20 validation
    with pytest.raises(ValueError, match=r"data.seq_len=64 is longer .* validation split has 20 tokens, so data.seq_len can be at most 19"):
        build_data(text_config(path, seq_len=64), seed=0)
    with pytest.raises(ValueError, match=r"data.seq_len=64 is longer .* training split has 30 tokens, so data.seq_len can be at most 29"):
        build_data(text_config(path, seq_len=64, val_fraction=0.7), seed=0)
    build_data(text_config(path, seq_len=19), seed=0)  # the advertised maximum works


def test_validation_split_too_small(tmp_path):
    path = write_docs(tmp_path, ["y" * 999])  # 1000 tokens
    with pytest.raises(ValueError, match=r"data.val_fraction=0.01 leaves 10 validation tokens.*at least 0.032 .* at most 9"):
        build_data(text_config(path, seq_len=31, val_fraction=0.01), seed=0)
    data = build_data(text_config(path, seq_len=31, val_fraction=0.032), seed=0)  # the advertised minimum works
    assert len(data.val) == 1


def test_tiny_corpus(tmp_path):
    path = write_docs(tmp_path, ["z"])
    with pytest.raises(ValueError, match="the dataset has only 2 tokens"):
        build_data(text_config(path, seq_len=1), seed=0)


@pytest.mark.parametrize("overrides, message", [
    (dict(source="s3"), r"data.source='s3' is not allowed \(choose from: text, hf\)"),
    (dict(seq_len=0), r"data.seq_len=0 must be > 0"),
    (dict(val_fraction=1.0), r"data.val_fraction=1.0 must be in \(0, 1\)"),
    (dict(source="hf"), r"data.hf_name must be set"),
])
def test_bad_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_data(text_config(write_docs(tmp_path, ["abc"] * 30), **overrides), seed=0)


def test_tokenizer_load_failures(tmp_path):
    with pytest.raises(ValueError, match=r"data.tokenizer='.*missing.json' does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"data.tokenizer='.*' is a folder without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"data.tokenizer='.*broken.json' could not be loaded"):
        load_tokenizer(str(tmp_path / "broken.json"))
    no_eot = make_hf_tokenizer(tmp_path / "no_eot.json", special=("[PAD]",))
    with pytest.raises(ValueError, match=r"data.tokenizer='.*no_eot.json' has no end-of-text token"):
        load_tokenizer(str(no_eot))


def test_hf_dataset_that_cannot_be_loaded(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"text": "hello " * 50}) + "\n")
    with pytest.raises(ValueError, match=r"data.hf_name='.*ds' .*data.hf_split='nope'.* could not be loaded"):
        build_data(DataConfig(source="hf", hf_name=str(folder), hf_split="nope", seq_len=8), seed=0)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"ok \xff\xfe bad" * 20)
    with pytest.raises(ValueError, match=r"data.path='.*binary.txt' could not be read as UTF-8 text"):
        build_data(text_config(path), seed=0)
