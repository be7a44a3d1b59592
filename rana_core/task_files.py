"""Task names and multiple-choice files, torch-free (the queue checks a job's tasks when it is submitted; the
scoring is rana_core.tasks).

A task is "cloze" (built in, held-out Brown) or the path of a JSON-lines file of multiple-choice items in
lm-evaluation-harness's layout, one object a line: {"context": str, "choices": [str, …], "gold": int}. A file's
task is named by its file name without the extension.
"""

from __future__ import annotations

import json
from pathlib import Path

from rana_core.errors import RanaError

CLOZE = "cloze"


def task_name(task: str) -> str:
    return CLOZE if task == CLOZE else Path(task).stem


def checked_tasks(tasks) -> list[str]:
    """Tasks as a job stores them: "cloze" and the absolute paths of readable, valid files (in the order given,
    once each); a RanaError naming the first problem."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise RanaError("tasks must be a list of task names or files, e.g. [\"cloze\", \"piqa.jsonl\"]")
    checked = []
    for task in tasks:
        if task != CLOZE:
            load_multiple_choice(task)
            task = str(Path(task).resolve())
        if task not in checked:
            checked.append(task)
    names = [task_name(t) for t in checked]
    if len(set(names)) != len(names):
        raise RanaError(f"two tasks share a name: {', '.join(sorted(n for n in names if names.count(n) > 1))}")
    return checked


def load_multiple_choice(path) -> list[dict]:
    """The items of a JSON-lines file {"context", "choices", "gold"}; a RanaError naming the line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise RanaError(f"task file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RanaError(f"task file {path} is not UTF-8 text") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RanaError(f"task file {path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise RanaError(f"task file {path} line {number}: an object with context, choices and gold expected")
        for field in ("context", "choices", "gold"):
            if field not in item:
                raise RanaError(f"task file {path} line {number}: missing {field!r}")
        choices, gold = item["choices"], item["gold"]
        if not isinstance(item["context"], str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise RanaError(f"task file {path} line {number}: context must be text and choices two or more texts")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise RanaError(f"task file {path} line {number}: gold must be a choice's index (0..{len(choices) - 1})")
        items.append(item)
    if not items:
        raise RanaError(f"task file {path} holds no items")
    return items


