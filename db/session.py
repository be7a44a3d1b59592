"""One engine per URL and one session scope, for SQLite (WAL) and PostgreSQL alike.

Configuration: ``RANA_DB_URL`` (any SQLAlchemy URL), else SQLite at ``$RANA_DATA_DIR/rana.db``;
``RANA_DATA_DIR`` defaults to ``~/.local/share/rana-studio``.

SQLite: WAL so that the app reads while a worker writes, a busy timeout so that writers wait instead of failing,
and pysqlite's own transaction handling turned off so that ``BEGIN`` is ours to emit: a connection opened with
``execution_options(sqlite_begin="IMMEDIATE")`` takes the write lock at BEGIN, which is how jobs are claimed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_MS = 30_000


class DatabaseError(RuntimeError):
    """The database is missing, unreachable or behind the code's schema: one line a user can act on."""


def cannot(action: str, url: str | None, exc: BaseException) -> DatabaseError:
    """DatabaseError("cannot <action> the database <url>: <reason>") in one line. The reason is the error's first
    line: SQLAlchemy appends "(Background on this error at: …)" on a line of its own, and drivers add hints below
    theirs, neither of which belongs in a one-line refusal. A password in the URL is hidden."""
    reason = next((line.strip() for line in str(exc).splitlines()
                   if line.strip() and not line.startswith("(Background on this error")), type(exc).__name__)
    try:
        shown = make_url(url or database_url()).render_as_string(hide_password=True)
    except Exception:  # a URL SQLAlchemy cannot parse is shown as given: it holds no parsed password to hide
        shown = url or database_url()
    return DatabaseError(f"cannot {action} the database {shown}: {reason}")


def data_dir() -> Path:
    env = os.environ.get("RANA_DATA_DIR")
    base = Path(env) if env else Path.home() / ".local" / "share" / "rana-studio"
    return base.expanduser()


def database_url() -> str:
    url = os.environ.get("RANA_DB_URL")
    if url:
        return url
    return f"sqlite:///{data_dir() / 'rana.db'}"


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    url = url or database_url()
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True)


def _sqlite_engine(url: str) -> Engine:
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


@lru_cache(maxsize=8)
def _factory(url: str) -> sessionmaker:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    session = _factory(url or database_url())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
