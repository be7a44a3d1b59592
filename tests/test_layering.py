"""Dependencies flow one way: app → jobs → db, jobs → rana_core; the app and the queue never load torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "rana_core": {"db", "jobs", "app", "streamlit", "sqlalchemy", "alembic"},
    "db": {"jobs", "app", "rana_core", "torch", "streamlit"},
    "jobs": {"app", "streamlit"},
    "app": {"rana_core", "torch"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_goes_against_the_flow(package):
    offenders = {str(p.relative_to(ROOT)): imported_roots(p) & FORBIDDEN[package]
                 for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_app_and_the_queue_import_no_torch():
    code = ("import sys, app.data, app.charts, jobs.queue, jobs.specs, jobs.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
