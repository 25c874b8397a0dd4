"""The reconciler queues again what a stalled job still has pending, once, and only when the queue is idle."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import update

from pipeq import constants as C
from pipeq.models import Job, utcnow
from pipeq.models.store import ItemResult, Store, new_job_row
from pipeq.reconcile import reconcile
from pipeq.routing import ServeKey

KEY = ServeKey("text-classification", "/models/m")


@pytest.fixture
def celery() -> Iterator[Celery]:
    app = Celery("reconcile-test", broker="memory://", set_as_current=False)
    drain(app, KEY.queue)  # the memory transport is shared by every app in this process
    yield app
    drain(app, KEY.queue)
    app.close()


def add_job(store: Store, job_id: str, n: int, *, idle_for: float, key: ServeKey = KEY) -> None:
    rows = [
        {"job_id": job_id, "idx": i, "input_id": None, "input": f"text {i}", "status": "pending", "attempts": 0}
        for i in range(n)
    ]
    store.create_job(new_job_row(job_id, key), [rows])
    long_ago = utcnow() - timedelta(seconds=idle_for)
    with store.engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(published_at=long_ago))


def live_worker(store: Store, queue: str = KEY.queue) -> None:
    store.register_worker(
        {"id": f"w-{queue[-6:]}", "host": "h", "pid": 1, "queue": queue, "task": KEY.task, "model": KEY.model,
         "precision": "fp32", "device": "cpu", "status": "ready", "settings": {}}
    )  # fmt: skip


def drain(celery: Celery, queue: str) -> list[dict[str, Any]]:
    out = []
    with celery.connection_for_read() as conn:
        q = conn.SimpleQueue(queue)
        while True:
            try:
                out.append(q.get(timeout=0.2).payload[1])
            except q.Empty:
                return out


def test_stalled_job_is_queued_again_once(store: Store, celery: Celery) -> None:
    live_worker(store)
    add_job(store, "lost", 10, idle_for=600)
    store.claim("lost", [0, 1])
    store.record_batch("lost", [ItemResult(0, C.ITEM_DONE, output=1)], None, worker_id=None,
                       model_revision=None, precision="fp32", device="cpu")  # fmt: skip
    # The claim and the write above are progress: nothing is stalled yet.
    assert reconcile(store, celery, stalled_after=300, chunk_size=4) == []
    with store.engine.begin() as conn:
        conn.execute(update(Job.__table__).values(activity_at=utcnow() - timedelta(seconds=600)))
    (requeued,) = reconcile(store, celery, stalled_after=300, chunk_size=4)
    assert (requeued.job_id, requeued.items, requeued.messages) == ("lost", 9, 3)
    messages = drain(celery, KEY.queue)
    assert sorted(i for m in messages for i, _ in m["items"]) == list(range(1, 10))
    assert all(m["job_id"] == "lost" for m in messages)
    # A second pass right away finds the job just requeued: nothing is sent twice.
    assert reconcile(store, celery, stalled_after=300, chunk_size=4) == []
    assert store.job_row("lost")["requeues"] == 1  # type: ignore[index]


def test_a_job_waiting_behind_a_busy_queue_is_left_alone(store: Store, celery: Celery) -> None:
    live_worker(store)
    add_job(store, "waiting", 5, idle_for=600)
    add_job(store, "running", 5, idle_for=600)
    store.claim("running", [0])  # a worker is on the queue right now
    assert reconcile(store, celery, stalled_after=300, chunk_size=4) == []


def test_queues_without_a_live_worker_are_skipped_unless_asked(store: Store, celery: Celery) -> None:
    add_job(store, "orphan", 3, idle_for=600)
    assert reconcile(store, celery, stalled_after=300, chunk_size=4) == []
    (requeued,) = reconcile(store, celery, stalled_after=300, chunk_size=4, live_only=False)
    assert requeued.items == 3


def test_finished_and_fresh_jobs_are_not_touched(store: Store, celery: Celery) -> None:
    live_worker(store)
    add_job(store, "fresh", 3, idle_for=10)
    add_job(store, "cancelled", 3, idle_for=600)
    store.cancel_job("cancelled")
    assert reconcile(store, celery, stalled_after=300, chunk_size=4) == []
    assert drain(celery, KEY.queue) == []
