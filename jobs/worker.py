"""The worker: claim a job, run it through rana_core, store its results, repeat.

Progress goes to the job row (at most once a second, plus a heartbeat thread while a job runs). Results and the
``done`` status commit in one transaction, so a crash leaves either a finished job with all its rows or a running
job with none. SIGINT/SIGTERM: the job in hand is handed back to the queue at its next progress point and the
worker exits.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback

from db.session import session_scope
from jobs import queue
from jobs.results import store_compression

log = logging.getLogger("rana.worker")

HEARTBEAT_SECONDS = 5.0
PROGRESS_EVERY_SECONDS = 1.0


class StopRequested(Exception):
    pass


class Worker:
    def __init__(self, url: str | None = None, device: str | None = None, poll_seconds: float = 1.0):
        self.url = url
        self.device = device
        self.poll_seconds = poll_seconds
        self.name = queue.worker_name()
        self.stopping = threading.Event()
        self._model_cache: dict = {}  # one loaded model, reused while jobs keep asking for it

    def install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            log.info("signal %s: stopping after handing back the current job", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self, exit_when_idle: bool = False, max_jobs: int | None = None) -> int:
        """Process jobs until stopped (or idle, or `max_jobs` done); returns the number processed."""
        processed = 0
        while not self.stopping.is_set():
            job = queue.claim(self.name, self.url)
            if job is None:
                if exit_when_idle:
                    break
                self.stopping.wait(self.poll_seconds)
                continue
            self.process(job)
            processed += 1
            if max_jobs is not None and processed >= max_jobs:
                break
        return processed

    def process(self, job: queue.ClaimedJob) -> None:
        log.info("job %s (%s) claimed by %s", job.id, job.kind, self.name)
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, beat_stop), daemon=True)
        beat.start()
        try:
            result = self._execute(job)
            with session_scope(self.url) as session:
                store_compression(session, result, job_id=job.id)
                if not queue.mark_done(session, job.id, self.name):
                    raise queue.JobCancelled(f"job {job.id} was taken from {self.name} before it finished")
            log.info("job %s done", job.id)
        except StopRequested:
            queue.release(job.id, self.name, "handed back: its worker stopped", self.url)
            log.info("job %s handed back to the queue", job.id)
        except queue.JobCancelled as exc:
            log.info("%s", exc)
        except Exception as exc:  # the job failed; the worker lives on
            log.debug("job %s failed:\n%s", job.id, traceback.format_exc())
            queue.fail(job.id, self.name, _one_line(exc), self.url)
            log.warning("job %s failed: %s", job.id, _one_line(exc))
        finally:
            beat_stop.set()
            beat.join()

    def _execute(self, job: queue.ClaimedJob) -> dict:
        from rana_core.config import CompressConfig
        from rana_core.pipeline import compress

        config = CompressConfig.from_dict(job.payload)
        if self.device:
            config.device = self.device
        config.validate()
        loaded = self._loaded_model(config)
        last = [0.0]
        stage = [""]

        def progress(fraction: float, message: str) -> None:
            if self.stopping.is_set():
                raise StopRequested()
            if message.split(":")[0] != stage[0]:
                stage[0] = message.split(":")[0]
                log.info("job %s: %s (%.0f%%)", job.id, message, 100 * fraction)
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_SECONDS or fraction >= 1.0:
                last[0] = now
                queue.report_progress(job.id, self.name, fraction, message, self.url)

        return compress(config, progress=progress, loaded=loaded).to_json()

    def _loaded_model(self, config):
        from rana_core.models import load_model

        key = (config.model, config.device, config.dtype)
        if key not in self._model_cache:
            self._model_cache.clear()  # keep one model in memory at a time
            self._model_cache[key] = load_model(config.model, device=config.device, dtype=config.dtype)
        return self._model_cache[key]

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                queue.heartbeat(job_id, self.name, self.url)
            except Exception as exc:  # a missed beat is not fatal; the next one may get through
                log.warning("heartbeat for job %s failed: %s", job_id, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
