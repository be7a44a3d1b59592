"""The `rana` command as a user runs it: real subprocesses, a temporary database, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

SMALL = ["--model", "tiny", "--calib-tokens", "1024", "--eval-tokens", "512", "--seq-len", "128"]


def rana(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "rana_cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_every_command():
    listed = rana("--help").stdout
    for command in ("compress", "submit", "sweep", "evaluate", "latency", "recover", "cancel", "retry", "worker",
                    "jobs", "methods", "app", "up", "db"):
        assert f"\n    {command} " in listed, command


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "RANA_DATA_DIR": str(tmp_path), "RANA_DB_URL": f"sqlite:///{tmp_path / 'cli.db'}"}


def test_compress_writes_json_and_a_table(tmp_path, env):
    out = tmp_path / "out.json"
    proc = rana("compress", *SMALL, "--method", "svd", "--flop-reduction", "0.3", "--json", str(out), env=env)
    assert "FLOP reduction measured (QKV+MLP)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["method"] == "svd"
    assert abs(result["measured_flop_reduction"] - 0.3) <= 0.015
    assert result["eval_tokens"] == 512 and result["calib_tokens"] == 1024
    assert len(result["layers"]) == 8
    assert not (tmp_path / "cli.db").exists()  # compress runs in-process, without the database
    # stderr is a pipe here, as in a log: progress as plain lines (no bar's carriage returns), the last at 100%
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert "\r" not in proc.stderr and len(lines) >= 3, proc.stderr
    assert lines[-1].startswith("[100%]") and all("elapsed" in line for line in lines)


@pytest.mark.parametrize("args, message", [
    (["--flop-reduction", "0.95"], "FLOP reduction must be in [0, 0.95)"),
    (["--flop-reduction", "-0.2"], "FLOP reduction must be in [0, 0.95)"),
    (["--model", "gpt-17"], "unknown model"),
    (["--model", "./missing/folder"], "model folder not found"),
    (["--eval-tokens", "0"], "eval tokens must be a positive integer"),
])
@pytest.mark.parametrize("command", ["compress", "submit"])
def test_bad_input_is_one_line_and_stores_nothing(command, args, message, env, tmp_path):
    rana("db", "upgrade", env=env)
    proc = rana(command, *SMALL, *args, env=env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rana: error:") and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert json.loads(rana("jobs", "--json", env=env).stdout) == []


def test_submit_worker_jobs_round_trip(env):
    rana("db", "upgrade", env=env)
    job_id = json.loads(rana("submit", *SMALL, "--flop-reduction", "0.25", "--json", env=env).stdout)["job_id"]
    listed = json.loads(rana("jobs", "--json", env=env).stdout)
    assert [(j["id"], j["status"], j["run_id"]) for j in listed] == [(job_id, "queued", None)]
    rana("worker", "--exit-when-idle", env=env)
    (job,) = json.loads(rana("jobs", "--json", env=env).stdout)
    assert job["status"] == "done" and job["progress"] == 1.0 and job["run_id"] is not None
    assert job["payload"]["flop_reduction"] == 0.25


def test_evaluate_re_measures_a_stored_run(env):
    """`rana evaluate RUN_ID` end to end: a worker stores a run, the command enqueues its evaluation, a worker runs
    it, and the new evaluation row holds the run's own perplexity again (the same held-out tokens, the model rebuilt
    from the run's stored adapters)."""
    from sqlalchemy import select

    from db.models import Evaluation
    from db.session import get_engine, session_scope

    rana("db", "upgrade", env=env)
    rana("submit", *SMALL, "--method", "svd", "--flop-reduction", "0.3", env=env)
    rana("worker", "--exit-when-idle", env=env)
    (compressed,) = json.loads(rana("jobs", "--json", env=env).stdout)
    run_id = compressed["run_id"]
    assert compressed["status"] == "done" and run_id is not None
    out = rana("evaluate", str(run_id), "--eval-tokens", "512", "--seq-len", "128", "--json", env=env).stdout
    job_id = json.loads(out)["job_id"]
    listed = json.loads(rana("jobs", "--json", env=env).stdout)
    assert [(j["id"], j["kind"], j["status"]) for j in listed][0] == (job_id, "evaluate", "queued")
    rana("worker", "--exit-when-idle", env=env)
    evaluated = next(j for j in json.loads(rana("jobs", "--json", env=env).stdout) if j["id"] == job_id)
    assert evaluated["status"] == "done" and evaluated["progress"] == 1.0
    url = env["RANA_DB_URL"]
    try:
        with session_scope(url) as session:
            query = select(Evaluation).where(Evaluation.run_id == run_id)
            rows = {e.job_id: e for e in session.execute(query).scalars()}
            assert set(rows) == {None, job_id}  # the compression's own evaluation, and the new one
            new, first = rows[job_id], rows[None]
            assert (new.split, new.tokens, new.seq_len) == ("heldout", 512, 128)
            assert new.perplexity == pytest.approx(first.perplexity, rel=1e-6)
    finally:
        get_engine(url).dispose()


