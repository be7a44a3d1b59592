"""Real worker processes against SQLite and a real PostgreSQL server: many workers, one execution per job; a
worker killed with SIGKILL mid-job is reaped and its job finishes once, also when the other workers were only
draining the queue; SIGTERM hands the job back."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

from sqlalchemy import func, select

from db.models import Run
from db.session import session_scope
from jobs import queue

QUICK = {"model": "tiny", "method": "svd", "flop_reduction": 0.3, "calib_tokens": 256, "eval_tokens": 256,
         "seq_len": 128}
# About 8 s on two cores here, of which the held-out evaluation (progress 0.5 to 1) is the last 2-3: the window in
# which the tests below stop a worker mid-job. The tiny model is fast; the evaluation's tokens make the window.
SLOW = {"model": "tiny", "method": "rana", "allocation": "greedy", "flop_reduction": 0.3, "calib_tokens": 8192,
        "eval_tokens": 65536, "seq_len": 128}


def start_worker(url, tmp_path, name, *args, env=None):
    log = open(tmp_path / f"{name}.log", "w")
    env = {**os.environ, "RANA_DB_URL": url, "RANA_DATA_DIR": str(tmp_path), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "rana_cli.main", "worker", "--poll", "0.2", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def worker_name(process):
    """The name a worker process claims jobs under (jobs.worker: host:pid)."""
    return f"{socket.gethostname()}:{process.pid}"


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job(url, job_id):
    return next(j for j in queue.list_jobs(url=url) if j.id == job_id)


def run_count(url, job_id=None):
    with session_scope(url) as session:
        query = select(func.count()).select_from(Run)
        if job_id is not None:
            query = query.where(Run.job_id == job_id)
        return session.execute(query).scalar()


def test_four_workers_run_forty_jobs_exactly_once(any_db_url, tmp_path):
    url = any_db_url
    ids = [queue.submit("compress", QUICK, url=url) for _ in range(40)]
    # one thread each: four workers' thread pools on CI's two cores spun against each other (71 s against 22 here)
    workers = [start_worker(url, tmp_path, f"w{i}", "--exit-when-idle", env={"OMP_NUM_THREADS": "1"})
               for i in range(4)]
    for worker in workers:
        assert worker.wait(timeout=600) == 0
    jobs = {j.id: j for j in queue.list_jobs(url=url)}
    assert all(jobs[i].status == "done" and jobs[i].attempts == 1 and jobs[i].run_id for i in ids)
    assert run_count(url) == 40 and len({jobs[i].run_id for i in ids}) == 40
    claims = Counter()
    for i in range(4):
        for match in re.finditer(r"job (\d+) \(compress\) claimed by", (tmp_path / f"w{i}.log").read_text()):
            claims[int(match.group(1))] += 1
    assert claims == Counter({i: 1 for i in ids})  # every job executed once, by one worker
    assert len({jobs[i].worker for i in ids}) >= 2  # and the workers really did share the queue


def test_a_killed_worker_is_reaped_and_its_job_finishes_once(any_db_url, tmp_path):
    url = any_db_url
    job_id = queue.submit("compress", SLOW, url=url)
    victim = start_worker(url, tmp_path, "victim")
    try:
        freeze_mid_job(url, job_id, {worker_name(victim): victim})
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert job(url, job_id).status == "running"  # nobody told the queue: only the heartbeat stopped
    finally:
        if victim.poll() is None:
            victim.kill()
    rescuer = start_worker(url, tmp_path, "rescuer", "--stale-after", "3")
    try:
        wait_for(lambda: job(url, job_id).status == "done", 600, "the rescued job to finish")
    finally:
        rescuer.send_signal(signal.SIGTERM)
        rescuer.wait(timeout=60)
    view = job(url, job_id)
    assert view.attempts == 2 and view.worker != worker_name(victim)
    assert run_count(url, job_id) == 1 and run_count(url) == 1
    assert "stopped heartbeating" in (tmp_path / "rescuer.log").read_text()


def test_a_drain_waits_for_the_job_of_a_killed_worker_and_finishes_it(any_db_url, tmp_path):
    """Three `--exit-when-idle` workers drain the queue; whoever claims the last job is killed with SIGKILL while
    it runs it and every other job is finished. The others must not take the empty queue for the end of the work:
    they wait, reap the job once its heartbeat is 3 s old, run it, and only then exit."""
    url = any_db_url
    quick = [queue.submit("compress", QUICK, url=url) for _ in range(6)]
    last = queue.submit("compress", SLOW, priority=-1, url=url)  # claimed last, runs longest
    # Three workers on a shared CPU: one thread each, or their thread pools spin against each other.
    workers = [start_worker(url, tmp_path, f"w{i}", "--exit-when-idle", "--stale-after", "3",
                            env={"OMP_NUM_THREADS": "1"}) for i in range(3)]
    by_name = {worker_name(w): w for w in workers}
    try:
        victim = kill_mid_job(url, last, by_name, others=quick)
        survivors = [w for w in workers if w is not victim]
        for worker in survivors:
            assert worker.wait(timeout=300) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    jobs = {j.id: j for j in queue.list_jobs(url=url)}
    assert {j.status for j in jobs.values()} == {"done"}
    assert jobs[last].attempts == 2 and jobs[last].worker != worker_name(victim)
    assert run_count(url) == 7 and run_count(url, last) == 1
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(3) if workers[i] is not victim)
    assert f"waiting for 1 running job(s) (job {last}" in logs and "stopped heartbeating" in logs


def kill_mid_job(url, job_id, by_name, others):
    """SIGKILL the worker that runs `job_id` once every job in `others` is done; return its process."""
    worker = freeze_mid_job(url, job_id, by_name, others)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    return worker


def freeze_mid_job(url, job_id, by_name, others=()):
    """SIGSTOP the worker that runs `job_id` once its progress is past 0.1 and every job in `others` is done; return
    its process, frozen. The worker is frozen before the last look at the row, so whatever the caller sends next
    reaches a worker that is still in the middle of the job: no race with a job that ends between look and signal."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        view = job(url, job_id)
        assert view.status in ("queued", "running"), f"job {job_id} ended ({view.status}) before it could be stopped"
        if view.status == "running" and view.progress > 0.1 and all(job(url, i).status == "done" for i in others):
            worker = by_name[view.worker]
            worker.send_signal(signal.SIGSTOP)
            still = job(url, job_id)
            if still.status == "running" and still.worker == view.worker:
                return worker
            worker.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got under way alone")


