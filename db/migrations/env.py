"""Alembic environment: the URL comes from db.migrate's config, the target schema from db.models."""

from alembic import context

from db.models import Base
from db.session import get_engine

config = context.config


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = get_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode rebuilds a table by copy, drop and rename; with foreign keys enforced, dropping a table
            # that others reference fails. The pragma only takes effect outside a transaction.
            # (at the driver level: SQLAlchemy would first emit BEGIN).
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        # render_as_batch: SQLite alters tables by copy-and-move, which Alembic's batch mode does for us.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
        if sqlite:
            driver = connection.connection.driver_connection
            problems = driver.execute("PRAGMA foreign_key_check").fetchall()
            driver.execute("PRAGMA foreign_keys=ON")
            if problems:
                raise RuntimeError(f"migration left rows with dangling foreign keys: {problems[:3]}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
