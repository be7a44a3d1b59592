"""Accuracy on tasks (rana_core.tasks): the built-in cloze items come from held-out Brown only; scoring lines each
continuation token up with the position that predicts it (checked with models whose predictions are known:
an oracle that reads the next token, one wrong only at a context position, one wrong only at a word's last
token); multiple choice picks by summed and by per-character log-likelihood (a unigram model where the two
disagree); lm-eval's JSON shape; a bad task file is one line."""

import json
import math

import pytest
import torch
from torch import nn

from rana_core.corpus import split_sentences
from rana_core.errors import RanaError
from rana_core.loading import ByteTokenizer
from rana_core.task_files import load_multiple_choice
from rana_core.tasks import cloze_accuracy, cloze_items, lm_eval_results, multiple_choice_accuracy

VOCAB = 257


class Output:
    def __init__(self, logits):
        self.logits = logits


class Peeking(nn.Module):
    """Predicts at each position the token that follows it in its input (it reads ahead), except at positions
    `wrong(ids, t)` says, where it predicts another token."""

    def __init__(self, wrong=lambda row, t: False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.wrong = wrong

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, VOCAB)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row) - 1):
                target = row[t + 1]
                logits[b, t, (target + 1) % VOCAB if self.wrong(row, t) else target] = 10.0
        return Output(logits)


def test_cloze_items_are_held_out_sentences_ending_in_a_word():
    tokenizer = ByteTokenizer()
    items, skipped = cloze_items(tokenizer)
    assert len(items) == 1000 and skipped == 0  # bytes never merge across the boundary
    held_out, train = set(split_sentences("heldout")), set(split_sentences("train"))
    for item in items[:200]:
        context = bytes(item.context).decode()
        (word,) = item.continuations
        word = bytes(word).decode()
        assert word.startswith(" ") and word[1:].isalpha() and len(word) >= 3
        assert len(item.context) + len(item.continuations[0]) >= 20
        assert any(s.startswith(context + word) for s in held_out)
    assert not any(s.startswith(bytes(items[0].context).decode()) for s in train - held_out)


def test_cloze_scores_every_token_of_the_word_and_nothing_before_it():
    tokenizer = ByteTokenizer()
    items, _ = cloze_items(tokenizer, count=40)
    assert cloze_accuracy(Peeking(), tokenizer, count=40).acc == 1.0
    # wrong where it predicts the context's second token: not part of the word, no effect
    assert cloze_accuracy(Peeking(lambda row, t: t == 0), tokenizer, count=40).acc == 1.0
    # wrong only where it predicts the word's last token
    result = cloze_accuracy(Peeking(lambda row, t: t == _length(row) - 2), tokenizer, count=40)
    assert (result.acc, result.items, result.acc_stderr) == (0.0, 40, 0.0)
    # wrong at the word's first token on items of odd length only: the share of even-length items is right
    lengths = [len(i.context) + len(i.continuations[0]) for i in items]
    even = sum(1 for n in lengths if n % 2 == 0) / len(lengths)
    first_wrong = Peeking(lambda row, t: _length(row) % 2 == 1 and t == _first(items, row) - 1)
    result = cloze_accuracy(first_wrong, tokenizer, count=40)
    assert 0 < even < 1 and result.acc == pytest.approx(even)
    assert result.acc_stderr == pytest.approx(math.sqrt(even * (1 - even) / 39))


def _length(row):
    """The real length of a right-padded row (padding is token 0; Brown text has no NUL byte)."""
    return len(row) - next((i for i, t in enumerate(reversed(row)) if t != 0), len(row))


def _first(items, row):
    """Where the word starts in this row: the item whose context and word the row holds."""
    tokens = tuple(row[: _length(row)])
    for item in items:
        if item.context + item.continuations[0] == tokens:
            return len(item.context)
    raise AssertionError("a row that is no item")


def unigram(logprobs: dict[int, float]) -> nn.Module:
    """A model whose next-token distribution is the same everywhere: the given log-probabilities, the rest of the
    probability spread evenly over the other tokens."""
    rest = 1.0 - sum(math.exp(v) for v in logprobs.values())
    table = torch.full((VOCAB,), math.log(rest / (VOCAB - len(logprobs))))
    for token, value in logprobs.items():
        table[token] = value

    class Unigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(table, requires_grad=False)

        def forward(self, ids):
            return Output(self.table.expand(*ids.shape, VOCAB))

    return Unigram()


def test_multiple_choice_by_likelihood_and_by_likelihood_per_character(tmp_path):
    """log p: space −1, 'a' −1, 'b' −1.5. " aaaa" sums −5 (−1 a character), " b" −2.5 (−1.25): acc picks " b",
    acc_norm picks " aaaa"."""
    model = unigram({ord(" "): -1.0, ord("a"): -1.0, ord("b"): -1.5})
    path = tmp_path / "task.jsonl"
    rows = [{"context": "Pick one:", "choices": ["aaaa", "b"], "gold": 0},
            {"context": "Pick one:", "choices": ["aaaa", "b"], "gold": 1},
            {"context": "Again:", "choices": ["b", "aaaa", "zzz"], "gold": 0},
            {"context": "Again:", "choices": ["b", "aaaa", "zzz"], "gold": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = multiple_choice_accuracy(model, ByteTokenizer(), "toy", load_multiple_choice(path))
    assert (result.items, result.acc, result.acc_norm) == (4, 0.75, 0.25)
    assert result.acc_stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    shaped = lm_eval_results([result], {"model": "unigram"})
    assert shaped["results"]["toy"] == {"alias": "toy", "acc,none": 0.75, "acc_stderr,none": result.acc_stderr,
                                        "acc_norm,none": 0.25, "acc_norm_stderr,none": result.acc_norm_stderr}
    assert shaped["n-samples"]["toy"] == {"original": 4, "effective": 4}


@pytest.mark.parametrize("content, message", [
    ("", "holds no items"),
    ('{"context": "x", "choices": ["a", "b"]}', "line 1: missing 'gold'"),
    ('{"context": "x", "choices": ["a", "b"], "gold": 2}', "gold must be a choice's index (0..1)"),
    ('{"context": "x", "choices": ["a"], "gold": 0}', "choices two or more texts"),
    ("not json", "line 1: not JSON"),
])
def test_a_bad_task_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(RanaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_multiple_choice(path)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RanaError, match="not UTF-8 text"):
        load_multiple_choice(binary)
