"""A run's text: the bundled Brown, a user's files (txt, jsonl, json, csv, parquet, a folder) read through
`datasets`, the fixed split rule, the digest a run stores, and one clear line for each bad input."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from rana_core.config import CompressConfig
from rana_core.corpora import SPLIT_RULE, open_corpus
from rana_core.corpus import split_documents, token_windows
from rana_core.errors import CorpusError, RanaError
from rana_core.loading import ByteTokenizer


def documents(n: int) -> list[str]:
    """n documents, each its number repeated, so a window tells which documents it came from."""
    return [f"doc{i:03d} " * 40 + "end." for i in range(n)]


def numbers_in(windows) -> set[int]:
    text = bytes(b for b in windows.flatten().tolist() if b < 256).decode("utf-8", "replace")  # 256: separator
    return {int(n) for n in re.findall(r"doc(\d{3})", text)}


def write_jsonl(path, texts, field="body"):
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_brown_through_datasets_is_the_bundled_split():
    brown = open_corpus("brown")
    assert brown.split("train") == split_documents("train") and brown.split("heldout") == split_documents("heldout")
    assert brown.record() == {"name": "brown", "split": SPLIT_RULE, "digest": brown.digest, "documents": 500}


def test_a_jsonl_file_is_split_every_tenth_document_and_windows_come_from_its_split(tmp_path):
    texts = documents(40)
    path = write_jsonl(tmp_path / "mine.jsonl", texts)
    corpus = open_corpus(f"{path}:body")
    assert corpus.split("heldout") == [texts[9], texts[19], texts[29], texts[39]]
    assert len(corpus.split("train")) == 36
    # the windows of each split come from that split's documents only, spread over all of them
    assert numbers_in(token_windows(ByteTokenizer(), "heldout", 1024, 128, corpus)) == {9, 19, 29, 39}
    train = numbers_in(token_windows(ByteTokenizer(), "train", 8192, 128, corpus))
    assert train <= set(range(40)) - {9, 19, 29, 39} and {0, 38} <= train
    expected = hashlib.sha256(b"".join(t.encode() + b"\x1e" for t in texts)).hexdigest()[:16]
    assert corpus.digest == expected


def test_other_kinds_of_files_and_folders(tmp_path):
    texts = documents(20)
    (tmp_path / "notes.txt").write_text("\n\n".join(texts) + "\n")  # a lone .txt: one document per paragraph
    assert open_corpus(str(tmp_path / "notes.txt")).documents == tuple(texts)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, text in enumerate(texts):  # a folder of .txt files: one document per file, by name
        (folder / f"{i:02d}.txt").write_text(text + "\n")
    assert open_corpus(str(folder)).documents == tuple(texts)
    import pandas as pd

    pd.DataFrame({"id": range(20), "content": texts}).to_csv(tmp_path / "t.csv", index=False)
    assert open_corpus(f"{tmp_path / 't.csv'}:content").documents == tuple(texts)
    pd.DataFrame({"text": texts, "id": range(20)}).to_parquet(tmp_path / "t.parquet")
    assert open_corpus(str(tmp_path / "t.parquet")).documents == tuple(texts)  # "text" is the default field
    (tmp_path / "t.json").write_text(json.dumps([{"body": t} for t in texts]))
    assert open_corpus(str(tmp_path / "t.json")).documents == tuple(texts)  # the only text field


def test_the_digest_tells_two_versions_of_one_file_apart(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", documents(20))
    first = open_corpus(str(path)).digest
    write_jsonl(path, documents(21))
    assert open_corpus(str(path)).digest != first


def test_a_tokenizer_that_begins_texts_with_bos_gets_it_at_every_window_start():
    """Gemma's tokenizer adds <bos>, and Gemma 3 without it reads held-out Brown at perplexity 107.6 instead of
    34.5: every window then starts with it, followed by seq_len − 1 text tokens. The tokenizer is generated here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rana_core.loading import HFTokenizer
    from rana_core.probes import PROBES, prompt_ids
    from rana_core.tasks import cloze_items

    words = sorted({w for text in split_documents("heldout")[:3] for w in text.split()})
    vocab = {"<bos>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>", add_bos_token=True)
    tokenizer = HFTokenizer(hf)
    windows = token_windows(tokenizer, "heldout", 2048, 64)
    assert windows.shape == (32, 64) and (windows[:, 0] == 0).all() and (windows[:, 1:] != 0).all()
    items, _ = cloze_items(tokenizer, count=5)
    assert all(item.context[0] == 0 and 0 not in item.context[1:] for item in items)
    text_probe = next(p for p in PROBES if p.kind == "text")
    assert prompt_ids(tokenizer, text_probe)[0] == 0
    plain = token_windows(ByteTokenizer(), "heldout", 2048, 64)  # no begin token: the text from the first position
    assert bytes(plain[0].tolist()) == split_documents("heldout")[0].encode()[:64]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jsonl", "no such file or folder"),
    (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "is empty"),
    (lambda d: (d / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR") and None or d / "blob.txt",
     "binary file"),
    (lambda d: (d / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1")) and None or d / "latin.txt",
     "not UTF-8 text"),
    (lambda d: (d / "model.bin").write_bytes(b"\0" * 16) and None or d / "model.bin", "cannot read .bin files"),
    (lambda d: d, "holds no"),  # a folder with no readable files
])
def test_bad_files_are_one_line_at_validation(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CorpusError, match=message):
        CompressConfig(model="tiny", corpus=str(path)).validate()


