"""The reconciler queues again what a stalled job still has pending, once, and only when the queue is idle."""

from __future__ import annotations

import json
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
    store.open_window(job_id, cursor=n, chunk_size=4)  # as submit does: all of it published
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
    assert reconcile(store, celery, stalled_after=300) == []
    with store.engine.begin() as conn:
        conn.execute(update(Job.__table__).values(activity_at=utcnow() - timedelta(seconds=600)))
    (requeued,) = reconcile(store, celery, stalled_after=300)
    assert (requeued.job_id, requeued.items) == ("lost", 9)
    messages = drain(celery, KEY.queue)
    assert [len(m["items"]) for m in messages] == [4, 4, 1]
    assert sorted(i for m in messages for i, _ in m["items"]) == list(range(1, 10))
    assert all(m["job_id"] == "lost" for m in messages)
    # A second pass right away finds the job just requeued: nothing is sent twice.
    assert reconcile(store, celery, stalled_after=300) == []
    assert store.job_row("lost")["requeues"] == 1  # type: ignore[index]


def test_a_job_waiting_behind_a_busy_queue_is_left_alone(store: Store, celery: Celery) -> None:
    live_worker(store)
    add_job(store, "waiting", 5, idle_for=600)
    add_job(store, "running", 5, idle_for=600)
    store.claim("running", [0])  # a worker is on the queue right now
    assert reconcile(store, celery, stalled_after=300) == []


def test_queues_without_a_live_worker_are_skipped_unless_asked(store: Store, celery: Celery) -> None:
    add_job(store, "orphan", 3, idle_for=600)
    assert reconcile(store, celery, stalled_after=300) == []
    (requeued,) = reconcile(store, celery, stalled_after=300, live_only=False)
    assert requeued.items == 3


def test_finished_and_fresh_jobs_are_not_touched(store: Store, celery: Celery) -> None:
    live_worker(store)
    add_job(store, "fresh", 3, idle_for=10)
    add_job(store, "cancelled", 3, idle_for=600)
    store.cancel_job("cancelled")
    assert reconcile(store, celery, stalled_after=300) == []
    assert drain(celery, KEY.queue) == []


def test_status_and_workers_show_liveness(store: Store, store_url: str) -> None:
    from typer.testing import CliRunner

    from pipeq.cli import app
    from pipeq.models import Worker

    env = {"PIPEQ_DATABASE_URL": store_url, "PIPEQ_BROKER_URL": "memory://"}
    add_job(store, "job1", 3, idle_for=0)
    out = CliRunner().invoke(app, ["status", "job1"], env=env)
    assert out.exit_code == 0 and "0 live on its queue" in out.output
    assert (
        "warning: no live worker serves this job" in out.output
        and "pipeq worker --task text-classification" in out.output
    )
    live_worker(store)
    store.heartbeat(f"w-{KEY.queue[-6:]}", current_job="job1", items_done=42)
    store.register_worker(
        {"id": "w-dead", "host": "gone", "pid": 9, "queue": KEY.queue, "task": KEY.task, "model": KEY.model,
         "precision": "fp32", "device": "cpu", "status": "ready", "settings": {}}
    )  # fmt: skip
    with store.writer.begin() as conn:
        conn.execute(
            update(Worker.__table__)
            .where(Worker.__table__.c.id == "w-dead")
            .values(heartbeat_at=utcnow() - timedelta(minutes=5))
        )
    out = CliRunner().invoke(app, ["status", "job1", "--json"], env=env)
    status = json.loads(out.stdout)
    assert [w["current_job"] for w in status["workers"]["live"]] == ["job1"]
    assert [w["host"] for w in status["workers"]["stale"]] == ["gone"]
    out = CliRunner().invoke(app, ["workers"], env=env)
    assert "42 items, running job job1" in out.output and "1 stale workers" in out.output and "gone:9" in out.output
