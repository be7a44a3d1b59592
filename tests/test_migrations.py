"""A database made by an earlier schema upgrades to head without losing rows."""

import sqlalchemy as sa

from db.migrate import check_schema, current_revision, head_revision, upgrade
from db.session import DatabaseError, get_engine


def test_first_schema_upgrades_to_head_keeping_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO jobs (id, kind, status, priority, payload, progress, message, attempts) "
                             "VALUES (1, 'compress', 'done', 0, '{}', 1.0, 'done', 1)")
        conn.exec_driver_sql("INSERT INTO runs (id, job_id, model, method, allocation, target_flop_reduction, "
                             "calib_tokens, seconds, config, environment) VALUES "
                             "(1, 1, 'tiny', 'svd', 'uniform', 0.3, 1024, 1.0, '{}', '{}')")
        conn.exec_driver_sql("INSERT INTO layer_metrics (run_id, layer, module, rank, max_rank, density, "
                             "recon_error, flops_per_token, dense_flops_per_token) VALUES "
                             "(1, 0, 'qkv', 29, 64, 1.0, 0.01, 100.0, 200.0)")
    try:
        check_schema(url)
        raise AssertionError("a schema behind head must be refused")
    except DatabaseError as exc:
        assert "rana db upgrade" in str(exc)
    upgrade(url)
    assert current_revision(url) == head_revision()
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT rank, recon_error, adapter, sparsity FROM layer_metrics")).one()
        assert tuple(row) == (29, 0.01, None, None)
        assert conn.execute(sa.text("SELECT model FROM runs")).scalar() == "tiny"
    engine.dispose()
