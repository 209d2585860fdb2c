"""RULER-style long-context tasks (Hsieh et al., 2024): synthetic prompts of any length, for any
tokenizer, scored by exact match of greedy decoding; no judge model.

    eval.tasks=[passkey, niah_multikey, niah_multivalue, niah_multiquery, variable_tracking,
                common_words, frequent_words]

Every prompt is exactly ``context_len`` token ids, built from separately encoded pieces (as
passkey.py builds its task), so the token position of everything inserted is known and the
answer's ids are the ids the prompt holds:

    passkey            one needle "The pass key is NNNNNNN. Remember it." at the depth; asks for it
    niah_multikey      ruler.num_needles needles "One of the special magic numbers for <key> is: <value>."
                       with different keys; the target's at the depth, the distractors' at random
                       depths; asks for the target key's value
    niah_multivalue    ruler.num_values needles with the same key and different values (the first at
                       the depth); asks for all of them, answer in the order they appear
    niah_multiquery    ruler.num_queries needles with different keys (the first queried at the
                       depth); asks for every key's value, answer in the order of the question
    variable_tracking  a chain "VAR A = 1234567." "VAR B = VAR A." ... of ruler.num_hops assignments
                       spread through the filler in order; asks which variables hold the value,
                       answer the names in chain order
    common_words       a numbered list: ruler.num_common words ruler.common_freq times each, the other
                       words ruler.rare_freq times each, as many as fit, shuffled; asks for the common
                       words, answer in the order they first appear
    frequent_words     a stream of words drawn from a Zipf distribution (ruler.zipf_alpha) over
                       pseudo-words; asks for the ruler.num_frequent most frequent, most frequent first
                       (drawn again until their counts are strictly ordered)

The needle tasks hide their needles in filler (passkey's sentences, repeated and cut at a token
boundary); the depth d puts a needle at token round(d * F) of the F filler tokens. The list and
stream tasks have no depth; the tokens they leave free of a whole list item or word are filler
before the instructions. Keys, values, names and words come from one numpy generator seeded by
``(seed, task, context_len, depth, trial)``, so the grid is reproducible and cells are unrelated.

Scoring: the prompts of one cell are decoded greedily through the model's KV cache
(``GPT.generate``, temperature 0) for as many tokens as the longest answer; a trial counts when
the first ``len(answer)`` generated ids equal the answer's ids. ``token_accuracy`` (the share of
answer positions decoded right) is reported as a graded signal.

Caution / known limits: the filler is a few repeated sentences (RULER's noise haystack), not
essays; a needle can split a filler sentence; pseudo-words stand in for RULER's English word
lists (no download); answers are exact token matches in a fixed order, stricter than RULER's
recall-based scores for the multi-answer tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from fatrain.eval.passkey import FILLER, NEEDLE_AFTER_KEY, NEEDLE_BEFORE_KEY, QUESTION
from fatrain.progress import progress

TASKS = ("passkey", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words",
         "frequent_words")
DEPTH_TASKS = ("passkey", "niah_multikey", "niah_multivalue", "niah_multiquery")

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class TaskParams:
    """The generators' knobs (fatrain-eval's ruler.* settings)."""

    value_digits: int = 7
    num_needles: int = 4
    num_values: int = 4
    num_queries: int = 4
    num_hops: int = 4
    num_common: int = 4
    common_freq: int = 10
    rare_freq: int = 3
    zipf_alpha: float = 2.0
    num_frequent: int = 3
    vocab_words: int = 200  # frequent_words: distinct pseudo-words the stream draws from


@dataclass
class LongTask:
    """One prompt of ``context_len`` ids and its answer; ``spans`` are the token ranges [start, end) of
    what was inserted, with ``inserted`` their texts (needles, assignments), for tests and debugging."""

    name: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    depth: Optional[float]
    spans: list[tuple[int, int]] = field(default_factory=list)
    inserted: list[str] = field(default_factory=list)
    filler_len: int = 0  # tokens of filler in the prompt
    target_span: Optional[int] = None  # the needle tasks: the span placed at ``depth``


class TaskTooShort(ValueError):
    """The context cannot hold the task's fixed parts."""


