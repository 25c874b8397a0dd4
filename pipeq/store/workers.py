"""Workers and their calibrations: registration, heartbeats, who is live."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import insert, select, update

from pipeq import constants as C
from pipeq.primitives import utcnow
from pipeq.store.base import CALIBRATIONS, WORKERS, StoreBase
from pipeq.store.engine import as_utc


class WorkerQueries(StoreBase):
    """The ``workers`` and ``calibrations`` tables."""

    # -------------------------------------------------------------- workers

    def register_worker(self, row: dict[str, Any]) -> None:
        now = utcnow()
        with self.writer.begin() as conn:
            conn.execute(insert(WORKERS), [{"started_at": now, "heartbeat_at": now, **row}])

    def update_worker(self, worker_id: str, **values: Any) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(WORKERS).where(WORKERS.c.id == worker_id).values(**values))

    def heartbeat(self, worker_id: str, *, current_job: str | None = None, **totals: float) -> None:
        """Fresh heartbeat, the job being run, and running totals (items_done, busy_seconds, write_seconds)."""
        self.update_worker(worker_id, heartbeat_at=utcnow(), current_job=current_job, **totals)

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
