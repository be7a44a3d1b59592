"""A GPU worker that runs out of memory (run on the device machine: pytest -m gpu): the job fails with one line that
names where it was and what it asked for, nothing of it is stored, and the same worker runs the next job."""

import pytest
import torch

from jobs import queue
from jobs.worker import Worker
from rana_core.config import CompressConfig
from rana_core.pipeline import compress

pytestmark = pytest.mark.gpu

GIB = 1 << 30
# Windows of 2,048 tokens, four at a time, against windows of 128: the long job's logits and activations are 16
# times the short one's, so a cap between their peaks lets one through and stops the other.
LONG = {"model": "tiny", "method": "svd", "flop_reduction": 0.3, "calib_tokens": 8192, "eval_tokens": 8192,
        "seq_len": 2048, "device": "cuda"}
SHORT = {**LONG, "calib_tokens": 1024, "eval_tokens": 512, "seq_len": 128}


def peak_reserved(payload: dict) -> int:
    """Bytes the caching allocator held at most while compressing `payload` with no cap."""
    torch.cuda.init()  # the allocator's statistics exist only once CUDA is initialised
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(0)
    compress(CompressConfig(**payload))
    return torch.cuda.max_memory_reserved(0)


@pytest.fixture
def uncapped_afterwards():
    yield
    torch.cuda.set_per_process_memory_fraction(1.0, 0)  # later tests in this process get the whole GPU again


def test_out_of_memory_fails_the_job_in_one_line_and_the_worker_takes_the_next(db_url, tmp_path,
                                                                              uncapped_afterwards):
    short_peak, long_peak = peak_reserved(SHORT), peak_reserved(LONG)
    assert long_peak > 4 * short_peak, (short_peak, long_peak)  # the cap below separates them
    cap = 2 * short_peak / GIB
    long_job = queue.submit("compress", LONG, priority=1, url=db_url)  # claimed first
    short_job = queue.submit("compress", SHORT, url=db_url)
    worker = Worker(url=db_url, device="cuda:0", max_gpu_memory=cap)
    assert worker.run(exit_when_idle=True) == 2
    jobs = {job.id: job for job in queue.list_jobs(url=db_url)}
    failed = jobs[long_job]
    assert failed.status == "failed" and failed.run_id is None
    assert failed.error.startswith("CUDA out of memory on cuda:0 in 'dense eval: ") and "\n" not in failed.error
    assert "asked for " in failed.error and f"(this worker's cap: {cap:g} GiB)" in failed.error
    assert jobs[short_job].status == "done" and jobs[short_job].run_id is not None
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [f"job-{short_job}-attempt-1.safetensors"]
