"""Which text a run calibrates and evaluates on: the bundled Brown corpus, a user's files, or a hub data set, all
read through Hugging Face `datasets` into one list of documents with a fixed train/held-out split.

A corpus is named by one string (the CLI's ``--corpus``, a job's payload, the New run form):

- ``brown`` — the bundled Brown corpus (rana_core.corpus cleans it; 500 files, one document each);
- a local file ``.txt`` (one document per blank-line separated paragraph), ``.jsonl``/``.json``/``.csv``/
  ``.parquet`` (one document per record), or a folder of such files (of one kind; a ``.txt`` file is then one
  document), optionally followed by ``:FIELD`` to name the text field (default: ``text``, or the only text
  column);
- anything else is a hub id, read with ``datasets.load_dataset`` on machines that reach a hub.

The split is Brown's rule for every corpus: documents in their order, **every 10th (positions 9, 19, …) held out**,
the rest for calibration. A run stores each corpus's name, that rule and a digest of the documents, so two runs on
"the same" file that changed in between are told apart.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rana_core.corpus import HELD_OUT_EVERY, split_part
from rana_core.errors import CorpusError
from rana_core.model_source import hub_off

BROWN = "brown"
SPLIT_RULE = (f"every {HELD_OUT_EVERY}th document held out "
              f"(positions {HELD_OUT_EVERY - 1}, {2 * HELD_OUT_EVERY - 1}, …)")
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_KINDS = {".txt", ".jsonl", ".json", ".csv"}  # read as text: a NUL byte or bad UTF-8 means a binary file
DEFAULT_FIELD = "text"


@dataclass(frozen=True)
class Corpus:
    """A corpus's documents in order, and what a run stores about it."""

    name: str  # the string that named it
    documents: tuple[str, ...]
    digest: str  # sha256 of the documents, 16 hex digits

    def split(self, split: str) -> list[str]:
        return split_part(self.documents, split)

    def record(self) -> dict:
        """What a run stores: name, split rule, digest and document count."""
        return {"name": self.name, "split": SPLIT_RULE, "digest": self.digest, "documents": len(self.documents)}


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus string taken apart: a local path (file or folder) and text field, or a hub id."""

    name: str
    path: Path | None
    field: str | None
    hub_id: str | None
    files: tuple[Path, ...] = ()  # a local path's data files (itself, or a folder's files of one kind)


def parse_corpus(name: str) -> CorpusSpec:
    """Take `name` apart and check what can be checked without reading the text: a path exists, is readable, has
    a kind we read, is not empty and (for text kinds) is not binary. A string that names no local path and has
    the shape of a hub id ("owner/name" or "name") is a hub id. Raises a CorpusError of one line."""
    name = (name or "").strip()
    if not name:
        raise CorpusError("no corpus given: use brown, a local file or folder, or a hub id")
    if name == BROWN:
        return CorpusSpec(BROWN, None, None, None)
    path, field = Path(name).expanduser(), None
    if not path.exists() and ":" in name:
        head, _, tail = name.rpartition(":")
        if Path(head).expanduser().exists() and tail:
            path, field = Path(head).expanduser(), tail
    if path.exists():
        files = _data_files(path, name)
        _check_files(files, name)
        return CorpusSpec(name, path, field, None, tuple(files))
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix.lower() in BUILDERS:
        raise CorpusError(f"corpus {name!r}: no such file or folder")
    return CorpusSpec(name, None, None, name)


def checked_corpus(name: str) -> str:
    """`name` as a job stores it, after parse_corpus's checks: "brown", a hub id, or a local path made absolute
    (with its ":FIELD"), so that a worker started in another folder reads the same file."""
    spec = parse_corpus(name)
    if spec.path is None:
        return spec.name
    absolute = str(spec.path.resolve())
    return f"{absolute}:{spec.field}" if spec.field else absolute


def _check_files(files: list[Path], name: str) -> None:
    for file in files:
        try:
            with open(file, "rb") as handle:
                head = handle.read(8192)
        except OSError as exc:
            raise CorpusError(f"corpus {name!r}: cannot read {file.name}: {exc.strerror or exc}") from None
        if not head.strip():
            raise CorpusError(f"corpus {name!r}: {file.name} is empty")
        if file.suffix.lower() in TEXT_KINDS:
            if b"\0" in head:
                raise CorpusError(f"corpus {name!r}: {file.name} is a binary file, not {file.suffix} text")
            try:  # incremental: a character cut at the sniff's end is not an error
                codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            except UnicodeDecodeError:
                raise CorpusError(f"corpus {name!r}: {file.name} is not UTF-8 text") from None


def _data_files(path: Path, name: str) -> list[Path]:
    """The files a path names: itself, or a folder's files of one readable kind (sorted by name)."""
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise CorpusError(f"corpus {name!r}: cannot read {path.suffix or 'extension-less'} files; use "
                              f"{', '.join(BUILDERS)}")
        return [path]
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise CorpusError(f"corpus {name!r}: cannot read the folder: {exc.strerror or exc}") from None
    files = [p for p in entries if p.suffix.lower() in BUILDERS]
    if not files:
        raise CorpusError(f"corpus {name!r}: the folder holds no {', '.join(BUILDERS)} files")
    builders = {BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise CorpusError(f"corpus {name!r}: the folder mixes kinds of files ({', '.join(sorted(builders))}); "
                          "keep one kind per folder")
    return files


def open_corpus(name: str) -> Corpus:
    """The corpus `name` names, read through `datasets` (cached by name and, for local files, their sizes and
    modification times: a file edited in between is read again)."""
    spec = parse_corpus(name)
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in spec.files)
    return _open(spec, stamp)


