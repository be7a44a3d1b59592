"""Store what a job produced, in the caller's session: a compression's run, evaluation and per-layer metrics; a
re-evaluation of a run; latency measurements; a LoRA recovery of a run.

Idempotent: a job's results are written once (runs.job_id and evaluations.job_id are unique, latency rows are
unique per job and point); writing them again returns what is stored.
"""

from __future__ import annotations

from sqlalchemy import select

from db.models import Evaluation, LatencyResult, LayerMetric, Recovery, Run
from rana_core.errors import RanaError

LAYER_FIELDS = ("layer", "module", "adapter", "rank", "max_rank", "density", "recon_error", "sparsity",
                "sparsity_curve", "flops_per_token", "dense_flops_per_token", "planned_keep")
LATENCY_FIELDS = ("model", "device_name", "dtype", "engine", "flop_reduction", "measured_flop_reduction",
                  "context_tokens", "new_tokens", "ms_per_token", "dense_ms_per_token", "shapes")


def store_compression(session, result: dict, job_id: int | None = None, author: str | None = None, tags=(),
                      artifact_path: str | None = None) -> int:
    """Insert the run described by `result` (CompressionResult.to_json()) and return its id. `artifact_path`
    is where its adapters lie, relative to the data directory (the sha256 comes from the result)."""
    if job_id is not None:
        existing = session.execute(select(Run.id).where(Run.job_id == job_id)).scalar()
        if existing is not None:
            return existing
    artifact = result.get("artifact") or {}
    run = Run(
        job_id=job_id,
        model=result["model"],
        method=result["method"],
        allocation=result["allocation"],
        target_flop_reduction=result["target_flop_reduction"],
        calib_tokens=result["calib_tokens"],
        seconds=result["seconds"],
        config=result["config"],
        environment=result.get("environment", {}),
        provenance={**result.get("provenance", {}), "author": author, "tags": list(tags)},
        author=author,
        tags=list(tags),
        artifact_path=artifact_path if artifact else None,
        artifact_sha256=artifact.get("sha256"),
        model_stats=result.get("model_stats") or {},
        probes=result.get("probes"),
        corpora=result.get("corpora") or None,
    )
    run.evaluations.append(
        Evaluation(
            split="heldout",
            tokens=result["eval_tokens"],
            seq_len=result["seq_len"],
            perplexity=result["perplexity"],
            dense_perplexity=result["dense_perplexity"],
            measured_flop_reduction=result["measured_flop_reduction"],
            measured_flop_reduction_whole_model=result["measured_flop_reduction_whole_model"],
            tasks=result.get("tasks"),
            corpus=(result.get("corpora") or {}).get("evaluation"),
        )
    )
    for row in result["layers"]:
        run.layers.append(LayerMetric(**{key: row.get(key) for key in LAYER_FIELDS}))
    session.add(run)
    session.flush()
    return run.id


def store_evaluation(session, run_id: int, evaluation: dict, job_id: int | None = None) -> int:
    """Add one evaluation (rana_core.pipeline.evaluate_saved) to a run; returns its id."""
    if job_id is not None:
        existing = session.execute(select(Evaluation.id).where(Evaluation.job_id == job_id)).scalar()
        if existing is not None:
            return existing
    measured = {key: evaluation[key] for key in ("split", "tokens", "seq_len", "perplexity", "dense_perplexity",
                                                 "measured_flop_reduction", "measured_flop_reduction_whole_model")}
    row = Evaluation(run_id=run_id, job_id=job_id, tasks=evaluation.get("tasks"), corpus=evaluation.get("corpus"),
                     **measured)
    session.add(row)
    session.flush()
    return row.id


def store_latency(session, rows: list[dict], job_id: int | None = None, run_id: int | None = None,
                  layers: list | None = None) -> int:
    """Insert latency measurements (one per model, engine, budget and context); returns how many are stored for
    the job. Rows already stored for this job are skipped. `run_id` and `layers`: a stored run's measurement."""
    stored = 0
    for row in rows:
        values = {key: row.get(key) for key in LATENCY_FIELDS}
        if job_id is not None and session.execute(
            select(LatencyResult.id).where(
                LatencyResult.job_id == job_id, LatencyResult.model == values["model"],
                LatencyResult.engine == values["engine"], LatencyResult.flop_reduction == values["flop_reduction"],
                LatencyResult.context_tokens == values["context_tokens"])
        ).scalar() is not None:
            continue
        session.add(LatencyResult(job_id=job_id, run_id=run_id, layers=layers, **values))
        stored += 1
    session.flush()
    return stored


def store_run_latency(session, run_id: int, report: dict, job_id: int | None = None) -> int:
    """A run's decode speed (rana_core.decode.run_latency.measure_run): one row per context, linked to the run,
    with the dense engine's time, the floor, the batch sizes timed at that context and the per-layer sections
    beside it."""
    run = session.get(Run, run_id)
    if run is None:
        raise RanaError(f"run {run_id} no longer exists")
    rows = [{"model": run.model, "device_name": report["device_name"], "dtype": report["dtype"],
             "engine": report["engine"], "flop_reduction": run.target_flop_reduction,
             "measured_flop_reduction": report["measured_flop_reduction"], "context_tokens": row["context_tokens"],
             "new_tokens": row["new_tokens"], "ms_per_token": row["ms_per_token"],
             "dense_ms_per_token": row["dense_ms_per_token"],
             "shapes": {"floor_ms": row["floor_ms"], "dense_floor_ms": row["dense_floor_ms"],
                        "copy_bandwidth_gbs": report["copy_bandwidth_gbs"], "head_ms": report.get("head_ms"),
                        "batches": row.get("batches", []), "section_costs": report.get("section_costs")}}
            for row in report["rows"]]
    return store_latency(session, rows, job_id=job_id, run_id=run_id, layers=report["layers"])


RECOVERY_COLUMNS = ("strategy", "ranks", "trainable_params", "train_tokens", "eval_tokens", "perplexity_before",
                    "perplexity_after", "dense_perplexity", "seconds")


def store_recovery(session, run_id: int, result: dict, job_id: int | None = None) -> int:
    """Add one recovery (rana_core.recovery.recover.RecoveryResult.to_json()) to a run; returns its id."""
    if job_id is not None:
        existing = session.execute(select(Recovery.id).where(Recovery.job_id == job_id)).scalar()
        if existing is not None:
            return existing
    details = {key: value for key, value in result.items() if key not in RECOVERY_COLUMNS and key != "history"}
    row = Recovery(run_id=run_id, job_id=job_id, **{key: result[key] for key in RECOVERY_COLUMNS},
                   measured_flop_reduction_after=result["flop_reduction_after"],
                   search_history=result.get("history") or [], details=details)
    session.add(row)
    session.flush()
    return row.id
