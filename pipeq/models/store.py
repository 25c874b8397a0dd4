"""The store's queries: the SQL database is pipeq's source of truth."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from pipeq import cache
from pipeq import constants as C
from pipeq.errors import JobNotFoundError, StoreError
from pipeq.models import Batch, Calibration, Item, Job, Worker, utcnow
from pipeq.routing import ServeKey
from pipeq.settings import mask_url

log = logging.getLogger(__name__)

_items: Table = Item.__table__  # type: ignore[assignment]
_jobs: Table = Job.__table__  # type: ignore[assignment]
_batches: Table = Batch.__table__  # type: ignore[assignment]
_workers: Table = Worker.__table__  # type: ignore[assignment]
_calibrations: Table = Calibration.__table__  # type: ignore[assignment]
#: A job's last sign of life for the reconciler: a worker's claim or write, a requeue, or the commit that
#: stored it (``published_at`` and ``created_at`` only for rows written before commits set ``activity_at``).
_LAST_ACTIVITY = func.coalesce(_jobs.c.activity_at, _jobs.c.published_at, _jobs.c.created_at)
#: Execution option marking a connection that writes (SQLite: BEGIN IMMEDIATE).
_WRITE = "pipeq_write"
#: Columns a new item is inserted with (the rest start NULL).
_ITEM_COLUMNS = "job_id, idx, input_id, input, status, attempts"


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; pipeq writes UTC, so read them as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def is_transient(exc: BaseException) -> bool:
    """Whether a store error means "unreachable or busy, try again" rather than "this write is wrong"."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def new_job_row(
    job_id: str,
    key: ServeKey,
    *,
    params: dict[str, Any] | None = None,
    priority: int = 0,
    source: str | None = None,
    use_cache: bool = False,
    chunk_size: int = C.DEFAULT_CHUNK_SIZE,
) -> dict[str, Any]:
    """The ``jobs`` row of a job about to be stored (what ``Store.create_job`` takes).

    ``chunk_size`` is the most items per message; publishing the job's window sets the size it uses.
    """
    return {
        "id": job_id,
        "task": key.task,
        "model": key.model,
        "revision": key.revision,
        "precision": key.precision,
        "queue": key.queue,
        "params": dict(params or {}),
        "status": C.JOB_QUEUED,
        "priority": priority,
        "source": source,
        "use_cache": use_cache,
        "chunk_size": chunk_size,
    }


def make_engine(url: str) -> Engine:
    """Create an engine tuned for pipeq's write pattern on SQLite or PostgreSQL."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, say when transactions begin (so BEGIN IMMEDIATE works);
            # WAL lets readers (status, results) run while a worker writes.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writes take the write lock up front: two workers' read-then-write transactions
            # serialize instead of failing with "database is locked" on upgrade. Reads (status,
            # results, reports) take no lock, so they never hold up a worker's writes.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item, as a worker hands it to the store."""

    idx: int
    status: str
    output: Any = None
    error: str | None = None
    truncated: bool | None = None
    n_tokens: int | None = None
    #: True when the output was read from the result cache instead of computed.
    cached: bool | None = None


@dataclass
class BatchTiming:
    """Timing metadata of one micro-batch (milliseconds)."""

    size: int
    rows: int
    real_tokens: int
    padded_tokens: int
    queue_wait_ms: float
    preprocess_ms: float
    forward_ms: float
    postprocess_ms: float
    total_ms: float
    started_at: datetime
    finished_at: datetime


@dataclass(frozen=True)
class WriteOutcome:
    """How many items one write moved to each final state (0 for a redelivered duplicate)."""

    done: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0


@dataclass
class JobProgress:
    """A job's row and counts, as status, wait and the progress bar show them."""

    id: str
    task: str
    model: str
    precision: str
    status: str
    total: int
    done: int
    failed: int
    cancelled: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: Items whose output came from the result cache.
    cache_hits: int = 0
    #: What ``--shadow-fraction`` measured (see ``pipeq.worker.shadow``), None without a shadow check.
    shadow: dict[str, Any] | None = None

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def pending(self) -> int:
        return self.total - self.finished

    @property
    def is_final(self) -> bool:
        return self.status in C.JOB_FINAL_STATES

    def elapsed(self, now: datetime | None = None) -> float:
        start = self.started_at or self.created_at
        end = self.finished_at or now or utcnow()
        return max((end - start).total_seconds(), 0.0)

    @property
    def rate(self) -> float:
        """Items finished per second since the first worker started on the job."""
        elapsed = self.elapsed()
        return self.finished / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if self.is_final:
            return 0.0
        return self.pending / rate if rate > 0 else None


