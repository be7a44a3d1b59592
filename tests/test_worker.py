"""Queue and worker against a temporary SQLite file, in process."""

import pytest
from sqlalchemy import func, select, update

from db.models import Evaluation, Job, LayerMetric, Run
from db.session import session_scope
from jobs import queue
from jobs.worker import Worker
from rana_core.errors import RanaError

PAYLOAD = {"model": "tiny", "method": "svd", "flop_reduction": 0.3, "calib_tokens": 1024, "eval_tokens": 512,
           "seq_len": 128}


def counts(url):
    with session_scope(url) as s:
        return tuple(s.execute(select(func.count()).select_from(t)).scalar() for t in (Run, Evaluation, LayerMetric))


def test_worker_processes_a_job_end_to_end(db_url):
    job_id = queue.submit("compress", PAYLOAD, url=db_url)
    progress_seen = []
    original = queue.report_progress

    def spy(job, worker, fraction, message, url=None):
        progress_seen.append((fraction, message))
        return original(job, worker, fraction, message, url)

    queue.report_progress = spy
    try:
        assert Worker(url=db_url).run(exit_when_idle=True) == 1
    finally:
        queue.report_progress = original
    (job,) = queue.list_jobs(url=db_url)
    assert (job.id, job.status, job.progress, job.attempts) == (job_id, "done", 1.0, 1)
    assert job.run_id is not None and job.finished_at is not None
    assert counts(db_url) == (1, 1, 8)
    assert progress_seen and progress_seen[-1][0] == 1.0
    with session_scope(db_url) as s:
        run = s.get(Run, job.run_id)
        assert run.method == "svd" and run.evaluations[0].tokens == 512
        assert abs(run.evaluations[0].measured_flop_reduction - 0.3) <= 0.015


def test_a_failing_job_is_marked_failed_with_its_error_and_stores_nothing(db_url, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # passes submit-time checks, fails to load
    job_id = queue.submit("compress", {**PAYLOAD, "model": str(folder)}, url=db_url)
    Worker(url=db_url).run(exit_when_idle=True)
    (job,) = queue.list_jobs(url=db_url)
    assert job.id == job_id and job.status == "failed" and job.error
    assert counts(db_url) == (0, 0, 0)


def test_claim_is_exclusive_and_follows_priority(db_url):
    low = queue.submit("compress", PAYLOAD, url=db_url)
    high = queue.submit("compress", PAYLOAD, priority=5, url=db_url)
    first = queue.claim("w1", url=db_url)
    second = queue.claim("w2", url=db_url)
    assert (first.id, second.id) == (high, low)
    assert queue.claim("w3", url=db_url) is None
    with pytest.raises(queue.JobCancelled):
        queue.report_progress(low, "w1", 0.5, "not mine", url=db_url)  # only the claimant may report


def test_results_are_written_once_per_job(db_url):
    from jobs.results import store_compression
    from rana_core.config import CompressConfig
    from rana_core.pipeline import compress

    job_id = queue.submit("compress", PAYLOAD, url=db_url)
    result = compress(CompressConfig.from_dict(PAYLOAD)).to_json()
    with session_scope(db_url) as s:
        first = store_compression(s, result, job_id=job_id)
    with session_scope(db_url) as s:
        assert store_compression(s, result, job_id=job_id) == first
    assert counts(db_url) == (1, 1, 8)


def test_invalid_payloads_never_reach_the_table(db_url):
    for bad in ({**PAYLOAD, "flop_reduction": 1.2}, {**PAYLOAD, "model": "nope"}, {"flop": 0.3}):
        with pytest.raises(RanaError):
            queue.submit("compress", bad, url=db_url)
    with pytest.raises(RanaError):
        queue.submit("quantize", PAYLOAD, url=db_url)
    assert queue.list_jobs(url=db_url) == []


def test_stop_request_hands_the_job_back(db_url):
    job_id = queue.submit("compress", PAYLOAD, url=db_url)
    worker = Worker(url=db_url)
    worker.stopping.set()  # as if SIGTERM arrived while the job was running
    worker.process(queue.claim(worker.name, url=db_url))
    (job,) = queue.list_jobs(url=db_url)
    assert (job.id, job.status, job.worker, job.attempts) == (job_id, "queued", None, 0)
    assert counts(db_url) == (0, 0, 0)
    with session_scope(db_url) as s:  # and another worker can take it
        s.execute(update(Job).values(priority=1))
    assert queue.claim("other", url=db_url).id == job_id