def test_a_decode_speed_job_waits_for_a_gpu_worker_and_can_be_cancelled(env):
    """`rana latency RUN_ID` queues a job that only a GPU worker claims: a CPU worker draining the queue leaves it
    queued, saying what it waits for, and it can be cancelled."""
    rana("db", "upgrade", env=env)
    rana("submit", *SMALL, "--method", "svd", "--flop-reduction", "0.3", env=env)
    rana("worker", "--exit-when-idle", env=env)
    (compressed,) = json.loads(rana("jobs", "--json", env=env).stdout)
    bad = rana("latency", str(compressed["run_id"]), "--batches", "4,eight", env=env, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "rana: error: --batches must be integers separated by commas, got '4,eight'"]
    job_id = json.loads(rana("latency", str(compressed["run_id"]), "--contexts", "1,128", "--batches", "8,4",
                             "--json", env=env).stdout)["job_id"]
    rana("worker", "--exit-when-idle", env={**env, "RANA_DEVICE": "cpu"})
    waiting = next(j for j in json.loads(rana("jobs", "--json", env=env).stdout) if j["id"] == job_id)
    assert (waiting["kind"], waiting["status"], waiting["message"]) == (
        "run_latency", "queued", "queued; waiting for a GPU worker")
    assert waiting["payload"] == {"run_id": compressed["run_id"], "contexts": [1, 128], "new_tokens": 256,
                                  "dtype": "bfloat16", "batches": [4, 8]}
    rana("cancel", str(job_id), env=env)
    assert next(j for j in json.loads(rana("jobs", "--json", env=env).stdout) if j["id"] == job_id)["status"] == \
        "cancelled"


def test_commands_refuse_a_database_without_schema(env):
    proc = rana("jobs", env=env, check=False)
    assert proc.returncode == 2 and "rana db upgrade" in proc.stderr


def test_sweep_cancel_retry_from_the_command_line(env):
    rana("db", "upgrade", env=env)
    out = rana("sweep", *SMALL, "--methods", "rana-greedy,cats", "--budgets", "0.3,0.2", "--author", "ada",
               "--tags", "cli", "--json", env=env).stdout
    sweep_id = json.loads(out)["job_id"]
    listed = json.loads(rana("jobs", "--json", env=env).stdout)
    points = [j for j in listed if j["parent_id"] == sweep_id]
    assert len(points) == 4 and all(j["author"] == "ada" and j["tags"] == ["cli"] for j in points)
    assert rana("cancel", str(sweep_id), env=env).stdout.strip() == f"job {sweep_id}: 4 job(s) cancelled"
    assert rana("retry", str(points[0]["id"]), env=env).stdout.strip() == f"job {points[0]['id']}: 1 job(s) queued again"
    table = rana("jobs", env=env).stdout
    assert f"(sweep {sweep_id})" in table and "cancelled" in table and "queued" in table
    assert "tiny / rana-greedy,cats / 2 budgets" in table and f"tiny / rana-greedy / 0.3 (sweep {sweep_id})" in table


