"""A throwaway PostgreSQL server on loopback for the tests, from the Debian package that `make test` installs.

RANA_TEST_POSTGRES_URL points the tests at a server of your own instead (a URL to a database the tests may
create databases from). Otherwise initdb makes a cluster in a temporary folder, owned by the `postgres` user
when the tests run as root (PostgreSQL refuses to run as root), listening on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

_counter = itertools.count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class LocalPostgres:
    def __init__(self):
        bindir = _bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: `make test` installs the Debian package postgresql")
        self.folder = Path(tempfile.mkdtemp(prefix="rana-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        self.pg_ctl = str(bindir / "pg_ctl")
        user = "postgres" if self.as_user else os.environ.get("USER", "postgres")
        self._run([str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8"])
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -F -c max_connections=200"
        self._run([self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start"])
        self.admin_url = f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/postgres"

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(self.as_user + command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")

    def stop(self) -> None:
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def fresh_database(admin_url: str) -> str:
    """Create an empty database on the server and return its URL."""
    import psycopg

    name = f"rana_test_{os.getpid()}_{next(_counter)}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
