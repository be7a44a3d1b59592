"""The dashboard's only door to the database: a cached engine and short-lived query results as DataFrames.

Reads go through SQLAlchemy here; writes (enqueueing) go through `jobs.queue`, never straight to the tables.
"""

from __future__ import annotations

import statistics

import pandas as pd
import streamlit as st
from sqlalchemy import select

from db.migrate import check_schema
from db.models import Evaluation, LatencyResult, LayerMetric, Recovery, Run
from db.session import DatabaseError, database_url, session_scope
from app import auth
from jobs import kinds, queue, specs

RUN_COLUMNS = ["run_id", "job_id", "model", "method", "allocation", "series", "target_flop_reduction",
               "measured_flop_reduction", "measured_flop_reduction_whole_model", "perplexity", "dense_perplexity",
               "eval_tokens", "seq_len", "calib_tokens", "seconds", "author", "tags", "created_at", "corpus",
               "eval_corpus", "corpora"]
BROWN = {"name": "brown"}  # what a run from before corpora could be chosen calibrated and evaluated on


def corpus_label(record: dict | None) -> str:
    """A corpus as the dashboard names it: "brown", a hub id, or a file's name with its digest's first digits
    (two versions of one file differ)."""
    record = record or BROWN
    name = record["name"]
    if not name.startswith("/"):
        return name
    return f"{name.rsplit('/', 1)[-1]} #{record.get('digest', '')[:6]}"


def corpora_columns(calibration: dict | None, evaluation: dict | None) -> dict:
    """A run's "corpus", "eval_corpus" and the "corpora" filter label ("brown", or "mine.jsonl #4ce7b3 → brown")."""
    corpus, eval_corpus = corpus_label(calibration), corpus_label(evaluation)
    return {"corpus": corpus, "eval_corpus": eval_corpus,
            "corpora": corpus if corpus == eval_corpus else f"{corpus} → {eval_corpus}"}


def url() -> str:
    return database_url()


def schema_problem() -> str | None:
    """None when the database is ready, else the message to show."""
    try:
        check_schema(url())
    except DatabaseError as exc:
        return str(exc)
    return None


def page(title: str) -> None:
    """Every page's opening: its title, then the schema check (one message, and the page stops, when the
    database is missing or behind the code)."""
    problem = schema_problem()
    if problem:
        st.title(title)
        st.error(problem)
        st.stop()
    auth.gate(url())  # team mode: the sign-in form until someone signs in (main.py asks first; a page run alone too)
    st.title(title)


def finished_runs(empty_message: str) -> pd.DataFrame:
    """runs(), or `empty_message` and the page stops when there are none."""
    frame = runs(url())
    if frame.empty:
        st.info(empty_message)
        st.stop()
    return frame


@st.cache_data(ttl=2, show_spinner=False)
def runs(db_url: str) -> pd.DataFrame:
    """One row per run with its held-out evaluation (the first one if several)."""
    with session_scope(db_url) as session:
        rows = session.execute(
            select(Run, Evaluation).join(Evaluation, Evaluation.run_id == Run.id)
            .where(Evaluation.split == "heldout").order_by(Run.id, Evaluation.id)
        ).all()
        records, seen = [], set()
        for run, ev in rows:
            if run.id in seen:
                continue
            seen.add(run.id)
            records.append({
                "run_id": run.id, "job_id": run.job_id, "model": run.model, "method": run.method,
                "allocation": run.allocation, "series": specs.method_label(run.method, run.allocation),
                "target_flop_reduction": run.target_flop_reduction,
                "measured_flop_reduction": ev.measured_flop_reduction,
                "measured_flop_reduction_whole_model": ev.measured_flop_reduction_whole_model,
                "perplexity": ev.perplexity, "dense_perplexity": ev.dense_perplexity, "eval_tokens": ev.tokens,
                "seq_len": ev.seq_len, "calib_tokens": run.calib_tokens, "seconds": run.seconds,
                "author": run.author, "tags": list(run.tags or []), "created_at": run.created_at,
                **corpora_columns((run.corpora or {}).get("calibration"), ev.corpus),
            })
    return pd.DataFrame.from_records(records, columns=RUN_COLUMNS)


LAYER_COLUMNS = ["layer", "module", "adapter", "rank", "max_rank", "density", "recon_error", "sparsity",
                 "sparsity_curve", "flops_per_token", "dense_flops_per_token", "planned_keep"]


