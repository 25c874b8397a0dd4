"""Items: claiming a delivery, counting attempts, writing a micro-batch's results exactly once, reading them back."""

from __future__ import annotations

import binascii
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from datetime import datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import Dialect, and_, bindparam, case, func, insert, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

from pipeq import constants as C
from pipeq.cache import CacheScope
from pipeq.ordering import KEY_END
from pipeq.primitives import BatchTiming, ItemResult, Lease, WriteOutcome, utcnow
from pipeq.store.base import BATCHES, ITEMS, JOB_COUNTS, JOBS, WORKERS, StoreBase
from pipeq.store.cache import record_cached
from pipeq.store.counts import COUNTED
from pipeq.vectors import Vector

#: A batch's timing row: who ran it, then BatchTiming's fields.
_TIMING_COLUMNS = ("job_id", "worker_id", "model_revision", "precision", "device", *BatchTiming.__dataclass_fields__)
_Batches = Sequence[tuple[Sequence[ItemResult], BatchTiming | None]]

# Statements built once (building a SQLAlchemy statement costs more than running it on a small batch).
_PENDING = ITEMS.c.status == C.ITEM_PENDING
_IN_CHUNK = and_(ITEMS.c.job_id == bindparam("b_job"), ITEMS.c.idx.in_(bindparam("b_idxs", expanding=True)))
#: A chunk's items on SQLite, their indexes bound as one JSON array's text (``_json_int_array``) and read by
#: ``json_each``: an expanding IN renders a bound parameter per index at every execution, which costs more
#: than the statement on a chunk of thousands (SQLite still finds each item by its primary key).
_IN_CHUNK_SQLITE = and_(
    ITEMS.c.job_id == bindparam("b_job"),
    ITEMS.c.idx.in_(select(literal_column("value")).select_from(func.json_each(bindparam("b_idxs")))),
)
_SELECT_PENDING = select(ITEMS.c.idx).where(_IN_CHUNK_SQLITE, _PENDING)
_SELECT_CLAIMABLE = select(ITEMS.c.idx, ITEMS.c.attempts).where(_IN_CHUNK_SQLITE, _PENDING)
_FIRST_ATTEMPT_SQLITE = update(ITEMS).where(_IN_CHUNK_SQLITE, _PENDING, ITEMS.c.attempts == 0).values(attempts=1)
_FIRST_ATTEMPT = update(ITEMS).where(_IN_CHUNK, _PENDING, ITEMS.c.attempts == 0).values(attempts=1)
#: The first claim of a queued job starts it; later claims leave the job's row alone (no lock taken).
_START_JOB = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_job"), JOBS.c.status == C.JOB_QUEUED)
    .values(started_at=func.coalesce(JOBS.c.started_at, bindparam("b_now")), status=C.JOB_RUNNING)
)


def _pg_inline(statement: Any) -> tuple[str, dict[str, Any]]:
    """``statement`` compiled as psycopg takes it, to sit inside a hand-written PostgreSQL statement (as a
    CTE), and its constants (bound literals, not pipeq's own ``b_`` parameters) to pass with every execution."""
    compiled = statement.compile(dialect=pg_psycopg.dialect())
    return str(compiled), {k: v for k, v in compiled.params.items() if not k.startswith("b_")}


