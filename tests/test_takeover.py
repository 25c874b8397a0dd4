"""A dead worker's claim, taken over by a live one: the lease on the worker's row, the atomic takeover,
the republished items (only the pending ones of its claim), and a worker declared lost by mistake."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from test_store import done, make_job, record

import pipeq.broker.reconcile as reconcile_module
from pipeq import constants as C
from pipeq.broker.reconcile import take_over
from pipeq.primitives import Lease, utcnow
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.store.base import WORKERS

#: The queue of ``make_job``'s jobs, which their workers serve.
QUEUE = ServeKey("text-classification", "/m").queue


def register(store: Store, worker_id: str, queue: str = QUEUE, *, silent_for: float = 0.0) -> None:
    store.register_worker(
        {
            "id": worker_id,
            "host": "h",
            "pid": 1,
            "queue": queue,
            "task": "text-classification",
            "model": "/m",
            "precision": "fp32",
            "device": "cpu",
            "status": "ready",
        }
    )
    if silent_for:
        silence(store, worker_id, silent_for)


def silence(store: Store, worker_id: str, seconds: float) -> None:
    with store.writer.begin() as conn:
        conn.execute(
            update(WORKERS).where(WORKERS.c.id == worker_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def row(store: Store, worker_id: str) -> dict[str, Any]:
    return next(w for w in _rows(store) if w["id"] == worker_id)


def _rows(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(WORKERS)).mappings()]


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What ``take_over`` sends to the broker, recorded instead of sent."""
    sent: list[dict[str, Any]] = []

    def fake_publish(celery: Any, job_id: str, queue: str, items: Any, **kwargs: Any) -> int:
        sent.append({"job": job_id, "queue": queue, "items": list(items), **kwargs})
        return 1

    monkeypatch.setattr(reconcile_module, "publish_chunks", fake_publish)
    return sent


def test_the_claim_writes_the_lease_on_the_worker_row(store: Store) -> None:
    job = make_job(store, 6)
    register(store, "w1")
    store.claim(job, [2, 3, 4], lease=Lease("w1", slice_end=True))
    assert row(store, "w1")["lease"] == {"job": job, "idxs": [2, 3, 4], "slice_end": True}
    store.claim(job, [5], lease=Lease("w1"))
    assert row(store, "w1")["lease"] == {"job": job, "idxs": [5], "slice_end": False}, "the next claim replaces it"


def test_a_silent_worker_is_taken_over_once_and_only_its_pending_items_go_back(
    store: Store, published: list[dict[str, Any]]
) -> None:
    job = make_job(store, 8)
    register(store, "dead")
    register(store, "alive")
    store.claim(job, [0, 1, 2, 3], lease=Lease("dead", slice_end=True))
    record(store, job, [done(0), done(1)])  # committed before it died
    silence(store, "dead", 31)
    taken = take_over(store, object(), dead_after=30, queues=[QUEUE])  # type: ignore[arg-type]
    assert [(t.worker_id, t.job_id, t.items) for t in taken] == [("dead", job, 2)]
    assert taken[0].silent_seconds >= 30
    (message,) = published
    assert sorted(idx for idx, _ in message["items"]) == [2, 3]
    assert message["slice_end"] is True, "the job's window moves on when the dead message ended a slice"
    assert message["queue"] == QUEUE and message["chunk_size"] >= 1
    dead = row(store, "dead")
    assert dead["status"] == C.WORKER_LOST and dead["stopped_at"] is not None
    assert [w["id"] for w in store.live_workers(QUEUE)] == ["alive"]
    # A second pass (or another survivor) finds nothing left to take.
    assert take_over(store, object(), dead_after=30, queues=[QUEUE]) == []  # type: ignore[arg-type]
    assert len(published) == 1


def test_the_items_a_dead_first_delivery_left_go_back_counted_as_tried(
    store: Store, published: list[dict[str, Any]]
) -> None:
    job = make_job(store, 4)
    register(store, "dead")
    # A first delivery from a broker that marks redeliveries writes no attempt on its items.
    assert store.claim(job, [0, 1, 2, 3], lease=Lease("dead"), redelivered=False) == dict.fromkeys(range(4), 0)
    record(store, job, [done(0)])
    silence(store, "dead", 31)
    (taken,) = take_over(store, object(), dead_after=30, queues=[QUEUE])  # type: ignore[arg-type]
    assert taken.items == 3
    assert store.attempts(job, [0, 1, 2, 3]) == {1: 1, 2: 1, 3: 1}, "the lost delivery's attempt is counted"
    # So the message queued again runs them one at a time: an input that killed the worker runs out.
    assert store.claim(job, [1, 2, 3], redelivered=False) == {1: 1, 2: 1, 3: 1}


