"""README.md and docs/*.md point only at things that exist.

Three kinds of reference are checked:
- Markdown links and images, ``[text](target)``: resolved from the file's own folder; a ``#anchor`` must be a
  heading of the target file (GitHub's anchor rule). Web addresses are not checked.
- Repository paths written in the text, in code or in prose (``bench/results/quality-smollm2-135m.json``): any
  word that starts with a top-level folder of the repository, resolved from the repository root. ``{a,b}`` is
  expanded and ``*`` globbed (at least one file must match); a ``<placeholder>`` ends the path.
- The README's code map: a bare module name (``flops.py``) in a folder's row is a file of that folder.
Paths not rooted at a top-level folder (``$RANA_DATA_DIR/…``, ``.venv/…``) are not checked.
"""

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FOLDERS = ("app", "bench", "db", "docs", "jobs", "rana_cli", "rana_core", "scripts", "tests")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(rf"(?<![\w./$~-])((?:{'|'.join(FOLDERS)})/[^\s`'\"()\[\]<>;|]*)")


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def expand(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for part in match.group(1).split(",")
            for p in expand(path[:match.start()] + part + path[match.end():])]


def dangling(doc: Path, text: str | None = None) -> list[str]:
    """The references in `doc` (or in `text`, read as if it were `doc`) that point at nothing."""
    text = doc.read_text() if text is None else text
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        where = (doc.parent / file_part).resolve() if file_part else doc
        if not where.exists():
            problems.append(f"link {target}: no {where.relative_to(ROOT) if where.is_relative_to(ROOT) else where}")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            problems.append(f"link {target}: no heading #{anchor} in {where.name}")
    for raw in PATH.findall(LINK.sub("", text)):  # link targets were checked above, from the file's folder
        written = raw.rstrip(".,:")
        for path in expand(written):
            if "*" in path or "?" in path:
                if not glob.glob(str(ROOT / path)):
                    problems.append(f"path {written}: nothing matches {path}")
            elif not (ROOT / path).exists():
                problems.append(f"path {written}: no {path}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_exists(doc):
    assert dangling(doc) == []


def test_the_code_map_names_real_files():
    """The README's map names modules by their bare file name in its folder's row: those files exist too."""
    rows = re.findall(r"^\| `([\w/]+/)` \| (.*) \|$", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 8
    missing = [folder + name for folder, cell in rows for name in re.findall(r"`(\w+\.py)`", cell)
               if not (ROOT / folder / name).is_file()]
    assert missing == []


def test_the_check_finds_what_it_should():
    readme = ROOT / "README.md"
    assert dangling(readme, "[x](docs/results.md) `bench/results/quality-smollm2-135m{,-a3}.json` docs/*.md") == []
    found = dangling(readme, "[a](docs/nope.md) [b](#no-such-heading) see `bench/results/nope.json` and "
                             "bench/results/quality-smollm2-135m{,-nope}.json, and rana_core/none*.py.")
    assert [p.split(":")[0] for p in found] == ["link docs/nope.md", "link #no-such-heading",
                                                "path bench/results/nope.json",
                                                "path bench/results/quality-smollm2-135m{,-nope}.json",
                                                "path rana_core/none*.py"]
    assert sum(len(LINK.findall(d.read_text())) + len(PATH.findall(d.read_text())) for d in DOCS) > 50
