"""The job queue, kept in the jobs table: submit, claim, report progress, finish, fail, list. Torch-free.

Claiming is compare-and-set: pick the best queued candidate, then ``UPDATE … WHERE status = 'queued'`` and check
that exactly one row changed. On SQLite the pick runs under ``BEGIN IMMEDIATE`` (one writer at a time, so no two
workers see the same candidate); on PostgreSQL candidates are taken with ``FOR UPDATE SKIP LOCKED`` so workers on
many hosts never wait on each other. Timestamps come from the database clock, which all hosts share.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update

from db.models import Job, Run
from db.session import get_engine, session_scope
from jobs.specs import validate_payload


class JobCancelled(Exception):
    """The job was cancelled (or taken from this worker) while it ran."""


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    payload: dict
    attempts: int


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def submit(kind: str, payload: dict, priority: int = 0, url: str | None = None) -> int:
    """Validate and enqueue; returns the job id. Raises RanaError before writing anything if the payload is bad."""
    clean = validate_payload(kind, payload)
    with session_scope(url) as session:
        job = Job(kind=kind, payload=clean, priority=priority, status="queued", progress=0.0, message="queued",
                  attempts=0)
        session.add(job)
        session.flush()
        return job.id


def claim(worker: str, url: str | None = None) -> ClaimedJob | None:
    engine = get_engine(url)
    options = {"sqlite_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}
    with engine.connect().execution_options(**options) as connection, connection.begin():
        pick = select(Job.id).where(Job.status == "queued").order_by(Job.priority.desc(), Job.id).limit(1)
        if engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        job_id = connection.execute(pick).scalar()
        if job_id is None:
            return None
        changed = connection.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="running", worker=worker, attempts=Job.attempts + 1, progress=0.0,
                    message="claimed", error=None, started_at=func.now(), heartbeat_at=func.now())
        ).rowcount
        if changed != 1:  # another worker won the race
            return None
        row = connection.execute(select(Job.kind, Job.payload, Job.attempts).where(Job.id == job_id)).one()
        return ClaimedJob(job_id, row.kind, row.payload, row.attempts)


def report_progress(job_id: int, worker: str, fraction: float, message: str, url: str | None = None) -> None:
    """Record progress and beat the heart; raise JobCancelled if the job is no longer this worker's to run."""
    with session_scope(url) as session:
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
            .values(progress=fraction, message=message[:500], heartbeat_at=func.now())
        ).rowcount
    if changed != 1:
        raise JobCancelled(f"job {job_id} is no longer running on {worker}")


def heartbeat(job_id: int, worker: str, url: str | None = None) -> bool:
    with session_scope(url) as session:
        return session.execute(
            update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
            .values(heartbeat_at=func.now())
        ).rowcount == 1


def release(job_id: int, worker: str, message: str, url: str | None = None) -> None:
    """Give a running job back to the queue (the worker is stopping); its attempt is not counted."""
    with session_scope(url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
            .values(status="queued", worker=None, progress=0.0, message=message, attempts=Job.attempts - 1)
        )


def fail(job_id: int, worker: str, error: str, url: str | None = None) -> None:
    with session_scope(url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
            .values(status="failed", error=error, message="failed", finished_at=func.now())
        )


def mark_done(session, job_id: int, worker: str) -> bool:
    """Inside the session that stored the results, so that results and status commit together."""
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
        .values(status="done", progress=1.0, message="done", finished_at=func.now())
    ).rowcount == 1


@dataclass(frozen=True)
class JobView:
    id: int
    kind: str
    status: str
    priority: int
    progress: float
    message: str
    error: str | None
    worker: str | None
    attempts: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    run_id: int | None
    payload: dict

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        for key in ("created_at", "started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def list_jobs(limit: int = 200, status: str | None = None, url: str | None = None) -> list[JobView]:
    with session_scope(url) as session:
        query = select(Job, Run.id).outerjoin(Run, Run.job_id == Job.id).order_by(Job.id.desc()).limit(limit)
        if status:
            query = query.where(Job.status == status)
        return [
            JobView(job.id, job.kind, job.status, job.priority, job.progress, job.message, job.error, job.worker,
                    job.attempts, job.created_at, job.started_at, job.finished_at, run_id, job.payload)
            for job, run_id in session.execute(query)
        ]
