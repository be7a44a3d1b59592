"""What a job may ask for: each kind's payload rules, and the names pickers list. Torch-free and database-free.

A validator takes a payload as submitted and returns it normalised, or raises a RanaError naming what is wrong.
They run once, when a job enters the queue (jobs.queue.submit, through the table in jobs.kinds); the worker trusts
what is stored.

- ``compress``: one CompressConfig (one model, method, allocation and budget), evaluated on held-out text.
- ``sweep``: methods × budgets over one base configuration; the queue turns it into one compress job per point
  (children of the sweep's row, which shows their aggregate progress).
- ``evaluate``: an existing run's stored adapters measured again on another split or token count.
- ``latency``: decode latency of dense and adapted models of one shape on a GPU (see rana_core's latency code).
- ``recover``: LoRA fine-tuning of an existing run's stored adapters, one rank per layer (rana_core.recovery.recover).
"""

from __future__ import annotations

from rana_core.config import MAX_FLOP_REDUCTION, CompressConfig
from rana_core.errors import RanaError
from rana_core.methods import METHODS, method_label, parse_method_label
from rana_core.model_source import BUNDLED_MODELS
from rana_core.recovery.config import STRATEGIES, RecoverConfig
from rana_core.task_files import checked_tasks
from rana_core.corpora import checked_corpus

SPLITS = ("heldout", "train")
MAX_SWEEP_POINTS = 200
LATENCY_SHAPES = ("llama2-7b-shape", "smollm2-135m-shape")
LATENCY_DTYPES = ("float16", "bfloat16")
LATENCY_DEFAULTS = {"model": "llama2-7b-shape", "flop_reductions": [0.0, 0.3, 0.44, 0.5],
                    "contexts": [1, 128, 512, 1000], "new_tokens": 492, "dtype": "float16"}


def compress_payload(payload: dict) -> dict:
    return CompressConfig.from_dict(payload).validate().to_dict()


def sweep_payload(payload: dict) -> dict:
    _only(payload, {"base", "methods", "budgets", "latency"}, "sweep")
    base = dict(payload.get("base") or {})
    for key in ("method", "allocation", "flop_reduction"):
        if key in base:
            raise RanaError(f"a sweep's base configuration must not set {key!r}: the sweep varies it")
    methods = payload.get("methods")
    budgets = payload.get("budgets")
    if not isinstance(methods, list) or not methods:
        raise RanaError("a sweep needs a non-empty list of methods, e.g. [\"rana-greedy\", \"cats\"]")
    if not isinstance(budgets, list) or not budgets:
        raise RanaError("a sweep needs a non-empty list of budgets (FLOP reductions)")
    for key, check in (("corpus", checked_corpus), ("eval_corpus", checked_corpus), ("tasks", checked_tasks)):
        if base.get(key):  # as the children's jobs will store them (absolute paths), whatever the worker's folder
            base[key] = check(base[key])
    points = list(dict.fromkeys(parse_method_label(m) for m in methods))
    clean_budgets = sorted({_budget(b) for b in budgets})
    count = sum(1 if method == "dense" else len(clean_budgets) for method, _ in points)
    if count > MAX_SWEEP_POINTS:
        raise RanaError(f"a sweep of {count} points is more than {MAX_SWEEP_POINTS}: split it")
    normalised = {"base": base, "methods": [method_label(m, a) for m, a in points], "budgets": clean_budgets}
    if payload.get("latency") is not None:  # each point's run is then measured by a GPU worker (jobs.queue)
        normalised["latency"] = run_latency_options(payload["latency"] if isinstance(payload["latency"], dict)
                                                    else {})
    for point in sweep_points(normalised):  # every child must be a valid compression before the sweep is accepted
        compress_payload(point)
    return normalised


def sweep_points(payload: dict) -> list[dict]:
    """The compress payloads of a validated sweep, one per method and budget (dense once), defaults filled in.
    Not validated again: sweep_payload checked each point when the sweep was submitted."""
    children = []
    for name in payload["methods"]:
        method, allocation = parse_method_label(name)
        for budget in [0.0] if method == "dense" else payload["budgets"]:
            config = {**payload["base"], "method": method, "allocation": allocation, "flop_reduction": budget}
            children.append(CompressConfig.from_dict(config).to_dict())
    return children


def evaluate_payload(payload: dict) -> dict:
    _only(payload, {"run_id", "split", "eval_tokens", "seq_len", "tasks", "corpus"}, "evaluate")
    run_id = _run_id(payload)
    split = payload.get("split", "heldout")
    if split not in SPLITS:
        raise RanaError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    clean = {"run_id": run_id, "split": split}
    for key, default in (("eval_tokens", 8192), ("seq_len", 512)):
        value = payload.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise RanaError(f"{key.replace('_', ' ')} must be an integer ≥ 2, got {value!r}")
        clean[key] = value
    if clean["eval_tokens"] < clean["seq_len"]:
        raise RanaError(f"eval tokens ({clean['eval_tokens']}) is less than one sequence of {clean['seq_len']}")
    if payload.get("tasks"):  # accuracy beside perplexity: "cloze" and multiple-choice files the worker can read
        clean["tasks"] = checked_tasks(payload["tasks"])
    if payload.get("corpus"):  # "brown" unless named: the held-out text of a user's file, folder or hub set
        clean["corpus"] = checked_corpus(payload["corpus"])
    return clean


