"""The queue's life cycle on SQLite and on a real PostgreSQL server: sweeps, cancel, retry, the reaper,
priorities and payload validation. In process; the multi-process tests are in test_queue_processes.py."""

import pytest
from sqlalchemy import select, text, update

from db.models import Job
from db.session import get_engine, session_scope
from jobs import queue
from rana_core.errors import RanaError

PAYLOAD = {"model": "tiny", "method": "svd", "flop_reduction": 0.3, "calib_tokens": 256, "eval_tokens": 256,
           "seq_len": 128}
SWEEP = {"base": {"model": "tiny", "calib_tokens": 256, "eval_tokens": 256, "seq_len": 128},
         "methods": ["rana-greedy", "cats", "dense"], "budgets": [0.3, 0.2]}


def job(url, job_id):
    return next(j for j in queue.list_jobs(url=url) if j.id == job_id)


def finish(url, claimed, worker):
    with session_scope(url) as session:
        assert queue.mark_done(session, claimed.id, worker)


def test_a_sweep_becomes_one_job_per_point_and_aggregates_them(any_db_url):
    url = any_db_url
    sweep_id = queue.submit("sweep", SWEEP, author="ada", tags=["baseline"], url=url)
    children = queue.list_jobs(url=url, parent_id=sweep_id)
    points = sorted((c.payload["method"], c.payload["allocation"], c.payload["flop_reduction"]) for c in children)
    assert points == [("cats", "uniform", 0.2), ("cats", "uniform", 0.3), ("dense", "uniform", 0.0),
                      ("rana", "greedy", 0.2), ("rana", "greedy", 0.3)]
    assert all(c.author == "ada" and c.tags == ("baseline",) for c in children)
    assert job(url, sweep_id).message == "0/5 done"

    claimed = [queue.claim(f"w{i}", url=url) for i in range(5)]
    assert sweep_id not in {c.id for c in claimed}  # the sweep's own row is never claimed
    assert queue.claim("w5", url=url) is None
    queue.report_progress(claimed[0].id, "w0", 0.5, "half way", url=url)
    parent = job(url, sweep_id)
    assert parent.status == "running" and parent.progress == pytest.approx(0.5 / 5)

    for i in range(3):
        finish(url, claimed[i], f"w{i}")
    queue.fail(claimed[3].id, "w3", "RuntimeError: boom", url=url)
    parent = job(url, sweep_id)
    assert (parent.status, parent.message) == ("running", "3/5 done, 1 running, 1 failed")
    finish(url, claimed[4], "w4")
    parent = job(url, sweep_id)
    assert (parent.status, parent.progress) == ("failed", 1.0)  # finished, with a failed point

    assert queue.retry(sweep_id, url=url) == 1  # retrying a sweep requeues its failed points only
    assert job(url, sweep_id).status == "running"
    again = queue.claim("w9", url=url)
    assert again.id == claimed[3].id and again.attempts == 1
    finish(url, again, "w9")
    assert job(url, sweep_id).status == "done"


def test_cancel_a_sweep_cancels_its_unfinished_points(any_db_url):
    url = any_db_url
    sweep_id = queue.submit("sweep", SWEEP, url=url)
    first = queue.claim("w0", url=url)
    finish(url, first, "w0")
    running = queue.claim("w1", url=url)
    assert queue.cancel(sweep_id, url=url) == 4
    statuses = sorted(j.status for j in queue.list_jobs(url=url, parent_id=sweep_id))
    assert statuses == ["cancelled"] * 4 + ["done"]
    assert job(url, sweep_id).status == "cancelled"
    with pytest.raises(queue.JobCancelled):  # the running point's worker stops at its next report
        queue.report_progress(running.id, "w1", 0.6, "still going", url=url)
    with session_scope(url) as session:
        assert not queue.mark_done(session, running.id, "w1")


def test_cancel_and_retry_single_jobs(any_db_url):
    url = any_db_url
    queued = queue.submit("compress", PAYLOAD, url=url)
    assert queue.cancel(queued, url=url) == 1
    assert queue.claim("w", url=url) is None  # a cancelled job is never claimed
    with pytest.raises(RanaError, match="only queued or running"):
        queue.cancel(queued, url=url)
    assert queue.retry(queued, url=url) == 1
    claimed = queue.claim("w", url=url)
    assert claimed.id == queued
    finish(url, claimed, "w")
    with pytest.raises(RanaError, match="only failed or cancelled"):
        queue.retry(queued, url=url)
    with pytest.raises(RanaError, match="no job 999"):
        queue.cancel(999, url=url)


def age_heartbeat(url, job_id, seconds):
    engine = get_engine(url)
    with session_scope(url) as session:
        if engine.dialect.name == "sqlite":
            value = text(f"datetime('now', '-{seconds} seconds')")
        else:
            value = text(f"now() - interval '{seconds} seconds'")
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=value))


