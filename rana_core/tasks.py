"""Accuracy beside perplexity: a built-in cloze task on held-out Brown text, and multiple-choice tasks read from
local files in lm-evaluation-harness's layout, with results in lm-eval's JSON shape.

- **cloze** (LAMBADA-style, offline): sentences of the held-out split of at least 20 tokens whose last word is a
  word of letters; the model reads the sentence up to that word and must produce the word's tokens greedily. One
  forward per item, fed the word's tokens: the item is right when every one of them is the model's argmax at its
  position (exactly what greedy decoding would have produced).
- **multiple choice**: JSON lines {"context": str, "choices": [str, …], "gold": int}. Each choice is scored by
  the summed log-likelihood of its tokens after the context and the delimiter " " (its continuation); `acc` picks
  the highest, `acc_norm` the highest per character of the continuation. Standard errors are the sample standard
  deviation of the per-item scores over √n, as lm-eval reports them.

Tokens of a continuation are those of encode(context + continuation) past encode(context); an item whose context
does not tokenize to a prefix of the whole (a merge across the boundary), or is empty, is skipped and counted.

    items = cloze_items(loaded.tokenizer)
    result = cloze_accuracy(loaded.model, loaded.tokenizer, items)     # TaskResult("cloze", n, acc, acc_stderr)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rana_core.corpus import split_sentences
from rana_core.errors import RanaError
from rana_core.progress import ProgressFn, no_progress
from rana_core.task_files import CLOZE, load_multiple_choice, task_name

CLOZE_ITEMS = 1000
CLOZE_MIN_TOKENS = 20
DELIMITER = " "
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{2,})[.!?;:,\"')]*$")


@dataclass(frozen=True)
class Scored:
    """An item's context tokens and its continuations' tokens (one for cloze, one per choice)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...] = ()  # characters of each continuation (for acc_norm)
    gold: int = 0


@dataclass(frozen=True)
class TaskResult:
    task: str
    items: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    skipped: int = 0  # items whose context did not tokenize to a prefix of the whole


def cloze_items(tokenizer, count: int = CLOZE_ITEMS, min_tokens: int = CLOZE_MIN_TOKENS,
                root: str | None = None) -> tuple[list[Scored], int]:
    """(items, skipped): the first `count` held-out sentences, in corpus order, that qualify."""
    items, skipped, bos = [], 0, tokenizer.bos_ids
    for sentence in split_sentences("heldout", root):
        match = _LAST_WORD.match(sentence)
        if match is None:
            continue
        scored = _scored(tokenizer, match["context"], [DELIMITER + match["word"]])
        if scored is None:
            skipped += 1
            continue
        if len(scored.context) - len(bos) + len(scored.continuations[0]) < min_tokens:  # the sentence's own tokens
            continue
        items.append(scored)
        if len(items) == count:
            return items, skipped
    raise RanaError(f"the held-out split has only {len(items)} cloze sentences of {min_tokens}+ tokens; "
                    f"asked for {count}")


def multiple_choice_items(tokenizer, items: list[dict]) -> tuple[list[Scored], int]:
    scored, skipped = [], 0
    for item in items:
        continuations = [DELIMITER + choice for choice in item["choices"]]
        one = _scored(tokenizer, item["context"], continuations, item["gold"])
        if one is None:
            skipped += 1
        else:
            scored.append(one)
    return scored, skipped


def cloze_accuracy(model, tokenizer, count: int = CLOZE_ITEMS, progress: ProgressFn = no_progress,
                   root: str | None = None) -> TaskResult:
    items, skipped = cloze_items(tokenizer, count, root=root)
    acc, stderr = _mean_stderr([float(greedy[0]) for _, greedy in _score(model, items, progress)])
    return TaskResult("cloze", len(items), acc, stderr, skipped=skipped)