@st.cache_data(ttl=2, show_spinner=False)
def layer_metrics(db_url: str, run_id: int) -> pd.DataFrame:
    """One row per (layer, module) of a run, with `keep` = FLOPs spent / dense FLOPs."""
    with session_scope(db_url) as session:
        rows = session.execute(select(LayerMetric).where(LayerMetric.run_id == run_id)
                               .order_by(LayerMetric.layer, LayerMetric.id)).scalars().all()
        frame = pd.DataFrame([{c: getattr(r, c) for c in LAYER_COLUMNS} for r in rows], columns=LAYER_COLUMNS)
    frame["keep"] = frame["flops_per_token"] / frame["dense_flops_per_token"]
    return frame


@st.cache_data(ttl=2, show_spinner=False)
def run_details(db_url: str, run_ids: tuple[int, ...]) -> dict[int, dict]:
    """Everything stored about each run but its layers: configuration, provenance, every evaluation."""
    details = {}
    with session_scope(db_url) as session:
        for run in session.execute(select(Run).where(Run.id.in_(run_ids))).scalars():
            details[run.id] = {
                "run_id": run.id, "job_id": run.job_id, "model": run.model, "method": run.method,
                "allocation": run.allocation, "series": specs.method_label(run.method, run.allocation),
                "target_flop_reduction": run.target_flop_reduction, "author": run.author,
                "tags": list(run.tags or []), "created_at": run.created_at, "seconds": run.seconds,
                "config": dict(run.config or {}), "provenance": dict(run.provenance or {}),
                "artifact": run.artifact_path, "model_stats": dict(run.model_stats or {}),
                "probes": run.probes, "corpora": run.corpora or {"calibration": BROWN, "evaluation": BROWN},
                "evaluations": [{"split": e.split, "tokens": e.tokens, "seq_len": e.seq_len,
                                 "perplexity": e.perplexity, "dense_perplexity": e.dense_perplexity,
                                 "measured_flop_reduction": e.measured_flop_reduction,
                                 "measured_flop_reduction_whole_model": e.measured_flop_reduction_whole_model,
                                 "tasks": e.tasks, "corpus": corpus_label(e.corpus)}
                                for e in sorted(run.evaluations, key=lambda e: e.id)],
            }
    return details


def probe_table(probes: dict | None) -> pd.DataFrame:
    """A run's probes (rana_core.probes) as rows: the prompt, the dense model's reply, the run's, and whether the
    run's reply holds a known answer (None for openings, which are shown, not scored)."""
    columns = ["kind", "prompt", "dense reply", "reply", "answered"]
    if not probes or not probes.get("adapted"):
        return pd.DataFrame(columns=columns)
    dense = {r["prompt"]: r["reply"] for r in (probes.get("dense") or {}).get("replies", [])}
    return pd.DataFrame([{"kind": r["kind"], "prompt": r["prompt"], "dense reply": dense.get(r["prompt"]),
                          "reply": r["reply"], "answered": r["correct"]} for r in probes["adapted"]["replies"]],
                        columns=columns)


RECOVERY_COLUMNS = ["recovery_id", "job_id", "strategy", "ranks", "trainable_params", "train_tokens", "eval_tokens",
                    "perplexity_before", "perplexity_after", "dense_perplexity", "measured_flop_reduction_after",
                    "configs_measured", "seconds", "created_at"]


@st.cache_data(ttl=2, show_spinner=False)
def recoveries(db_url: str, run_id: int) -> pd.DataFrame:
    """The LoRA recoveries of one run, oldest first."""
    with session_scope(db_url) as session:
        rows = session.execute(select(Recovery).where(Recovery.run_id == run_id).order_by(Recovery.id)).scalars()
        records = [{"recovery_id": r.id, "configs_measured": len(r.search_history or []),
                    **{c: getattr(r, c) for c in RECOVERY_COLUMNS if c not in ("recovery_id", "configs_measured")}}
                   for r in rows]
    return pd.DataFrame.from_records(records, columns=RECOVERY_COLUMNS)


@st.cache_data(ttl=2, show_spinner=False)
def all_recoveries(db_url: str) -> pd.DataFrame:
    """Every recovery: its run, strategy and perplexity after."""
    with session_scope(db_url) as session:
        rows = session.execute(select(Recovery).order_by(Recovery.id)).scalars()
        records = [{"run_id": r.run_id, "strategy": r.strategy, "perplexity_after": r.perplexity_after}
                   for r in rows]
    return pd.DataFrame.from_records(records, columns=["run_id", "strategy", "perplexity_after"])


