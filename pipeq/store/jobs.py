"""Jobs: storing one with its items, its progress, cancelling, its publish window, the reconciler's view."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import orjson
from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.exc import OperationalError

from pipeq import constants as C
from pipeq.errors import ConfigurationError, DuplicateIdError, JobNotFoundError
from pipeq.ordering import KEY_END, order_key
from pipeq.primitives import JobProgress, utcnow
from pipeq.routing import ServeKey
from pipeq.store.base import BATCHES, ITEMS, JOB_COUNTS, JOBS, StoreBase
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
_ITEM_COLUMNS = "job_id, idx, input_id, input, order_key, status, attempts"


#: The key ``:step`` items after ``:start`` in a job's run order (None when fewer are left).
_WINDOW_STOP = (
    select(ITEMS.c.order_key)
    .where(ITEMS.c.job_id == bindparam("job"), ITEMS.c.order_key >= bindparam("start"))
    .order_by(ITEMS.c.order_key)
    .limit(1)
    .offset(bindparam("step"))
)


class WindowSpan(NamedTuple):
    """Items of a job's run order published together: keys ``[start, stop)``, ``items`` of them."""

    start: int
    stop: int
    items: int


class NewItem(NamedTuple):
    """One item of a job being stored: its index, its own id (or None), the pipeline input, and its size
    (characters of its text: what orders the job, ``pipeq.ordering``)."""

    idx: int
    input_id: str | None
    input: Any
    size: int


