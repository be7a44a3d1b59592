"""Alembic, driven from code: upgrade a database to head, and refuse to run against a schema behind it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.session import DatabaseError, database_url, get_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", (url or database_url()).replace("%", "%%"))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str | None = None) -> str | None:
    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def check_schema(url: str | None = None) -> None:
    """Raise DatabaseError unless the database is at the code's head revision."""
    try:
        current = current_revision(url)
    except Exception as exc:  # unreachable server, unreadable file
        raise DatabaseError(f"cannot open the database {url or database_url()}: {exc}") from exc
    head = head_revision()
    if current != head:
        state = "has no schema yet" if current is None else f"is at revision {current}, the code needs {head}"
        raise DatabaseError(f"the database {state}: run `rana db upgrade`")
