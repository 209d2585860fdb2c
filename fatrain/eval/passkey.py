"""Passkey retrieval: a synthetic long-context probe (Mohtashami and Jaggi, 2023, section 4.2).

A random key is hidden at a chosen depth inside filler text and the model is asked for it
at the end. Every task is a sequence of exactly ``context_len`` token ids, built from
separately encoded pieces so that it works with any tokenizer and the key's position is
known to the token:

    [filler[:p]] [needle] [filler[p:F]] [question] [answer]
     needle   = "The pass key is" + " NNNNN" + ". Remember it. "
     question = "What is the pass key? The pass key is"
     answer   = " NNNNN"  (the same token ids as the key inside the needle)

F is what is left of ``context_len`` for filler (fixed sentences, repeated and cut at a
token boundary), and the needle starts at token ``p = round(depth * F)``: depth 0 puts it
first, depth 1 right before the question. The key and nothing else comes from the seed:
``(seed, context_len, depth, trial)`` fixes it, so the whole grid is reproducible.

Scoring is greedy decoding, computed in one teacher-forced forward pass: a trial counts as
retrieved when the argmax at every answer position is the key's next token. That is the
same as greedy decoding producing the key exactly (each greedy step sees exactly the
tokens teacher forcing feeds it, as long as all earlier steps were right), at the cost of
one forward pass and no sampling loop. ``token_accuracy`` (the fraction of answer tokens
whose argmax is right) is reported too, as a graded signal for models too weak to
retrieve whole keys; note that it counts the key's leading space (a token of its own with
the byte tokenizer), which even a model that ignores the context predicts.

Caution / known limits: the filler is a handful of repeated sentences, as in the original
task; the forward pass materialises the logits of the whole sequence (batch x context_len
x vocab floats), so lower the batch at long contexts with large vocabularies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fatrain.progress import progress

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE_BEFORE_KEY = "The pass key is"
NEEDLE_AFTER_KEY = ". Remember it. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyTask:
    """One passkey sequence: ``ids`` has ``context_len`` tokens; the answer is its last ``len(answer_ids)``."""

    ids: list[int]
    key: str
    answer_ids: list[int]
    depth: float
    needle_start: int  # index of the needle's first token in ids
    key_start: int  # index of the key's first token in ids (inside the needle)
    filler_len: int  # F: tokens of filler in the sequence

    @property
    def answer_start(self) -> int:
        return len(self.ids) - len(self.answer_ids)


def task_key(seed: int, context_len: int, depth: float, trial: int, digits: int = 5) -> str:
    """The key of one grid cell's trial: ``digits`` decimal digits, no leading zero."""
    # NOTE: SeedSequence mixes the whole tuple, so neighbouring cells get unrelated keys;
    # the depth enters in millionths because SeedSequence takes integers only.
    rng = np.random.default_rng(np.random.SeedSequence([seed, context_len, round(depth * 1_000_000), trial]))
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def minimum_context(tokenizer, digits: int = 5) -> int:
    """The shortest context_len that fits a task with no filler at all."""
    key = "9" * digits
    return len(_needle(tokenizer, key)[0]) + len(tokenizer.encode(QUESTION)) + len(tokenizer.encode(" " + key))


def _needle(tokenizer, key: str) -> tuple[list[int], int, list[int]]:
    before = tokenizer.encode(NEEDLE_BEFORE_KEY)
    key_ids = tokenizer.encode(" " + key)
    return before + key_ids + tokenizer.encode(NEEDLE_AFTER_KEY), len(before), key_ids


def make_task(tokenizer, context_len: int, depth: float, *, seed: int, trial: int, digits: int = 5) -> PasskeyTask:
    """The passkey sequence for one (context_len, depth, trial) cell; see the module docstring."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey.depths: {depth} is not a fraction of the context (allowed: 0.0 .. 1.0)")
    if digits < 1:
        raise ValueError(f"passkey.key_digits={digits} must be > 0")
    key = task_key(seed, context_len, depth, trial, digits)
    needle, key_offset, answer_ids = _needle(tokenizer, key)
    question = tokenizer.encode(QUESTION)
    filler_len = context_len - len(needle) - len(question) - len(answer_ids)
    if filler_len < 0:
        raise ValueError(f"passkey.context_lens: {context_len} tokens cannot hold the task "
                         f"(at least {minimum_context(tokenizer, digits)} with this tokenizer)")
    filler_unit = tokenizer.encode(FILLER)
    filler = (filler_unit * math.ceil(filler_len / len(filler_unit)))[:filler_len]
    p = round(depth * filler_len)
    ids = filler[:p] + needle + filler[p:] + question + answer_ids
    return PasskeyTask(ids=ids, key=key, answer_ids=answer_ids, depth=depth, needle_start=p,
                       key_start=p + key_offset, filler_len=filler_len)


@torch.no_grad()
def score_tasks(model, tasks: list[PasskeyTask], *, batch_size: int, device, autocast) -> dict:
    """Greedy exact-match accuracy and per-token accuracy of ``model`` on tasks of one length."""
    exact, token_hits, token_total = 0, 0, 0
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        ids = torch.tensor([t.ids for t in chunk], dtype=torch.long, device=device)
        with autocast():
            logits, _ = model(ids)
        for row, task in enumerate(chunk):
            a, n = task.answer_start, len(task.answer_ids)
            # logits at position i predict token i + 1.
            predicted = logits[row, a - 1:a - 1 + n].argmax(dim=-1)
            hits = (predicted == ids[row, a:a + n]).sum().item()
            exact += int(hits == n)
            token_hits += hits
            token_total += n
    return {"accuracy": exact / len(tasks), "token_accuracy": token_hits / token_total}


def run_passkey(model, tokenizer, *, context_lens, depths, trials: int, seed: int, digits: int,
                batch_size: int, device, autocast) -> dict:
    """Accuracy over the context_lens x depths grid, ``trials`` tasks per cell.

    Returns a dict with ``accuracy`` and ``token_accuracy`` as [depth][context] lists (the
    heat map's rows and columns); a length too short for the task is listed in ``skipped``
    with the reason and its column holds None.
    """
    if trials < 1:
        raise ValueError(f"passkey.trials={trials} must be > 0")
    accuracy = [[None] * len(context_lens) for _ in depths]
    token_accuracy = [[None] * len(context_lens) for _ in depths]
    skipped = {}
    shortest = minimum_context(tokenizer, digits)
    for length in context_lens:
        if length < shortest:
            skipped[str(length)] = f"{length} tokens cannot hold the task (at least {shortest} with this tokenizer)"
    cells = [(i, j) for j, length in enumerate(context_lens) if str(length) not in skipped
             for i in range(len(depths))]
    for i, j in progress(cells, desc=f"passkey (context x depth, {trials} trials each)", unit="cell"):
        length, depth = context_lens[j], depths[i]
        tasks = [make_task(tokenizer, length, depth, seed=seed, trial=t, digits=digits) for t in range(trials)]
        cell = score_tasks(model, tasks, batch_size=batch_size, device=device, autocast=autocast)
        accuracy[i][j], token_accuracy[i][j] = cell["accuracy"], cell["token_accuracy"]
    return {
        "context_lens": list(context_lens), "depths": list(depths), "trials": trials, "seed": seed,
        "key_digits": digits, "accuracy": accuracy, "token_accuracy": token_accuracy, "skipped": skipped,
        "scoring": "greedy exact match of the key's tokens (teacher-forced argmax, equivalent to greedy decoding)",
    }
