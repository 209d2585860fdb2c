"""RULER-style task generators and scoring (fatrain.eval.tasks), and the long-document filter of the
loss by position: each generator places what it claims where it claims (checked by decoding the
prompt), for a byte and a word-level tokenizer; tasks are reproducible from the seed; scoring on
hand-made outputs and through GPT.generate."""

import contextlib

import numpy as np
import pytest
import torch

from fatrain.data import ByteTokenizer
from fatrain.eval.loss import long_document_blocks, multi_length_eval
from fatrain.eval.tasks import (DEPTH_TASKS, TASKS, LongTask, TaskParams, TaskTooShort, exact_matches, make_task,
                                run_tasks, score_cell)
from fatrain.model import GPT, GPTSpec
from test_passkey import WordTokenizer

SMALL = TaskParams(common_freq=4, rare_freq=2, num_common=3)


def _words(text: str) -> list[str]:
    return text.replace(",", " ").replace(".", " ").split()


def check_placement(task: LongTask, tokenizer, context_len: int, params: TaskParams):
    """What each task claims about its prompt, read back from the decoded prompt."""
    assert len(task.prompt_ids) == context_len
    for (a, b), text in zip(task.spans, task.inserted):
        assert _words(tokenizer.decode(task.prompt_ids[a:b])) == _words(text)
    assert all(b <= c for (_, b), (c, _) in zip(task.spans, task.spans[1:]))  # in prompt order, disjoint
    tail = tokenizer.decode(task.prompt_ids[task.spans[-1][1]:])
    answer = _words(task.answer)
    if task.name in DEPTH_TASKS:
        a, b = task.spans[task.target_span]
        filler_before = a - sum(e - s for s, e in task.spans[:task.target_span])
        assert filler_before == round(task.depth * task.filler_len)
        if task.name in ("passkey", "niah_multikey"):
            # The answer's ids are the ids the target needle holds (pieces encoded alone).
            target, n = task.prompt_ids[a:b], len(task.answer_ids)
            assert any(target[i:i + n] == task.answer_ids for i in range(len(target)))
    if task.name == "passkey":
        assert answer[0] in task.inserted[0] and "pass key" in tail
    elif task.name == "niah_multikey":
        key = task.inserted[task.target_span].split()[7]
        assert f"for {key} mentioned" in tail and answer == [task.inserted[task.target_span].split()[-1][:-1]]
        assert len({t.split()[7] for t in task.inserted}) == params.num_needles
    elif task.name == "niah_multivalue":
        assert answer == [t.split()[-1][:-1] for t in task.inserted]  # every value, in the order of appearance
        assert len({t.split()[7] for t in task.inserted}) == 1
    elif task.name == "niah_multiquery":
        value_of = {t.split()[7]: t.split()[-1][:-1] for t in task.inserted}
        asked = tail.split("magic numbers for ")[1].split(" mentioned")[0].split(", ")
        assert answer == [value_of[k] for k in asked] and len(asked) == params.num_queries
    elif task.name == "variable_tracking":
        names = [t.split()[1] for t in task.inserted]
        value = task.inserted[0].split()[3][:-1]
        assert answer == names and all(f"VAR {names[i - 1]}." in task.inserted[i] for i in range(1, len(names)))
        assert f"assigned the value {value}" in tail
    elif task.name == "common_words":
        listed = [t.split()[1] for t in task.inserted]
        assert [t.split()[0] for t in task.inserted] == [f"{i}." for i in range(1, len(listed) + 1)]
        counts = {w: listed.count(w) for w in listed}
        assert sorted(w for w, c in counts.items() if c == params.common_freq) == sorted(answer)
        assert set(counts.values()) <= {params.common_freq, params.rare_freq}
        assert answer == sorted(answer, key=listed.index)  # in the order they first appear
    elif task.name == "frequent_words":
        stream = [t.strip() for t in task.inserted]
        counts = sorted(((stream.count(w), w) for w in set(stream)), reverse=True)
        assert answer == [w for _, w in counts[:params.num_frequent]]
        top = [c for c, _ in counts[:params.num_frequent + 1]]
        assert all(x > y for x, y in zip(top, top[1:]))  # strictly ordered, no tie at the cut


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("tokenizer_cls, context_len", [(ByteTokenizer, 1500), (WordTokenizer, 333)])
def test_each_task_places_what_it_claims(name, tokenizer_cls, context_len):
    tokenizer = tokenizer_cls()
    for depth, trial in ((0.0, 0), (0.37, 1), (1.0, 2)):
        task = make_task(name, tokenizer, context_len, depth, seed=5, trial=trial, params=SMALL)
        check_placement(task, tokenizer, context_len, SMALL)
        if name not in DEPTH_TASKS:
            break


