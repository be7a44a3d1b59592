"""The job kinds, in one table. Torch-free and database-free.

Each row says how a kind's payload is validated (jobs.specs), how one line describes a job of it (the "what" of
`rana jobs` and of the dashboard's Jobs page), whether it needs a stored run with adapters, whether it is a parent
whose children do the work, and which jobs.worker.Worker method runs it. The queue, the worker, the CLI and the app
all read this table: a new kind is one row here, its validator in jobs.specs and its handler on the Worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from jobs import specs
from rana_core.errors import RanaError


@dataclass(frozen=True)
class JobKind:
    name: str
    validate: Callable[[dict], dict]  # the payload as submitted → normalised, or a RanaError naming what is wrong
    describe: Callable[[dict], str]  # a stored (normalised) payload → one line saying what the job does
    handler: str | None  # the Worker method that runs it; None for a parent, which is never claimed itself
    needs_run: bool = False  # payload["run_id"] must name a stored run with adapters when the job is submitted
    children: Callable[[dict], list[dict]] | None = None  # a parent's child payloads, one job each...
    child_kind: str | None = None  # ...of this kind
    needs_gpu: bool = False  # only a worker on a CUDA device claims it (it waits, saying so, until one does)


def _compress(p: dict) -> str:
    return f"{p['model']} / {specs.method_label(p['method'], p['allocation'])} / {p['flop_reduction']}"


def _sweep(p: dict) -> str:
    return f"{p['base'].get('model')} / {','.join(p['methods'])} / {len(p['budgets'])} budgets"


def _evaluate(p: dict) -> str:
    return f"run {p['run_id']} on {p['split']} ({p['eval_tokens']} tokens)"


def _recover(p: dict) -> str:
    return f"run {p['run_id']}: LoRA {p['strategy']} at rank budget {p['rank_budget']}"


def _latency(p: dict) -> str:
    return f"{p['model']} / {p['dtype']} (synthetic weights)"


def _run_latency(p: dict) -> str:
    batches = f", batches {','.join(map(str, p['batches']))}" if p.get("batches") else ""
    return f"run {p['run_id']}: decode speed at contexts {','.join(map(str, p['contexts']))}{batches} ({p['dtype']})"


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("compress", specs.compress_payload, _compress, handler="run_compress"),
    JobKind("sweep", specs.sweep_payload, _sweep, handler=None, children=specs.sweep_points, child_kind="compress"),
    JobKind("evaluate", specs.evaluate_payload, _evaluate, handler="run_evaluate", needs_run=True),
    JobKind("latency", specs.latency_payload, _latency, handler="run_latency", needs_gpu=True),
    JobKind("run_latency", specs.run_latency_payload, _run_latency, handler="run_run_latency", needs_run=True,
            needs_gpu=True),
    JobKind("recover", specs.recover_payload, _recover, handler="run_recover", needs_run=True),
)}
JOB_KINDS = tuple(KINDS)
PARENT_KINDS = tuple(name for name, kind in KINDS.items() if kind.children is not None)
GPU_KINDS = tuple(name for name, kind in KINDS.items() if kind.needs_gpu)
WAITING_FOR_GPU = "queued; waiting for a GPU worker"


# What a worker keeps from one job for the next: the loaded model and what a method computed on one calibration
# sample of it (RaNA's profiles and loss model, hybrid's curves and bases). Jobs that agree on these reuse them.
_REUSED = ("model", "dtype", "device", "method", "calib_tokens", "seq_len", "split")


def reuse_key(kind: str, payload: dict) -> tuple:
    """Jobs with equal keys share work when one worker runs them one after the other (e.g. the budgets of one
    method in a sweep)."""
    return (kind, *(str(payload.get(name)) for name in _REUSED))


def job_kind(name: str) -> JobKind:
    kind = KINDS.get(name)
    if kind is None:
        raise RanaError(f"unknown job kind {name!r}: use one of {', '.join(JOB_KINDS)}")
    return kind


def validate_payload(kind: str, payload: dict) -> dict:
    """The normalised payload for `kind`, or a RanaError naming what is wrong."""
    rules = job_kind(kind)
    if not isinstance(payload, dict):
        raise RanaError("a job payload must be a JSON object")
    return rules.validate(payload)


def describe(kind: str, payload: dict) -> str:
    """One line about a stored job; a kind this version does not know (a newer worker's, sharing the database)
    is named, not a crash."""
    return KINDS[kind].describe(payload) if kind in KINDS else f"(a {kind} job: unknown to this version)"