def test_sigterm_hands_the_running_job_back(db_url, tmp_path):
    job_id = queue.submit("compress", SLOW, url=db_url)
    worker = start_worker(db_url, tmp_path, "worker")
    try:
        freeze_mid_job(db_url, job_id, {worker_name(worker): worker})
        worker.send_signal(signal.SIGTERM)  # delivered when the worker thaws, mid-job
        worker.send_signal(signal.SIGCONT)
        assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    view = job(db_url, job_id)
    assert (view.status, view.worker, view.attempts) == ("queued", None, 0)
    assert run_count(db_url) == 0
    assert "handed back" in (tmp_path / "worker.log").read_text()


def test_a_locked_sqlite_database_is_waited_for(db_url):
    import sqlite3
    import threading

    job_id = queue.submit("compress", QUICK, url=db_url)
    holder = sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    release = threading.Timer(1.5, lambda: holder.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    claimed = queue.claim("patient:1", url=db_url)
    assert claimed.id == job_id and time.monotonic() - started >= 1.0
    release.join()
    holder.close()


def test_a_worker_rides_out_a_database_that_is_unavailable(db_url, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from jobs.worker import Worker

    job_id = queue.submit("compress", QUICK, url=db_url)
    real_claim, failures = queue.claim, []

    def flaky_claim(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(queue, "claim", flaky_claim)
    worker = Worker(url=db_url, poll_seconds=0.05)
    assert worker.run(exit_when_idle=True) == 1
    assert len(failures) == 2 and job(db_url, job_id).status == "done"