def test_tasks_are_deterministic_and_too_short_is_named():
    tok = ByteTokenizer()
    for name in TASKS:
        a, b = (make_task(name, tok, 900, 0.5, seed=3, trial=1, params=SMALL) for _ in range(2))
        assert a == b
        assert make_task(name, tok, 900, 0.5, seed=4, trial=1, params=SMALL).prompt_ids != a.prompt_ids
        with pytest.raises(TaskTooShort, match="40 tokens cannot hold"):
            make_task(name, tok, 40, 0.5, seed=3, trial=1, params=SMALL)
    with pytest.raises(ValueError, match="ruler.depths: 1.5"):
        make_task("passkey", tok, 900, 1.5, seed=0, trial=0)
    with pytest.raises(ValueError, match="'niah' is not a task"):
        make_task("niah", tok, 900, 0.5, seed=0, trial=0)


def test_exact_match_on_hand_made_outputs():
    tasks = [LongTask("x", [1, 2], [7, 8, 9], "", None), LongTask("x", [1, 2], [5], "", None)]
    exact, hits = exact_matches(torch.tensor([[7, 8, 9], [5, 0, 0]]), tasks)  # extra tokens after an answer: ignored
    assert exact == [True, True] and hits == [3, 1]
    exact, hits = exact_matches(torch.tensor([[7, 0, 9], [4, 5, 5]]), tasks)
    assert exact == [False, False] and hits == [2, 0]


class Oracle:
    """Decodes the answer of every prompt it knows (and zeros for the rest): what a perfect model does."""

    def __init__(self, tasks, wrong=()):
        self.answers = {tuple(t.prompt_ids): t.answer_ids for t in tasks}
        self.wrong = set(wrong)

    def generate(self, idx, steps, *, temperature, use_cache):
        assert temperature == 0 and use_cache
        rows = []
        for row in idx.tolist():
            answer = list(self.answers.get(tuple(row), []))
            if tuple(row) in self.wrong:
                answer[-1] += 1
            rows.append(row + (answer + [0] * steps)[:steps])
        return torch.tensor(rows)


def test_scoring_through_generate_batches_and_grid():
    tok = ByteTokenizer()
    tasks = [make_task("niah_multivalue", tok, 600, 0.5, seed=0, trial=t, params=SMALL) for t in range(5)]
    oracle = Oracle(tasks, wrong=[tuple(tasks[3].prompt_ids)])
    cell = score_cell(oracle, tasks, batch_size=2, device="cpu", autocast=contextlib.nullcontext)
    assert cell["accuracy"] == pytest.approx(4 / 5)
    n = sum(len(t.answer_ids) for t in tasks)
    assert cell["token_accuracy"] == pytest.approx((n - 1) / n)

    # A real GPT through its KV cache: the grid's shape, skipped lengths and the per-length mean.
    torch.manual_seed(0)
    model = GPT(GPTSpec(vocab_size=257, attention="naive", n_layer=1, n_head=2, n_embd=32)).eval()
    out = run_tasks(model, tok, ["passkey", "common_words"], context_lens=[48, 600], depths=[0.0, 1.0], trials=1,
                    seed=0, params=SMALL, batch_size=2, device="cpu", autocast=contextlib.nullcontext)
    passkey, common = out["tasks"]["passkey"], out["tasks"]["common_words"]
    assert passkey["depths"] == [0.0, 1.0] and len(passkey["accuracy"]) == 2 and common["depths"] is None
    assert "600" not in common["skipped"] and "48" in common["skipped"] and common["accuracy"][0][0] is None
    assert "48" in passkey["skipped"] and all(0.0 <= row[1] <= 1.0 for row in passkey["accuracy"])
    assert out["summary"]["context_lens"] == [48, 600] and len(out["summary"]["mean_accuracy"]) == 2


def test_long_document_filter_keeps_blocks_inside_long_documents():
    lengths = [5, 40, 17, 33, 8]
    doc_ids = np.repeat(np.arange(len(lengths)), lengths)
    tokens = np.arange(len(doc_ids)) % 250
    blocks, long_docs = long_document_blocks(tokens, doc_ids, 16)
    assert long_docs == 3 and len(blocks) == 2 + 1 + 2  # floor((len - 1) / 16) blocks per document
    for i in range(len(blocks)):
        block = blocks[i]
        assert (block["doc_ids"] == 0).all()  # one document, from its own start or a block after it
    model = GPT(GPTSpec(vocab_size=250, attention="naive", n_layer=1, n_head=2, n_embd=32)).eval()
    at16, at64 = multi_length_eval(model, tokens, doc_ids, [16, 64], train_len=16, split="val", batch_size=2,
                                   max_batches=None, bucket_size=8, device="cpu", count_bytes=False,
                                   autocast=contextlib.nullcontext, long_documents=True)
    assert at16["long_documents"] == 3 and at16["tokens"] == 5 * 16
    assert "no document of at least seq_len+1=65" in at64["skipped"]