@st.cache_data(ttl=2, show_spinner=False)
def recovered_points(db_url: str) -> pd.DataFrame:
    """Recoveries as Pareto points in the runs() layout: series "<run's series>+lora-<strategy>", the FLOP
    reduction measured after recovery, the perplexity after; run_id is the recovered run."""
    with session_scope(db_url) as session:
        rows = session.execute(select(Recovery, Run).join(Run, Recovery.run_id == Run.id)
                               .order_by(Recovery.id)).all()
        records = [{
            "run_id": run.id, "job_id": recovery.job_id, "model": run.model, "method": run.method,
            "allocation": run.allocation,
            "series": f"{specs.method_label(run.method, run.allocation)}+lora-{recovery.strategy}",
            "target_flop_reduction": run.target_flop_reduction,
            "measured_flop_reduction": recovery.measured_flop_reduction_after,
            "measured_flop_reduction_whole_model": float("nan"), "perplexity": recovery.perplexity_after,
            "dense_perplexity": recovery.dense_perplexity, "eval_tokens": recovery.eval_tokens,
            "seq_len": (recovery.details or {}).get("config", {}).get("eval_seq_len"),
            "calib_tokens": run.calib_tokens, "seconds": recovery.seconds, "author": run.author,
            "tags": list(run.tags or []), "created_at": recovery.created_at,
            # recovery fine-tunes and measures on Brown (rana_core.recovery), whatever text built the adapters
            **corpora_columns((run.corpora or {}).get("calibration"), None),
        } for recovery, run in rows]
    return pd.DataFrame.from_records(records, columns=RUN_COLUMNS)


LATENCY_COLUMNS = ["run_id", "model", "device_name", "dtype", "engine", "flop_reduction", "measured_flop_reduction",
                   "context_tokens", "new_tokens", "ms_per_token", "dense_ms_per_token", "speedup", "created_at"]


@st.cache_data(ttl=5, show_spinner=False)
def latency(db_url: str) -> pd.DataFrame:
    with session_scope(db_url) as session:
        rows = session.execute(select(LatencyResult).order_by(LatencyResult.id)).scalars().all()
        frame = pd.DataFrame([{c: getattr(r, c) for c in LATENCY_COLUMNS if c != "speedup"} for r in rows],
                             columns=[c for c in LATENCY_COLUMNS if c != "speedup"])
    frame["speedup"] = frame["dense_ms_per_token"] / frame["ms_per_token"]
    return frame[LATENCY_COLUMNS]


ACCURACY_COLUMNS = ["run_id", "task", "acc", "acc_stderr", "acc_norm", "dense_acc", "dense_acc_norm", "items"]


@st.cache_data(ttl=2, show_spinner=False)
def accuracy(db_url: str) -> pd.DataFrame:
    """Accuracy on tasks, one row per run and task, from the latest evaluation that measured the task."""
    records = {}
    with session_scope(db_url) as session:
        for e in session.execute(select(Evaluation).where(Evaluation.tasks.is_not(None))
                                 .order_by(Evaluation.id)).scalars():
            adapted, dense = (e.tasks or {}).get("adapted", {}), (e.tasks or {}).get("dense", {})
            for task, row in adapted.get("results", {}).items():
                base = dense.get("results", {}).get(task, {})
                records[(e.run_id, task)] = {
                    "run_id": e.run_id, "task": task, "acc": row.get("acc,none"),
                    "acc_stderr": row.get("acc_stderr,none"), "acc_norm": row.get("acc_norm,none"),
                    "dense_acc": base.get("acc,none"), "dense_acc_norm": base.get("acc_norm,none"),
                    "items": adapted.get("n-samples", {}).get(task, {}).get("effective")}
    return pd.DataFrame.from_records(list(records.values()), columns=ACCURACY_COLUMNS)


def submit_evaluate(run_id: int, tasks: str, author: str | None = None, corpus: str = "") -> int:
    """Queue an evaluation of a run with accuracy on `tasks` ("cloze,FILE"), on the held-out split of `corpus`
    (default Brown); RanaError as a message if refused."""
    payload = {"run_id": int(run_id), "tasks": tasks} | ({"corpus": corpus.strip()} if corpus.strip() else {})
    job_id = queue.submit("evaluate", payload, author=author, url=url(), actor=auth.actor())
    jobs.clear()
    return job_id


