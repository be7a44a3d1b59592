"""Shared fixtures: a migrated temporary SQLite database, the tiny model, and a few held-out windows."""

from __future__ import annotations

import pytest

from db.migrate import upgrade
from db.session import get_engine


@pytest.fixture
def db_url(tmp_path, monkeypatch):
    """A fresh SQLite database at head, also exported as RANA_DB_URL/RANA_DATA_DIR for code that reads the env."""
    url = f"sqlite:///{tmp_path / 'rana.db'}"
    monkeypatch.setenv("RANA_DB_URL", url)
    monkeypatch.setenv("RANA_DATA_DIR", str(tmp_path))
    upgrade(url)
    yield url
    get_engine(url).dispose()


@pytest.fixture(scope="session")
def tiny():
    from rana_core.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_windows(tiny):
    from rana_core.corpus import token_windows

    return {
        "train": token_windows(tiny.tokenizer, "train", 2048, 128),
        "heldout": token_windows(tiny.tokenizer, "heldout", 1024, 128),
    }