def test_the_reaper_requeues_silent_jobs_then_gives_up(any_db_url):
    url = any_db_url
    job_id = queue.submit("compress", PAYLOAD, max_attempts=2, url=url)
    first = queue.claim("crashed:1", url=url)
    assert queue.reap(30, url=url) == []  # a fresh heartbeat is left alone
    age_heartbeat(url, job_id, 120)
    assert queue.reap(30, url=url) == [job_id]
    view = job(url, job_id)
    assert view.status == "queued" and view.worker is None and "crashed:1 stopped heartbeating" in view.message
    with pytest.raises(queue.JobCancelled):  # the silent worker, should it wake up, can no longer report
        queue.report_progress(first.id, "crashed:1", 0.9, "late", url=url)

    second = queue.claim("crashed:2", url=url)
    assert second.attempts == 2
    age_heartbeat(url, job_id, 120)
    assert queue.reap(30, url=url) == [job_id]
    view = job(url, job_id)
    assert view.status == "failed" and "gave up after 2 attempt(s)" in view.error


def test_claim_follows_priority_then_age_and_records_host_and_device(any_db_url):
    url = any_db_url
    low = queue.submit("compress", PAYLOAD, url=url)
    high = queue.submit("compress", PAYLOAD, priority=5, url=url)
    later_high = queue.submit("compress", PAYLOAD, priority=5, url=url)
    order = [queue.claim("gpu-host-1:7", url=url, device="cuda:0 (NVIDIA H100)").id for _ in range(3)]
    assert order == [high, later_high, low]
    view = job(url, high)
    assert (view.host, view.device, view.worker) == ("gpu-host-1", "cuda:0 (NVIDIA H100)", "gpu-host-1:7")


def test_workers_keep_to_the_methods_they_started_so_each_reuses_its_own_profiles_and_curves(any_db_url):
    """Two workers draining a sweep: a worker keeps a method's profiles, loss model and curves between jobs, so
    the second worker leaves the method the first started to it, and each takes the next budget of its own
    method (first-come order would hand both workers every method, each computed twice). Priority still wins."""
    url = any_db_url
    queue.submit("sweep", {**SWEEP, "methods": ["svd", "cats"], "budgets": [0.2, 0.3, 0.4]}, url=url)
    a, b = queue.claim("a", url=url), queue.claim("b", url=url)
    assert (a.payload["method"], b.payload["method"]) == ("svd", "cats")
    finish(url, a, "a")
    finish(url, b, "b")  # nothing runs now: only the worker's last job tells them apart
    b2, a2 = queue.claim("b", url=url, after=b), queue.claim("a", url=url, after=a)
    assert (a2.payload["method"], a2.payload["flop_reduction"]) == ("svd", 0.3)
    assert (b2.payload["method"], b2.payload["flop_reduction"]) == ("cats", 0.3)
    urgent = queue.submit("compress", {**PAYLOAD, "method": "cats"}, priority=5, url=url)
    assert queue.claim("a", url=url, after=a2).id == urgent


def test_jobs_that_need_a_gpu_are_claimed_by_gpu_workers_only(any_db_url):
    url = any_db_url
    latency = queue.submit("latency", {"model": "smollm2-135m-shape"}, url=url)
    compress = queue.submit("compress", PAYLOAD, url=url)
    assert job(url, latency).message == "queued; waiting for a GPU worker"
    assert queue.claim("cpu-host:1", url=url, device="cpu").id == compress
    assert queue.claim("cpu-host:1", url=url, device="cpu") is None  # the GPU job stays queued for a GPU
    assert queue.claim("gpu-host:1", url=url, device="cuda:0 (NVIDIA H200)").id == latency


@pytest.mark.parametrize("kind,payload,message", [
    ("compress", {**PAYLOAD, "flop_reduction": 0.95}, "FLOP reduction"),
    ("sweep", {**SWEEP, "budgets": [0.3, 1.5]}, "budgets are FLOP reductions"),
    ("sweep", {**SWEEP, "methods": ["rana-random"]}, "no allocation"),
    ("sweep", {**SWEEP, "base": {"method": "svd"}}, "must not set"),
    ("evaluate", {"run_id": 12345}, "no run 12345"),
    ("evaluate", {"run_id": 1, "split": "test"}, "unknown split"),
    ("latency", {"dtype": "float64"}, "latency dtype"),
    ("latency", {"contexts": [0, 128]}, "contexts"),
    ("quantize", PAYLOAD, "unknown job kind"),
])
def test_invalid_payloads_are_refused_before_anything_is_written(any_db_url, kind, payload, message):
    with pytest.raises(RanaError, match=message):
        queue.submit(kind, payload, url=any_db_url)
    with session_scope(any_db_url) as session:
        assert session.execute(select(Job.id)).first() is None