def _rng(seed: int, task: str, context_len: int, depth: Optional[float], trial: int) -> np.random.Generator:
    # NOTE: SeedSequence takes non-negative integers: the depth in millionths, plus one (0: no depth).
    depth_code = 0 if depth is None else round(depth * 1_000_000) + 1
    return np.random.default_rng(np.random.SeedSequence([seed, TASKS.index(task), context_len, depth_code, trial]))


def _number(rng, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _word(rng, syllables: int = 3) -> str:
    return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))


def _distinct(rng, n: int, make) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        candidate = make(rng)
        if candidate not in out:
            out.append(candidate)
    return out


def _filler(tokenizer, n: int) -> list[int]:
    unit = tokenizer.encode(FILLER)
    return (unit * math.ceil(n / len(unit)))[:n] if n > 0 else []


def _haystack(tokenizer, context_len: int, needles: list[tuple[float, list[int]]], tail: list[int],
              what: str) -> tuple[list[int], list[int]]:
    """Filler with each (depth, ids) needle at token round(depth * F) of the F filler tokens, then ``tail``;
    exactly ``context_len`` ids. Returns (ids, each needle's start, F)."""
    filler_len = context_len - sum(len(ids) for _, ids in needles) - len(tail)
    if filler_len < 0:
        raise TaskTooShort(f"{context_len} tokens cannot hold {what} (needs {context_len - filler_len})")
    filler = _filler(tokenizer, filler_len)
    order = sorted(range(len(needles)), key=lambda k: (round(needles[k][0] * filler_len), k))
    ids: list[int] = []
    starts = [0] * len(needles)
    previous = 0
    for k in order:
        p = round(needles[k][0] * filler_len)
        ids += filler[previous:p]
        starts[k] = len(ids)
        ids += needles[k][1]
        previous = p
    ids += filler[previous:] + tail
    return ids, starts, filler_len


def _magic_needle(tokenizer, key: str, value: str) -> tuple[list[int], list[int], str]:
    """The needle's ids, the value's ids inside it, and its text."""
    value_ids = tokenizer.encode(" " + value)
    ids = tokenizer.encode(f"One of the special magic numbers for {key} is:") + value_ids + tokenizer.encode(". ")
    return ids, value_ids, f"One of the special magic numbers for {key} is: {value}. "


def _needle_task(name: str, tokenizer, context_len: int, depth: float, rng, p: TaskParams) -> LongTask:
    if name == "passkey":
        key = _number(rng, p.value_digits)
        answer_ids = tokenizer.encode(" " + key)
        needle = tokenizer.encode(NEEDLE_BEFORE_KEY) + answer_ids + tokenizer.encode(NEEDLE_AFTER_KEY)
        ids, starts, filler_len = _haystack(tokenizer, context_len, [(depth, needle)],
                                            tokenizer.encode(" " + QUESTION), "the passkey task")
        return LongTask(name, ids, answer_ids, " " + key, depth, [(starts[0], starts[0] + len(needle))],
                        [f"{NEEDLE_BEFORE_KEY} {key}{NEEDLE_AFTER_KEY}"], filler_len, 0)
    count = {"niah_multikey": p.num_needles, "niah_multivalue": p.num_values, "niah_multiquery": p.num_queries}[name]
    depths = [depth] + [float(d) for d in rng.uniform(0.0, 1.0, size=count - 1)]
    values = _distinct(rng, count, lambda r: _number(r, p.value_digits))
    if name == "niah_multivalue":
        keys = [_word(rng)] * count
    else:
        keys = _distinct(rng, count, _word)
    needles = [_magic_needle(tokenizer, k, v) for k, v in zip(keys, values)]
    if name == "niah_multikey":
        question = (f"What is the special magic number for {keys[0]} mentioned in the provided text? "
                    f"The special magic number for {keys[0]} mentioned in the provided text is:")
        answer_values = [values[0]]
    elif name == "niah_multivalue":
        question = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                    f"The special magic numbers for {keys[0]} mentioned in the provided text are:")
        answer_values = None  # in the order of appearance, known once placed
    else:
        asked = [int(i) for i in rng.permutation(count)]
        if asked[0] != 0:  # the needle at the asked depth is queried first
            asked.remove(0)
            asked.insert(0, 0)
        listed = ", ".join(keys[i] for i in asked)
        question = (f"What are the special magic numbers for {listed} mentioned in the provided text? "
                    f"The special magic numbers for {listed} mentioned in the provided text are:")
        answer_values = [values[i] for i in asked]
    ids, starts, filler_len = _haystack(tokenizer, context_len, [(d, n[0]) for d, n in zip(depths, needles)],
                                        tokenizer.encode(" " + question), f"the {name} task")
    if answer_values is None:
        answer_values = [values[k] for k in sorted(range(count), key=lambda k: starts[k])]
    answer = " " + ", ".join(answer_values)
    order = sorted(range(count), key=lambda k: starts[k])
    return LongTask(name, ids, tokenizer.encode(answer), answer, depth,
                    [(starts[k], starts[k] + len(needles[k][0])) for k in order], [needles[k][2] for k in order],
                    filler_len, order.index(0))


