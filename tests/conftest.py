"""Shared fixtures: migrated temporary databases (SQLite, and PostgreSQL on a throwaway local server), the tiny
model, and a few held-out windows."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (small shapes only)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def upgrade(url):  # imported here, not at the top: the GPU machine runs the kernel tests without SQLAlchemy
    from db.migrate import upgrade as run

    run(url)


def get_engine(url):
    from db.session import get_engine as engine

    return engine(url)


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
def postgres_admin_url():
    url = os.environ.get("RANA_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    from pg_server import LocalPostgres

    server = LocalPostgres()
    try:
        yield server.admin_url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path, monkeypatch):
    """A fresh database at head on each backend, exported as RANA_DB_URL/RANA_DATA_DIR."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rana.db'}"
    else:
        from pg_server import fresh_database

        url = fresh_database(request.getfixturevalue("postgres_admin_url"))
    monkeypatch.setenv("RANA_DB_URL", url)
    monkeypatch.setenv("RANA_DATA_DIR", str(tmp_path))
    upgrade(url)
    yield url
    get_engine(url).dispose()


@pytest.fixture(scope="session")
def tiny():
    from rana_core.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_windows(tiny):
    from rana_core.corpus import token_windows

    return {
        "train": token_windows(tiny.tokenizer, "train", 2048, 128),
        "heldout": token_windows(tiny.tokenizer, "heldout", 1024, 128),
    }
