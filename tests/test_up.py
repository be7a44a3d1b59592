"""`rana up` (what `make run` starts): the dashboard answers, the worker runs a job, Ctrl-C stops both."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_up_serves_the_app_runs_jobs_and_stops_on_ctrl_c(tmp_path):
    env = {**os.environ, "RANA_DATA_DIR": str(tmp_path), "RANA_DB_URL": f"sqlite:///{tmp_path / 'up.db'}"}
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "rana_cli.main", "up", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: healthy(port), 90, "the dashboard")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert "<title>Streamlit</title>" in response.read().decode() or response.status == 200
        rana = [sys.executable, "-m", "rana_cli.main"]
        submitted = subprocess.run(rana + ["submit", "--model", "tiny", "--calib-tokens", "512", "--eval-tokens",
                                           "256", "--seq-len", "128", "--json"], env=env, capture_output=True,
                                   text=True, check=True)
        job_id = json.loads(submitted.stdout)["job_id"]

        def done():
            jobs = json.loads(subprocess.run(rana + ["jobs", "--json"], env=env, capture_output=True, text=True,
                                             check=True).stdout)
            return any(j["id"] == job_id and j["status"] == "done" for j in jobs)

        wait_for(done, 120, "the worker to finish the job")
    finally:
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "Traceback" not in output
    assert not healthy(port)
