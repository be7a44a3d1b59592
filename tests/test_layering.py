"""Dependencies flow one way: the `rana` command (rana_cli) on top; app → jobs → db, jobs → rana_core; bench
beside the app, over jobs, db and rana_core. The app and the queue never load torch, and nothing below rana_cli
starts the dashboard: an import rule cannot see a launch by name at run time, so the sources are read for one."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "rana_cli": set(),  # the top: it may use every package (the app's only to locate its entry point)
    "app": {"rana_core", "bench", "rana_cli", "torch"},
    "bench": {"app", "rana_cli"},  # bench/app_pages.py renders pages with Streamlit's AppTest (no server)
    "jobs": {"app", "bench", "rana_cli", "streamlit"},
    "rana_core": {"db", "jobs", "app", "bench", "rana_cli", "streamlit", "sqlalchemy", "alembic"},
    "db": {"jobs", "app", "rana_core", "bench", "rana_cli", "torch", "streamlit"},
}
BELOW_THE_CLI = sorted(set(FORBIDDEN) - {"rana_cli"})


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
    code = ("import sys, app.data, app.charts, jobs.queue, jobs.specs, jobs.kinds, rana_cli.main; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_rana_script_is_the_top_package():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rana"] == "rana_cli.main:main"


def _string(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def launches_of_the_app(source: str) -> list[str]:
    """Where `source` could start the dashboard at run time:
    - "streamlit" as a word of a command: an element of a list or tuple, or an argument of a call
      ([python, "-m", "streamlit", "run", …], "streamlit run …");
    - the app package looked up or imported by name (find_spec("app"), import_module("app.main"), __import__);
    - a path to an entry script named main.py ("main.py", "app/main.py");
    - Streamlit's own launcher imported (streamlit.web)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.List, ast.Tuple, ast.Call)):
            parts = [*node.args, *(k.value for k in node.keywords)] if isinstance(node, ast.Call) else node.elts
            for part in parts:
                if "streamlit" in (_string(part) or "").split():
                    found.append(f"line {part.lineno}: {part.value!r} in a command")
        if isinstance(node, ast.Call) and node.args:
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            target = _string(node.args[0]) or ""
            if called in ("find_spec", "import_module", "__import__") and target.split(".")[0] == "app":
                found.append(f"line {node.lineno}: {called}({target!r})")
        if re.fullmatch(r"[\w./-]*main\.py", _string(node) or ""):
            found.append(f"line {node.lineno}: the path {node.value!r}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"line {node.lineno}: imports {n}" for n in names if n.startswith("streamlit.web")]
    return found


@pytest.mark.parametrize("package", BELOW_THE_CLI)
def test_nothing_below_the_cli_starts_the_dashboard(package):
    offenders = {str(p.relative_to(ROOT)): launches_of_the_app(p.read_text()) for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_launch_rule_sees_the_ways_to_start_the_dashboard():
    """The rule against a launcher like the one jobs/cli.py had, and against the one rana_cli has now."""
    launcher = '''
entry = Path(importlib.util.find_spec("app").origin).with_name("main.py")
command = [sys.executable, "-m", "streamlit", "run", str(entry)]
os.system("streamlit run app/main.py")
from streamlit.web import bootstrap
'''
    found = launches_of_the_app(launcher)
    assert [line.split(":")[0] for line in found].count("line 2") == 2  # find_spec("app") and "main.py"
    assert "line 3: 'streamlit' in a command" in found and "line 4: 'streamlit run app/main.py' in a command" in found
    assert "line 5: imports streamlit.web" in found
    assert launches_of_the_app('"""Run with `rana app`: streamlit serves app/main.py."""\nst.title("Jobs")') == []
    assert launches_of_the_app((ROOT / "rana_cli" / "serve.py").read_text())  # where the launch lives now