def _variable_tracking(tokenizer, context_len: int, rng, p: TaskParams) -> LongTask:
    value = _number(rng, p.value_digits)
    names = _distinct(rng, p.num_hops + 1, lambda r: "".join(_LETTERS[i] for i in r.integers(len(_LETTERS), size=5)))
    texts = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, len(names))]
    depths = sorted(float(d) for d in rng.uniform(0.0, 1.0, size=len(texts)))
    question = (f" Question: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain of variable assignments in the text above, {len(names)} variables are "
                f"assigned the value {value}, they are:")
    statements = [tokenizer.encode(t) for t in texts]
    ids, starts, filler_len = _haystack(tokenizer, context_len, list(zip(depths, statements)),
                                        tokenizer.encode(question), "the variable_tracking task")
    answer = " " + " ".join(names)
    return LongTask("variable_tracking", ids, tokenizer.encode(answer), answer, None,
                    [(s, s + len(n)) for s, n in zip(starts, statements)], texts, filler_len)


def _pad_front(tokenizer, context_len: int, body: list[int], what: str) -> list[int]:
    if len(body) > context_len:
        raise TaskTooShort(f"{context_len} tokens cannot hold {what} (needs {len(body)})")
    return _filler(tokenizer, context_len - len(body)) + body


def _common_words(tokenizer, context_len: int, rng, p: TaskParams) -> LongTask:
    header = tokenizer.encode(" Below is a numbered list of words. Some of them appear more often than the others. "
                              "Memorize the ones that appear most often.")
    question_text = (f" Question: What are the {p.num_common} most common words in the above list? Answer: The top "
                     f"{p.num_common} words that appear most often in the list, in the order they first appear, are:")
    question = tokenizer.encode(question_text)
    budget = context_len - len(header) - len(question)
    # NOTE: items are encoded as " <i>." + " <word>", so the list's length does not depend on its order.
    number_len = [len(tokenizer.encode(f" {i}.")) for i in range(1, max(budget, 0) + 2)]
    number_prefix = np.concatenate(([0], np.cumsum(number_len)))  # tokens of the first k item numbers
    words = _distinct(rng, p.num_common, _word)
    common_tokens = p.common_freq * sum(len(tokenizer.encode(" " + w)) for w in words)

    def needed(items: int, word_tokens: int) -> int:
        return budget + 1 if items >= len(number_len) else int(number_prefix[items]) + word_tokens

    items, used = p.num_common * p.common_freq, common_tokens
    if needed(items, used) > budget:
        raise TaskTooShort(f"{context_len} tokens cannot hold the common_words task's {p.num_common} x "
                           f"{p.common_freq} common words")
    n_rare = 0
    while True:
        w = _word(rng)
        if w in words:
            continue
        extra = p.rare_freq * len(tokenizer.encode(" " + w))
        if needed(items + p.rare_freq, used + extra) > budget:
            break
        words.append(w)
        items, used, n_rare = items + p.rare_freq, used + extra, n_rare + 1
    listed = [w for w in words[:p.num_common] for _ in range(p.common_freq)]
    listed += [w for w in words[p.num_common:p.num_common + n_rare] for _ in range(p.rare_freq)]
    listed = [listed[i] for i in rng.permutation(len(listed))]
    body = list(header)
    spans, inserted = [], []
    for i, w in enumerate(listed, start=1):
        item = tokenizer.encode(f" {i}.") + tokenizer.encode(" " + w)
        spans.append((len(body), len(body) + len(item)))
        inserted.append(f" {i}. {w}")
        body += item
    body += question
    ids = _pad_front(tokenizer, context_len, body, "the common_words task")
    shift = len(ids) - len(body)
    common = set(words[:p.num_common])
    first_seen = []
    for w in listed:
        if w in common and w not in first_seen:
            first_seen.append(w)
    answer = " " + " ".join(first_seen)
    return LongTask("common_words", ids, tokenizer.encode(answer), answer, None,
                    [(a + shift, b + shift) for a, b in spans], inserted, shift)


