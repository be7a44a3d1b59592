"""The job queue, kept in the jobs table: submit, claim, progress, finish, fail, cancel, retry, reap. Torch-free.

Claiming is compare-and-set: pick the best queued candidate (highest priority; among those, one that reuses what
this worker computed for its last job, else one whose work no running job shares, else the oldest), then
``UPDATE … WHERE status = 'queued'`` and check that exactly one row changed. On SQLite the pick runs under
``BEGIN IMMEDIATE`` (one writer at a time, so no two workers see the same candidate); on PostgreSQL candidates are
taken with ``FOR UPDATE SKIP LOCKED`` so workers on many hosts never wait on each other. Timestamps come from the
database clock, which all hosts share.

Every state change a worker makes is conditional on the row still being *its* running job, so a job that was
cancelled, or reaped from a worker that stopped heartbeating and claimed by another, can never be finished twice.
A parent's row (a sweep's) is never claimed: its children are, and each change to a child refreshes the parent's
aggregate. Which kinds are parents, and which need a stored run, is read from the table in jobs.kinds.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text, update

from db.migrate import check_schema
from db.models import Job, Run
from db.session import get_engine, session_scope
from jobs.accounts import SOLO, Actor, require, require_owner
from jobs.kinds import GPU_KINDS, KINDS, PARENT_KINDS, WAITING_FOR_GPU, reuse_key, validate_payload
from rana_core.errors import RanaError

FINISHED = ("done", "failed", "cancelled")
DEFAULT_MAX_ATTEMPTS = 3


class JobCancelled(Exception):
    """The job was cancelled (or taken from this worker) while it ran."""


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    payload: dict
    attempts: int
    author: str | None = None
    tags: tuple = ()
    parent_id: int | None = None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def default_author() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no login name in some containers
        return os.environ.get("USER", "unknown")


def submit(kind: str, payload: dict, priority: int = 0, author: str | None = None, tags=(),
           max_attempts: int = DEFAULT_MAX_ATTEMPTS, url: str | None = None, actor: Actor = SOLO) -> int:
    """Validate and enqueue; returns the job id (a parent's own id, for a sweep). Raises RanaError, before the
    database is opened, if the request is bad, and DatabaseError if the database is not at the code's schema.

    The one place a payload is validated: the CLI and the app both enqueue through here, and the worker trusts
    what is stored. `actor`: who asks (jobs.accounts): in team mode a runner or admin, who becomes the author."""
    require(actor, "runner", f"queue {kind} jobs")
    if actor.name is not None:
        author = actor.name  # a signed-in user queues under their own name, never another's
    clean = validate_payload(kind, payload)
    rules = KINDS[kind]
    tags = _clean_tags(tags)
    if max_attempts < 1:
        raise RanaError(f"max attempts must be at least 1, got {max_attempts}")
    check_schema(url)
    common = {"priority": priority, "author": author or default_author(), "tags": tags, "max_attempts": max_attempts,
              "progress": 0.0, "attempts": 0}
    with session_scope(url) as session:
        if rules.needs_run:
            _check_run_has_artifact(session, clean["run_id"], kind)
        job = Job(kind=kind, payload=clean, status="queued",
                  message=WAITING_FOR_GPU if rules.needs_gpu else "queued", **common)
        session.add(job)
        session.flush()
        if rules.children is not None:
            points = rules.children(clean)
            for point in points:
                session.add(Job(kind=rules.child_kind, payload=point, status="queued", message="queued",
                                parent_id=job.id, **common))
            job.message = f"0/{len(points)} done"
        return job.id


def _clean_tags(tags) -> list[str]:
    if isinstance(tags, str):
        tags = tags.split(",")
    clean = sorted({str(t).strip() for t in tags or () if str(t).strip()})
    for tag in clean:
        if len(tag) > 40:
            raise RanaError(f"tag {tag[:20]!r}… is longer than 40 characters")
    return clean


def _check_run_has_artifact(session, run_id: int, verb: str) -> None:
    run = session.get(Run, run_id)
    if run is None:
        raise RanaError(f"no run {run_id}")
    if not run.artifact_path:
        raise RanaError(f"run {run_id} has no stored adapters to {verb} (it was made before artifacts existed)")


CANDIDATES = 64  # queued jobs of the top priority a claim chooses among


def claim(worker: str, url: str | None = None, host: str | None = None, device: str | None = None,
          after: "ClaimedJob | None" = None) -> ClaimedJob | None:
    """The next job for `worker`, now running on it, or None. `after`: the job this worker ran last; a queued job
    that reuses its work (jobs.kinds.reuse_key) comes first, so that two workers draining a sweep each take whole
    methods instead of both computing every method's profiles and curves. A worker whose `device` is not a CUDA
    device never claims a job that needs a GPU (jobs.kinds: needs_gpu)."""
    engine = get_engine(url)
    options = {"sqlite_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}
    with engine.connect().execution_options(**options) as connection, connection.begin():
        not_claimable = PARENT_KINDS if device is None or device.startswith("cuda") else PARENT_KINDS + GPU_KINDS
        pick = (select(Job.id, Job.kind, Job.payload, Job.priority)
                .where(Job.status == "queued", Job.kind.not_in(not_claimable))
                .order_by(Job.priority.desc(), Job.id).limit(CANDIDATES))
        if engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        candidates = connection.execute(pick).all()
        if not candidates:
            return None
        job_id = _preferred(connection, [c for c in candidates if c.priority == candidates[0].priority], after)
        changed = connection.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="running", worker=worker, host=host or worker.rsplit(":", 1)[0], device=device,
                    attempts=Job.attempts + 1, progress=0.0, message="claimed", error=None, started_at=func.now(),
                    heartbeat_at=func.now(), finished_at=None)
        ).rowcount
        if changed != 1:  # another worker won the race
            return None
        row = connection.execute(
            select(Job.kind, Job.payload, Job.attempts, Job.author, Job.tags, Job.parent_id).where(Job.id == job_id)
        ).one()
        if row.parent_id is not None:
            _refresh_sweep(connection, row.parent_id)
        return ClaimedJob(job_id, row.kind, row.payload, row.attempts, row.author, tuple(row.tags or ()),
                          row.parent_id)


def _preferred(connection, candidates: list, after: "ClaimedJob | None") -> int:
    keys = [reuse_key(c.kind, c.payload or {}) for c in candidates]
    if after is not None:
        mine = reuse_key(after.kind, after.payload or {})
        for candidate, key in zip(candidates, keys):
            if key == mine:
                return candidate.id
    running = {reuse_key(kind, payload or {}) for kind, payload in
               connection.execute(select(Job.kind, Job.payload).where(Job.status == "running")).all()}
    for candidate, key in zip(candidates, keys):
        if key not in running:
            return candidate.id
    return candidates[0].id


def follow_up(job: ClaimedJob, url: str | None = None) -> int | None:
    """After a sweep's point is done: when the sweep asked for decode speed (`rana sweep --latency`), queue a
    measurement of the point's run for a GPU worker; returns that job's id."""
    if job.parent_id is None:
        return None
    with session_scope(url) as session:
        parent = session.get(Job, job.parent_id)
        options = (parent.payload or {}).get("latency") if parent is not None else None
        run_id = session.execute(select(Run.id).where(Run.job_id == job.id)).scalar()
    if options is None or run_id is None:
        return None
    return submit("run_latency", {**options, "run_id": run_id}, author=job.author, tags=job.tags, url=url)


def _mine(job_id: int, worker: str):
    return (Job.id == job_id, Job.worker == worker, Job.status == "running")


def report_progress(job_id: int, worker: str, fraction: float, message: str, url: str | None = None) -> None:
    """Record progress and beat the heart; raise JobCancelled if the job is no longer this worker's to run."""
    with session_scope(url) as session:
        changed = session.execute(
            update(Job).where(*_mine(job_id, worker))
            .values(progress=fraction, message=message[:500], heartbeat_at=func.now())
        ).rowcount
        if changed == 1:
            _refresh_parent_of(session, job_id)
    if changed != 1:
        raise JobCancelled(f"job {job_id} is no longer running on {worker}")


def heartbeat(job_id: int, worker: str, url: str | None = None) -> bool:
    with session_scope(url) as session:
        return session.execute(update(Job).where(*_mine(job_id, worker)).values(heartbeat_at=func.now())).rowcount == 1


def release(job_id: int, worker: str, message: str, url: str | None = None) -> None:
    """Give a running job back to the queue (the worker is stopping); its attempt is not counted."""
    with session_scope(url) as session:
        session.execute(
            update(Job).where(*_mine(job_id, worker))
            .values(status="queued", worker=None, progress=0.0, message=message, attempts=Job.attempts - 1)
        )
        _refresh_parent_of(session, job_id)


def fail(job_id: int, worker: str, error: str, url: str | None = None) -> None:
    with session_scope(url) as session:
        session.execute(
            update(Job).where(*_mine(job_id, worker))
            .values(status="failed", error=error, message="failed", finished_at=func.now())
        )
        _refresh_parent_of(session, job_id)


def mark_done(session, job_id: int, worker: str) -> bool:
    """Inside the session that stored the results, so that results and status commit together."""
    done = session.execute(
        update(Job).where(*_mine(job_id, worker))
        .values(status="done", progress=1.0, message="done", finished_at=func.now())
    ).rowcount == 1
    if done:
        _refresh_parent_of(session, job_id)
    return done


def cancel(job_id: int, url: str | None = None, actor: Actor = SOLO) -> int:
    """Cancel a queued or running job (a sweep: all its unfinished points). A running job stops at its worker's
    next progress report. Returns how many jobs (points, for a sweep) were cancelled."""
    return _move(job_id, ("queued", "running"), dict(status="cancelled", message="cancelled", finished_at=func.now()),
                 "only queued or running jobs can be cancelled", url, actor, "cancel")


def retry(job_id: int, url: str | None = None, actor: Actor = SOLO) -> int:
    """Queue a failed or cancelled job again with a fresh attempt count (a sweep: its failed and cancelled
    points). Returns how many jobs were queued."""
    values = dict(status="queued", message="queued again", error=None, attempts=0, progress=0.0, worker=None,
                  started_at=None, finished_at=None, heartbeat_at=None)
    return _move(job_id, ("failed", "cancelled"), values, "only failed or cancelled jobs can be retried", url, actor,
                 "retry")


def _move(job_id: int, from_statuses: tuple, values: dict, refusal: str, url: str | None, actor: Actor,
          verb: str) -> int:
    """Apply `values` to the job (a sweep: to its points) where its status is one of `from_statuses`; refresh
    the sweep's aggregate; refuse with one line when nothing was in such a state, or when `actor` may not touch
    this job (a runner another's, a viewer any)."""
    with session_scope(url) as session:
        job = _get(session, job_id)
        require_owner(actor, job.author, job_id, verb)
        targets = _children(session, job_id) if job.kind in PARENT_KINDS else [job_id]
        changed = session.execute(
            update(Job).where(Job.id.in_(targets), Job.status.in_(from_statuses)).values(**values)
        ).rowcount
        if changed == 0:
            raise RanaError(f"job {job_id} is {job.status}: {refusal}")
        if job.kind in PARENT_KINDS:
            _refresh_sweep(session, job_id)
        else:
            _refresh_parent_of(session, job_id)
        return changed


def reap(stale_seconds: float, url: str | None = None) -> list[int]:
    """Requeue running jobs whose worker has not beaten its heart for `stale_seconds` (crashed, killed, cut off);
    a job that has used its attempts is failed instead, with the reason. Returns the ids it touched."""
    engine = get_engine(url)
    if engine.dialect.name == "sqlite":
        cutoff = func.datetime("now", f"-{int(stale_seconds)} seconds")
    else:
        cutoff = func.now() - text(f"interval '{int(stale_seconds)} seconds'")
    touched = []
    with session_scope(url) as session:
        stale = session.execute(
            select(Job.id, Job.worker, Job.attempts, Job.max_attempts, Job.heartbeat_at)
            .where(Job.status == "running", Job.kind.not_in(PARENT_KINDS), Job.heartbeat_at < cutoff)
        ).all()
        for row in stale:
            reason = f"worker {row.worker} stopped heartbeating (last beat {row.heartbeat_at:%Y-%m-%d %H:%M:%S})"
            still_stale = (Job.id == row.id, Job.status == "running", Job.worker == row.worker,
                           Job.heartbeat_at < cutoff)
            if row.attempts >= row.max_attempts:
                values = dict(status="failed", finished_at=func.now(), message="failed",
                              error=f"{reason}; gave up after {row.attempts} attempt(s)")
            else:
                values = dict(status="queued", worker=None, progress=0.0, message=f"requeued: {reason}")
            if session.execute(update(Job).where(*still_stale).values(**values)).rowcount == 1:
                touched.append(row.id)
                _refresh_parent_of(session, row.id)
    return touched


@dataclass(frozen=True)
class RunningJob:
    id: int
    worker: str | None
    silent_seconds: float  # since its last heartbeat, on the database clock


def running_jobs(url: str | None = None) -> list[RunningJob]:
    """The jobs a worker holds now, each with how long its worker has been silent. A parent (a sweep) is left
    out: it runs only through its children, and nobody heartbeats or reaps its own row."""
    engine = get_engine(url)
    if engine.dialect.name == "sqlite":  # CURRENT_TIMESTAMP strings, as func.now() stored them
        silent = (func.julianday("now") - func.julianday(Job.heartbeat_at)) * 86400.0
    else:
        silent = func.extract("epoch", func.now() - Job.heartbeat_at)
    with session_scope(url) as session:
        rows = session.execute(
            select(Job.id, Job.worker, silent.label("silent"))
            .where(Job.status == "running", Job.kind.not_in(PARENT_KINDS)).order_by(Job.id)
        ).all()
    return [RunningJob(row.id, row.worker, float(row.silent or 0.0)) for row in rows]


def _get(session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise RanaError(f"no job {job_id}")
    return job


def _children(session, parent_id: int) -> list[int]:
    return list(session.execute(select(Job.id).where(Job.parent_id == parent_id)).scalars())


def _refresh_parent_of(session_or_connection, job_id: int) -> None:
    parent = session_or_connection.execute(select(Job.parent_id).where(Job.id == job_id)).scalar()
    if parent is not None:
        _refresh_sweep(session_or_connection, parent)


def _refresh_sweep(session_or_connection, parent_id: int) -> None:
    """Write a sweep's status, progress and message from its points, in the caller's transaction.

    The sweep's row is locked first: on PostgreSQL two workers finishing two points at once would otherwise each
    read the other's point as unfinished, and the later write would leave a stale aggregate behind."""
    session_or_connection.execute(select(Job.id).where(Job.id == parent_id).with_for_update())
    rows = session_or_connection.execute(
        select(Job.status, Job.progress).where(Job.parent_id == parent_id)).all()
    if not rows:
        return
    counts = {status: sum(1 for r in rows if r.status == status) for status in ("queued", "running", *FINISHED)}
    progress = sum(1.0 if r.status in FINISHED else r.progress for r in rows) / len(rows)
    if counts["queued"] + counts["running"] == 0:
        status = "failed" if counts["failed"] else "cancelled" if counts["cancelled"] else "done"
    else:
        status = "queued" if counts["queued"] == len(rows) else "running"
    parts = [f"{counts['done']}/{len(rows)} done"] + [f"{counts[s]} {s}" for s in ("running", "failed", "cancelled")
                                                       if counts[s]]
    finished = func.now() if status in FINISHED else None
    session_or_connection.execute(
        update(Job).where(Job.id == parent_id)
        .values(status=status, progress=progress, message=", ".join(parts), finished_at=finished))


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
    host: str | None
    device: str | None
    attempts: int
    max_attempts: int
    parent_id: int | None
    author: str | None
    tags: tuple
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    run_id: int | None
    payload: dict

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["tags"] = list(self.tags)
        for key in ("created_at", "started_at", "finished_at", "heartbeat_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def list_jobs(limit: int = 200, status: str | None = None, url: str | None = None,
              parent_id: int | None = None) -> list[JobView]:
    with session_scope(url) as session:
        query = select(Job, Run.id).outerjoin(Run, Run.job_id == Job.id).order_by(Job.id.desc()).limit(limit)
        if status:
            query = query.where(Job.status == status)
        if parent_id is not None:
            query = query.where(Job.parent_id == parent_id)
        return [
            JobView(job.id, job.kind, job.status, job.priority, job.progress, job.message, job.error, job.worker,
                    job.host, job.device, job.attempts, job.max_attempts, job.parent_id, job.author,
                    tuple(job.tags or ()), job.created_at, job.started_at, job.finished_at, job.heartbeat_at,
                    run_id, job.payload)
            for job, run_id in session.execute(query)
        ]
