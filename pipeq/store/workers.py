"""Workers and their calibrations: registration, heartbeats, who is live."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, insert, select, update

from pipeq import constants as C
from pipeq.primitives import utcnow
from pipeq.store.base import CALIBRATIONS, ITEMS, JOBS, WORKERS, StoreBase
from pipeq.store.engine import as_utc


class WorkerQueries(StoreBase):
    """The ``workers`` and ``calibrations`` tables."""

    # -------------------------------------------------------------- workers

    def register_worker(self, row: dict[str, Any]) -> None:
        with self.writer.begin() as conn:
            now = utcnow()  # once the write lock is held (SQLite: BEGIN IMMEDIATE), not before waiting for it
            conn.execute(insert(WORKERS), [{"started_at": now, "heartbeat_at": now, **row}])

    def update_worker(self, worker_id: str, **values: Any) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(WORKERS).where(WORKERS.c.id == worker_id).values(**values))

    def heartbeat(
        self, worker_id: str, *, current_job: str | None = None, status: str = "ready", **totals: float
    ) -> bool:
        """Fresh heartbeat, the job being run, and running totals (items_done, busy_seconds, write_seconds).

        Returns False when the worker had been declared lost (its heartbeats stopped for longer than
        ``dead_after``, and a live worker queued its claimed items again); it counts as live again, in
        ``status`` (what it is doing: ``ready``, or ``loading`` while its model loads).

        The time is taken once the write lock is held: a heartbeat that waited for it (SQLite's lock held
        by a long write) is fresh when it lands, not as old as the wait.
        """
        with self.writer.begin() as conn:
            values = {"heartbeat_at": utcnow(), "current_job": current_job, **totals}
            conn.execute(update(WORKERS).where(WORKERS.c.id == worker_id).values(**values))
            revived = conn.execute(
                update(WORKERS)
                .where(WORKERS.c.id == worker_id, WORKERS.c.status == C.WORKER_LOST)
                .values(status=status, stopped_at=None)
            ).rowcount
        return not revived

    def take_over(self, dead_after: float, queue: str | None = None) -> list[dict[str, Any]]:
        """Declare lost the workers (on ``queue``) silent for ``dead_after`` seconds; returns their rows.

        Each is taken by one caller only: the UPDATE that marks it lost is conditional, so of two
        live workers that find the same dead one, one gets its row and the other nothing.
        """
        now = utcnow()
        silent = and_(WORKERS.c.stopped_at.is_(None), WORKERS.c.heartbeat_at < now - timedelta(seconds=dead_after))
        q = select(WORKERS.c.id).where(silent)
        if queue is not None:
            q = q.where(WORKERS.c.queue == queue)
        taken: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            ids = list(conn.execute(q).scalars())
        for worker_id in ids:
            with self.writer.begin() as conn:
                won = conn.execute(
                    update(WORKERS)
                    .where(WORKERS.c.id == worker_id, silent)
                    .values(status=C.WORKER_LOST, stopped_at=now, current_job=None)
                ).rowcount
                if won:
                    taken.append(dict(conn.execute(select(WORKERS).where(WORKERS.c.id == worker_id)).mappings().one()))
        return taken

    def bind_revision(self, job_id: str, revision: str) -> str | None:
        """The model revision ``job_id`` runs on: ``revision`` if it had none yet (its first claimer's), else its own.

        Conditional, so of two workers binding a new job at once, the second gets the first's revision.
        """
        with self.writer.begin() as conn:
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.resolved_revision.is_(None))
                .values(resolved_revision=revision)
            )
            return conn.execute(select(JOBS.c.resolved_revision).where(JOBS.c.id == job_id)).scalar_one_or_none()

    def stale_workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Workers that never said they stopped but whose heartbeat is old (killed, host lost)."""
        since = utcnow() - timedelta(seconds=C.HEARTBEAT_STALE_AFTER)
        q = select(WORKERS).where(WORKERS.c.stopped_at.is_(None), WORKERS.c.heartbeat_at < since)
        if queue is not None:
            q = q.where(WORKERS.c.queue == queue)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(WORKERS.c.heartbeat_at.desc()).limit(100)).mappings()]

    def live_workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Workers whose heartbeat is fresh and that have not stopped."""
        since = utcnow() - timedelta(seconds=C.HEARTBEAT_STALE_AFTER)
        q = select(WORKERS).where(WORKERS.c.stopped_at.is_(None), WORKERS.c.heartbeat_at >= since)
        if queue is not None:
            q = q.where(WORKERS.c.queue == queue)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def held_jobs(self, queue: str) -> set[str]:
        """Jobs of which a live worker on ``queue`` holds claimed items that are still pending.

        Such a job is being run (or will be taken over with its claim if that worker dies): its messages
        are not lost, whatever the broker holds. A worker's lease stays on its row after its message is
        done, so only a lease with pending items counts.
        """
        held: set[str] = set()
        for worker in self.live_workers(queue):
            lease = worker.get("lease") or {}
            job_id, idxs = lease.get("job"), lease.get("idxs") or []
            if not job_id or not idxs or job_id in held:
                continue
            q = select(ITEMS.c.idx).where(
                ITEMS.c.job_id == job_id, ITEMS.c.idx.in_([int(i) for i in idxs]), ITEMS.c.status == C.ITEM_PENDING
            )
            with self.engine.connect() as conn:
                if conn.execute(q.limit(1)).first() is not None:
                    held.add(job_id)
        return held

    def served_custom_tasks(self) -> frozenset[str]:
        """Task names that live workers serve (custom pipeline tasks are only known through them)."""
        return frozenset(w["task"] for w in self.live_workers())

    # --------------------------------------------------------- calibrations

    def save_calibration(self, row: dict[str, Any]) -> None:
        """Store one ``--calibrate`` result (a ``calibrations`` row without id)."""
        with self.writer.begin() as conn:
            conn.execute(insert(CALIBRATIONS), [{"created_at": utcnow(), **row}])

    def latest_calibration(
        self, *, task: str, model: str, revision: str | None, precision: str, device: str, device_name: str
    ) -> dict[str, Any] | None:
        """The newest calibration of exactly this model, revision, precision and device, if any."""
        c = CALIBRATIONS.c
        q = (
            select(CALIBRATIONS)
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
