"""A job report's read-only aggregates: the database counts and sums, only per-batch timing is streamed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from pipeq import constants as C
from pipeq.store.base import BATCHES, ITEMS, WORKERS, StoreBase
from pipeq.store.engine import as_utc

#: Rows read per round trip while streaming a job's batches or errors.
STREAM_ROWS = 10_000


class ReportQueries(StoreBase):
    """What ``pipeq.report`` reads: per-worker sums, batch shapes, failure groups, timing columns."""

    def batch_sums_by_worker(self, job_id: str) -> list[tuple[Any, ...]]:
        """Per worker: (worker_id, batches, items, real and padded tokens, total/preprocess/forward/postprocess ms)."""
        b = BATCHES.c
        with self.engine.connect() as conn:
            return [
                tuple(row)
                for row in conn.execute(
                    select(
                        b.worker_id,
                        func.count(),
                        func.sum(b.size),
                        func.sum(b.real_tokens),
                        func.sum(b.padded_tokens),
                        func.sum(b.total_ms),
                        func.sum(b.preprocess_ms),
                        func.sum(b.forward_ms),
                        func.sum(b.postprocess_ms),
                    )
                    .where(b.job_id == job_id)
                    .group_by(b.worker_id)
                )
            ]

    def workers_by_id(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The ``workers`` rows of ``ids`` that still exist."""
        if not ids:
            return {}
        with self.engine.connect() as conn:
            return {r["id"]: dict(r) for r in conn.execute(select(WORKERS).where(WORKERS.c.id.in_(ids))).mappings()}

    def batch_rows_histogram(self, job_id: str) -> list[tuple[int, int]]:
        """(forward rows, batches with that many) of a job, by rows."""
        b = BATCHES.c
        q = select(b.rows, func.count()).where(b.job_id == job_id).group_by(b.rows).order_by(b.rows)
        with self.engine.connect() as conn:
            return [(int(rows), int(n)) for rows, n in conn.execute(q)]

    def batch_revisions(self, job_id: str) -> list[str]:
        """The model revisions a job's batches ran with."""
        q = select(BATCHES.c.model_revision).where(BATCHES.c.job_id == job_id).distinct()
        with self.engine.connect() as conn:
            return sorted(r for r in conn.scalars(q) if r)

    def batch_span(self, job_id: str) -> tuple[datetime | None, datetime | None]:
        """When a job's first batch started and its last one finished (None without batches)."""
        b = BATCHES.c
        with self.engine.connect() as conn:
            start, end = conn.execute(
                select(func.min(b.started_at), func.max(b.finished_at)).where(b.job_id == job_id)
            ).one()
        return as_utc(start), as_utc(end)

    def failure_groups(self, job_id: str) -> Iterator[tuple[str | None, int, int]]:
        """(error text, items, first idx) of a job's failed items, one row per distinct error text."""
        with self.engine.connect() as conn:
            grouped = conn.execution_options(yield_per=STREAM_ROWS).execute(
                select(ITEMS.c.error, func.count(), func.min(ITEMS.c.idx))
                .where(ITEMS.c.job_id == job_id, ITEMS.c.status == C.ITEM_FAILED)
                .group_by(ITEMS.c.error)
            )
            for error, n, idx in grouped:
                yield error, int(n), int(idx)

    def iter_batch_timing(self, job_id: str) -> Iterator[tuple[Any, ...]]:
        """(worker_id, size, finished_at, queue_wait, preprocess, forward, postprocess, total ms) of each batch."""
        b = BATCHES.c
        with self.engine.connect() as conn:
            rows = conn.execution_options(yield_per=STREAM_ROWS).execute(
                select(
                    b.worker_id,
                    b.size,
                    b.finished_at,
                    b.queue_wait_ms,
                    b.preprocess_ms,
                    b.forward_ms,
                    b.postprocess_ms,
                    b.total_ms,
                ).where(b.job_id == job_id)
            )
            for row in rows:
                worker_id, size, finished_at, *phases = row
                yield (worker_id, size, as_utc(finished_at), *phases)

    def output_tokens_by_worker(self, job_id: str) -> list[tuple[str | None, int, int]]:
        """Per worker: (worker_id, generated items, their output tokens) of a generation job, by the ``batches``
        row that wrote each item (worker None: an item written without one, or by a worker whose row is gone)."""
        worker = BATCHES.c.worker_id
        q = (
            select(worker, func.count(), func.sum(ITEMS.c.output_tokens))
            .select_from(ITEMS.outerjoin(BATCHES, ITEMS.c.batch_id == BATCHES.c.id))
            .where(ITEMS.c.job_id == job_id, ITEMS.c.output_tokens.is_not(None))
            .group_by(worker)
        )
        with self.engine.connect() as conn:
            return [(w, int(n), int(tokens or 0)) for w, n, tokens in conn.execute(q)]

    def iter_generation_timing(self, job_id: str) -> Iterator[tuple[float | None, float | None, int]]:
        """(first_token_ms, decode_ms, output_tokens) of each item a generation job generated."""
        i = ITEMS.c
        with self.engine.connect() as conn:
            rows = conn.execution_options(yield_per=STREAM_ROWS).execute(
                select(i.first_token_ms, i.decode_ms, i.output_tokens).where(
                    i.job_id == job_id, i.output_tokens.is_not(None)
                )
            )
            for first, decode, tokens in rows:
                yield first, decode, int(tokens)