def multiple_choice_accuracy(model, tokenizer, name: str, items: list[dict],
                             progress: ProgressFn = no_progress) -> TaskResult:
    scored, skipped = multiple_choice_items(tokenizer, items)
    if not scored:
        raise RanaError(f"task {name}: no item could be scored")
    acc, acc_norm = [], []
    for item, (logprobs, _) in zip(scored, _score(model, scored, progress)):
        acc.append(float(max(range(len(logprobs)), key=lambda i: logprobs[i]) == item.gold))
        normed = [lp / length for lp, length in zip(logprobs, item.lengths)]
        acc_norm.append(float(max(range(len(normed)), key=lambda i: normed[i]) == item.gold))
    mean, stderr = _mean_stderr(acc)
    norm_mean, norm_stderr = _mean_stderr(acc_norm)
    return TaskResult(name, len(scored), mean, stderr, norm_mean, norm_stderr, skipped)


def run_tasks(model, tokenizer, tasks: list[str], progress: ProgressFn = no_progress) -> list[TaskResult]:
    """Each task ("cloze", or a multiple-choice file) on `model` as it is now (adapters injected or not)."""
    results = []
    for index, task in enumerate(tasks):
        step = lambda f, m, index=index: progress((index + f) / len(tasks), f"{task_name(task)}: {m}")  # noqa: E731
        if task == CLOZE:
            results.append(cloze_accuracy(model, tokenizer, progress=step))
        else:
            results.append(multiple_choice_accuracy(model, tokenizer, task_name(task), load_multiple_choice(task),
                                                    step))
    return results


def lm_eval_results(results: list[TaskResult], config: dict | None = None) -> dict:
    """The results in lm-evaluation-harness's JSON shape (results[task]["acc,none"], "acc_stderr,none", …)."""
    shaped = {}
    for result in results:
        row = {"alias": result.task, "acc,none": result.acc, "acc_stderr,none": result.acc_stderr}
        if result.acc_norm is not None:
            row.update({"acc_norm,none": result.acc_norm, "acc_norm_stderr,none": result.acc_norm_stderr})
        shaped[result.task] = row
    return {"results": shaped,
            "n-samples": {r.task: {"original": r.items + r.skipped, "effective": r.items} for r in results},
            "config": config or {}}


def _scored(tokenizer, context: str, continuations: list[str], gold: int = 0) -> Scored | None:
    bos = list(tokenizer.bos_ids)  # a model that expects a begin-of-text token gets it
    start = bos + tokenizer.encode(context)
    if len(start) == len(bos):  # the first continuation token needs a position to be predicted from
        return None
    tails = []
    for continuation in continuations:
        whole = bos + tokenizer.encode(context + continuation)
        if whole[: len(start)] != start or len(whole) == len(start):
            return None
        tails.append(tuple(whole[len(start):]))
    return Scored(tuple(start), tuple(tails), tuple(len(c) for c in continuations), gold)


@torch.no_grad()
def _score(model, items: list[Scored], progress: ProgressFn, batch_size: int = 16):
    """For each item: (summed log-likelihood of each continuation, whether each is the greedy argmax throughout).
    Sequences are right-padded: a causal model's outputs at a position never see the padding after it."""
    rows = [(i, j, item.context + tail) for i, item in enumerate(items) for j, tail in enumerate(item.continuations)]
    rows.sort(key=lambda row: len(row[2]))
    device = next(model.parameters()).device
    out: dict[tuple[int, int], tuple[float, bool]] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        width = max(len(tokens) for _, _, tokens in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (_, _, tokens) in enumerate(batch):
            ids[b, : len(tokens)] = torch.tensor(tokens)
        logits = model(ids.to(device)).logits.float()
        logprobs = F.log_softmax(logits, dim=-1)
        for b, (i, j, tokens) in enumerate(batch):
            first = len(items[i].context)  # the continuation's first token is predicted at position first − 1
            target = torch.tensor(tokens[first:], device=device)
            positions = torch.arange(first - 1, len(tokens) - 1, device=device)
            picked = logprobs[b, positions, target]
            greedy = bool((logits[b, positions].argmax(-1) == target).all())
            out[(i, j)] = (picked.sum().item(), greedy)
        progress(min(start + batch_size, len(rows)) / len(rows), f"{min(start + batch_size, len(rows))}/{len(rows)}")
    for i, item in enumerate(items):
        pairs = [out[(i, j)] for j in range(len(item.continuations))]
        yield [p[0] for p in pairs], [p[1] for p in pairs]


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