def _job_progress(row: Any) -> JobProgress:
    """A ``jobs`` row as JobProgress."""
    return JobProgress(
        id=row["id"],
        task=row["task"],
        model=row["model"],
        precision=row["precision"],
        status=row["status"],
        total=row["total"],
        done=row["n_done"],
        failed=row["n_failed"],
        cancelled=row["n_cancelled"],
        created_at=as_utc(row["created_at"]) or utcnow(),
        started_at=as_utc(row["started_at"]),
        finished_at=as_utc(row["finished_at"]),
        error=row["error"],
        params=row["params"] or {},
        cache_hits=row["cache_hits"],
        shadow=row["shadow"],
    )


class Store:
    """All of pipeq's reads and writes of the SQL store."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        #: The same engine and pool, for transactions that write (``with store.writer.begin()``).
        self.writer = self.engine.execution_options(**{_WRITE: True})
        self._is_pg = self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    def check_schema(self) -> None:
        """Raise StoreError unless the store is reachable and migrated."""
        try:
            with self.engine.connect() as conn:
                tables = set(inspect(conn).get_table_names())
        except OperationalError as exc:
            raise StoreError(f"cannot reach the store {mask_url(self.url)}: {exc.orig}") from None
        missing = {"jobs", "items", "batches", "workers", "calibrations"} - tables
        if missing:
            raise StoreError(
                f"the store {mask_url(self.url)} has no pipeq schema (missing {', '.join(sorted(missing))}); "
                f"run `pipeq db upgrade` first"
            )

    # ----------------------------------------------------------------- jobs

    def create_job(self, job: dict[str, Any], items: Iterable[Sequence[dict[str, Any]]]) -> int:
        """Insert a job and all its items in one transaction; returns the item count.

        ``items`` yields lists of rows; an exception while it is consumed (bad input) rolls
        back everything, so a rejected submission leaves nothing behind. The commit counts as the
        job's activity: the reconciler leaves a job alone while its producer may still be publishing it.
        """
        total = 0
        with self.writer.begin() as conn:
            conn.execute(insert(_jobs), [{**job, "total": 0}])
            for rows in items:
                if rows:
                    self._insert_items(conn, rows)
                    total += len(rows)
            conn.execute(update(_jobs).where(_jobs.c.id == job["id"]).values(total=total, activity_at=utcnow()))
        return total

    def _insert_items(self, conn: Any, rows: Sequence[dict[str, Any]]) -> None:
        """Bulk-insert new items: COPY on PostgreSQL, a plain executemany on SQLite.

        Submission is bound by this insert, so it bypasses per-row ORM/Core processing; the
        input is JSON-encoded here exactly as the JSON column would encode it.
        """
        tuples = [
            (r["job_id"], r["idx"], r["input_id"], json.dumps(r["input"], ensure_ascii=False), C.ITEM_PENDING, 0)
            for r in rows
        ]
        if self._is_pg:
            cursor = conn.connection.dbapi_connection.cursor()
            with cursor.copy(f"COPY items ({_ITEM_COLUMNS}) FROM STDIN") as copy:
                for row in tuples:
                    copy.write_row(row)
            cursor.close()
        else:
            conn.exec_driver_sql(f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", tuples)

    def mark_published(self, job_id: str) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(published_at=utcnow()))

    def set_job_error(self, job_id: str, error: str) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(error=error))

    def job(self, job_id: str) -> JobProgress:
        """Return a job's progress, or raise JobNotFoundError."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r} in the store")
        return _job_progress(row)

    def job_row(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).mappings().first()
        return dict(row) if row else None

    def job_status(self, job_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(_jobs.c.status).where(_jobs.c.id == job_id)).scalar_one_or_none()

    def recent_jobs(self, limit: int = 20, status: str | None = None) -> list[JobProgress]:
        """The newest ``limit`` jobs, newest first, optionally only those in ``status``."""
        q = select(_jobs).order_by(_jobs.c.created_at.desc(), _jobs.c.id).limit(limit)
        if status is not None:
            q = q.where(_jobs.c.status == status)
        with self.engine.connect() as conn:
            return [_job_progress(row) for row in conn.execute(q).mappings()]

    def cancel_job(self, job_id: str) -> int:
        """Cancel a job's pending items (finished results are kept); returns how many."""
        now = utcnow()
        with self.writer.begin() as conn:
            q = select(_jobs.c.status).where(_jobs.c.id == job_id)
            status = conn.execute(q.with_for_update() if self._is_pg else q).scalar_one_or_none()
            if status is None:
                raise JobNotFoundError(f"no job {job_id!r} in the store")
            if status in C.JOB_FINAL_STATES:
                return 0
            n = conn.execute(
                update(_items)
                .where(_items.c.job_id == job_id, _items.c.status == C.ITEM_PENDING)
                .values(status=C.ITEM_CANCELLED, finished_at=now)
            ).rowcount
            conn.execute(
                update(_jobs)
                .where(_jobs.c.id == job_id)
                .values(status=C.JOB_CANCELLED, n_cancelled=_jobs.c.n_cancelled + n, finished_at=now)
            )
        return int(n)

    # ---------------------------------------------------------------- items

    def claim(self, job_id: str, idxs: Sequence[int]) -> dict[int, int]:
        """Start a delivery of ``idxs``: returns {idx: attempts before it} for the items still pending.

        Items never tried get their first attempt counted here. Items tried before (a redelivered
        message) are left as they are: the worker runs them one at a time and counts each attempt
        as it starts (``start_attempt``), so an input that kills the process uses up only its own
        attempts. Finished items are left out, so they never run twice.
        """
        now = utcnow()
        with self.writer.begin() as conn:
            q = select(_items.c.idx, _items.c.attempts).where(
                _items.c.job_id == job_id, _items.c.idx.in_(idxs), _items.c.status == C.ITEM_PENDING
            )
            rows = conn.execute(q.with_for_update() if self._is_pg else q).all()
            conn.execute(
                update(_items)
                .where(
                    _items.c.job_id == job_id,
                    _items.c.idx.in_(idxs),
                    _items.c.status == C.ITEM_PENDING,
                    _items.c.attempts == 0,
                )
                .values(attempts=1)
            )
            conn.execute(
                update(_jobs)
                .where(_jobs.c.id == job_id)
                .values(
                    activity_at=now,
                    started_at=func.coalesce(_jobs.c.started_at, now),
                    status=case((_jobs.c.status == C.JOB_QUEUED, C.JOB_RUNNING), else_=_jobs.c.status),
                )
            )
        return {int(idx): int(attempts) for idx, attempts in rows}

    def start_attempt(self, job_id: str, idx: int) -> int | None:
        """Count one more attempt on a pending item about to run alone; None when it is no longer pending."""
        with self.writer.begin() as conn:
            conn.execute(
                update(_items)
                .where(_items.c.job_id == job_id, _items.c.idx == idx, _items.c.status == C.ITEM_PENDING)
                .values(attempts=_items.c.attempts + 1)
            )
            return conn.execute(
                select(_items.c.attempts).where(
                    _items.c.job_id == job_id, _items.c.idx == idx, _items.c.status == C.ITEM_PENDING
                )
            ).scalar_one_or_none()

    def release(self, job_id: str, idxs: Sequence[int]) -> None:
        """Take back the attempt counted on pending items that were claimed but never ran (a stopping worker)."""
        if not idxs:
            return
        with self.writer.begin() as conn:
            conn.execute(
                update(_items)
                .where(
                    _items.c.job_id == job_id,
                    _items.c.idx.in_(idxs),
                    _items.c.status == C.ITEM_PENDING,
                    _items.c.attempts > 0,
                )
                .values(attempts=_items.c.attempts - 1)
            )

    def attempts(self, job_id: str, idxs: Sequence[int]) -> dict[int, int]:
        """{idx: attempts} of the pending items among ``idxs``, counting no new attempt."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_items.c.idx, _items.c.attempts).where(
                    _items.c.job_id == job_id, _items.c.idx.in_(idxs), _items.c.status == C.ITEM_PENDING
                )
            ).all()
        return {int(idx): int(attempts) for idx, attempts in rows}

    def record_batch(
        self,
        job_id: str,
        results: Sequence[ItemResult],
        timing: BatchTiming | None,
        *,
        worker_id: str | None,
        model_revision: str | None,
        precision: str,
        device: str,
        cache_scope: cache.CacheScope | None = None,
    ) -> WriteOutcome:
        """Store a micro-batch's results and timing in one transaction, exactly once.

        Only items still pending are written (guarded by status, and locked on PostgreSQL), so a
        redelivered message can neither duplicate a result nor overwrite a finished one. With a
        ``cache_scope`` (a use_cache job), computed outputs go into the result cache and cached ones count as hits.
        """
        if not results:
            return WriteOutcome()
        now = utcnow()
        idxs = [r.idx for r in results]
        with self.writer.begin() as conn:
            q = select(_items.c.idx).where(
                _items.c.job_id == job_id, _items.c.idx.in_(idxs), _items.c.status == C.ITEM_PENDING
            )
            pending = set(conn.scalars(q.with_for_update() if self._is_pg else q))
            todo = [r for r in results if r.idx in pending]
            if not todo:
                return WriteOutcome(skipped=len(results))
            batch_id = None
            if timing is not None:
                batch_id = conn.execute(
                    insert(_batches).values(
                        job_id=job_id,
                        worker_id=worker_id,
                        model_revision=model_revision,
                        precision=precision,
                        device=device,
                        **vars(timing),
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            conn.execute(
                update(_items)
                .where(
                    _items.c.job_id == job_id,
                    _items.c.idx == bindparam("b_idx"),
                    _items.c.status == C.ITEM_PENDING,
                )
                .values(
                    status=bindparam("b_status"),
                    output=bindparam("b_output", type_=_items.c.output.type),
                    error=bindparam("b_error"),
                    truncated=bindparam("b_truncated"),
                    n_tokens=bindparam("b_tokens"),
                    cached=bindparam("b_cached"),
                    batch_id=batch_id,
                    finished_at=now,
                ),
                [
                    {
                        "b_idx": r.idx,
                        "b_status": r.status,
                        "b_output": r.output,
                        "b_error": r.error,
                        "b_truncated": r.truncated,
                        "b_tokens": r.n_tokens,
                        "b_cached": r.cached,
                    }
                    for r in todo
                ],
            )
            done = sum(r.status == C.ITEM_DONE for r in todo)
            failed = sum(r.status == C.ITEM_FAILED for r in todo)
            cancelled = sum(r.status == C.ITEM_CANCELLED for r in todo)
            self._count(conn, job_id, done=done, failed=failed, cancelled=cancelled, now=now)
            if cache_scope is not None:
                cache.record(conn, job_id, cache_scope, todo)
        return WriteOutcome(done=done, failed=failed, cancelled=cancelled, skipped=len(results) - len(todo))

    def _count(self, conn: Any, job_id: str, *, done: int, failed: int, cancelled: int, now: datetime) -> None:
        conn.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id)
            .values(
                n_done=_jobs.c.n_done + done,
                n_failed=_jobs.c.n_failed + failed,
                n_cancelled=_jobs.c.n_cancelled + cancelled,
                started_at=func.coalesce(_jobs.c.started_at, now),
                activity_at=now,
                status=case((_jobs.c.status == C.JOB_QUEUED, C.JOB_RUNNING), else_=_jobs.c.status),
            )
        )
        conn.execute(
            update(_jobs)
            .where(
                _jobs.c.id == job_id,
                _jobs.c.status.in_([C.JOB_QUEUED, C.JOB_RUNNING]),
                _jobs.c.n_done + _jobs.c.n_failed + _jobs.c.n_cancelled >= _jobs.c.total,
            )
            .values(status=C.JOB_DONE, finished_at=now)
        )

    def iter_results(self, job_id: str, *, page: int = 2000) -> Iterator[dict[str, Any]]:
        """Yield a job's items in input order with their batch timing, a page at a time."""
        cols = [
            _items.c.idx,
            _items.c.input_id,
            _items.c.status,
            _items.c.output,
            _items.c.error,
            _items.c.truncated,
            _items.c.n_tokens,
            _items.c.cached,
            _items.c.attempts,
            _items.c.finished_at,
            _items.c.batch_id,
            _batches.c.size.label("batch_size"),
            _batches.c.queue_wait_ms,
            _batches.c.preprocess_ms,
            _batches.c.forward_ms,
            _batches.c.postprocess_ms,
            _batches.c.total_ms,
            _batches.c.model_revision,
            _batches.c.worker_id,
        ]
        last = -1
        while True:
            with self.engine.connect() as conn:
                rows = (
                    conn.execute(
                        select(*cols)
                        .select_from(_items.outerjoin(_batches, _items.c.batch_id == _batches.c.id))
                        .where(_items.c.job_id == job_id, _items.c.idx > last)
                        .order_by(_items.c.idx)
                        .limit(page)
                    )
                    .mappings()
                    .all()
                )
            if not rows:
                return
            for row in rows:
                yield dict(row)
            last = rows[-1]["idx"]

    def iter_pending(
        self, job_id: str, *, page: int = 5000, start: int = 0, stop: int | None = None
    ) -> Iterator[list[tuple[int, Any]]]:
        """(idx, input) of a job's pending items with ``start <= idx < stop``, in input order, a page at a time."""
        last = start - 1
        while True:
            q = (
                select(_items.c.idx, _items.c.input)
                .where(_items.c.job_id == job_id, _items.c.status == C.ITEM_PENDING, _items.c.idx > last)
                .order_by(_items.c.idx)
                .limit(page)
            )
            if stop is not None:
                q = q.where(_items.c.idx < stop)
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            yield [(int(i), x) for i, x in rows]
            last = int(rows[-1][0])

    # ---------------------------------------------------- result cache, shadow

    def cache_get(self, keys: Sequence[str]) -> dict[str, Any]:
        """{key: output} of the result cache's entries among ``keys`` (one query)."""
        with self.engine.connect() as conn:
            return cache.lookup(conn, keys)

    def cache_put(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``result_cache`` rows; a key already stored keeps its row."""
        with self.writer.begin() as conn:
            cache.put(conn, rows)

    def update_shadow(self, job_id: str, merge: Callable[[dict[str, Any] | None], dict[str, Any]]) -> None:
        """Replace a job's shadow-check figures by ``merge(current figures)``, the job's row locked meanwhile."""
        with self.writer.begin() as conn:
            q = select(_jobs.c.shadow).where(_jobs.c.id == job_id)
            current = conn.execute(q.with_for_update() if self._is_pg else q).scalar_one_or_none()
            conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(shadow=merge(current)))

    # -------------------------------------------------------- publish window

    def open_window(self, job_id: str, *, cursor: int, chunk_size: int) -> None:
        """Record how far a new job's items are published, and its chunk size."""
        with self.writer.begin() as conn:
            conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(publish_cursor=cursor, chunk_size=chunk_size))

    def advance_window(self, job_id: str, step: int) -> tuple[int, int] | None:
        """Move an unfinished job's publish cursor ``step`` items on; returns the items' (start, stop) to publish."""
        with self.writer.begin() as conn:
            q = select(_jobs.c.publish_cursor, _jobs.c.total, _jobs.c.status).where(_jobs.c.id == job_id)
            row = conn.execute(q.with_for_update() if self._is_pg else q).first()
            if row is None or row.status in C.JOB_FINAL_STATES or row.publish_cursor >= row.total:
                return None
            stop = min(row.publish_cursor + step, row.total)
            conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(publish_cursor=stop))
        return int(row.publish_cursor), int(stop)

    # ------------------------------------------------------------ reconciler

    def stalled_jobs(self, stalled_after: float, queues: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Unfinished jobs with pending items and no activity for ``stalled_after`` seconds.

        A published job counts only on an idle queue, where no job made progress in that time: a
        job waiting behind a long one on a busy queue is not stalled, so nothing is queued twice
        while work flows. A job stored but never published (its producer died after the commit, or
        the broker refused it) is not on the broker at all, so it counts whatever its queue is doing.
        """
        cutoff = utcnow() - timedelta(seconds=stalled_after)
        active = [C.JOB_QUEUED, C.JOB_RUNNING]
        busy = select(_jobs.c.queue).where(_jobs.c.status.in_(active), _jobs.c.activity_at >= cutoff)
        q = select(_jobs).where(
            _jobs.c.status.in_(active),
            _jobs.c.n_done + _jobs.c.n_failed + _jobs.c.n_cancelled < _jobs.c.total,
            _LAST_ACTIVITY < cutoff,
            or_(_jobs.c.published_at.is_(None), _jobs.c.queue.not_in(busy)),
        )
        if queues is not None:
            q = q.where(_jobs.c.queue.in_(list(queues)))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(_jobs.c.created_at)).mappings()]

    def take_requeue(self, job_id: str, stalled_after: float) -> bool:
        """Atomically claim the right to queue a stalled job again (one reconciler wins; the next waits a period)."""
        now = utcnow()
        cutoff = now - timedelta(seconds=stalled_after)
        with self.writer.begin() as conn:
            n = conn.execute(
                update(_jobs)
                .where(
                    _jobs.c.id == job_id,
                    _jobs.c.status.in_([C.JOB_QUEUED, C.JOB_RUNNING]),
                    _LAST_ACTIVITY < cutoff,
                )
                .values(activity_at=now, requeues=_jobs.c.requeues + 1)
            ).rowcount
        return bool(n)

    # -------------------------------------------------------------- workers

    def register_worker(self, row: dict[str, Any]) -> None:
        now = utcnow()
        with self.writer.begin() as conn:
            conn.execute(insert(_workers), [{"started_at": now, "heartbeat_at": now, **row}])

    def update_worker(self, worker_id: str, **values: Any) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(_workers).where(_workers.c.id == worker_id).values(**values))

    def heartbeat(self, worker_id: str, *, current_job: str | None = None, **totals: float) -> None:
        """Fresh heartbeat, the job being run, and running totals (items_done, busy_seconds, write_seconds)."""
        self.update_worker(worker_id, heartbeat_at=utcnow(), current_job=current_job, **totals)

    def stale_workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Workers that never said they stopped but whose heartbeat is old (killed, host lost)."""
        since = utcnow() - timedelta(seconds=C.HEARTBEAT_STALE_AFTER)
        q = select(_workers).where(_workers.c.stopped_at.is_(None), _workers.c.heartbeat_at < since)
        if queue is not None:
            q = q.where(_workers.c.queue == queue)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(_workers.c.heartbeat_at.desc()).limit(100)).mappings()]

    def live_workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Workers whose heartbeat is fresh and that have not stopped."""
        since = utcnow() - timedelta(seconds=C.HEARTBEAT_STALE_AFTER)
        q = select(_workers).where(_workers.c.stopped_at.is_(None), _workers.c.heartbeat_at >= since)
        if queue is not None:
            q = q.where(_workers.c.queue == queue)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def served_custom_tasks(self) -> frozenset[str]:
        """Task names that live workers serve (custom pipeline tasks are only known through them)."""
        return frozenset(w["task"] for w in self.live_workers())

    # --------------------------------------------------------- calibrations

    def save_calibration(self, row: dict[str, Any]) -> None:
        """Store one ``--calibrate`` result (a ``calibrations`` row without id)."""
        with self.writer.begin() as conn:
            conn.execute(insert(_calibrations), [{"created_at": utcnow(), **row}])

    def latest_calibration(
        self, *, task: str, model: str, revision: str | None, precision: str, device: str, device_name: str
    ) -> dict[str, Any] | None:
        """The newest calibration of exactly this model, revision, precision and device, if any."""
        c = _calibrations.c
        q = (
            select(_calibrations)
            .where(
                c.task == task,
                c.model == model,
                c.revision.is_(None) if revision is None else c.revision == revision,
                c.precision == precision,
                c.device == device,
                c.device_name == device_name,
            )
            .order_by(c.created_at.desc(), c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        return None if row is None else {**row, "created_at": as_utc(row["created_at"])}
