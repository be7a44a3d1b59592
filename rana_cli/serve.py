"""``rana app`` and ``rana up``: start the dashboard (and, for ``up``, one worker beside it).

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
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def worker_command() -> list[str]:
    return [sys.executable, "-m", "rana_cli.main", "worker"]


def cmd_app(args) -> int:
    from db.migrate import check_schema

    check_schema()
    command = app_command(args.port, args.address)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become Streamlit rather than wait on it: a signal sent to `rana app` (Ctrl-C, SIGTERM from a supervisor or
    # a test) then reaches the server itself, and no orphaned server is left behind.
    os.execv(command[0], command)


def cmd_up(args) -> int:
    from db.migrate import upgrade

    upgrade()
    worker = subprocess.Popen(worker_command())
    app_server = subprocess.Popen(app_command(args.port, args.address))
    print(f"RaNA Studio on http://{args.address}:{args.port} (one worker); Ctrl-C stops both", file=sys.stderr)
    children = [worker, app_server]
    try:
        while all(child.poll() is None for child in children):
            try:
                children[1].wait(timeout=1.0)
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