@lru_cache(maxsize=8)
def _open(spec: CorpusSpec, stamp: tuple) -> Corpus:
    if spec.name == BROWN:
        documents = _brown_documents()
    elif spec.path is not None:
        documents = _local_documents(spec)
    else:
        documents = _hub_documents(spec)
    documents = tuple(text.strip() for text in documents if text and text.strip())  # a file's last newline too
    if not documents:
        raise CorpusError(f"corpus {spec.name!r} holds no text")
    digest = hashlib.sha256()
    for text in documents:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1e")  # a record separator: ("ab", "c") and ("a", "bc") differ
    return Corpus(spec.name, documents, digest.hexdigest()[:16])


def _brown_documents() -> list[str]:
    import datasets

    from rana_core.corpus import load_documents

    names, texts = zip(*load_documents())
    table = datasets.Dataset.from_dict({"file": list(names), "text": list(texts)})
    return table["text"]


@contextmanager
def _quiet():
    """`datasets` without its progress bars and the hub client's retry warnings: a run reports its own progress,
    and a failure is the one line the caller raises."""
    import datasets

    hub_log = logging.getLogger("huggingface_hub")
    level, bars = hub_log.level, datasets.is_progress_bar_enabled()
    hub_log.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        hub_log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _local_documents(spec: CorpusSpec) -> list[str]:
    files = spec.files
    builder = BUILDERS[files[0].suffix.lower()]
    options = {}
    if builder == "text":  # a lone file: its paragraphs; a folder: each file
        options["sample_by"] = "paragraph" if spec.path.is_file() else "document"
    try:
        with _quiet() as datasets:
            table = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as exc:  # the parsers' own errors (a broken JSON line, a file that is not parquet)
        raise CorpusError(f"corpus {spec.name!r}: could not read it as {builder}: {_first_line(exc)}") from None
    return _text_column(table, spec)


def _hub_documents(spec: CorpusSpec) -> list[str]:
    if hub_off():
        raise CorpusError(f"corpus {spec.name!r} is no local file or folder, and the hub could not give it: the "
                          "hub is off here (HF_HUB_OFFLINE)")
    try:
        with _quiet() as datasets:
            table = datasets.load_dataset(spec.hub_id, split="train")
    except Exception as exc:  # no hub from this machine, an unknown id, a gated set
        raise CorpusError(f"corpus {spec.name!r} is no local file or folder, and the hub could not give it: "
                          f"{_first_line(exc)}") from None
    return _text_column(table, spec)


def _text_column(table, spec: CorpusSpec) -> list[str]:
    columns = list(table.column_names)
    field = spec.field
    if field is None:
        texts = [c for c in columns if getattr(table.features[c], "dtype", None) in ("string", "large_string")]
        field = DEFAULT_FIELD if DEFAULT_FIELD in columns else (texts[0] if len(texts) == 1 else None)
        if field is None:
            raise CorpusError(f"corpus {spec.name!r}: no {DEFAULT_FIELD!r} field; name one as "
                              f"{spec.name}:FIELD (fields: {', '.join(columns)})")
    if field not in columns:
        raise CorpusError(f"corpus {spec.name!r}: no field {field!r} (fields: {', '.join(columns)})")
    values = table[field]
    if any(v is not None and not isinstance(v, str) for v in values[:100]):
        raise CorpusError(f"corpus {spec.name!r}: field {field!r} does not hold text")
    return [v for v in values if isinstance(v, str)]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
