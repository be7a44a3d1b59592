"""Store what a compression produced: a run, its evaluation and its per-layer metrics, in the caller's session.

Idempotent: a job's results are written once (runs.job_id is unique); writing them again returns the stored run.
"""

from __future__ import annotations

from sqlalchemy import select

from db.models import Evaluation, LayerMetric, Run

LAYER_FIELDS = ("layer", "module", "adapter", "rank", "max_rank", "density", "recon_error", "sparsity",
                "flops_per_token", "dense_flops_per_token")


def store_compression(session, result: dict, job_id: int | None = None) -> int:
    """Insert the run described by `result` (CompressionResult.to_json()) and return its id."""
    if job_id is not None:
        existing = session.execute(select(Run.id).where(Run.job_id == job_id)).scalar()
        if existing is not None:
            return existing
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
        )
    )
    for row in result["layers"]:
        run.layers.append(LayerMetric(**{key: row.get(key) for key in LAYER_FIELDS}))
    session.add(run)
    session.flush()
    return run.id