def run_speed(db_url: str, run_id: int) -> tuple[pd.DataFrame, dict]:
    """The decode speed measured for a run (one row per device, dtype and context; the latest measurement), and
    the per-layer sections of the latest one with what the worker fitted to them: {"layers": [...], "costs": the
    section_costs dict, or None for measurements stored before it existed, "context": the context they were
    profiled at (a measurement's last, whose row is stored last)}."""
    frame = latency(db_url)
    rows = frame[frame["run_id"] == run_id].sort_values("created_at")
    latest = rows.drop_duplicates(["device_name", "dtype", "context_tokens"], keep="last")
    with session_scope(db_url) as session:
        stored = session.execute(select(LatencyResult.id, LatencyResult.device_name, LatencyResult.dtype,
                                        LatencyResult.context_tokens, LatencyResult.shapes)
                                 .where(LatencyResult.run_id == run_id).order_by(LatencyResult.id)).all()
        # every row of a measurement repeats its sections: only the last row's are read
        layers = session.get(LatencyResult, stored[-1].id).layers if stored else None
    shapes_of = {(device, dtype, context): shapes or {} for _, device, dtype, context, shapes in stored}  # last wins
    keys = list(zip(latest["device_name"], latest["dtype"], latest["context_tokens"]))
    latest = latest.assign(**{column: [shapes_of.get(key, {}).get(column) for key in keys]
                              for column in ("floor_ms", "dense_floor_ms")})
    _, _, _, context, shapes = stored[-1] if stored else (None, None, None, None, None)
    return latest.sort_values(["device_name", "context_tokens"]), {
        "layers": layers or [], "costs": (shapes or {}).get("section_costs"), "context": context}


@st.cache_data(ttl=5, show_spinner=False)
def model_speed_history(db_url: str, model: str) -> list[dict]:
    """What the stored runs of `model` measured of decode speed, per GPU: dense's time over its bandwidth floor
    (the median over measurements that stored a floor; None if none did) and the fastest run against dense, with
    its method, budget and context."""
    with session_scope(db_url) as session:
        rows = session.execute(select(LatencyResult.device_name, LatencyResult.context_tokens,
                                      LatencyResult.ms_per_token, LatencyResult.dense_ms_per_token,
                                      LatencyResult.shapes, Run.method, Run.target_flop_reduction)
                               .join(Run, Run.id == LatencyResult.run_id)
                               .where(Run.model == model, LatencyResult.dense_ms_per_token.is_not(None))).all()
    history = []
    for device in sorted({row.device_name for row in rows}):
        mine = [row for row in rows if row.device_name == device]
        over = [row.dense_ms_per_token / row.shapes["dense_floor_ms"] for row in mine
                if (row.shapes or {}).get("dense_floor_ms")]
        best = max(mine, key=lambda row: row.dense_ms_per_token / row.ms_per_token)
        history.append({"device_name": device, "dense_over_floor": statistics.median(over) if over else None,
                        "best_speedup": best.dense_ms_per_token / best.ms_per_token, "best_method": best.method,
                        "best_budget": best.target_flop_reduction, "best_context": best.context_tokens})
    return history


BATCH_COLUMNS = ["series", "batch", "tokens_per_s", "dense_tokens_per_s"]


def run_batches(db_url: str, run_id: int) -> pd.DataFrame:
    """Tokens per second of a run and of the dense model by batch size, from the latest measurement at each device,
    dtype and context that timed batches: batch 1 is the one-token engine, larger batches the batched step."""
    with session_scope(db_url) as session:
        rows = session.execute(select(LatencyResult).where(LatencyResult.run_id == run_id)
                               .order_by(LatencyResult.id)).scalars().all()
        latest = {(r.device_name, r.dtype, r.context_tokens): r for r in rows}  # a later measurement wins
        records = []
        for (device, dtype, context), row in sorted(latest.items()):
            batches = (row.shapes or {}).get("batches") or []
            series = f"{device} · {dtype} · context {context}"
            if batches:
                records.append({"series": series, "batch": 1, "tokens_per_s": 1e3 / row.ms_per_token,
                                "dense_tokens_per_s": 1e3 / row.dense_ms_per_token})
            records += [{"series": series, "batch": b["batch"], "tokens_per_s": b["tokens_per_s"],
                         "dense_tokens_per_s": b["dense_tokens_per_s"]} for b in batches]
    return pd.DataFrame.from_records(records, columns=BATCH_COLUMNS)