_PG_START_JOB, _PG_START_JOB_CONSTANTS = _pg_inline(_START_JOB)
#: A result write counts the attempt that made it on an item its claim did not count (a first delivery).
_COUNT_ATTEMPT = "CASE WHEN {attempts} = 0 THEN 1 ELSE {attempts} END"
#: What a claim or a result write adds to the writer's ``job_counts`` row on PostgreSQL (its sign of life,
#: too): the rows of a CTE named ``n`` (``n``, ``done``, ``failed``, ``cancelled``).
_PG_ADD_COUNTS = (
    "k AS (INSERT INTO job_counts (job_id, slot, n_done, n_failed, n_cancelled, updated_at) "
    "SELECT %(b_job)s, %(k_slot)s, done, failed, cancelled, %(b_now)s FROM n {where}"
    "ON CONFLICT (job_id, slot) DO UPDATE SET n_done = job_counts.n_done + excluded.n_done, "
    "n_failed = job_counts.n_failed + excluded.n_failed, n_cancelled = job_counts.n_cancelled + excluded.n_cancelled, "
    "updated_at = excluded.updated_at)"
)
#: A claim on PostgreSQL, in one statement: the lease on the worker's row, the job started if it was queued,
#: the writer's sign of life, and the pending items with their attempts (``claim``). One statement is one
#: transaction: it runs without BEGIN and COMMIT.
_PG_CLAIM = (
    "WITH {lease}"
    f"s AS ({_PG_START_JOB}), "
    "n AS (SELECT 0 AS done, 0 AS failed, 0 AS cancelled), " + _PG_ADD_COUNTS.format(where="") + "{items}"
)
#: The pending items as they are: a first delivery counts no attempt on them (see ``claim``).
_PG_PENDING_ITEMS = (
    "SELECT idx, attempts FROM items WHERE job_id = %(b_job)s AND idx = ANY(%(b_idxs)s::int[]) "
    f"AND status = '{C.ITEM_PENDING}'"
)
#: First attempts counted (``first``), and what the pending items had before: ``{counted}`` for those it
#: counts (the SELECT reads the statement's snapshot, from before its UPDATE).
_PG_COUNT_FIRST = (
    ", first AS (UPDATE items SET attempts = 1 WHERE job_id = %(b_job)s AND idx = ANY(%(b_idxs)s::int[]) "
    f"AND status = '{C.ITEM_PENDING}' AND attempts = 0 RETURNING idx) "
    "SELECT idx, {counted} FROM first UNION ALL " + _PG_PENDING_ITEMS + " AND attempts > 0"
)
#: {(leased, redelivered): statement} for ``claim``.
_PG_CLAIMS = {
    (leased, redelivered): _PG_CLAIM.format(
        lease="w AS (UPDATE workers SET lease = %(lease)s::json WHERE id = %(k_slot)s), " if leased else "",
        items=(
            _PG_COUNT_FIRST.format(counted=0 if redelivered is None else 1)
            if redelivered is not False
            else " " + _PG_PENDING_ITEMS
        ),
    )
    for leased in (False, True)
    for redelivered in (None, False, True)
}
_INSERT_BATCH = insert(BATCHES)
#: A page of a job's results with their batch timing (``iter_result_pages``), in input order.
_RESULT_PAGE = (
    select(
        ITEMS.c.idx,
        ITEMS.c.input_id,
        ITEMS.c.status,
        ITEMS.c.output,
        ITEMS.c.vector,
        ITEMS.c.error,
        ITEMS.c.truncated,
        ITEMS.c.n_tokens,
        ITEMS.c.cached,
        ITEMS.c.first_token_ms,
        ITEMS.c.decode_ms,
        ITEMS.c.output_tokens,
        ITEMS.c.attempts,
        ITEMS.c.finished_at,
        ITEMS.c.batch_id,
        BATCHES.c.size.label("batch_size"),
        BATCHES.c.queue_wait_ms,
        BATCHES.c.preprocess_ms,
        BATCHES.c.forward_ms,
        BATCHES.c.postprocess_ms,
        BATCHES.c.total_ms,
        BATCHES.c.model_revision,
        BATCHES.c.worker_id,
    )
    .select_from(ITEMS.outerjoin(BATCHES, ITEMS.c.batch_id == BATCHES.c.id))
    .where(ITEMS.c.job_id == bindparam("b_job"), ITEMS.c.idx > bindparam("b_last"))
    .order_by(ITEMS.c.idx)
    .limit(bindparam("b_limit"))
)
#: ``_RESULT_PAGE`` with each item's stored input too (``iter_result_pages(inputs=True)``).
_RESULT_PAGE_INPUTS = _RESULT_PAGE.add_columns(ITEMS.c.input)
_RESULT_PAGE_NAMES = {
    inputs: tuple(c.name for c in page.selected_columns)
    for inputs, page in ((False, _RESULT_PAGE), (True, _RESULT_PAGE_INPUTS))
}
#: A micro-batch's results on PostgreSQL, in one statement: its items still pending updated from its rows
#: (``u``), its timing row inserted if any was (``b``, its id drawn first so the items can point at it), the
#: writer's counts added (``k``) and the job's row settled (``s``: started, or done with its last items).
#: Returns the indexes it wrote. The job's counts in ``s`` are read from the statement's snapshot, which
#: does not hold what ``k`` adds, so ``s`` adds this batch's count itself.
#:
#: The rows travel as one JSON array of arrays (``_pg_rows``: one ``orjson.dumps``, in C) and ``r_idx`` as an
#: int array's text (``_pg_int_array``), so the writer's client CPU is not spent on a Python list per column
#: that the driver would dump element by element (benchmarks/fleet.py measures the writes). A JSON ``output``
#: is taken verbatim (``->`` on ``json`` keeps the text orjson wrote), a JSON null as SQL NULL; a vector
#: travels as base64. A generated item's timing comes last (its row's 9th to 11th values); a shorter row, such
#: as a pooled embedding's, leaves them NULL (``->>`` past the end of an array is NULL).
_PG_WRITE = (
    "WITH {batch_id_cte}"
    "r AS (SELECT (v->>0)::int AS idx, (v->>1)::varchar AS status, "
    "CASE WHEN json_typeof(v->2) <> 'null' THEN v->2 END AS output, decode(v->>3, 'base64') AS vector, "
    "v->>4 AS error, (v->>5)::bool AS truncated, (v->>6)::int AS n_tokens, (v->>7)::bool AS cached, "
    "(v->>8)::float8 AS first_token_ms, (v->>9)::float8 AS decode_ms, (v->>10)::int AS output_tokens "
    "FROM json_array_elements(%(r_rows)s::json) AS v), "
    "u AS (UPDATE items AS i SET status = r.status, output = r.output, vector = r.vector, error = r.error, "
    "truncated = r.truncated, n_tokens = r.n_tokens, cached = r.cached, first_token_ms = r.first_token_ms, "
    "decode_ms = r.decode_ms, output_tokens = r.output_tokens, batch_id = {batch_id}, "
    f"finished_at = %(b_now)s, attempts = {_COUNT_ATTEMPT.format(attempts='i.attempts')} "
    "FROM r "
    # ``idx = ANY`` as well as the join: the planner then reads the batch's rows by primary key, not the whole job.
    "WHERE i.job_id = %(b_job)s AND i.idx = ANY(%(r_idx)s::int[]) AND i.idx = r.idx "
    f"AND i.status = '{C.ITEM_PENDING}' RETURNING i.idx, i.status), "
    "{insert_batch}"
    f"n AS (SELECT count(*) AS n, count(*) FILTER (WHERE status = '{C.ITEM_DONE}') AS done, "
    f"count(*) FILTER (WHERE status = '{C.ITEM_FAILED}') AS failed, "
    f"count(*) FILTER (WHERE status = '{C.ITEM_CANCELLED}') AS cancelled FROM u), "
    + _PG_ADD_COUNTS.format(where="WHERE n > 0 ")
    + ", {settle} SELECT array(SELECT idx FROM u)"
)


