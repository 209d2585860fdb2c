"""Passkey task generator and scorer: the key sits where asked, tasks are reproducible, scoring lines up."""

import pytest
import torch

from fatrain.data import ByteTokenizer
from fatrain.eval.passkey import QUESTION, make_task, minimum_context, run_passkey, score_tasks


class WordTokenizer:
    """A stand-in for a subword tokenizer: one id per whitespace-separated word (and one per digit run)."""

    name = "words"
    eot_id = 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(word, len(self.vocab) + 1) for word in text.split()]

    def decode(self, ids):
        inverse = {i: w for w, i in self.vocab.items()}
        return " ".join(inverse[i] for i in ids if i in inverse)


TOKENIZERS = {"byte": ByteTokenizer, "words": WordTokenizer}


@pytest.mark.parametrize("tokenizer", ["byte", "words"])
@pytest.mark.parametrize("context_len", [160, 333])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_is_at_the_asked_depth(tokenizer, context_len, depth):
    tok = TOKENIZERS[tokenizer]()
    task = make_task(tok, context_len, depth, seed=3, trial=1)
    assert len(task.ids) == context_len
    n = len(task.answer_ids)
    assert task.ids[task.key_start:task.key_start + n] == task.answer_ids
    assert task.ids[-n:] == task.answer_ids
    assert task.needle_start == round(depth * task.filler_len)
    assert abs(task.needle_start - depth * task.filler_len) <= 0.5
    question = tok.encode(QUESTION)
    assert task.ids[task.answer_start - len(question):task.answer_start] == question
    needle_text = tok.decode(task.ids[task.needle_start:task.key_start + n])
    assert needle_text.startswith("The pass key is") and needle_text.endswith(task.key)
    assert len(task.key) == 5 and task.key.isdigit()


def test_tasks_are_deterministic_from_the_seed():
    tok = ByteTokenizer()
    first = [make_task(tok, 200, 0.5, seed=7, trial=t) for t in range(8)]
    again = [make_task(tok, 200, 0.5, seed=7, trial=t) for t in range(8)]
    other = [make_task(tok, 200, 0.5, seed=8, trial=t) for t in range(8)]
    assert [t.ids for t in first] == [t.ids for t in again]
    assert len({t.key for t in first}) > 1, "trials should get different keys"
    assert [t.key for t in first] != [t.key for t in other]


def test_too_short_context_and_bad_depth():
    tok = ByteTokenizer()
    shortest = minimum_context(tok)
    assert len(make_task(tok, shortest, 0.5, seed=0, trial=0).ids) == shortest
    with pytest.raises(ValueError, match="cannot hold the task"):
        make_task(tok, shortest - 1, 0.5, seed=0, trial=0)
    with pytest.raises(ValueError, match="passkey.depths"):
        make_task(tok, 200, 1.5, seed=0, trial=0)


class PeekingModel:
    """Logits that put all mass on the next token of the input itself (a model that reads ahead)."""

    def __init__(self, vocab, wrong=False):
        self.vocab, self.wrong = vocab, wrong

    def __call__(self, ids):
        nxt = torch.roll(ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        return torch.nn.functional.one_hot(nxt, self.vocab).float(), None


def test_scoring_reads_the_answer_positions():
    tok = ByteTokenizer()
    tasks = [make_task(tok, 120, d, seed=1, trial=t) for d in (0.0, 1.0) for t in range(3)]
    kwargs = dict(batch_size=4, device="cpu", autocast=torch.autograd.grad_mode.no_grad)
    assert score_tasks(PeekingModel(tok.vocab_size), tasks, **kwargs) == {"accuracy": 1.0, "token_accuracy": 1.0}
    assert score_tasks(PeekingModel(tok.vocab_size, wrong=True), tasks, **kwargs)["accuracy"] == 0.0


def test_grid_shape_and_skipped_lengths():
    tok = ByteTokenizer()
    out = run_passkey(PeekingModel(tok.vocab_size), tok, context_lens=[50, 100, 130], depths=[0.0, 0.5],
                      trials=2, seed=0, digits=5, batch_size=8, device="cpu",
                      autocast=torch.autograd.grad_mode.no_grad)
    assert out["accuracy"] == [[None, 1.0, 1.0], [None, 1.0, 1.0]]
    assert list(out["skipped"]) == ["50"] and "cannot hold the task" in out["skipped"]["50"]
