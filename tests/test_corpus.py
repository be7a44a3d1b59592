import pytest

from rana_core.corpus import HELD_OUT_EVERY, clean_brown, load_documents, split_documents, token_windows
from rana_core.errors import CorpusError
from rana_core.loading import ByteTokenizer


def test_brown_is_complete_and_cleaned():
    docs = load_documents()
    assert len(docs) == 500
    assert docs[0][0] == "ca01" and docs[-1][0] == "cr09"
    assert docs[0][1].startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
        'produced "no evidence" that any irregularities took place.'
    )
    assert "/at" not in docs[0][1] and " ," not in docs[0][1]


def test_split_is_every_tenth_file_held_out():
    train, held = split_documents("train"), split_documents("heldout")
    assert (len(train), len(held)) == (450, 50)
    names = [name for name, _ in load_documents()]
    texts = dict(load_documents())
    assert held[0] == texts[names[HELD_OUT_EVERY - 1]]
    assert not set(train) & set(held)


def test_clean_brown_detokenizes_punctuation():
    raw = "\n\n\tHe/pps said/vbd ``/`` no/at ''/'' (/( twice/rb )/) ,/, ok/uh ./.\n"
    assert clean_brown(raw) == 'He said "no" (twice), ok.'


def test_windows_are_deterministic_and_span_the_split():
    tok = ByteTokenizer()
    a = token_windows(tok, "heldout", 4096, 256)
    b = token_windows(tok, "heldout", 4096, 256)
    assert a.shape == (16, 256) and a.equal(b)
    first_doc = split_documents("heldout")[0].encode()
    assert bytes(a[0].tolist()) == first_doc[:256]  # the first window starts the split
    assert bytes(a[-1].tolist()) != first_doc[-256:]  # and the last is far from it


@pytest.mark.parametrize("n_tokens, seq_len, message", [
    (0, 128, "must be positive"),
    (100, 128, "less than one sequence"),
    (10**9, 512, "holds"),
])
def test_bad_token_requests_are_one_clear_error(n_tokens, seq_len, message):
    with pytest.raises(CorpusError, match=message):
        token_windows(ByteTokenizer(), "heldout", n_tokens, seq_len)


def test_missing_or_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_documents(str(tmp_path / "nowhere"))
    with pytest.raises(CorpusError, match="no Brown corpus files"):
        load_documents(str(tmp_path))
