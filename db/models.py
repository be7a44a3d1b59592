"""The schema: jobs (the queue and its single source of truth), runs, their evaluations and per-layer metrics.

A run is what one compression job produced (one model, method, budget and configuration); an evaluation is one
measurement of a run on one split and token count; layer metrics belong to the run's first evaluation; a recovery
is one LoRA fine-tune of a run (per-layer ranks, perplexity before and after).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # compress | sweep | evaluate | latency | recover (jobs.specs)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher runs first
    payload: Mapped[dict] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))  # "host:pid" of the claimant
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default="3")  # then the reaper fails it
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)  # the sweep a point belongs to
    host: Mapped[str | None] = mapped_column(String(200))  # the claimant's host name
    device: Mapped[str | None] = mapped_column(String(200))  # and the device it runs on ("cpu", "NVIDIA H100 …")
    author: Mapped[str | None] = mapped_column(String(100))
    tags: Mapped[list] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)

    run: Mapped["Run | None"] = relationship(back_populates="job", uselist=False)

    __table_args__ = (Index("ix_jobs_claim", "status", "priority", "id"),)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)  # one result per job
    model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    allocation: Mapped[str] = mapped_column(String(32))
    target_flop_reduction: Mapped[float] = mapped_column(Float)
    calib_tokens: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    config: Mapped[dict] = mapped_column(JSON)
    environment: Mapped[dict] = mapped_column(JSON, default=dict)
    author: Mapped[str | None] = mapped_column(String(100), index=True)
    tags: Mapped[list] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    provenance: Mapped[dict] = mapped_column(JSON, default=dict, server_default=text("'{}'"))  # git SHA, versions…
    artifact_path: Mapped[str | None] = mapped_column(Text)  # relative to the data directory
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    # What the compressed model costs: {"params", "kv_bytes_per_token", "flops_per_token", …} (rana_core.pipeline)
    model_stats: Mapped[dict] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    # what the model says (rana_core.probes): {"adapted": {"replies", "chat_accuracy"}, "dense": …}; None if not asked
    probes: Mapped[dict | None] = mapped_column(JSON)
    # the text behind the numbers (rana_core.corpora): {"calibration": {"name", "split", "digest", "documents"},
    # "evaluation": …}; None for runs from before corpora could be chosen, which used Brown
    corpora: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())

    job: Mapped[Job | None] = relationship(back_populates="run")
    evaluations: Mapped[list["Evaluation"]] = relationship(back_populates="run", cascade="all, delete-orphan")
    layers: Mapped[list["LayerMetric"]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)  # the evaluate job, if any
    split: Mapped[str] = mapped_column(String(32))
    tokens: Mapped[int] = mapped_column(Integer)
    seq_len: Mapped[int] = mapped_column(Integer)
    perplexity: Mapped[float] = mapped_column(Float)
    dense_perplexity: Mapped[float] = mapped_column(Float)
    measured_flop_reduction: Mapped[float] = mapped_column(Float)
    measured_flop_reduction_whole_model: Mapped[float] = mapped_column(Float)
    # accuracy on tasks: {"adapted": lm-eval results JSON, "dense": …}; None when none were asked for
    tasks: Mapped[dict | None] = mapped_column(JSON)
    corpus: Mapped[dict | None] = mapped_column(JSON)  # the evaluated text's record; None: Brown (older rows)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())

    run: Mapped[Run] = relationship(back_populates="evaluations")


class LatencyResult(Base):
    """One decode-latency measurement: an engine, a model (a stored run's, or a synthetic shape), a budget and a
    context length on one device."""

    __tablename__ = "latency_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)  # None: synthetic
    layers: Mapped[list | None] = mapped_column(JSON)  # per layer: FLOP shares kept, section times (ms)
    model: Mapped[str] = mapped_column(String(200))  # a model name or a shape name such as "llama2-7b-shape"
    device_name: Mapped[str] = mapped_column(String(200))
    dtype: Mapped[str] = mapped_column(String(16))
    engine: Mapped[str] = mapped_column(String(32))  # e.g. "graphs" (static cache + CUDA graphs) or "hf-eager"
    flop_reduction: Mapped[float] = mapped_column(Float)  # target; 0 is dense
    measured_flop_reduction: Mapped[float | None] = mapped_column(Float)
    context_tokens: Mapped[int] = mapped_column(Integer)
    new_tokens: Mapped[int] = mapped_column(Integer)
    ms_per_token: Mapped[float] = mapped_column(Float)  # median
    dense_ms_per_token: Mapped[float | None] = mapped_column(Float)  # same engine, same device
    shapes: Mapped[dict] = mapped_column(JSON, default=dict)  # hidden, intermediate, layers, heads…
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())

    __table_args__ = (UniqueConstraint("job_id", "model", "engine", "flop_reduction", "context_tokens"),)


class LayerMetric(Base):
    __tablename__ = "layer_metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    module: Mapped[str] = mapped_column(String(16))  # qkv | gate | up | down
    adapter: Mapped[str | None] = mapped_column(String(16))  # dense | svd | rank | neuron | cats
    rank: Mapped[int] = mapped_column(Integer)
    max_rank: Mapped[int] = mapped_column(Integer)
    density: Mapped[float] = mapped_column(Float)
    recon_error: Mapped[float | None] = mapped_column(Float)
    sparsity: Mapped[float | None] = mapped_column(Float)  # share of ranks carrying 90% of ‖z‖², per token
    sparsity_curve: Mapped[list | None] = mapped_column(JSON)  # the same at 50, 70, 80, 90, 95, 99% of ‖z‖²
    flops_per_token: Mapped[float] = mapped_column(Float)
    dense_flops_per_token: Mapped[float] = mapped_column(Float)
    # the keep fraction (FLOPs / dense) the allocation chose for the module group this row belongs to (its QKV,
    # or its whole MLP for gate/up/down); None where the method plans none per module
    planned_keep: Mapped[float | None] = mapped_column(Float)

    run: Mapped[Run] = relationship(back_populates="layers")

    __table_args__ = (UniqueConstraint("run_id", "layer", "module"),)


class Recovery(Base):
    """One LoRA recovery of a run (rana_core.recovery.recover): the per-layer ranks chosen by a strategy, perplexity before
    and after on held-out text, the FLOP reduction measured after, and the search that chose the ranks."""

    __tablename__ = "recoveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)  # the recover job, if any
    strategy: Mapped[str] = mapped_column(String(32))  # uniform | error | rankadaptor
    ranks: Mapped[list] = mapped_column(JSON)  # LoRA rank per layer
    trainable_params: Mapped[int] = mapped_column(Integer)
    train_tokens: Mapped[int] = mapped_column(Integer)  # of the final fine-tune (the search's are in `details`)
    eval_tokens: Mapped[int] = mapped_column(Integer)
    perplexity_before: Mapped[float] = mapped_column(Float)
    perplexity_after: Mapped[float] = mapped_column(Float)
    dense_perplexity: Mapped[float] = mapped_column(Float)
    measured_flop_reduction_after: Mapped[float] = mapped_column(Float)  # LoRA merged where it can be
    search_history: Mapped[list] = mapped_column(JSON, default=list)  # {round, ranks, predicted, spread, measured}
    details: Mapped[dict] = mapped_column(JSON, default=dict)  # the rest of RecoveryResult: config, errors, losses
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


USER_ROLES = ("viewer", "runner", "admin")  # read everything; also queue runs and manage own jobs; everything


class User(Base):
    """An account of team mode (jobs.accounts): a name, an Argon2 hash of its password, a role."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