def recover_payload(payload: dict) -> dict:
    """{"run_id": …, "strategy": …} plus any RecoverConfig option (tokens, steps, seed, rank budget…)."""
    run_id = _run_id(payload)
    options = {key: value for key, value in payload.items() if key != "run_id"}
    if "strategy" not in options:
        raise RanaError(f"a recovery needs a strategy: one of {', '.join(STRATEGIES)}")
    return {"run_id": run_id, **RecoverConfig.from_dict(options).validate().to_dict()}


def latency_payload(payload: dict) -> dict:
    _only(payload, set(LATENCY_DEFAULTS), "latency")
    clean = {**LATENCY_DEFAULTS, **payload}
    if clean["model"] not in LATENCY_SHAPES:
        raise RanaError(f"unknown latency model {clean['model']!r}: use one of {', '.join(LATENCY_SHAPES)}")
    if not isinstance(clean["flop_reductions"], list) or not clean["flop_reductions"]:
        raise RanaError("flop_reductions must be a non-empty list")
    clean["flop_reductions"] = sorted({_budget(b) for b in clean["flop_reductions"]})
    return _decode_options(clean, 8192)


RUN_LATENCY_DEFAULTS = {"contexts": [1, 512], "new_tokens": 256, "dtype": "bfloat16", "batches": []}
MAX_BATCH = 16  # rana_core.decode.batch_masked.MAX_BATCH (not imported: this module stays torch-free)


def run_latency_payload(payload: dict) -> dict:
    """The decode speed of a stored run: its engine and the dense model's, at each context length."""
    _only(payload, {"run_id"} | set(RUN_LATENCY_DEFAULTS), "run_latency")
    return {"run_id": _run_id(payload), **run_latency_options(
        {key: value for key, value in payload.items() if key != "run_id"})}


def run_latency_options(options: dict) -> dict:
    """A run's decode-speed options (contexts, new tokens, dtype, batch sizes also timed) with defaults; the
    model's own positions are checked where it is loaded."""
    _only(options, set(RUN_LATENCY_DEFAULTS), "latency")
    clean = _decode_options({**RUN_LATENCY_DEFAULTS, **options}, 131072)
    batches = clean["batches"]
    if not isinstance(batches, list) or not all(_positive_int(b, MAX_BATCH) and b >= 2 for b in batches):
        raise RanaError(f"batches must be a list of integers in [2, {MAX_BATCH}] (batch 1 is always measured), "
                        f"got {batches!r}")
    clean["batches"] = sorted(set(batches))
    return clean


def _run_id(payload: dict) -> int:
    run_id = payload.get("run_id")
    if not isinstance(run_id, int) or isinstance(run_id, bool) or run_id <= 0:
        raise RanaError(f"run_id must be a positive integer, got {run_id!r}")
    return run_id


def _decode_options(clean: dict, most_context: int) -> dict:
    """A decode measurement's dtype, contexts (sorted, once each) and new tokens, checked."""
    if clean["dtype"] not in LATENCY_DTYPES:
        raise RanaError(f"latency dtype must be one of {', '.join(LATENCY_DTYPES)}, got {clean['dtype']!r}")
    contexts = clean["contexts"]
    if not isinstance(contexts, list) or not contexts or not all(_positive_int(c, most_context) for c in contexts):
        raise RanaError(f"contexts must be a non-empty list of integers in [1, {most_context}]")
    if not _positive_int(clean["new_tokens"], 4096):
        raise RanaError(f"new_tokens must be an integer in [1, 4096], got {clean['new_tokens']!r}")
    clean["contexts"] = sorted(set(contexts))
    return clean


def _budget(value) -> float:
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise RanaError(f"a budget must be a number, got {value!r}") from None
    if not 0.0 <= budget < MAX_FLOP_REDUCTION:
        raise RanaError(f"budgets are FLOP reductions in [0, {MAX_FLOP_REDUCTION}), got {budget}")
    return round(budget, 6)


def _positive_int(value, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


def _only(payload: dict, allowed: set, kind: str) -> None:
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise RanaError(f"unknown {kind} option(s): {', '.join(unknown)}")


def method_names() -> list[str]:
    return list(METHODS)


def method_summaries() -> dict[str, str]:
    return {name: spec.summary for name, spec in METHODS.items()}


def allocations(method: str) -> tuple[str, ...]:
    return METHODS[method].allocations


def recovery_strategies() -> dict[str, str]:
    return dict(STRATEGIES)


def model_names() -> list[str]:
    return list(BUNDLED_MODELS)


def default_compress_options() -> dict:
    return CompressConfig().to_dict()


__all__ = [
    "MAX_FLOP_REDUCTION",
    "RanaError",
    "allocations",
    "compress_payload",
    "default_compress_options",
    "evaluate_payload",
    "latency_payload",
    "method_label",
    "method_names",
    "method_summaries",
    "model_names",
    "parse_method_label",
    "recover_payload",
    "sweep_payload",
    "sweep_points",
]
