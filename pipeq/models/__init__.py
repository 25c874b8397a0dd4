"""pipeq's SQL tables (SQLAlchemy 2.x). Every query of them lives in ``pipeq.store``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pipeq.primitives import utcnow

#: Constraint names fixed so Alembic migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: 64-bit ids on PostgreSQL; SQLite only autoincrements a plain INTEGER primary key.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON}


class Job(Base):
    """One submitted job: what to run, its parameters, and running counts."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(1024))
    revision: Mapped[str | None] = mapped_column(String(255))
    precision: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str | None] = mapped_column(String(1024))
    total: Mapped[int] = mapped_column(Integer, default=0)
    #: Counts kept on the job's row: cancelled items, and stores written before ``job_counts``; a job's
    #: progress adds its writers' rows (``pipeq.store.counts``).
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_cancelled: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Last time the job was stored (committed) or the reconciler queued its items again (workers' claims
    #: and writes are in their ``job_counts`` rows; ``pipeq.store.counts.LAST_ACTIVITY`` takes the latest).
    activity_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Times the reconciler queued the job's pending items again.
    requeues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Items published so far (in run order); the rest wait for the job's window to move.
    publish_cursor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The window's cursor in run order: items with a smaller ``order_key`` have been published
    #: (``publish_cursor`` counts them).
    publish_key: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: Items per message for this job.
    chunk_size: Mapped[int] = mapped_column(Integer, default=256, server_default="256")
    #: Opt-in: reuse outputs stored for the same input, model revision, precision and parameters.
    use_cache: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    cache_hits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: What running a sample through fp32 as well showed (``--shadow-fraction``).
    shadow: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The model revision the job runs on: that of the first worker that claimed from it (a hub commit, or a
    #: local folder's ``local-`` hash of its files); a worker with another one does not run its items.
    resolved_revision: Mapped[str | None] = mapped_column(String(255))


class JobCount(Base):
    """Items one writer moved to a final state, per job: a job's progress is its row's counts plus the sum
    of these. Each worker adds to its own row, so workers writing results never wait on one another's
    lock (a counter on the job's row would serialize every write of the fleet)."""

    __tablename__ = "job_counts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    #: The writing worker's id ("" for a writer without one).
    slot: Mapped[str] = mapped_column(String(32), primary_key=True)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_cancelled: Mapped[int] = mapped_column(Integer, default=0)
    #: The writer's last claim or write for the job (the reconciler's sign of life).
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Item(Base):
    """One input of a job: the input itself (so a job can be re-driven), and its result."""

    __tablename__ = "items"
    #: A job's items by their own id (those that have one): how submit finds a duplicate id in the database.
    __table_args__ = (
        Index(
            "ix_items_job_id_input_id",
            "job_id",
            "input_id",
            postgresql_where=text("input_id IS NOT NULL"),
            sqlite_where=text("input_id IS NOT NULL"),
        ),
        #: A job's items in run order (``pipeq.ordering``): how the publish window walks a job a slice at a time.
        Index("ix_items_job_id_order_key", "job_id", "order_key"),
    )

    #: The item's job. No foreign key: its check looked up the job's row for every item stored, about 30% of
    #: the server's time to store a job; the job's row is written first and deleted with its items
    #: (``Store.delete_job``).
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    input_id: Mapped[str | None] = mapped_column(String(255))
    input: Mapped[Any] = mapped_column(JSON)
    #: Where the item runs in its job: longest first, then input order (``pipeq.ordering.order_key``).
    order_key: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    output: Mapped[Any | None] = mapped_column(JSON)
    #: A pooled embedding (``pipeq.vectors``: a 4-byte type header, then the values little-endian); its
    #: ``output`` is then NULL.
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    truncated: Mapped[bool | None] = mapped_column(Boolean)
    n_tokens: Mapped[int | None] = mapped_column(Integer)
    #: The ``batches`` row of the micro-batch that wrote the result. No foreign key: its check ran a lookup in
    #: ``batches`` for every item a result write updated, a fifth of the write's time on the server, and the
    #: write inserts that row in the same statement (readers join it with an outer join).
    batch_id: Mapped[int | None] = mapped_column(BigId)
    #: True when the output came from the result cache instead of the model.
    cached: Mapped[bool | None] = mapped_column(Boolean)
    #: A generated item's timing (``pipeq.generation``; NULL for every other item): milliseconds from it entering
    #: the engine to its first new token, then from that token to its last, and the tokens it generated
    #: (``n_tokens`` counts its prompt).
    first_token_ms: Mapped[float | None] = mapped_column(Float)
    decode_ms: Mapped[float | None] = mapped_column(Float)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    """Timing of one micro-batch: one forward pass and the stages around it."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_job_id", "job_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    worker_id: Mapped[str | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    size: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    real_tokens: Mapped[int] = mapped_column(Integer)
    padded_tokens: Mapped[int] = mapped_column(Integer)
    queue_wait_ms: Mapped[float] = mapped_column(Float)
    preprocess_ms: Mapped[float] = mapped_column(Float)
    forward_ms: Mapped[float] = mapped_column(Float)
    postprocess_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    model_revision: Mapped[str | None] = mapped_column(String(255))
    precision: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Worker(Base):
    """One worker process with its loaded pipeline; alive while its heartbeat is fresh."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(255), index=True)
    task: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(1024))
    revision: Mapped[str | None] = mapped_column(String(255))
    resolved_revision: Mapped[str | None] = mapped_column(String(255))
    precision: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    footprint_bytes: Mapped[int | None] = mapped_column(BigInteger)
    load_seconds: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    quantization: Mapped[str | None] = mapped_column(String(64))
    #: The job whose chunk the worker is running now (None when idle).
    current_job: Mapped[str | None] = mapped_column(String(32))
    #: Its claim on the items of the message it runs or ran last: {"job", "idxs", "slice_end"}, written
    #: with the claim; when its heartbeat stops, a live worker queues the still-pending ones again.
    lease: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    items_done: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: Seconds spent running chunks, and the part of it spent writing results to SQL.
    busy_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    write_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    #: How ``--precision auto`` chose (None for a worker started with a fixed precision): items/s and
    #: agreement with fp32 per precision, those refused and why, the thresholds, and a one-line summary.
    precision_choice: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ResultCache(Base):
    """An output stored for reuse, keyed by a hash of (task, model, revision, precision, parameters, input)."""

    __tablename__ = "result_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(1024))
    revision: Mapped[str | None] = mapped_column(String(255))
    precision: Mapped[str] = mapped_column(String(16))
    output: Mapped[Any | None] = mapped_column(JSON)
    #: A pooled embedding, stored as in ``items.vector`` (``output`` is then NULL).
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    hits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Calibration(Base):
    """The fastest token budget ``pipeq worker --calibrate`` measured for a model on a device."""

    __tablename__ = "calibrations"
    __table_args__ = (Index("ix_calibrations_task_precision_device", "task", "precision", "device"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(1024))
    revision: Mapped[str | None] = mapped_column(String(255))
    precision: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(32))
    #: The CPU's model name or the CUDA device's name: a budget is only reused on the same hardware.
    device_name: Mapped[str] = mapped_column(String(255))
    max_batch_tokens: Mapped[int] = mapped_column(Integer)
    items_per_s: Mapped[float] = mapped_column(Float)
    #: Items/s per token budget tried, keyed by the budget.
    sweep: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


__all__ = ["Base", "Batch", "Calibration", "Item", "Job", "ResultCache", "Worker", "utcnow"]
