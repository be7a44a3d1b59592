"""``rana app`` and ``rana up``: start the dashboard (and, for ``up``, its workers beside it: one, or one per GPU).

The only place that launches the Streamlit app: it lives here, above every package, so the flow stays one way
(app → jobs → db, jobs → rana_core) at run time as well as at import time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import app


def app_command(port: int, address: str) -> list[str]:
    entry = Path(app.__file__).with_name("main.py")  # the package is imported only to find its entry point
    return [sys.executable, "-m", "streamlit", "run", str(entry), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal",  # no Deploy button, no developer menu
            "--client.showErrorDetails", "type" if _team_mode() else "full"]  # a team's users see no traceback


def _team_mode() -> bool:
    from jobs.accounts import auth_mode

    return auth_mode() == "team"


def worker_environment(workers: int) -> dict[str, str]:
    """The environment of one of `workers` workers on this host: a share of the CPU cores each. Much of a job's
    math runs on the CPU, and every PyTorch process takes all cores by default: two such workers on a 32-core
    host drained a tiny 8-point sweep 9x slower than one (bench/results/gpus-sweep-tiny-2gpu-all-cores-each.json)."""
    env = dict(os.environ)
    if workers > 1 and "OMP_NUM_THREADS" not in env:  # a user's own setting wins
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def worker_commands(gpus: int = 0, max_gpu_memory: float | None = None) -> list[list[str]]:
    """One worker on RANA_DEVICE, or with `gpus`, one per GPU (each records its own device on the jobs it runs)."""
    base = [sys.executable, "-m", "rana_cli.main", "worker"]
    cap = ["--max-gpu-memory", str(max_gpu_memory)] if max_gpu_memory else []
    if gpus <= 0:
        return [base + cap]
    return [base + ["--device", f"cuda:{index}"] + cap for index in range(gpus)]


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_serving(address: str, allow_remote: bool) -> None:
    """Team mode needs its session secret; solo mode (no sign-in) stays on this machine unless told otherwise."""
    from jobs.accounts import auth_mode, session_secret
    from rana_core.errors import RanaError

    if auth_mode() == "team":
        session_secret()
    elif address not in LOOPBACK and not allow_remote:
        raise RanaError(f"solo mode has no sign-in: serving on {address} lets anyone who reaches it queue and cancel "
                        "jobs; set RANA_AUTH=team (with RANA_SESSION_SECRET and `rana user add`), or pass "
                        "--allow-remote")


def cmd_app(args) -> int:
    from db.migrate import check_schema

    check_serving(args.address, args.allow_remote)
    check_schema()
    command = app_command(args.port, args.address)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become Streamlit rather than wait on it: a signal sent to `rana app` (Ctrl-C, SIGTERM from a supervisor or
    # a test) then reaches the server itself, and no orphaned server is left behind.
    os.execv(command[0], command)


def cmd_up(args) -> int:
    from db.migrate import upgrade
    from rana_core.devices import check_device_present
    from rana_core.errors import RanaError

    check_serving(args.address, args.allow_remote)
    if args.gpus < 0:
        raise RanaError(f"--gpus must be 0 (one worker on RANA_DEVICE) or more, got {args.gpus}")
    if args.gpus:  # every GPU must exist before anything starts
        try:
            check_device_present(f"cuda:{args.gpus - 1}")
        except RanaError as exc:
            raise RanaError(f"--gpus {args.gpus}: {exc}") from None
    upgrade()
    commands = worker_commands(args.gpus, args.max_gpu_memory)
    workers = [subprocess.Popen(command, env=worker_environment(len(commands))) for command in commands]
    app_server = subprocess.Popen(app_command(args.port, args.address))
    count = f"{len(workers)} workers, one per GPU" if args.gpus else "one worker"
    print(f"RaNA Studio on http://{args.address}:{args.port} ({count}); Ctrl-C stops them all", file=sys.stderr)
    children = [*workers, app_server]
    try:
        while all(child.poll() is None for child in children):
            try:
                app_server.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0