def test_a_worker_dead_after_its_last_write_still_moves_the_jobs_window_on(
    store: Store, published: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(store, 8)
    register(store, "dead")
    store.claim(job, [0, 1], lease=Lease("dead", slice_end=True))
    record(store, job, [done(0), done(1)])  # it wrote its last batch and died before publishing the next slice
    silence(store, "dead", 60)
    moved: list[str] = []
    monkeypatch.setattr(reconcile_module, "top_up", lambda store, celery, job: moved.append(job["id"]) or 0)
    (taken,) = take_over(store, object(), dead_after=30)  # type: ignore[arg-type]
    assert taken.items == 0 and moved == [job]


def test_live_stopped_and_other_queue_workers_are_left_alone(store: Store, published: list[dict[str, Any]]) -> None:
    job = make_job(store, 4)
    register(store, "recent", silent_for=10)
    register(store, "elsewhere", "pipeq.other", silent_for=60)
    register(store, "stopped", silent_for=60)
    store.update_worker("stopped", status="stopped", stopped_at=utcnow())
    for worker in ("recent", "elsewhere", "stopped"):
        store.claim(job, [0], lease=Lease(worker))
    assert take_over(store, object(), dead_after=30, queues=[QUEUE]) == []  # type: ignore[arg-type]
    assert not published
    assert row(store, "stopped")["status"] == "stopped"


def test_nothing_is_published_for_a_finished_or_cancelled_job(store: Store, published: list[dict[str, Any]]) -> None:
    job = make_job(store, 2)
    register(store, "dead")
    store.claim(job, [0, 1], lease=Lease("dead"))
    store.cancel_job(job)
    silence(store, "dead", 60)
    (taken,) = take_over(store, object(), dead_after=30)  # type: ignore[arg-type]
    assert (taken.worker_id, taken.items) == ("dead", 0)
    assert not published


def test_a_worker_declared_lost_by_mistake_counts_as_live_again(store: Store, published: list[dict[str, Any]]) -> None:
    register(store, "slow", silent_for=60)
    take_over(store, object(), dead_after=30)  # type: ignore[arg-type]
    assert row(store, "slow")["status"] == C.WORKER_LOST
    assert store.heartbeat("slow") is False, "its heartbeat tells it"
    again = row(store, "slow")
    assert (again["status"], again["stopped_at"]) == ("ready", None)
    assert [w["id"] for w in store.live_workers()] == ["slow"]
    assert store.heartbeat("slow") is True
    # One still loading its model comes back as loading, not ready.
    silence(store, "slow", 60)
    take_over(store, object(), dead_after=30)  # type: ignore[arg-type]
    assert store.heartbeat("slow", status="loading") is False
    assert row(store, "slow")["status"] == "loading"


def test_racing_survivors_take_a_dead_worker_over_exactly_once(pg_url: str, published: list[dict[str, Any]]) -> None:
    store = Store(pg_url)
    job = make_job(store, 4)
    register(store, "dead")
    store.claim(job, [0, 1, 2, 3], lease=Lease("dead"))
    silence(store, "dead", 60)
    survivors = [Store(pg_url) for _ in range(6)]
    start = threading.Barrier(len(survivors))
    taken: list[Any] = []

    def survivor(own: Store) -> None:
        start.wait()
        taken.extend(take_over(own, object(), dead_after=30))  # type: ignore[arg-type]

    threads = [threading.Thread(target=survivor, args=(s,)) for s in survivors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 1 and len(published) == 1
    assert sorted(idx for idx, _ in published[0]["items"]) == [0, 1, 2, 3]
    for s in [store, *survivors]:
        s.close()


def test_a_worker_judges_others_only_after_dead_after_of_its_own_contact_with_the_store() -> None:
    from pipeq.worker.contact import StoreContact

    clock = [100.0]
    contact = StoreContact(dead_after=30, slow_after=10, clock=lambda: clock[0])
    assert not contact.may_judge(), "no contact yet"
    contact.reached(clock[0])
    clock[0] += 29
    assert not contact.may_judge()
    clock[0] += 1
    assert contact.may_judge(), "30 s of unbroken contact"
    # The store was unreachable (a heartbeat failed): the first beat through starts the count again.
    contact.lost()
    clock[0] += 60
    contact.reached(clock[0])
    clock[0] += 29
    assert not contact.may_judge(), "others whose heartbeats failed too get a full dead_after to beat again"
    clock[0] += 1
    assert contact.may_judge()
    # A heartbeat that waited 35 s for the store's lock: every heartbeat waited as long.
    began = clock[0]
    clock[0] += 35
    contact.reached(began)
    assert not contact.may_judge()
    clock[0] += 30
    assert contact.may_judge()