def _settle_job(batch: Any = None) -> Any:
    """The UPDATE that moves the job's row: queued -> running with its first write, and -> done once every
    item is final (its counts plus its writers' ``job_counts``). On every other write the WHERE matches
    nothing and no lock is taken, so the fleet's writers never queue on the job's row.

    ``batch``: the SQL count of the items the same statement writes (PostgreSQL's one-statement write),
    added to the counts, which that statement's snapshot does not hold yet; the row moves only if it is > 0.
    """
    complete = (COUNTED if batch is None else COUNTED + batch) >= JOBS.c.total
    where = [
        JOBS.c.id == bindparam("b_job"),
        or_(JOBS.c.status == C.JOB_QUEUED, and_(JOBS.c.status == C.JOB_RUNNING, complete)),
    ]
    return (
        update(JOBS)
        .where(*where, *([] if batch is None else [batch > literal_column("0")]))
        .values(
            status=case((complete, C.JOB_DONE), else_=C.JOB_RUNNING),
            started_at=func.coalesce(JOBS.c.started_at, bindparam("b_now")),
            finished_at=case((complete, bindparam("b_now")), else_=JOBS.c.finished_at),
        )
    )


_SETTLE_JOB = _settle_job()
#: ``_SETTLE_JOB`` as the driver's SQL, for the look after every PostgreSQL write (``_record_pg``): run as a
#: string, compiled once, it skips the walk of the statement for its cache key on every execution.
_PG_SETTLE_AFTER, _PG_SETTLE_AFTER_CONSTANTS = _pg_inline(_SETTLE_JOB)
#: ``_settle_job`` inside ``_PG_WRITE``, as its CTE ``s``.
_PG_SETTLE, _PG_SETTLE_CONSTANTS = _pg_inline(_settle_job(literal_column("(SELECT n FROM n)")))
_PG_WRITE_TIMED = _PG_WRITE.format(
    settle=f"s AS ({_PG_SETTLE})",
    batch_id_cte="bid AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence('batches', 'id')) AS id), ",
    batch_id="(SELECT id FROM bid)",
    insert_batch="b AS (INSERT INTO batches (id, {cols}) SELECT (SELECT id FROM bid), {values} "
    "WHERE EXISTS (SELECT 1 FROM u)), ".format(
        cols=", ".join(_TIMING_COLUMNS), values=", ".join(f"%(t_{c})s" for c in _TIMING_COLUMNS)
    ),
)
_PG_WRITE_UNTIMED = _PG_WRITE.format(
    settle=f"s AS ({_PG_SETTLE})", batch_id_cte="", batch_id="NULL::bigint", insert_batch=""
)