def _input_json(value: Any) -> str:
    """An input as the JSON column stores it (``json.dumps(value, ensure_ascii=False)``); a text through orjson,
    which writes the same characters several times faster."""
    if type(value) is str:
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:  # a lone surrogate: the standard library writes it as it is
            pass
    return json.dumps(value, ensure_ascii=False)


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

    def create_job(self, job: dict[str, Any], items: Iterable[Sequence[NewItem]], *, unique_ids: bool = False) -> int:
        """Store a job and all its items; returns the item count.

        ``items`` yields pages of new items in index order. The job's row is written first, as
        "storing"; each page is then its own short transaction (on SQLite the write lock is held for one
        page only, so workers on the same file go on claiming, writing and beating), and the job takes
        its status (``job["status"]``, "queued") once its last page is stored: until then no worker or
        reconciler touches it. Any error while the pages are consumed (bad input) deletes what was
        stored, so a refused submission leaves nothing behind; a producer killed meanwhile leaves a job
        "storing" that ``pipeq jobs`` shows and ``delete_job`` removes.

        With ``unique_ids``, two items with the same ``input_id`` raise DuplicateIdError naming the first
        such pair (by the later item's index): each page is checked in memory, and against the pages
        before it through the items' id index, one statement a page, so no set of a large job's ids is
        held in memory. The last commit counts as the job's activity: the reconciler leaves a job alone
        while its producer may still be publishing it.
        """
        job_id = job["id"]
        total = 0
        with self.writer.begin() as conn:
            conn.execute(insert(JOBS), [{**job, "status": C.JOB_STORING, "total": 0, "activity_at": utcnow()}])
        try:
            for page in items:
                if not page:
                    continue
                with self.writer.begin() as conn:
                    if self._is_pg:  # the job's last commit flushes these pages' WAL with it
                        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                    if unique_ids:
                        self._refuse_duplicates(conn, job_id, page)
                    self._insert_items(conn, job_id, page)
                    total += len(page)
                    conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(total=total, activity_at=utcnow()))
            with self.writer.begin() as conn:
                stored = conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id == job_id, JOBS.c.status == C.JOB_STORING)
                    .values(status=job.get("status") or C.JOB_QUEUED, total=total, activity_at=utcnow())
                ).rowcount
            if not stored:
                raise JobNotFoundError(f"job {job_id} was cancelled or deleted while it was stored")
        except BaseException:
            self._drop_unstored(job_id)
            raise
        if self._is_pg and total >= C.ANALYZE_AFTER_ITEMS:
            self._analyze_items()
        return total

    def _drop_unstored(self, job_id: str) -> None:
        """Delete a job whose storing failed; a store that fails too leaves it "storing" (``pipeq jobs`` shows it)."""
        try:
            self.delete_job(job_id)
        except Exception:  # noqa: BLE001 - the error that stopped the submit is the one to report
            log.warning("could not delete the partly stored job %s: delete it with `pipeq delete %s`", job_id, job_id)

    def delete_job(self, job_id: str) -> int:
        """Delete a job with its items, results, counts and batches; returns its item count (0 if none).

        Its items go even when its row is already gone: a producer still storing a job that was deleted
        meanwhile inserts a page or more before it finds out (``items.job_id`` has no foreign key to stop it).
        """
        with self.writer.begin() as conn:
            total = conn.execute(select(JOBS.c.total).where(JOBS.c.id == job_id)).scalar_one_or_none()
            for table in (ITEMS, JOB_COUNTS, BATCHES, JOBS):
                key = JOBS.c.id if table is JOBS else table.c.job_id
                conn.execute(table.delete().where(key == job_id))
        return int(total or 0)

    def delete_finished_job(self, job_id: str) -> int:
        """Delete a job that no worker may still run (done, cancelled, or left "storing"); returns its item count.

        Raises JobNotFoundError for an unknown job and ConfigurationError for a queued or running one.
        """
        status = self.job_status(job_id)
        if status is None:
            raise JobNotFoundError(f"no job {job_id!r} in the store")
        if status in (C.JOB_QUEUED, C.JOB_RUNNING):
            raise ConfigurationError(f"job {job_id} is {status}: cancel it first (`pipeq cancel {job_id}`)")
        return self.delete_job(job_id)

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

    def _insert_items(self, conn: Any, job_id: str, page: Sequence[NewItem]) -> None:
        """Bulk-insert new items: COPY on PostgreSQL, a plain executemany on SQLite.

        Submission is bound by this insert, so it bypasses per-row ORM/Core processing; the
        input is JSON-encoded here exactly as the JSON column would encode it.
        """
        tuples = [
            (job_id, i.idx, i.input_id, _input_json(i.input), order_key(i.size, i.idx), C.ITEM_PENDING, 0) for i in page
        ]
        if self._is_pg:
            cursor = conn.connection.dbapi_connection.cursor()
            with cursor.copy(f"COPY items ({_ITEM_COLUMNS}) FROM STDIN") as copy:
                for row in tuples:
                    copy.write_row(row)
            cursor.close()
        else:
            conn.exec_driver_sql(f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", tuples)

    def _refuse_duplicates(self, conn: Any, job_id: str, page: Sequence[NewItem]) -> None:
        """Raise DuplicateIdError if an item of ``page`` has the id of an earlier item (of the page or stored).

        The pair named is the one whose later item comes first in the input.
        """
        first: dict[str, int] = {}
        found: tuple[int, int, str] | None = None  # (later, earlier, id)
        for item in page:
            if item.input_id is None:
                continue
            earlier = first.setdefault(item.input_id, item.idx)
            if earlier != item.idx:
                found = (item.idx, earlier, item.input_id)
                break
        if first:
            for input_id, earlier in self._stored_ids(conn, job_id, list(first)):
                later = first[input_id]
                if found is None or later < found[0]:
                    found = (later, earlier, input_id)
        if found is not None:
            raise DuplicateIdError(found[2], found[1], found[0])

    def _stored_ids(self, conn: Any, job_id: str, ids: list[str]) -> list[tuple[str, int]]:
        """(id, first index) of the ids among ``ids`` that stored items of the job already have.

        One statement, a probe of ``ix_items_job_id_input_id`` per id: the ids travel as one array
        (PostgreSQL) or one JSON document (SQLite), whatever their number.
        """
        if self._is_pg:
            sql = (
                "SELECT input_id, min(idx) FROM items WHERE job_id = %(job)s AND input_id = ANY(%(ids)s::text[]) "
                "AND input_id IS NOT NULL GROUP BY input_id"
            )
            rows = conn.exec_driver_sql(sql, {"job": job_id, "ids": ids}).all()
        else:
            sql = (
                "SELECT input_id, min(idx) FROM items INDEXED BY ix_items_job_id_input_id WHERE job_id = ? "
                "AND input_id IN (SELECT value FROM json_each(?)) AND input_id IS NOT NULL GROUP BY input_id"
            )
            rows = conn.exec_driver_sql(sql, (job_id, json.dumps(ids))).all()
        return [(str(input_id), int(idx)) for input_id, idx in rows]

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

    def open_window(self, job_id: str, *, chunk_size: int, items: int) -> WindowSpan:
        """Open a new job's window on its first ``items`` items in run order, with its chunk size; returns them."""
        with self.writer.begin() as conn:
            stop, n = self._window_stop(conn, job_id, 0, items)
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id)
                .values(publish_key=stop, publish_cursor=n, chunk_size=chunk_size)
            )
        return WindowSpan(0, stop, n)

    def advance_window(self, job_id: str, step: int) -> WindowSpan | None:
        """Move an unfinished job's window ``step`` items on in run order; returns the span to publish.

        The span's items count as published from here on: a publish that fails hands them back with
        ``retreat_window``, so the window never passes items that are on no broker.
        """
        with self.writer.begin() as conn:
            q = select(JOBS.c.publish_key, JOBS.c.publish_cursor, JOBS.c.total, JOBS.c.status).where(
                JOBS.c.id == job_id
            )
            row = conn.execute(self.locked(q)).first()
            if row is None or row.status in C.JOB_FINAL_STATES or row.publish_cursor >= row.total:
                return None
            start = int(row.publish_key)
            stop, n = self._window_stop(conn, job_id, start, step, left=int(row.total) - int(row.publish_cursor))
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id)
                .values(publish_key=stop, publish_cursor=JOBS.c.publish_cursor + n)
            )
        return WindowSpan(start, stop, n)

    def retreat_window(self, job_id: str, span: WindowSpan) -> bool:
        """Move a job's window back over ``span`` (its publish failed), unless it moved on since; True if moved."""
        with self.writer.begin() as conn:
            moved = conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.publish_key == span.stop)
                .values(publish_key=span.start, publish_cursor=JOBS.c.publish_cursor - span.items)
            ).rowcount
        return bool(moved)

    def _window_stop(
        self, conn: Any, job_id: str, start: int, step: int, *, left: int | None = None
    ) -> tuple[int, int]:
        """The key ``step`` items after ``start`` in the job's run order (``KEY_END`` past its last) and the
        items in between: one walk of ``ix_items_job_id_order_key`` over ``step`` entries."""
        stop = conn.execute(_WINDOW_STOP, {"job": job_id, "start": start, "step": step}).scalar_one_or_none()
        if stop is not None:
            return int(stop), step
        if left is None:
            left = conn.execute(
                select(func.count()).select_from(ITEMS).where(ITEMS.c.job_id == job_id, ITEMS.c.order_key >= start)
            ).scalar_one()
        return KEY_END, int(left)

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