@pytest.mark.parametrize("args, message", [
    (["sweep", *SMALL, "--methods", "rana-best", "--budgets", "0.3"], "has no allocation 'best'"),
    (["sweep", *SMALL, "--methods", "svd", "--budgets", "0.3,x"], "a budget must be a number"),
    (["cancel", "999"], "no job 999"),
    (["retry", "999"], "no job 999"),
    (["evaluate", "7"], "no run 7"),
    (["latency", "7"], "no run 7"),
    (["latency", "7", "--contexts", "1,x"], "--contexts must be integers separated by commas"),
    (["latency", "7", "--dtype", "float64"], "latency dtype must be one of float16, bfloat16"),
    (["latency", "7", "--new-tokens", "0"], "new_tokens must be an integer in [1, 4096]"),
])
def test_queue_commands_explain_bad_input_in_one_line(args, message, env):
    rana("db", "upgrade", env=env)
    proc = rana(*args, env=env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def one_line_refusal(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", "CUDA", "cuda:"])
@pytest.mark.parametrize("command", [["submit", *SMALL], ["sweep", *SMALL, "--methods", "svd", "--budgets", "0.3"]])
def test_a_malformed_device_is_refused_at_submit(command, device, env):
    """The submit path checks the form of RANA_DEVICE (it stays torch-free, and the job runs on another machine)."""
    rana("db", "upgrade", env=env)
    line = one_line_refusal(rana(*command, env={**env, "RANA_DEVICE": device}, check=False))
    assert line == f"rana: error: RANA_DEVICE={device}: unknown device {device!r}: use cpu, cuda, cuda:N or mps"
    assert json.loads(rana("jobs", "--json", env=env).stdout) == []


def test_a_well_formed_device_is_queued_even_if_this_machine_lacks_it(env):
    """`cuda:7` on a CPU-only laptop is a fine job for a GPU host: submit checks the form, not this machine."""
    rana("db", "upgrade", env=env)
    rana("submit", *SMALL, env={**env, "RANA_DEVICE": "cuda:7"})
    (job,) = json.loads(rana("jobs", "--json", env=env).stdout)
    assert (job["status"], job["payload"]["device"]) == ("queued", "cuda:7")


def missing_cuda_devices() -> list[str]:
    """Devices this machine does not have, by torch's own count: one index past its last GPU, and plain `cuda` on a
    machine without any."""
    import torch

    count = torch.cuda.device_count()
    missing = [pytest.param(f"cuda:{count}", f"this machine has no CUDA device {count} (it has {count})",
                            id=f"cuda:{count}")]
    if count == 0:
        missing.append(pytest.param("cuda", "this machine has no CUDA device (it has 0)", id="cuda"))
    return missing


@pytest.mark.parametrize("device, reason", missing_cuda_devices())
def test_a_device_this_machine_lacks_stops_the_worker_at_start_and_keeps_the_queue(device, reason, env):
    rana("db", "upgrade", env=env)
    job_id = json.loads(rana("submit", *SMALL, "--json", env=env).stdout)["job_id"]
    proc = rana("worker", "--exit-when-idle", env={**env, "RANA_DEVICE": device}, check=False)
    assert one_line_refusal(proc) == f"rana: error: RANA_DEVICE={device}: {reason}"
    (job,) = json.loads(rana("jobs", "--json", env=env).stdout)
    assert (job["id"], job["status"], job["attempts"]) == (job_id, "queued", 0)


@pytest.mark.parametrize("device, reason", missing_cuda_devices())
def test_a_device_this_machine_lacks_is_refused_by_compress(device, reason, env, tmp_path):
    out = tmp_path / "out.json"
    proc = rana("compress", *SMALL, "--json", str(out), env={**env, "RANA_DEVICE": device}, check=False)
    assert one_line_refusal(proc) == f"rana: error: RANA_DEVICE={device}: {reason}"
    assert not out.exists()


@pytest.mark.parametrize("command, action", [(["jobs"], "open"), (["db", "current"], "open"),
                                             (["db", "upgrade"], "upgrade"), (["submit", *SMALL], "open"),
                                             (["worker", "--exit-when-idle"], "open")],
                         ids=["jobs", "db-current", "db-upgrade", "submit", "worker"])
def test_a_database_that_cannot_be_opened_is_one_line(command, action, env, tmp_path):
    """A folder where the SQLite file should be: the driver's reason, without SQLAlchemy's second line
    "(Background on this error at: …)"."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    proc = rana(*command, env={**env, "RANA_DB_URL": f"sqlite:///{folder}"}, check=False)
    assert one_line_refusal(proc) == (f"rana: error: cannot {action} the database sqlite:///{folder}: "
                                      "(sqlite3.OperationalError) unable to open database file")


def test_an_unreachable_server_is_one_line_without_its_password(env):
    url = "postgresql+psycopg://ada:s3cret@127.0.0.1:1/rana"  # port 1: nothing listens, refused at once
    line = one_line_refusal(rana("jobs", env={**env, "RANA_DB_URL": url}, check=False))
    assert line.startswith("rana: error: cannot open the database postgresql+psycopg://ada:***@127.0.0.1:1/rana: ")
    assert "Connection refused" in line and "s3cret" not in line


def test_a_worker_device_flag_this_machine_lacks_is_one_line(env):
    import torch

    count = torch.cuda.device_count()
    rana("db", "upgrade", env=env)
    proc = rana("worker", "--exit-when-idle", "--device", f"cuda:{count}", env=env, check=False)
    assert one_line_refusal(proc) == (f"rana: error: --device cuda:{count}: this machine has no CUDA device {count} "
                                      f"(it has {count})")


def test_a_gpu_memory_cap_on_a_cpu_worker_is_one_line(env):
    rana("db", "upgrade", env=env)
    proc = rana("worker", "--exit-when-idle", "--max-gpu-memory", "4", env={**env, "RANA_DEVICE": "cpu"},
                check=False)
    assert one_line_refusal(proc) == "rana: error: --max-gpu-memory needs a CUDA device; this worker runs on cpu"


def test_up_with_more_gpus_than_the_machine_has_starts_nothing(env, tmp_path):
    import torch

    count = torch.cuda.device_count()
    proc = rana("up", "--gpus", str(count + 1), "--port", "1", env=env, check=False)
    assert one_line_refusal(proc) == (f"rana: error: --gpus {count + 1}: this machine has no CUDA device {count} "
                                      f"(it has {count})")
    assert not (tmp_path / "cli.db").exists()  # refused before the database was even created


def test_up_starts_one_worker_per_gpu_each_on_its_own_device():
    from rana_cli.serve import worker_commands

    commands = worker_commands(gpus=2, max_gpu_memory=8.0)
    assert [c[c.index("--device") + 1] for c in commands] == ["cuda:0", "cuda:1"]
    assert all(c[c.index("--max-gpu-memory") + 1] == "8.0" for c in commands)
    assert all("--device" not in c for c in worker_commands())  # no --gpus: one worker on RANA_DEVICE


def test_workers_of_one_host_share_its_cpu_cores(monkeypatch):
    """Much of a job's math runs on the CPU: N workers that each took every core slowed a two-GPU drain ninefold."""
    from rana_cli.serve import worker_environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert worker_environment(2)["OMP_NUM_THREADS"] == "16"
    assert worker_environment(64)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in worker_environment(1)  # one worker keeps PyTorch's own choice
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_environment(2)["OMP_NUM_THREADS"] == "3"  # the user's setting wins


def test_evaluate_reports_accuracy_on_tasks_beside_perplexity(env, tmp_path):
    """`rana evaluate RUN_ID --tasks cloze,FILE`: the worker stores accuracy on each task for the adapted model and
    for the dense one, in lm-eval's JSON shape; they are what scoring the run's stored adapters (and the model
    without them) gives in this process. A bad task file is refused at submit, nothing queued."""
    from sqlalchemy import select

    from db.models import Evaluation, Run
    from db.session import get_engine, session_scope
    from rana_core.adapters.artifacts import load_adapters
    from rana_core.adapters.base import inject, unload
    from rana_core.loading import load_model
    from rana_core.tasks import lm_eval_results, run_tasks

    task = tmp_path / "toy.jsonl"
    task.write_text("\n".join(json.dumps({"context": f"The number {i} is", "choices": ["even", "odd"],
                                          "gold": i % 2}) for i in range(6)))
    rana("db", "upgrade", env=env)
    rana("submit", *SMALL, "--method", "svd", "--flop-reduction", "0.3", env=env)
    rana("worker", "--exit-when-idle", env=env)
    (compressed,) = json.loads(rana("jobs", "--json", env=env).stdout)
    run_id = compressed["run_id"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a", "b"]}')
    line = one_line_refusal(rana("evaluate", str(run_id), "--tasks", f"cloze,{bad}", env=env, check=False))
    assert f"task file {bad} line 1: missing 'gold'" in line
    rana("evaluate", str(run_id), "--eval-tokens", "512", "--seq-len", "128", "--tasks", f"cloze,{task}", env=env)
    rana("worker", "--exit-when-idle", env=env)
    url = env["RANA_DB_URL"]
    try:
        with session_scope(url) as session:
            (evaluation,) = session.execute(select(Evaluation).where(Evaluation.job_id.is_not(None))).scalars()
            stored, run = evaluation.tasks, session.get(Run, run_id)
            artifact, digest = run.artifact_path, run.artifact_sha256
    finally:
        get_engine(url).dispose()
    assert set(stored) == {"adapted", "dense"}
    for which in ("adapted", "dense"):
        assert set(stored[which]["results"]) == {"cloze", "toy"}
        assert stored[which]["n-samples"] == {"cloze": {"original": 1000, "effective": 1000},
                                              "toy": {"original": 6, "effective": 6}}
    loaded = load_model("tiny")
    tasks = ["cloze", str(task)]
    assert stored["dense"]["results"] == lm_eval_results(run_tasks(loaded.model, loaded.tokenizer, tasks))["results"]
    inject(loaded.layers, load_adapters(loaded, tmp_path / artifact, digest))
    try:
        adapted = lm_eval_results(run_tasks(loaded.model, loaded.tokenizer, tasks))["results"]
    finally:
        unload(loaded.layers)
    assert stored["adapted"]["results"] == adapted


def test_compress_reports_accuracy_on_tasks_and_a_bad_task_is_one_line(env, tmp_path):
    out = tmp_path / "out.json"
    rana("compress", *SMALL, "--method", "svd", "--flop-reduction", "0.3", "--tasks", "cloze", "--json", str(out),
         env=env)
    result = json.loads(out.read_text())
    for which in ("adapted", "dense"):
        cloze = result["tasks"][which]["results"]["cloze"]
        assert 0.0 <= cloze["acc,none"] <= 1.0 and cloze["acc_stderr,none"] >= 0.0
        assert result["tasks"][which]["n-samples"]["cloze"]["effective"] == 1000
    line = one_line_refusal(rana("compress", *SMALL, "--tasks", "cloze,./missing.jsonl", env=env, check=False))
    assert line.endswith("task file missing.jsonl not found")
