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
    for bad in ({**PAYLOAD, "flop_reduction": 1.2}, {**PAYLOAD, "model": "nope"}, {"flop": 0.3},
                {**PAYLOAD, "device": "gpu0"}):  # what the app submits goes through the same checks as the CLI's
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


def test_a_run_carries_provenance_and_an_artifact_that_an_evaluate_job_reuses(db_url, tmp_path):
    import re

    from db.session import data_dir

    payload = {**PAYLOAD, "method": "rana", "allocation": "greedy"}
    job_id = queue.submit("compress", payload, author="grace", tags="baseline, ablation", url=db_url)
    Worker(url=db_url).run(exit_when_idle=True)
    with session_scope(db_url) as s:
        run = s.execute(select(Run).where(Run.job_id == job_id)).scalar_one()
        run_id, provenance = run.id, dict(run.provenance)
        assert (run.author, run.tags) == ("grace", ["ablation", "baseline"])
        artifact = data_dir() / run.artifact_path
        assert artifact.is_file() and re.fullmatch(r"[0-9a-f]{64}", run.artifact_sha256)
        first_ppl = run.evaluations[0].perplexity
        curves = {m.adapter: m.sparsity_curve for m in run.layers if m.sparsity_curve}
        assert {"rank", "neuron"} <= set(curves)  # rank- and neuron-importance curves, stored per layer
        assert all(len(c) == 6 and c == sorted(c) for c in curves.values())
        said = {side: [r["prompt"] for r in run.probes[side]["replies"]] for side in ("dense", "adapted")}
        assert said["dense"] == said["adapted"] and len(said["dense"]) == 8  # what the model says, stored
    assert re.fullmatch(r"([0-9a-f]{40}(\+dirty)?|unknown)", provenance["git_sha"])
    assert provenance["packages"]["torch"] and provenance["seed"] == 0
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["model_sha256"])
    assert (provenance["calib_tokens"], provenance["eval_tokens"]) == (1024, 512)
    assert provenance["device"] == "cpu" and provenance["device_name"] and provenance["author"] == "grace"

    same_split = queue.submit("evaluate", {"run_id": run_id, "split": "heldout", "eval_tokens": 512,
                                           "seq_len": 128}, url=db_url)
    other_split = queue.submit("evaluate", {"run_id": run_id, "split": "train", "eval_tokens": 1024,
                                            "seq_len": 128}, url=db_url)
    assert Worker(url=db_url).run(exit_when_idle=True) == 2
    with session_scope(db_url) as s:
        rows = {e.job_id: e for e in s.execute(select(Evaluation).where(Evaluation.run_id == run_id)).scalars()}
        assert set(rows) == {None, same_split, other_split}
        # the stored adapters rebuild the very model that was measured: same tokens, same perplexity
        assert rows[same_split].perplexity == pytest.approx(first_ppl, rel=1e-6)
        assert (rows[other_split].split, rows[other_split].tokens) == ("train", 1024)
        assert abs(rows[other_split].measured_flop_reduction - 0.3) < 0.05

    artifact.write_bytes(artifact.read_bytes()[:-10])  # truncated on disk
    broken = queue.submit("evaluate", {"run_id": run_id, "eval_tokens": 512, "seq_len": 128}, url=db_url)
    Worker(url=db_url).run(exit_when_idle=True)
    view = next(j for j in queue.list_jobs(url=db_url) if j.id == broken)
    assert view.status == "failed" and "is corrupt" in view.error


def test_latency_results_are_stored_once_and_a_cpu_worker_leaves_latency_jobs_queued(db_url):
    from db.models import LatencyResult
    from jobs.results import store_latency

    rows = [{"model": "llama2-7b-shape", "device_name": "NVIDIA H100", "dtype": "float16", "engine": "graphs",
             "flop_reduction": budget, "measured_flop_reduction": budget, "context_tokens": context,
             "new_tokens": 492, "ms_per_token": 10.0 * (1 - budget / 2), "dense_ms_per_token": 10.0,
             "shapes": {"hidden": 4096}} for budget in (0.0, 0.44) for context in (1, 128)]
    job_id = queue.submit("latency", {"flop_reductions": [0.0, 0.44], "contexts": [1, 128]}, url=db_url)
    with session_scope(db_url) as s:
        assert store_latency(s, rows, job_id=job_id) == 4
    with session_scope(db_url) as s:
        assert store_latency(s, rows, job_id=job_id) == 0  # a job's rows are written once
        assert s.execute(select(func.count()).select_from(LatencyResult)).scalar() == 4

    Worker(url=db_url, device="cpu").run(exit_when_idle=True)  # never claims it: it needs a GPU
    view = next(j for j in queue.list_jobs(url=db_url) if j.id == job_id)
    assert (view.status, view.message, view.attempts) == ("queued", "queued; waiting for a GPU worker", 0)