def test_a_missing_field_or_too_little_text_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", documents(20))
    with pytest.raises(CorpusError, match=r"no field 'txt' \(fields: body, n\)"):
        open_corpus(f"{path}:txt")
    with pytest.raises(CorpusError, match="does not hold text"):
        open_corpus(f"{path}:n")
    with pytest.raises(CorpusError, match=r"heldout split of corpus .* holds"):
        token_windows(ByteTokenizer(), "heldout", 100_000, 128, str(path))
    (tmp_path / "two.csv").write_text("a,b\nx,y\n")
    with pytest.raises(CorpusError, match="no 'text' field; name one"):
        open_corpus(str(tmp_path / "two.csv"))


def test_a_hub_id_on_a_machine_without_a_hub_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for a hub in tests
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match="no local file or folder, and the hub could not give it"):
        open_corpus("someone/no-such-set")


def test_a_config_stores_the_absolute_path_and_its_field(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "mine.jsonl", documents(20))
    monkeypatch.chdir(tmp_path)
    config = CompressConfig(model="tiny", corpus="mine.jsonl:body", eval_corpus="brown").validate()
    assert config.corpus == f"{tmp_path / 'mine.jsonl'}:body" and config.eval_corpus == "brown"
    with pytest.raises(RanaError, match="corpus must be a name"):
        CompressConfig(model="tiny", corpus=3).validate()


def rana(*args, env):
    return subprocess.run([sys.executable, "-m", "rana_cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_calibrate_on_a_users_file_evaluate_on_brown_and_then_on_the_file(tmp_path):
    """Through the CLI and a worker: the run stores both corpora's records; a later evaluation on the user's
    file stores that file's record and measures other text than Brown."""
    from sqlalchemy import select

    from db.models import Evaluation, Run
    from db.session import session_scope

    texts = [text for text in split_documents("train")[:120]]
    write_jsonl(tmp_path / "mine.jsonl", [t.upper() for t in texts])  # other text than Brown's held-out split
    url = f"sqlite:///{tmp_path / 'q.db'}"
    env = {**os.environ, "RANA_DATA_DIR": str(tmp_path), "RANA_DB_URL": url}
    small = ["--model", "tiny", "--calib-tokens", "1024", "--eval-tokens", "1024", "--seq-len", "128", "--no-probes"]
    assert rana("db", "upgrade", env=env).returncode == 0
    submitted = rana("submit", *small, "--corpus", str(tmp_path / "mine.jsonl"), "--eval-corpus", "brown", env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert rana("worker", "--exit-when-idle", env=env).returncode == 0
    assert rana("evaluate", "1", "--corpus", str(tmp_path / "mine.jsonl"), "--eval-tokens", "1024", "--seq-len",
                "128", env=env).returncode == 0
    assert rana("worker", "--exit-when-idle", env=env).returncode == 0
    mine = hashlib.sha256(b"".join(t.upper().encode() + b"\x1e" for t in texts)).hexdigest()[:16]
    with session_scope(url) as session:
        run = session.execute(select(Run)).scalar_one()
        assert run.corpora["calibration"] == {"name": str(tmp_path / "mine.jsonl"), "split": SPLIT_RULE,
                                              "digest": mine, "documents": 120}
        assert run.corpora["evaluation"]["name"] == "brown"
        first, second = session.execute(select(Evaluation).order_by(Evaluation.id)).scalars().all()
        assert first.corpus["name"] == "brown" and second.corpus["digest"] == mine
        assert second.perplexity != first.perplexity  # other tokens were measured