@cache
def _upsert_counts(dialect_name: str) -> Any:
    """INSERT into the writer's ``job_counts`` row, or add to it (a dialect's upsert)."""
    from sqlalchemy.dialects import postgresql, sqlite

    upsert: Any = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    row = upsert(JOB_COUNTS).values(
        job_id=bindparam("k_job"),
        slot=bindparam("k_slot"),
        n_done=bindparam("k_done"),
        n_failed=bindparam("k_failed"),
        n_cancelled=bindparam("k_cancelled"),
        updated_at=bindparam("k_now"),
    )
    return row.on_conflict_do_update(
        index_elements=[JOB_COUNTS.c.job_id, JOB_COUNTS.c.slot],
        set_={
            "n_done": JOB_COUNTS.c.n_done + row.excluded.n_done,
            "n_failed": JOB_COUNTS.c.n_failed + row.excluded.n_failed,
            "n_cancelled": JOB_COUNTS.c.n_cancelled + row.excluded.n_cancelled,
            "updated_at": row.excluded.updated_at,
        },
    )


class ItemQueries(StoreBase):
    """A job's items: claims and attempts, result writes, and paging through them."""

    # ---------------------------------------------------------------- items

    def claim(
        self, job_id: str, idxs: Sequence[int], *, lease: Lease | None = None, redelivered: bool | None = None
    ) -> dict[int, int]:
        """Start a delivery of ``idxs``: returns {idx: attempts before it} for the items still pending.

        An attempt is counted on an item so that an input that kills the process runs out of
        attempts: a delivery that finds an item tried before (attempts > 0) runs its items one at a
        time, counting each attempt as it starts (``start_attempt``), so the culprit uses up only its
        own. Finished items are left out, so they never run twice. ``redelivered`` says what the
        broker knows of this delivery:

        - None (a broker that does not mark redeliveries): items never tried get their first
          attempt counted now, and report 0.
        - False (the broker's first delivery of the message, and it marks any later one): nothing is
          written on the items; their first attempt is counted with their result (``record_batches``),
          or by whoever finds the delivery lost (``count_lost_delivery``): the broker's redelivery
          (True), a take-over, or the delivery itself when it fails as a whole. That is one row write
          an item instead of two.
        - True (the broker delivers the message again: its first delivery died or lost the store):
          that delivery's attempt is counted on the items it never got to count, and they report 1.

        With ``lease``, the claim is written on the worker's row in the same transaction: if the
        worker dies, a live one knows exactly which items to queue again (``take_over``).
        """
        now = utcnow()
        params = {
            "b_job": job_id,
            "b_idxs": _pg_int_array(idxs) if self._is_pg else _json_int_array(idxs),
            "b_now": now,
        }
        if self._is_pg:
            params.update(_PG_START_JOB_CONSTANTS, k_slot=lease.worker_id if lease else "")
            if lease is not None:
                params["lease"] = json.dumps(lease.record(job_id, idxs))
            with self.engine.connect() as conn:  # one statement, its own transaction
                conn.execution_options(isolation_level="AUTOCOMMIT")
                rows = conn.exec_driver_sql(_PG_CLAIMS[lease is not None, redelivered], params).all()
            return {int(idx): int(attempts) for idx, attempts in rows}
        with self.writer.begin() as conn:  # SQLite: the transaction holds the write lock
            if lease is not None:
                conn.execute(
                    update(WORKERS).where(WORKERS.c.id == lease.worker_id).values(lease=lease.record(job_id, idxs))
                )
            rows = conn.execute(_SELECT_CLAIMABLE, params).all()
            if redelivered is not False:
                conn.execute(_FIRST_ATTEMPT_SQLITE, params)
            conn.execute(_START_JOB, params)
            self._add_counts(conn, job_id, lease.worker_id if lease else None, WriteOutcome(), now=now)
        counted = 1 if redelivered else 0
        return {int(idx): int(attempts) or counted for idx, attempts in rows}

    def count_lost_delivery(self, job_id: str, idxs: Sequence[int]) -> None:
        """Count the attempt of a delivery that was lost (its worker taken over, or the delivery failed as a
        whole) on the pending items among ``idxs`` that it had not counted (claimed as a first delivery)."""
        if idxs:
            with self.writer.begin() as conn:
                conn.execute(_FIRST_ATTEMPT, {"b_job": job_id, "b_idxs": list(idxs)})

    def start_attempt(self, job_id: str, idx: int) -> int | None:
        """Count one more attempt on a pending item about to run alone; None when it is no longer pending."""
        with self.writer.begin() as conn:
            conn.execute(
                update(ITEMS)
                .where(ITEMS.c.job_id == job_id, ITEMS.c.idx == idx, ITEMS.c.status == C.ITEM_PENDING)
                .values(attempts=ITEMS.c.attempts + 1)
            )
            return conn.execute(
                select(ITEMS.c.attempts).where(
                    ITEMS.c.job_id == job_id, ITEMS.c.idx == idx, ITEMS.c.status == C.ITEM_PENDING
                )
            ).scalar_one_or_none()

    def release(self, job_id: str, idxs: Sequence[int]) -> None:
        """Take back the attempt counted on pending items that were claimed but never ran (a stopping worker)."""
        if not idxs:
            return
        with self.writer.begin() as conn:
            conn.execute(
                update(ITEMS)
                .where(
                    ITEMS.c.job_id == job_id,
                    ITEMS.c.idx.in_(idxs),
                    ITEMS.c.status == C.ITEM_PENDING,
                    ITEMS.c.attempts > 0,
                )
                .values(attempts=ITEMS.c.attempts - 1)
            )

    def pending_inputs(self, job_id: str, idxs: Sequence[int]) -> list[tuple[int, Any]]:
        """(idx, input) of the items among ``idxs`` still pending, in index order."""
        if not idxs:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ITEMS.c.idx, ITEMS.c.input)
                .where(ITEMS.c.job_id == job_id, ITEMS.c.idx.in_(list(idxs)), _PENDING)
                .order_by(ITEMS.c.idx)
            ).all()
        return [(int(idx), value) for idx, value in rows]

    def attempts(self, job_id: str, idxs: Sequence[int]) -> dict[int, int]:
        """{idx: attempts} of the pending items among ``idxs``, counting no new attempt."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ITEMS.c.idx, ITEMS.c.attempts).where(
                    ITEMS.c.job_id == job_id, ITEMS.c.idx.in_(idxs), ITEMS.c.status == C.ITEM_PENDING
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
        cache_scope: CacheScope | None = None,
    ) -> WriteOutcome:
        """Store one micro-batch's results and timing in one transaction, exactly once (see ``record_batches``)."""
        return self.record_batches(
            job_id,
            [(results, timing)],
            worker_id=worker_id,
            model_revision=model_revision,
            precision=precision,
            device=device,
            cache_scope=cache_scope,
        )[0]

    def record_batches(
        self,
        job_id: str,
        batches: Sequence[tuple[Sequence[ItemResult], BatchTiming | None]],
        *,
        worker_id: str | None,
        model_revision: str | None,
        precision: str,
        device: str,
        cache_scope: CacheScope | None = None,
    ) -> list[WriteOutcome]:
        """Store micro-batches' results and timing in one transaction (one commit), exactly once; an outcome each.

        Only items still pending are written (guarded by status, and locked on PostgreSQL), so a
        redelivered message can neither duplicate a result nor overwrite a finished one. The job's
        counters move once for all of them. With a ``cache_scope`` (a use_cache job), computed
        outputs go into the result cache and cached ones count as hits.
        """
        if not any(results for results, _ in batches):
            return [WriteOutcome() for _ in batches]
        now = utcnow()
        batch = {"worker_id": worker_id, "model_revision": model_revision, "precision": precision, "device": device}
        if self._is_pg:
            return self._record_pg(job_id, batches, batch, now, cache_scope)
        outcomes: list[WriteOutcome] = []
        written: list[ItemResult] = []
        with self.writer.begin() as conn:
            for results, todo in self._write_sqlite(conn, job_id, batches, batch, now):
                written.extend(todo)
                outcomes.append(_outcome(todo, skipped=len(results) - len(todo)))
            if written:
                self._add_counts(conn, job_id, worker_id, _outcome(written, skipped=0), now=now)
                conn.execute(_SETTLE_JOB, {"b_job": job_id, "b_now": now})
                if cache_scope is not None:
                    record_cached(conn, job_id, cache_scope, written)
        return outcomes

    def _record_pg(
        self, job_id: str, batches: _Batches, batch: dict[str, Any], now: datetime, cache_scope: CacheScope | None
    ) -> list[WriteOutcome]:
        """PostgreSQL: a statement a batch (``_PG_WRITE``: results, timing, counts and the job's row), then a
        look at the job's row after the commit. One batch with no cache to fill is one statement, so it
        runs as its own transaction, without BEGIN and COMMIT: two round trips a write in all (three when
        the pooled connection sat idle and is pinged first, see ``engine._ping_when_idle``)."""
        outcomes: list[WriteOutcome] = []
        written: list[ItemResult] = []
        alone = len(batches) == 1 and cache_scope is None
        with self.engine.connect() as conn:
            if alone:
                conn.execution_options(isolation_level="AUTOCOMMIT")
            with nullcontext() if alone else conn.begin():
                for results, timing in batches:
                    todo = self._write_pg(conn, job_id, results, timing, batch, now)
                    written.extend(todo)
                    outcomes.append(_outcome(todo, skipped=len(results) - len(todo)))
                if written and cache_scope is not None:
                    record_cached(conn, job_id, cache_scope, written)
            if not alone:  # committed: the look at the job's row below is a statement of its own
                conn.execution_options(isolation_level="AUTOCOMMIT")
            if written:
                # Two writers finishing a job's last items at once each see the other's count uncommitted,
                # and neither marks it done; after its commit, the later one of them sees both.
                conn.exec_driver_sql(
                    _PG_SETTLE_AFTER, {**_PG_SETTLE_AFTER_CONSTANTS, "b_job": job_id, "b_now": utcnow()}
                )
        return outcomes

    def _write_sqlite(
        self, conn: Any, job_id: str, batches: _Batches, batch: dict[str, Any], now: datetime
    ) -> Iterator[tuple[Sequence[ItemResult], list[ItemResult]]]:
        """SQLite: the transaction holds the write lock (BEGIN IMMEDIATE), so read what is pending, then write it."""
        idxs = [r.idx for results, _ in batches for r in results]
        pending = set(conn.scalars(_SELECT_PENDING, {"b_job": job_id, "b_idxs": _json_int_array(idxs)}))
        for results, timing in batches:
            todo = [r for r in results if r.idx in pending]
            if todo:
                self._write_items(conn, job_id, todo, timing, batch, now)
            yield results, todo

    def _write_pg(
        self,
        conn: Any,
        job_id: str,
        results: Sequence[ItemResult],
        timing: BatchTiming | None,
        batch: dict[str, Any],
        now: datetime,
    ) -> list[ItemResult]:
        """PostgreSQL: one statement writes a batch (``_PG_WRITE``); returns the results it wrote.

        The UPDATE's own guard (``status = 'pending'``, re-checked under the row lock it takes) keeps
        a result from being written twice by two deliveries at once; RETURNING says which it wrote.
        A batch none of whose items was pending any more leaves no timing row behind.
        """
        params: dict[str, Any] = {
            **_PG_SETTLE_CONSTANTS,
            "b_job": job_id,
            "b_now": now,
            "k_slot": batch["worker_id"] or "",
            "r_rows": _pg_rows(results),
            "r_idx": _pg_int_array([r.idx for r in results]),
        }
        sql = _PG_WRITE_UNTIMED if timing is None else _PG_WRITE_TIMED
        if timing is not None:
            params.update({f"t_{k}": v for k, v in {"job_id": job_id, **batch, **vars(timing)}.items()})
        done = set(conn.exec_driver_sql(sql, params).scalar_one())
        return [r for r in results if r.idx in done]

    def _write_items(
        self,
        conn: Any,
        job_id: str,
        todo: Sequence[ItemResult],
        timing: BatchTiming | None,
        batch: dict[str, Any],
        now: datetime,
    ) -> None:
        """One batch's timing row, and its pending items' results pointing at it (one executemany).

        The UPDATE goes to the driver as it is, each value converted by its column type's own bind
        processor (what SQLAlchemy would send): the per-row machinery of a Core executemany costs
        more than the statement itself on a batch of small results.
        """
        batch_id = None
        if timing is not None:
            row = {"job_id": job_id, **batch, **vars(timing)}
            batch_id = conn.execute(_INSERT_BATCH, row).inserted_primary_key[0]
        dialect = conn.dialect
        sql, (output, truncated, cached, finished) = _result_update(dialect)
        at = finished(now)
        conn.exec_driver_sql(
            sql,
            [
                (
                    r.status,
                    None if isinstance(r.output, Vector) else output(r.output),
                    r.output.blob if isinstance(r.output, Vector) else None,
                    r.error,
                    truncated(r.truncated),
                    r.n_tokens,
                    cached(r.cached),
                    r.first_token_ms,
                    r.decode_ms,
                    r.output_tokens,
                    batch_id,
                    at,
                    job_id,
                    r.idx,
                )
                for r in todo
            ],  # fmt: skip
        )

    def _add_counts(self, conn: Any, job_id: str, slot: str | None, moved: WriteOutcome, *, now: datetime) -> None:
        """Add ``moved`` to the writer's own counts of the job (its sign of life for the reconciler, too)."""
        params = {"k_job": job_id, "k_slot": slot or "", "k_now": now}
        counts = {"k_done": moved.done, "k_failed": moved.failed, "k_cancelled": moved.cancelled}
        conn.execute(_upsert_counts(conn.dialect.name), {**params, **counts})

    def iter_results(self, job_id: str, *, page: int = 2000, inputs: bool = False) -> Iterator[dict[str, Any]]:
        """Yield a job's items in input order with their batch timing, a page at a time.

        ``output`` is the stored JSON value, or a ``Vector`` where the item holds a pooled embedding; with
        ``inputs``, ``input`` is the item's stored input.
        """
        for columns in self.iter_result_pages(job_id, page=page, inputs=inputs):
            names = list(columns)
            for values in zip(*columns.values(), strict=True):
                yield dict(zip(names, values, strict=True))

    def iter_result_pages(
        self, job_id: str, *, page: int = 2000, inputs: bool = False
    ) -> Iterator[dict[str, list[Any]]]:
        """A job's items in input order with their batch timing, as columns of at most ``page`` rows:
        {column: values} (the names of ``iter_results``), so a page becomes Arrow arrays without a dict per row."""
        statement, names = (_RESULT_PAGE_INPUTS if inputs else _RESULT_PAGE), _RESULT_PAGE_NAMES[inputs]
        last = -1
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(statement, {"b_job": job_id, "b_last": last, "b_limit": page}).all()
            if not rows:
                return
            columns = dict(zip(names, map(list, zip(*rows, strict=True)), strict=True))
            vectors = columns.pop("vector")
            columns["output"] = list(map(read_output, columns["output"], vectors))
            yield columns
            last = int(rows[-1][0])

    def iter_outputs(self, job_id: str, *, page: int = 5000) -> Iterator[list[tuple[int, Any]]]:
        """(idx, output) of a job's done items in input order, a page at a time (``output`` as ``iter_results``)."""
        last = -1
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(ITEMS.c.idx, ITEMS.c.output, ITEMS.c.vector)
                    .where(ITEMS.c.job_id == job_id, ITEMS.c.idx > last, ITEMS.c.status == C.ITEM_DONE)
                    .order_by(ITEMS.c.idx)
                    .limit(page)
                ).all()
            if not rows:
                return
            yield [(int(idx), read_output(output, vector)) for idx, output, vector in rows]
            last = int(rows[-1][0])

    def first_output(self, job_id: str) -> Any:
        """The output of a job's first done item (as ``iter_results`` gives it); None when none is done."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(ITEMS.c.output, ITEMS.c.vector)
                .where(ITEMS.c.job_id == job_id, ITEMS.c.status == C.ITEM_DONE)
                .order_by(ITEMS.c.idx)
                .limit(1)
            ).first()
        return None if row is None else read_output(row[0], row[1])

    def iter_pending(
        self, job_id: str, *, page: int = 5000, start: int = 0, stop: int = KEY_END
    ) -> Iterator[list[tuple[int, Any]]]:
        """(idx, input) of a job's pending items with ``start <= order_key < stop``, in run order
        (``pipeq.ordering``), a page at a time."""
        after = start - 1
        while True:
            q = (
                select(ITEMS.c.order_key, ITEMS.c.idx, ITEMS.c.input)
                .where(
                    ITEMS.c.job_id == job_id,
                    ITEMS.c.order_key > after,
                    ITEMS.c.order_key < stop,
                    ITEMS.c.status == C.ITEM_PENDING,
                )
                .order_by(ITEMS.c.order_key)
                .limit(page)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            yield [(int(i), x) for _, i, x in rows]
            after = int(rows[-1][0])


def _outcome(written: Sequence[ItemResult], *, skipped: int) -> WriteOutcome:
    """How many of ``written`` moved to each final state."""
    moved = Counter([r.status for r in written])
    return WriteOutcome(
        done=moved[C.ITEM_DONE], failed=moved[C.ITEM_FAILED], cancelled=moved[C.ITEM_CANCELLED], skipped=skipped
    )


def _pg_int_array(values: Sequence[int]) -> str:
    """Item indexes as a PostgreSQL int array's text (``%(x)s::int[]``): one string for the driver to send,
    where a list is dumped element by element in Python (41 against 106 us for a 256-item claim's)."""
    return "{" + ",".join(map(str, values)) + "}"


def _json_int_array(values: Sequence[int]) -> str:
    """Item indexes as a JSON array's text, for SQLite's ``json_each`` (``_IN_CHUNK_SQLITE``)."""
    return "[" + ",".join(map(str, values)) + "]"


_RESULT_COLUMNS = (
    "status", "output", "vector", "error", "truncated", "n_tokens", "cached",
    "first_token_ms", "decode_ms", "output_tokens", "batch_id", "finished_at",
)  # fmt: skip


@cache
def _result_update(dialect: Dialect) -> tuple[str, tuple[Callable[[Any], Any], ...]]:
    """The driver-level UPDATE of one item's result (guarded by status), and the bind processors it needs."""
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    counted = f"attempts = {_COUNT_ATTEMPT.format(attempts='attempts')}"
    sets = ", ".join([*(f"{name} = {mark}" for name in _RESULT_COLUMNS), counted])
    sql = f"UPDATE items SET {sets} WHERE job_id = {mark} AND idx = {mark} AND status = '{C.ITEM_PENDING}'"

    def processor(column: str) -> Callable[[Any], Any]:
        process = ITEMS.c[column].type.dialect_impl(dialect).bind_processor(dialect)
        return process if process is not None else _same

    output = processor("output")

    def output_json(value: Any) -> Any:
        """The column type's JSON text of an output, written by orjson (the type's own serializer where it cannot)."""
        if value is not None:
            text = _json_text(value)
            if text is not None:
                return text
        return output(value)

    return sql, (output_json, *(processor(c) for c in ("truncated", "cached", "finished_at")))


def _json_text(value: Any) -> str | None:
    """``value`` as JSON text by orjson (compact, UTF-8 as it is); None where orjson refuses it (a lone
    surrogate, an integer beyond 64 bits, a type it does not know), for the standard library to write."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return None


def _same(value: Any) -> Any:
    return value


def _pg_rows(results: Sequence[ItemResult]) -> str:
    """A batch's results as ``_PG_WRITE`` reads them: a JSON array of [idx, status, output, vector (base64),
    error, truncated, n_tokens, cached, first_token_ms, decode_ms, output_tokens], one per result, a pooled
    embedding's output in the vector's place (and no generation timing: its row ends after ``cached``)."""
    rows = [
        (r.idx, r.status, None, _base64(r.output.blob), r.error, r.truncated, r.n_tokens, r.cached)
        if isinstance(r.output, Vector)
        else (r.idx, r.status, r.output, None, r.error, r.truncated, r.n_tokens, r.cached,
              r.first_token_ms, r.decode_ms, r.output_tokens)
        for r in results
    ]  # fmt: skip
    text = _json_text(rows)
    return json.dumps(rows) if text is None else text


def _base64(blob: bytes) -> str:
    return binascii.b2a_base64(blob, newline=False).decode("ascii")


def read_output(output: Any, vector: bytes | None) -> Any:
    """An item's output as stored: its JSON value, or the ``Vector`` of a pooled embedding."""
    return Vector(bytes(vector)) if vector is not None else output