@pytest.mark.parametrize("heartbeat_on", [True, False])
def test_the_heartbeat_keeps_a_long_quiet_job_from_the_reaper(db_url, monkeypatch, heartbeat_on):
    """A job that reports no progress for 5 s, while another worker with --stale-after 2 reaps all along: its
    worker's heartbeat thread (every 0.2 s here) keeps it alive to the end. The control, the heartbeat thread off,
    shows that the job was quiet long enough to be reaped: there the same job goes back to the queue."""
    import threading
    import time

    from jobs import worker as worker_module

    monkeypatch.setattr(worker_module, "HEARTBEAT_SECONDS", 0.2)
    if not heartbeat_on:
        monkeypatch.setattr(Worker, "_heartbeat", lambda self, job_id, stop: stop.wait())

    def quiet_compress(self, job, progress):
        time.sleep(5.0)  # long, and not a word of progress: only the heartbeat says that the worker lives
        return lambda session: None

    monkeypatch.setattr(Worker, "run_compress", quiet_compress)  # the compress kind's handler (jobs.kinds)
    job_id = queue.submit("compress", PAYLOAD, url=db_url)
    busy = Worker(url=db_url)
    thread = threading.Thread(target=busy.run, kwargs={"exit_when_idle": True, "max_jobs": 1})
    thread.start()
    reaper = Worker(url=db_url, stale_seconds=2)  # what `rana worker --stale-after 2` builds
    while thread.is_alive():
        reaper.reap_if_due()  # every HEARTBEAT_SECONDS, as between a worker's jobs
        time.sleep(0.05)
    thread.join()
    (job,) = queue.list_jobs(url=db_url)
    assert job.id == job_id and job.attempts == 1
    if heartbeat_on:
        assert (job.status, job.message) == ("done", "done")
        assert (job.heartbeat_at - job.started_at).total_seconds() >= 4  # the beats went on through the quiet
    else:
        assert job.status == "queued" and "stopped heartbeating" in job.message


def test_a_job_that_fails_after_saving_its_adapters_leaves_no_file_behind(db_url, tmp_path, monkeypatch):
    """The artifact is written before the adapted evaluation: a failure after it (here a planted one) must not
    leave a file that no run refers to."""
    import rana_core.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("planted failure after the adapters were saved")

    monkeypatch.setattr(rana_core.pipeline, "set_tracking", boom)  # called right after save_adapters
    job_id = queue.submit("compress", PAYLOAD, url=db_url)
    Worker(url=db_url).run(exit_when_idle=True)
    (job,) = queue.list_jobs(url=db_url)
    assert (job.id, job.status) == (job_id, "failed") and "planted failure" in job.error
    assert counts(db_url) == (0, 0, 0)
    assert list((tmp_path / "artifacts").glob("*")) == []


def test_a_gpu_memory_cap_needs_a_gpu():
    with pytest.raises(RanaError, match="--max-gpu-memory needs a CUDA device; this worker runs on cpu"):
        Worker(device="cpu", max_gpu_memory=1.0)


def test_a_sweep_with_latency_queues_each_points_decode_speed_for_a_gpu_worker(db_url):
    """`rana sweep --latency`: once a point's run is stored, a measurement of it is queued (with the sweep's
    author and tags); a CPU worker leaves those for a GPU worker."""
    from db.models import Run

    sweep = queue.submit("sweep", {"base": {"model": "tiny", "calib_tokens": 512, "eval_tokens": 256,
                                            "seq_len": 128},
                                   "methods": ["svd"], "budgets": [0.2, 0.3], "latency": {"contexts": [1, 64]}},
                         author="ada", tags=["speed"], url=db_url)
    Worker(url=db_url, device="cpu").run(exit_when_idle=True)
    jobs = queue.list_jobs(url=db_url)
    assert next(j for j in jobs if j.id == sweep).status == "done"
    with session_scope(db_url) as s:
        runs = sorted(s.execute(select(Run.id)).scalars())
    measurements = [j for j in jobs if j.kind == "run_latency"]
    assert sorted(j.payload["run_id"] for j in measurements) == runs and len(runs) == 2
    for job in measurements:
        assert (job.status, job.author, job.tags, job.payload["contexts"]) == ("queued", "ada", ("speed",), [1, 64])
