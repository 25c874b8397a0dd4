"""Items: claiming a delivery, counting attempts, writing a micro-batch's results exactly once, reading them back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, func, insert, select, update

from pipeq import constants as C
from pipeq.cache import CacheScope
from pipeq.primitives import BatchTiming, ItemResult, WriteOutcome, utcnow
from pipeq.store.base import BATCHES, ITEMS, JOBS, StoreBase
from pipeq.store.cache import record_cached


class ItemQueries(StoreBase):
    """A job's items: claims and attempts, result writes, and paging through them."""

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
            q = select(ITEMS.c.idx, ITEMS.c.attempts).where(
                ITEMS.c.job_id == job_id, ITEMS.c.idx.in_(idxs), ITEMS.c.status == C.ITEM_PENDING
            )
            rows = conn.execute(self.locked(q)).all()
            conn.execute(
                update(ITEMS)
                .where(
                    ITEMS.c.job_id == job_id,
                    ITEMS.c.idx.in_(idxs),
                    ITEMS.c.status == C.ITEM_PENDING,
                    ITEMS.c.attempts == 0,
                )
                .values(attempts=1)
            )
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id)
                .values(
                    activity_at=now,
                    started_at=func.coalesce(JOBS.c.started_at, now),
                    status=case((JOBS.c.status == C.JOB_QUEUED, C.JOB_RUNNING), else_=JOBS.c.status),
                )
            )
        return {int(idx): int(attempts) for idx, attempts in rows}

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
        idxs = [r.idx for results, _ in batches for r in results]
        if not idxs:
            return [WriteOutcome() for _ in batches]
        now = utcnow()
        outcomes: list[WriteOutcome] = []
        written: list[ItemResult] = []
        with self.writer.begin() as conn:
            q = select(ITEMS.c.idx).where(
                ITEMS.c.job_id == job_id, ITEMS.c.idx.in_(idxs), ITEMS.c.status == C.ITEM_PENDING
            )
            pending = set(conn.scalars(self.locked(q)))
            for results, timing in batches:
                todo = [r for r in results if r.idx in pending]
                if todo:
                    batch = {"worker_id": worker_id, "model_revision": model_revision, "precision": precision}
                    self._write_items(conn, job_id, todo, timing, {**batch, "device": device}, now)
                    written.extend(todo)
                outcomes.append(_outcome(todo, skipped=len(results) - len(todo)))
            if written:
                self._count(conn, job_id, _outcome(written, skipped=0), now=now)
                if cache_scope is not None:
                    record_cached(conn, job_id, cache_scope, written)
        return outcomes

    def _write_items(
        self,
        conn: Any,
        job_id: str,
        todo: Sequence[ItemResult],
        timing: BatchTiming | None,
        batch: dict[str, Any],
        now: datetime,
    ) -> None:
        """One batch's timing row, and its pending items' results pointing at it (one executemany)."""
        batch_id = None
        if timing is not None:
            row = {"job_id": job_id, **batch, **vars(timing)}
            batch_id = conn.execute(insert(BATCHES).values(**row)).inserted_primary_key[0]
        conn.execute(
            update(ITEMS)
            .where(ITEMS.c.job_id == job_id, ITEMS.c.idx == bindparam("b_idx"), ITEMS.c.status == C.ITEM_PENDING)
            .values(
                status=bindparam("b_status"),
                output=bindparam("b_output", type_=ITEMS.c.output.type),
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

    def _count(self, conn: Any, job_id: str, moved: WriteOutcome, *, now: datetime) -> None:
        """Move the job's counters by ``moved``; the write that finishes its last item marks it done (one UPDATE)."""
        n = moved.done + moved.failed + moved.cancelled
        j = JOBS.c
        last = and_(j.status.in_([C.JOB_QUEUED, C.JOB_RUNNING]), j.n_done + j.n_failed + j.n_cancelled + n >= j.total)
        conn.execute(
            update(JOBS)
            .where(j.id == job_id)
            .values(
                n_done=j.n_done + moved.done,
                n_failed=j.n_failed + moved.failed,
                n_cancelled=j.n_cancelled + moved.cancelled,
                started_at=func.coalesce(j.started_at, now),
                activity_at=now,
                status=case((last, C.JOB_DONE), (j.status == C.JOB_QUEUED, C.JOB_RUNNING), else_=j.status),
                finished_at=case((last, now), else_=j.finished_at),
            )
        )

    def iter_results(self, job_id: str, *, page: int = 2000) -> Iterator[dict[str, Any]]:
        """Yield a job's items in input order with their batch timing, a page at a time."""
        cols = [
            ITEMS.c.idx,
            ITEMS.c.input_id,
            ITEMS.c.status,
            ITEMS.c.output,
            ITEMS.c.error,
            ITEMS.c.truncated,
            ITEMS.c.n_tokens,
            ITEMS.c.cached,
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
        ]
        last = -1
        while True:
            with self.engine.connect() as conn:
                rows = (
                    conn.execute(
                        select(*cols)
                        .select_from(ITEMS.outerjoin(BATCHES, ITEMS.c.batch_id == BATCHES.c.id))
                        .where(ITEMS.c.job_id == job_id, ITEMS.c.idx > last)
                        .order_by(ITEMS.c.idx)
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
                select(ITEMS.c.idx, ITEMS.c.input)
                .where(ITEMS.c.job_id == job_id, ITEMS.c.status == C.ITEM_PENDING, ITEMS.c.idx > last)
                .order_by(ITEMS.c.idx)
                .limit(page)
            )
            if stop is not None:
                q = q.where(ITEMS.c.idx < stop)
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            yield [(int(i), x) for i, x in rows]
            last = int(rows[-1][0])


def _outcome(written: Sequence[ItemResult], *, skipped: int) -> WriteOutcome:
    """How many of ``written`` moved to each final state."""
    return WriteOutcome(
        done=sum(r.status == C.ITEM_DONE for r in written),
        failed=sum(r.status == C.ITEM_FAILED for r in written),
        cancelled=sum(r.status == C.ITEM_CANCELLED for r in written),
        skipped=skipped,
    )
