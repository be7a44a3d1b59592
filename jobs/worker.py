"""The worker: claim a job, run it through rana_core, store its results, repeat.

Progress goes to the job row (at most once a second, plus a heartbeat thread while a job runs). Results and the
``done`` status commit in one transaction, so a crash leaves either a finished job with all its rows or a running
job with none; the reaper (run by every worker between jobs) requeues a job whose worker stopped heartbeating.
A worker told to exit when idle leaves only when nothing is queued or running, so a drain ends with every job
finished even if one of its workers died mid-job.
SIGINT/SIGTERM: the job in hand is handed back to the queue at its next progress point and the worker exits.
A database that is busy or briefly unreachable is waited for and retried, never a reason to crash.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback

from sqlalchemy.exc import OperationalError

from db.models import Run
from db.session import data_dir, session_scope
from jobs import queue
from jobs.kinds import KINDS
from jobs.results import store_compression, store_evaluation, store_latency, store_run_latency, store_recovery
from rana_core.errors import RanaError

log = logging.getLogger("rana.worker")

HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0  # a running job whose heartbeat is older than this is reaped
PROGRESS_EVERY_SECONDS = 1.0
DB_RETRIES = 6  # attempts at a database write before giving up on it (backoff 0.5 s, doubling)


class StopRequested(Exception):
    pass


def with_db_retries(action, what: str, retries: int = DB_RETRIES, stopping: threading.Event | None = None):
    """Run `action()`, retrying a busy, locked or unreachable database with exponential backoff."""
    delay = 0.5
    for attempt in range(1, retries + 1):
        try:
            return action()
        except OperationalError as exc:
            if attempt == retries:
                raise
            log.warning("%s: database not available (%s); retry %d/%d in %.1f s", what,
                        str(exc.orig).splitlines()[0] if exc.orig else exc, attempt, retries - 1, delay)
            if stopping is not None and stopping.wait(delay):
                raise StopRequested() from None
            if stopping is None:
                time.sleep(delay)
            delay = min(delay * 2, 10.0)


class Worker:
    def __init__(self, url: str | None = None, device: str | None = None, poll_seconds: float = 1.0,
                 stale_seconds: float = STALE_SECONDS, max_gpu_memory: float | None = None):
        self.url = url
        self.device = device
        self.max_gpu_memory = max_gpu_memory  # GiB this worker's jobs may take of its GPU (jobs.gpu.cap_memory)
        if max_gpu_memory is not None:
            if not (device or "").startswith("cuda"):
                raise RanaError(f"--max-gpu-memory needs a CUDA device; this worker runs on {device or 'cpu'}")
            if max_gpu_memory <= 0:
                raise RanaError(f"--max-gpu-memory must be a positive number of GiB, got {max_gpu_memory}")
            from jobs import gpu

            gpu.cap_memory(device, max_gpu_memory)
        self._stage = ""  # the last progress message of the job in hand: where it was when it failed
        self.poll_seconds = poll_seconds
        self.stale_seconds = stale_seconds
        self.name = queue.worker_name()
        self.host = self.name.rsplit(":", 1)[0]
        self.stopping = threading.Event()
        self._model_cache: dict = {}  # one loaded model, reused while jobs keep asking for it
        self._device_label: str | None = None
        self._last_reap = 0.0

    @property
    def device_label(self) -> str:
        if self._device_label is None:
            device = self.device or "cpu"
            if device.startswith("cuda"):
                from rana_core.provenance import device_name

                self._device_label = f"{device} ({device_name(device)})"
            else:
                self._device_label = device
        return self._device_label

    def install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            log.info("signal %s: stopping after handing back the current job", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self, exit_when_idle: bool = False, max_jobs: int | None = None) -> int:
        """Process jobs until stopped (or idle, or `max_jobs` done); returns the number processed.

        Idle means that no job is queued *and* none is running anywhere. An empty queue is not enough: a job whose
        worker was killed stays `running` until some worker reaps it, and if every worker of a drain left at the
        empty queue, nobody would; so a worker told to exit when idle waits for the running jobs to finish, or to
        be reaped (requeued, then claimed here, or failed when out of attempts)."""
        processed = 0
        waiting_for: set[int] = set()
        last: queue.ClaimedJob | None = None
        while not self.stopping.is_set():
            try:
                self.reap_if_due()
                job = queue.claim(self.name, self.url, host=self.host, device=self.device_label, after=last)
                running = queue.running_jobs(self.url) if job is None and exit_when_idle else []
            except OperationalError as exc:
                log.warning("queue not available (%s); waiting", str(exc.orig or exc).splitlines()[0])
                self.stopping.wait(max(self.poll_seconds, 1.0))
                continue
            if job is None:
                if exit_when_idle and not running:
                    break
                if running and {r.id for r in running} != waiting_for:  # said once, again only when it changes
                    waiting_for = {r.id for r in running}
                    log.info("queue empty; waiting for %d running job(s) (%s) to finish or be reaped (after %g s "
                             "without a heartbeat)", len(running), _describe_running(running), self.stale_seconds)
                self.stopping.wait(self.poll_seconds)
                continue
            waiting_for = set()
            self.process(job)
            last = job
            processed += 1
            if max_jobs is not None and processed >= max_jobs:
                break
        return processed

    def reap_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_reap >= HEARTBEAT_SECONDS:
            self._last_reap = now
            for job_id in queue.reap(self.stale_seconds, self.url):
                log.warning("job %s: its worker stopped heartbeating; requeued or failed", job_id)

    def _on_gpu(self) -> bool:
        return (self.device or "").startswith("cuda")

    def process(self, job: queue.ClaimedJob) -> None:
        log.info("job %s (%s) claimed by %s on %s", job.id, job.kind, self.name, self.device_label)
        failed = out_of_memory = False
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, beat_stop), daemon=True)
        beat.start()
        try:
            store = self._execute(job)
            with_db_retries(lambda: self._finish(job, store), f"job {job.id} results", stopping=None)
            log.info("job %s done", job.id)
            self._follow_up(job)
        except StopRequested:
            with_db_retries(lambda: queue.release(job.id, self.name, "handed back: its worker stopped", self.url),
                            f"job {job.id} release")
            log.info("job %s handed back to the queue", job.id)
        except queue.JobCancelled as exc:
            log.info("%s", exc)
        except Exception as exc:  # the job failed; the worker lives on
            log.debug("job %s failed:\n%s", job.id, traceback.format_exc())
            failed = True
            out_of_memory = self._on_gpu() and _gpu().is_out_of_memory(exc)
            reason = (_gpu().out_of_memory_line(exc, self._stage, self.device, self.max_gpu_memory) if out_of_memory
                      else _one_line(exc))
            with_db_retries(lambda: queue.fail(job.id, self.name, reason, self.url), f"job {job.id} failure")
            log.warning("job %s failed: %s", job.id, reason)
        finally:
            beat_stop.set()
            beat.join()
            self._stage = ""
        if failed and self._on_gpu():  # the failed job's tensors are gone with its frames: give their memory back
            if out_of_memory:
                self._model_cache.clear()  # the model may hold half-moved weights or adapters; load it afresh
            _gpu().free(self.device)

    def _follow_up(self, job: queue.ClaimedJob) -> None:
        """What a finished job asks for next (a sweep point's decode speed); the job itself stays done."""
        try:
            follow = with_db_retries(lambda: queue.follow_up(job, self.url), f"job {job.id} follow-up")
        except Exception as exc:
            log.warning("job %s: its run's decode speed was not queued: %s", job.id, _one_line(exc))
            return
        if follow is not None:
            log.info("job %s: its run's decode speed is queued as job %s", job.id, follow)

    def _finish(self, job: queue.ClaimedJob, store) -> None:
        with session_scope(self.url) as session:
            store(session)
            if not queue.mark_done(session, job.id, self.name):
                raise queue.JobCancelled(f"job {job.id} was cancelled or taken from {self.name} before it finished")

    def _execute(self, job: queue.ClaimedJob):
        """Do the job's work through its kind's handler (jobs.kinds); return a function that stores its results
        in a session."""
        kind = KINDS.get(job.kind)
        if kind is None or kind.handler is None:
            raise RanaError(f"this worker cannot run jobs of kind {job.kind!r}")
        return getattr(self, kind.handler)(job, self._progress_reporter(job))

    def run_compress(self, job: queue.ClaimedJob, progress):
        from rana_core.pipeline import compress

        config = self._config(job.payload)
        relative = f"artifacts/job-{job.id}-attempt-{job.attempts}.safetensors"
        try:
            result = compress(config, progress=progress, loaded=self._loaded_model(config),
                              artifact_path=data_dir() / relative, cache_dir=data_dir() / "curves").to_json()
        except BaseException:  # a job that fails stores nothing: not even the adapters it had already saved
            (data_dir() / relative).unlink(missing_ok=True)
            raise
        return lambda session: store_compression(session, result, job_id=job.id, author=job.author, tags=job.tags,
                                                 artifact_path=relative)

    def run_evaluate(self, job: queue.ClaimedJob, progress):
        from rana_core.pipeline import evaluate_saved

        payload = job.payload
        run_config, path, digest = self._stored_run(payload["run_id"])
        config = self._config(run_config)
        evaluation = evaluate_saved(self._loaded_model(config), data_dir() / path, digest, payload["split"],
                                    payload["eval_tokens"], payload["seq_len"], progress, payload.get("tasks", []),
                                    payload.get("corpus", "brown"))
        return lambda session: store_evaluation(session, payload["run_id"], evaluation, job_id=job.id)

    def run_recover(self, job: queue.ClaimedJob, progress):
        from rana_core.recovery.recover import recover
        from rana_core.recovery.config import RecoverConfig

        payload = dict(job.payload)
        run_id = payload.pop("run_id")
        run_config, path, digest = self._stored_run(run_id)
        config = self._config(run_config)
        result = recover(self._loaded_model(config), data_dir() / path, digest, RecoverConfig.from_dict(payload),
                         progress).to_json()
        return lambda session: store_recovery(session, run_id, result, job_id=job.id)

    def _stored_run(self, run_id: int) -> tuple[dict, str, str | None]:
        """A run's configuration, artifact path and checksum; a RanaError if it is gone or has no adapters."""
        with session_scope(self.url) as session:
            run = session.get(Run, run_id)
            if run is None:
                raise RanaError(f"run {run_id} no longer exists")
            run_config, path, digest = dict(run.config), run.artifact_path, run.artifact_sha256
        if not path:
            raise RanaError(f"run {run_id} has no stored adapters")
        return run_config, path, digest

    def run_latency(self, job: queue.ClaimedJob, progress):
        device = self.device or "cpu"
        if not device.startswith("cuda"):
            raise RanaError(f"latency jobs need a CUDA GPU; this worker runs on {device} (set RANA_DEVICE=cuda)")
        try:
            from rana_core.decode.latency import measure_decode  # the GPU decode engine
        except ImportError:
            raise RanaError("this version has no GPU decode engine (rana_core.decode.latency) to measure latency") from None
        rows = measure_decode(job.payload, device=device, progress=progress)
        return lambda session: store_latency(session, rows, job_id=job.id)

    def run_run_latency(self, job: queue.ClaimedJob, progress):
        """A stored run's decode speed on this worker's GPU, beside the dense model's in the same engine."""
        from rana_core.adapters.artifacts import load_adapters
        from rana_core.corpus import token_windows
        from rana_core.decode.run_latency import measure_run

        payload = job.payload
        device = self.device or "cpu"
        if not device.startswith("cuda"):  # never claimed by such a worker (jobs.kinds: needs_gpu); said anyway
            raise RanaError(f"decode-speed jobs need a CUDA GPU; this worker runs on {device}")
        run_config, path, digest = self._stored_run(payload["run_id"])
        config = self._config(run_config)
        loaded = self._loaded_model(config)
        adapters = load_adapters(loaded, data_dir() / path, digest)
        text = token_windows(loaded.tokenizer, "heldout", 2048, 512)  # the masks are counted on held-out text
        report = measure_run(loaded.model, adapters, payload["contexts"], payload["new_tokens"], payload["dtype"],
                             device, text, progress, batches=payload.get("batches", []))  # none before batches
        return lambda session: store_run_latency(session, payload["run_id"], report, job_id=job.id)

    def _config(self, payload: dict):
        """The stored configuration as this worker runs it: validated when it was submitted, so trusted here; only
        the device is this worker's own."""
        from rana_core.config import CompressConfig

        config = CompressConfig.from_dict(payload)
        if self.device:
            config.device = self.device
        return config

    def _progress_reporter(self, job: queue.ClaimedJob):
        last = [0.0]
        stage = [""]

        def progress(fraction: float, message: str) -> None:
            if self.stopping.is_set():
                raise StopRequested()
            self._stage = message
            if message.split(":")[0] != stage[0]:
                stage[0] = message.split(":")[0]
                log.info("job %s: %s (%.0f%%)", job.id, message, 100 * fraction)
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_SECONDS or fraction >= 1.0:
                last[0] = now
                try:
                    queue.report_progress(job.id, self.name, fraction, message, self.url)
                except OperationalError as exc:  # a busy database costs one progress update, not the job
                    log.warning("job %s: progress not recorded (%s)", job.id, str(exc.orig or exc).splitlines()[0])

        return progress

    def _loaded_model(self, config):
        from rana_core.loading import load_model

        layer_by_layer = getattr(config, "layer_by_layer", None)  # a compress job's choice; others decide
        key = (config.model, config.device, config.dtype, layer_by_layer)
        if key not in self._model_cache:
            self._model_cache.clear()  # keep one model in memory at a time
            self._model_cache[key] = load_model(config.model, device=config.device, dtype=config.dtype,
                                                layer_by_layer=layer_by_layer)
        return self._model_cache[key]

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                queue.heartbeat(job_id, self.name, self.url)
            except Exception as exc:  # a missed beat is not fatal; the next one may get through
                log.warning("heartbeat for job %s failed: %s", job_id, _one_line(exc))


def _describe_running(running: list[queue.RunningJob]) -> str:
    """One line, e.g. "job 7, heartbeat 12 s ago; job 9, heartbeat 1 s ago" (five jobs at most, then a count)."""
    shown = "; ".join(f"job {r.id}, heartbeat {r.silent_seconds:.0f} s ago" for r in running[:5])
    return shown + (f"; {len(running) - 5} more" if len(running) > 5 else "")


def _gpu():
    from jobs import gpu  # torch: only a worker on a CUDA device gets here

    return gpu


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

