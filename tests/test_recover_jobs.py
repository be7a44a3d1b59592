"""The `recover` job: submit-time refusals, a real worker on SQLite and PostgreSQL, one stored row per job."""

import pytest
from sqlalchemy import func, select

from db.models import Job, Recovery, Run
from db.session import session_scope
from jobs import queue
from rana_cli.main import main
from jobs.results import store_recovery
from jobs.worker import Worker
from rana_core.errors import RanaError

COMPRESS = {"model": "tiny", "method": "rana", "flop_reduction": 0.3, "calib_tokens": 1024, "eval_tokens": 512,
            "seq_len": 128}
SMALL = {"train_tokens": 1024, "seq_len": 64, "batch_size": 4, "lr": 0.01, "eval_tokens": 512, "eval_seq_len": 128,
         "val_tokens": 256, "probe_tokens": 256, "initial_configs": 2, "rounds": 1, "per_round": 1}


def count(url, table) -> int:
    with session_scope(url) as s:
        return s.execute(select(func.count()).select_from(table)).scalar()


def compressed_run(url) -> int:
    job_id = queue.submit("compress", COMPRESS, url=url)
    assert Worker(url=url).run(exit_when_idle=True) == 1
    with session_scope(url) as s:
        return s.execute(select(Run.id).where(Run.job_id == job_id)).scalar_one()


def test_a_recover_job_runs_through_a_real_worker_and_stores_one_row(any_db_url):
    url = any_db_url
    run_id = compressed_run(url)
    job_id = queue.submit("recover", {"run_id": run_id, "strategy": "rankadaptor", **SMALL}, url=url)
    assert Worker(url=url).run(exit_when_idle=True) == 1
    job = next(j for j in queue.list_jobs(url=url) if j.id == job_id)
    assert (job.status, job.progress) == ("done", 1.0), job.error
    with session_scope(url) as s:
        row = s.execute(select(Recovery).where(Recovery.job_id == job_id)).scalar_one()
        assert (row.run_id, row.strategy, len(row.ranks)) == (run_id, "rankadaptor", 2)
        assert len(row.search_history) == 3 and all("measured" in h for h in row.search_history)
        assert row.trainable_params <= row.details["param_budget"]
        assert row.perplexity_after < row.perplexity_before and row.dense_perplexity > 0
        result = {"strategy": row.strategy, "ranks": row.ranks, "trainable_params": 1, "train_tokens": 1,
                  "eval_tokens": 1, "perplexity_before": 1.0, "perplexity_after": 1.0, "dense_perplexity": 1.0,
                  "seconds": 1.0, "flop_reduction_after": 0.0}
        assert store_recovery(s, run_id, result, job_id=job_id) == row.id  # idempotent: the stored row stands
    assert count(url, Recovery) == 1


def test_bad_recover_requests_are_refused_with_one_line_and_write_nothing(any_db_url, capsys):
    url = any_db_url
    with session_scope(url) as s:  # a run from before artifacts existed
        s.add(Run(model="tiny", method="svd", allocation="uniform", target_flop_reduction=0.3, calib_tokens=1,
                  seconds=1.0, config={}))
    with session_scope(url) as s:
        old_run = s.execute(select(Run.id)).scalar_one()
    bad = [({"run_id": 999, "strategy": "uniform"}, "no run 999"),
           ({"run_id": old_run, "strategy": "uniform"}, "has no stored adapters to recover"),
           ({"run_id": old_run, "strategy": "magic"}, "unknown strategy 'magic'"),
           ({"run_id": old_run}, "needs a strategy"),
           ({"run_id": old_run, "strategy": "uniform", "train_tokens": -5}, "train tokens must be")]
    for payload, message in bad:
        with pytest.raises(RanaError, match=message) as caught:
            queue.submit("recover", payload, url=url)
        assert "\n" not in str(caught.value)
    assert main(["recover", "999", "--strategy", "uniform"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rana: error: no run 999"
    assert (count(url, Job), count(url, Recovery), count(url, Run)) == (0, 0, 1)


def test_cancelling_a_running_recover_job_stops_it_and_stores_nothing(db_url):
    run_id = compressed_run(db_url)
    job_id = queue.submit("recover", {"run_id": run_id, "strategy": "uniform", **SMALL}, url=db_url)
    original, messages = queue.report_progress, []

    def cancel_on_first_report(job, worker, fraction, message, url=None):
        messages.append(message)
        if len(messages) == 1:
            queue.cancel(job_id, url=db_url)
        return original(job, worker, fraction, message, url)

    queue.report_progress = cancel_on_first_report
    try:
        Worker(url=db_url).run(exit_when_idle=True)
    finally:
        queue.report_progress = original
    job = next(j for j in queue.list_jobs(url=db_url) if j.id == job_id)
    assert job.status == "cancelled" and len(messages) == 1  # the report after the cancel stopped it
    assert count(db_url, Recovery) == 0


def test_the_cli_enqueues_a_recovery_and_prints_its_job_id(any_db_url, capsys):
    run_id = compressed_run(any_db_url)
    assert main(["recover", str(run_id), "--strategy", "error", "--steps", "3", "--seed", "2"]) == 0
    job_id = int(capsys.readouterr().out.strip())
    job = next(j for j in queue.list_jobs(url=any_db_url) if j.id == job_id)
    assert (job.kind, job.status) == ("recover", "queued")
    assert (job.payload["run_id"], job.payload["strategy"], job.payload["seed"]) == (run_id, "error", 2)
    assert job.payload["train_tokens"] == 3 * 4 * 256 and job.payload["rethreshold"] is False
