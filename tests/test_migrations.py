"""A database made by the first schema (a fixture dump, not the migration code) upgrades to head without loss."""

import sqlite3
from pathlib import Path

import sqlalchemy as sa

from db.migrate import check_schema, current_revision, head_revision, upgrade
from db.session import DatabaseError, get_engine
from jobs import queue

FIXTURE = Path(__file__).parent / "fixtures" / "schema-0001.sql"


def fixture_database(tmp_path) -> str:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(FIXTURE.read_text())
    return f"sqlite:///{path}"


def test_first_schema_upgrades_to_head_keeping_its_rows(tmp_path):
    url = fixture_database(tmp_path)
    assert current_revision(url) == "0001"
    try:
        check_schema(url)
        raise AssertionError("a schema behind head must be refused")
    except DatabaseError as exc:
        assert "rana db upgrade" in str(exc)
    upgrade(url)
    assert current_revision(url) == head_revision()
    engine = get_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT layer, module, rank, recon_error, adapter, sparsity FROM layer_metrics "
                                    "ORDER BY layer, id")).all()
        assert len(rows) == 8 and tuple(rows[0]) == (0, "qkv", 20, 0.01, None, None)
        run = conn.execute(sa.text("SELECT model, method, tags, provenance, artifact_path FROM runs")).one()
        assert tuple(run) == ("tiny", "svd", "[]", "{}", None)
        evaluation = conn.execute(sa.text("SELECT perplexity, dense_perplexity FROM evaluations")).one()
        assert tuple(evaluation) == (301.5, 255.25)
    jobs = {job.id: job for job in queue.list_jobs(url=url)}
    assert (jobs[1].status, jobs[1].run_id, jobs[2].status, jobs[2].priority) == ("done", 1, "queued", 5)
    assert jobs[2].payload["method"] == "rana"
    claimed = queue.claim("host:1", url=url)  # the old queued job is claimable under the new schema
    assert claimed.id == 2
    engine.dispose()


def test_every_revision_downgrades_and_upgrades_again(tmp_path):
    from alembic import command

    from db.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    assert current_revision(url) is None
    upgrade(url)
    assert current_revision(url) == head_revision()
    get_engine(url).dispose()


def test_migrations_build_exactly_the_models_schema(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from db.models import Base

    url = f"sqlite:///{tmp_path / 'head.db'}"
    upgrade(url)
    with get_engine(url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    get_engine(url).dispose()