def _frequent_words(tokenizer, context_len: int, rng, p: TaskParams) -> LongTask:
    header = tokenizer.encode(" Read the following coded text and track the frequency of each coded word. Find the "
                              f"{p.num_frequent} most frequently appeared coded words.")
    question = tokenizer.encode(f" Question: What are the {p.num_frequent} most frequently appeared words in the above "
                                f"coded text? Answer: According to the coded text above, the {p.num_frequent} most "
                                "frequently appeared words, most frequent first, are:")
    budget = context_len - len(header) - len(question)
    if budget <= 0:
        raise TaskTooShort(f"{context_len} tokens cannot hold the frequent_words task "
                           f"(its instructions alone are {len(header) + len(question)})")
    vocab = _distinct(rng, p.vocab_words, _word)
    ids_of = {w: tokenizer.encode(" " + w) for w in vocab}
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** p.zipf_alpha
    weights /= weights.sum()
    for _ in range(100):
        stream, used = [], 0
        while True:
            w = vocab[int(rng.choice(len(vocab), p=weights))]
            if used + len(ids_of[w]) > budget:
                break
            stream.append(w)
            used += len(ids_of[w])
        counts: dict[str, int] = {}
        for w in stream:
            counts[w] = counts.get(w, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        top = [c for _, c in ranked[:p.num_frequent + 1]] + [0]
        if len(ranked) >= p.num_frequent and all(top[i] > top[i + 1] for i in range(p.num_frequent)):
            break
    else:
        raise TaskTooShort(f"{context_len} tokens cannot hold a stream with {p.num_frequent} strictly most "
                           "frequent words (100 draws tried)")
    body = list(header)
    spans = []
    for w in stream:
        spans.append((len(body), len(body) + len(ids_of[w])))
        body += ids_of[w]
    body += question
    ids = _pad_front(tokenizer, context_len, body, "the frequent_words task")
    shift = len(ids) - len(body)
    answer = " " + " ".join(w for w, _ in ranked[:p.num_frequent])
    return LongTask("frequent_words", ids, tokenizer.encode(answer), answer, None,
                    [(a + shift, b + shift) for a, b in spans], [" " + w for w in stream], shift)


def make_task(name: str, tokenizer, context_len: int, depth: Optional[float] = None, *, seed: int, trial: int,
              params: Optional[TaskParams] = None) -> LongTask:
    """One prompt of task ``name`` (see the module docstring); raise TaskTooShort if it cannot fit."""
    if name not in TASKS:
        raise ValueError(f"eval.tasks: {name!r} is not a task (choose from: {', '.join(TASKS)})")
    p = params or TaskParams()
    if name in DEPTH_TASKS:
        if depth is None or not 0.0 <= depth <= 1.0:
            raise ValueError(f"ruler.depths: {depth} is not a fraction of the context (allowed: 0.0 .. 1.0)")
    else:
        depth = None
    rng = _rng(seed, name, context_len, depth, trial)
    if name in DEPTH_TASKS:
        return _needle_task(name, tokenizer, context_len, depth, rng, p)
    if name == "variable_tracking":
        return _variable_tracking(tokenizer, context_len, rng, p)
    if name == "common_words":
        return _common_words(tokenizer, context_len, rng, p)
    return _frequent_words(tokenizer, context_len, rng, p)


def exact_matches(generated: torch.Tensor, tasks: list[LongTask]) -> tuple[list[bool], list[int]]:
    """Per task: whether the first len(answer) generated ids are the answer's, and how many of them are right.
    ``generated`` (len(tasks), >= the longest answer) holds only the new ids."""
    exact, hits = [], []
    for row, task in enumerate(tasks):
        n = len(task.answer_ids)
        right = sum(int(a == b) for a, b in zip(generated[row, :n].tolist(), task.answer_ids))
        exact.append(right == n)
        hits.append(right)
    return exact, hits


@torch.no_grad()
def score_cell(model, tasks: list[LongTask], *, batch_size: int, device, autocast) -> dict:
    """Greedy decoding through the KV cache; exact-match and per-token accuracy over ``tasks``."""
    exact_total, token_hits, token_total = 0, 0, 0
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        prompt = torch.tensor([t.prompt_ids for t in chunk], dtype=torch.long, device=device)
        steps = max(len(t.answer_ids) for t in chunk)
        with autocast():
            out = model.generate(prompt, steps, temperature=0, use_cache=True)
        exact, hits = exact_matches(out[:, prompt.shape[1]:].cpu(), chunk)
        exact_total += sum(exact)
        token_hits += sum(hits)
        token_total += sum(len(t.answer_ids) for t in chunk)
    return {"accuracy": exact_total / len(tasks), "token_accuracy": token_hits / token_total}


def run_tasks(model, tokenizer, names: list[str], *, context_lens: list[int], depths: list[float], trials: int,
              seed: int, params: TaskParams, batch_size: int, device, autocast) -> dict:
    """Accuracy per task x context length (x depth for the needle tasks) and the mean over tasks per length.

    Per task: ``accuracy`` and ``token_accuracy`` as [depth][context] lists (one row for a task without
    depth), None where the length cannot hold the task (its reason under ``skipped``). ``summary``:
    per context length, the mean over tasks of each task's mean accuracy over its depths.
    """
    if trials < 1:
        raise ValueError(f"ruler.trials={trials} must be > 0")
    for name in names:
        if name not in TASKS:
            raise ValueError(f"eval.tasks: {name!r} is not a task (choose from: {', '.join(TASKS)})")
    out: dict = {}
    cells = []
    for name in names:
        rows = list(depths) if name in DEPTH_TASKS else [None]
        out[name] = {"context_lens": list(context_lens), "depths": rows if name in DEPTH_TASKS else None,
                     "accuracy": [[None] * len(context_lens) for _ in rows],
                     "token_accuracy": [[None] * len(context_lens) for _ in rows], "skipped": {}}
        cells += [(name, i, j) for j in range(len(context_lens)) for i in range(len(rows))]
    for name, i, j in progress(cells, desc=f"long-context tasks (task x context x depth, {trials} trials each)",
                               unit="cell"):
        entry, length = out[name], context_lens[j]
        if str(length) in entry["skipped"]:
            continue
        depth = entry["depths"][i] if entry["depths"] is not None else None
        try:
            tasks = [make_task(name, tokenizer, length, depth, seed=seed, trial=t, params=params) for t in range(trials)]
        except TaskTooShort as e:
            entry["skipped"][str(length)] = str(e)
            continue
        cell = score_cell(model, tasks, batch_size=batch_size, device=device, autocast=autocast)
        entry["accuracy"][i][j], entry["token_accuracy"][i][j] = cell["accuracy"], cell["token_accuracy"]
    summary = []
    for j, _ in enumerate(context_lens):
        per_task = [_mean([row[j] for row in out[name]["accuracy"]]) for name in names]
        summary.append(_mean(per_task))
    return {"tasks": out, "summary": {"context_lens": list(context_lens), "mean_accuracy": summary,
                                      "tasks": list(names)},
            "trials": trials, "seed": seed, "params": dict(params.__dict__),
            "scoring": "greedy decoding through the KV cache, exact match of the answer's token ids"}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
