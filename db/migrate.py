"""Alembic, driven from code: upgrade a database to head, and refuse to run against a schema behind it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from db.session import DatabaseError, cannot, database_url, get_engine

# What "the database cannot be used" raises: an unreachable server or unopenable file (SQLAlchemy's errors, a bad
# URL among them), a folder for a SQLite file that cannot be made (OSError), a driver not installed (ImportError).
UNUSABLE = (SQLAlchemyError, OSError, ImportError)

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", (url or database_url()).replace("%", "%%"))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str | None = None) -> str | None:
    try:
        with get_engine(url).connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except UNUSABLE as exc:
        raise cannot("open", url, exc) from exc


def upgrade(url: str | None = None, revision: str = "head") -> None:
    try:
        command.upgrade(alembic_config(url), revision)
    except UNUSABLE as exc:
        raise cannot("upgrade", url, exc) from exc


def check_schema(url: str | None = None) -> None:
    """Raise DatabaseError unless the database is at the code's head revision."""
    current = current_revision(url)
    head = head_revision()
    if current != head:
        state = "has no schema yet" if current is None else f"is at revision {current}, the code needs {head}"
        raise DatabaseError(f"the database {state}: run `rana db upgrade`")