def speed_points(runs: pd.DataFrame, db_url: str) -> pd.DataFrame:
    """Runs joined with their measured decode speed: one point per run and GPU, at the shortest context measured
    there (the latest measurement), its series the method's and the GPU's."""
    frame = latency(db_url)
    frame = frame[frame["run_id"].notna()].sort_values("created_at")
    if frame.empty:
        return frame
    frame = frame.drop_duplicates(["run_id", "device_name", "context_tokens"], keep="last")
    shortest = frame.loc[frame.groupby(["run_id", "device_name"])["context_tokens"].idxmin()]
    shortest = shortest[["run_id", "device_name", "context_tokens", "ms_per_token", "dense_ms_per_token", "speedup"]]
    joined = runs.merge(shortest.astype({"run_id": int}), on="run_id")
    joined["series"] = joined["series"] + " · " + joined["device_name"]
    return joined


def submit_run_latency(run_id: int, contexts: list[int], author: str | None = None,
                       batches: list[int] = ()) -> int:
    """Queue a measurement of a run's decode speed at each context (and, with `batches`, of that many sequences
    decoding together); a GPU worker runs it. RanaError as a message when refused."""
    job_id = queue.submit("run_latency", {"run_id": int(run_id), "contexts": contexts, "batches": list(batches)},
                          author=author, url=url(), actor=auth.actor())
    jobs.clear()
    return job_id


JOB_COLUMNS = ["job", "kind", "status", "progress", "message", "what", "host", "device", "attempts", "author",
               "sweep", "run", "created", "elapsed_s", "eta_s", "error"]


@st.cache_data(ttl=1, show_spinner=False)
def jobs(db_url: str, limit: int = 200) -> pd.DataFrame:
    records = []
    for job in queue.list_jobs(limit=limit, url=db_url):
        elapsed = None
        if job.started_at is not None:
            end = job.finished_at or (job.heartbeat_at if job.status == "running" else None)
            elapsed = (end - job.started_at).total_seconds() if end else None
        records.append({
            "job": job.id, "kind": job.kind, "status": job.status, "progress": job.progress, "message": job.message,
            "what": kinds.describe(job.kind, job.payload), "host": job.host, "device": job.device,
            "attempts": f"{job.attempts}/{job.max_attempts}", "author": job.author, "sweep": job.parent_id,
            "run": job.run_id, "created": job.created_at, "elapsed_s": elapsed,
            "eta_s": eta_seconds(job.status, job.progress, elapsed), "error": job.error,
        })
    return pd.DataFrame.from_records(records, columns=JOB_COLUMNS)


def eta_seconds(status: str, progress: float, elapsed: float | None) -> float | None:
    """Time left if the rest goes as fast as what is done; unknown before 2% or when not running."""
    if status != "running" or elapsed is None or progress < 0.02:
        return None
    return elapsed * (1.0 - progress) / progress


def submit_sweep(payload: dict, author: str | None = None, tags: str | list = ()) -> int:
    job_id = queue.submit("sweep", payload, author=author, tags=tags, url=url(), actor=auth.actor())
    jobs.clear()
    return job_id


def cancel_job(job_id: int) -> int:
    """Cancel; raises RanaError with a message for the user when the job cannot be cancelled."""
    count = queue.cancel(int(job_id), url=url(), actor=auth.actor())
    jobs.clear()
    return count


def retry_job(job_id: int) -> int:
    count = queue.retry(int(job_id), url=url(), actor=auth.actor())
    jobs.clear()
    return count


def submit_compress(payload: dict, author: str | None = None, tags: str | list = ()) -> int:
    """Enqueue; raises RanaError (shown to the user as one message) when the payload is invalid."""
    job_id = queue.submit("compress", payload, author=author, tags=tags, url=url(), actor=auth.actor())
    jobs.clear()
    return job_id


default_author = queue.default_author
method_label = specs.method_label  # what the Pareto plot colours by, and the sweep picker lists
model_names = specs.model_names
method_names = specs.method_names
method_summaries = specs.method_summaries
allocations = specs.allocations
default_options = specs.default_compress_options
MAX_FLOP_REDUCTION = specs.MAX_FLOP_REDUCTION
