"""Jobs: storing one with its items, its progress, cancelling, its publish window, the reconciler's view."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import OperationalError

from pipeq import constants as C
from pipeq.errors import DuplicateIdError, JobNotFoundError
from pipeq.primitives import JobProgress, utcnow
from pipeq.routing import ServeKey
from pipeq.store.base import ITEMS, JOBS, StoreBase
from pipeq.store.counts import CANCELLED, COUNTED, DONE, FAILED, LAST_ACTIVITY
from pipeq.store.engine import as_utc

log = logging.getLogger(__name__)

#: A job's row with its counts summed over its writers' rows (``counts``), under the row's own column names.
_JOB = select(
    *(c for c in JOBS.c if c.name not in ("n_done", "n_failed", "n_cancelled")),
    DONE.label("n_done"),
    FAILED.label("n_failed"),
    CANCELLED.label("n_cancelled"),
)
#: Columns a new item is inserted with (the rest start NULL).
_ITEM_COLUMNS = "job_id, idx, input_id, input, status, attempts"

_LATER, _EARLIER = ITEMS.alias("later"), ITEMS.alias("earlier")
#: The first item of a job's index range ``[lo, hi)`` whose id an earlier item of the job has, with the
#: earliest such item: one probe of ``ix_items_job_id_input_id`` per item of the range.
_FIRST_DUPLICATE = (
    select(_LATER.c.idx, _LATER.c.input_id, func.min(_EARLIER.c.idx).label("first"))
    .select_from(_LATER)
    .join(
        _EARLIER,
        and_(
            _EARLIER.c.job_id == _LATER.c.job_id,
            _EARLIER.c.input_id == _LATER.c.input_id,
            _EARLIER.c.input_id.is_not(None),
            _EARLIER.c.idx < _LATER.c.idx,
        ),
    )
    .where(
        _LATER.c.job_id == bindparam("job"),
        _LATER.c.idx >= bindparam("lo"),
        _LATER.c.idx < bindparam("hi"),
        _LATER.c.input_id.is_not(None),
    )
    .group_by(_LATER.c.idx, _LATER.c.input_id)
    .order_by(_LATER.c.idx)
    .limit(1)
)


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
        published=row["published_at"] is not None,
    )


class JobQueries(StoreBase):
    """A job's row: create, read, cancel, shadow figures, publish window, reconciler."""

    def create_job(
        self, job: dict[str, Any], items: Iterable[Sequence[dict[str, Any]]], *, unique_ids: bool = False
    ) -> int:
        """Insert a job and all its items in one transaction; returns the item count.

        ``items`` yields lists of rows in index order; an exception while it is consumed (bad input)
        rolls back everything, so a rejected submission leaves nothing behind. With ``unique_ids``,
        two items with the same ``input_id`` raise DuplicateIdError (naming the first such pair) and
        store nothing: the database finds them, page by page, through the items' id index, so no set
        of a large job's ids is held in memory. The commit counts as the job's activity: the reconciler
        leaves a job alone while its producer may still be publishing it.
        """
        total = 0
        with self.writer.begin() as conn:
            conn.execute(insert(JOBS), [{**job, "total": 0}])
            for rows in items:
                if rows:
                    self._insert_items(conn, rows)
                    if unique_ids and any(r["input_id"] is not None for r in rows):
                        self._refuse_duplicates(conn, job["id"], rows[0]["idx"], rows[-1]["idx"] + 1)
                    total += len(rows)
            conn.execute(update(JOBS).where(JOBS.c.id == job["id"]).values(total=total, activity_at=utcnow()))
        if self._is_pg and total >= C.ANALYZE_AFTER_ITEMS:
            self._analyze_items()
        return total

    def _analyze_items(self) -> None:
        """Refresh PostgreSQL's statistics of ``items`` after a large job was stored.

        Until autovacuum next analyzes the table (after a tenth of it changed, so perhaps never for a job
        small beside the table), the planner takes a new job for a few rows, and reads all of it for each
        claim and result write instead of the rows they name: on a 64,000-item job 10-16 ms a statement
        instead of 0.5. ANALYZE samples a bounded number of rows; it gives up after a short lock wait
        (autovacuum is on the table) and is skipped with a warning where the role does not own the table.
        """
        try:
            with self.writer.begin() as conn:
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {C.ANALYZE_LOCK_TIMEOUT_MS}")
                conn.exec_driver_sql("ANALYZE items")
        except OperationalError as exc:
            log.info("left the statistics of items to autovacuum: %s", exc.orig)

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

    def _refuse_duplicates(self, conn: Any, job_id: str, lo: int, hi: int) -> None:
        """Raise DuplicateIdError if an item of ``[lo, hi)`` has the id of an earlier item of the job."""
        found = conn.execute(_FIRST_DUPLICATE, {"job": job_id, "lo": lo, "hi": hi}).first()
        if found is not None:
            raise DuplicateIdError(found.input_id, int(found.first), int(found.idx))

    def mark_published(self, job_id: str) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(published_at=utcnow()))

    def set_job_error(self, job_id: str, error: str) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(error=error))

    def job(self, job_id: str) -> JobProgress:
        """Return a job's progress, or raise JobNotFoundError."""
        with self.engine.connect() as conn:
            row = conn.execute(_JOB.where(JOBS.c.id == job_id)).mappings().first()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r} in the store")
        return _job_progress(row)

    def job_row(self, job_id: str) -> dict[str, Any] | None:
        """A job's row as a dict (its counts summed over its writers), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(_JOB.where(JOBS.c.id == job_id)).mappings().first()
        return dict(row) if row else None

    def job_status(self, job_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(JOBS.c.status).where(JOBS.c.id == job_id)).scalar_one_or_none()

    def recent_jobs(self, limit: int = 20, status: str | None = None) -> list[JobProgress]:
        """The newest ``limit`` jobs, newest first, optionally only those in ``status``."""
        q = _JOB.order_by(JOBS.c.created_at.desc(), JOBS.c.id).limit(limit)
        if status is not None:
            q = q.where(JOBS.c.status == status)
        with self.engine.connect() as conn:
            return [_job_progress(row) for row in conn.execute(q).mappings()]

    def cancel_job(self, job_id: str) -> int:
        """Cancel a job's pending items (finished results are kept); returns how many."""
        now = utcnow()
        with self.writer.begin() as conn:
            q = select(JOBS.c.status).where(JOBS.c.id == job_id)
            status = conn.execute(self.locked(q)).scalar_one_or_none()
            if status is None:
                raise JobNotFoundError(f"no job {job_id!r} in the store")
            if status in C.JOB_FINAL_STATES:
                return 0
            n = conn.execute(
                update(ITEMS)
                .where(ITEMS.c.job_id == job_id, ITEMS.c.status == C.ITEM_PENDING)
                .values(status=C.ITEM_CANCELLED, finished_at=now)
            ).rowcount
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id)
                .values(status=C.JOB_CANCELLED, n_cancelled=JOBS.c.n_cancelled + n, finished_at=now)
            )
        return int(n)

    def update_shadow(self, job_id: str, merge: Callable[[dict[str, Any] | None], dict[str, Any]]) -> None:
        """Replace a job's shadow-check figures by ``merge(current figures)``, the job's row locked meanwhile."""
        with self.writer.begin() as conn:
            q = select(JOBS.c.shadow).where(JOBS.c.id == job_id)
            current = conn.execute(self.locked(q)).scalar_one_or_none()
            conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(shadow=merge(current)))

    # -------------------------------------------------------- publish window

    def open_window(self, job_id: str, *, cursor: int, chunk_size: int) -> None:
        """Record how far a new job's items are published, and its chunk size."""
        with self.writer.begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(publish_cursor=cursor, chunk_size=chunk_size))

    def advance_window(self, job_id: str, step: int) -> tuple[int, int] | None:
        """Move an unfinished job's publish cursor ``step`` items on; returns the items' (start, stop) to publish."""
        with self.writer.begin() as conn:
            q = select(JOBS.c.publish_cursor, JOBS.c.total, JOBS.c.status).where(JOBS.c.id == job_id)
            row = conn.execute(self.locked(q)).first()
            if row is None or row.status in C.JOB_FINAL_STATES or row.publish_cursor >= row.total:
                return None
            stop = min(row.publish_cursor + step, row.total)
            conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(publish_cursor=stop))
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
        busy = select(JOBS.c.queue).where(JOBS.c.status.in_(active), LAST_ACTIVITY >= cutoff)
        q = _JOB.where(
            JOBS.c.status.in_(active),
            COUNTED < JOBS.c.total,
            LAST_ACTIVITY < cutoff,
            or_(JOBS.c.published_at.is_(None), JOBS.c.queue.not_in(busy)),
        )
        if queues is not None:
            q = q.where(JOBS.c.queue.in_(list(queues)))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(JOBS.c.created_at)).mappings()]

    def take_requeue(self, job_id: str, stalled_after: float) -> bool:
        """Atomically claim the right to queue a stalled job again (one reconciler wins; the next waits a period)."""
        now = utcnow()
        cutoff = now - timedelta(seconds=stalled_after)
        with self.writer.begin() as conn:
            n = conn.execute(
                update(JOBS)
                .where(
                    JOBS.c.id == job_id,
                    JOBS.c.status.in_([C.JOB_QUEUED, C.JOB_RUNNING]),
                    LAST_ACTIVITY < cutoff,
                )
                .values(activity_at=now, requeues=JOBS.c.requeues + 1)
            ).rowcount
        return bool(n)
