"""A job's window on the broker: bounded, moved by workers, fair between jobs, priorities first."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from conftest import in_thread_worker
from pipeq import Client, Settings
from pipeq.broker.app import marks_redeliveries
from pipeq.broker.publish import broker_priority
from pipeq.broker.window import SLICE_CHUNKS, WINDOW_SLICES, requeue, top_up
from pipeq.errors import BrokerError, ConfigurationError
from pipeq.models import Item
from pipeq.ordering import order_key
from pipeq.routing import ServeKey
from pipeq.worker.app import create_worker_app
from pipeq.worker.config import WorkerConfig

TASK = "text-classification"


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return Settings(broker_url="memory://", database_url=sqlite_url, chunk_size=10)


@pytest.fixture
def model(model_dir: Callable[[str], str], tmp_path: Path) -> str:
    return str(shutil.copytree(model_dir(TASK), tmp_path / "model"))  # a queue of this test's own


def capture(client: Client, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(client._celery, "send_task", lambda name, **kw: sent.append(kw))
    return sent


def run_order(texts: list[str]) -> list[int]:
    """Item indexes in the order a job runs them: longest first across the whole job, then input order."""
    return sorted(range(len(texts)), key=lambda i: order_key(len(texts[i]), i))


def sent_items(sent: list[dict[str, Any]]) -> list[int]:
    return [i for m in sent for i, _ in m["kwargs"]["items"]]


def test_a_large_job_keeps_only_its_window_on_the_broker_in_run_order(
    settings: Settings, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"text {i} " * (1 + i % 7) for i in range(1000)]
    order = run_order(texts)
    with Client(settings) as client:
        sent = capture(client, monkeypatch)
        job = client.submit(texts, task=TASK, model=model)
        window = 10 * SLICE_CHUNKS * WINDOW_SLICES
        assert len(sent) == SLICE_CHUNKS * WINDOW_SLICES, "a few slices, not 100 messages"
        # The window holds the job's longest items, whichever part of the input they came from, in run order.
        assert sent_items(sent) == order[:window]
        lengths = [len(x) for m in sent for _, x in m["kwargs"]["items"]]
        assert lengths == sorted(lengths, reverse=True) and lengths[0] == max(map(len, texts))
        assert [m["kwargs"].get("slice_end", False) for m in sent] == [False, False, False, True] * WINDOW_SLICES
        row = client.store.job_row(job.id)
        assert row is not None and (row["publish_cursor"], row["chunk_size"]) == (window, 10)
        # A worker that finishes a slice publishes the next one in run order, once.
        sent.clear()
        assert top_up(client.store, client._celery, row) == 10 * SLICE_CHUNKS
        assert sent_items(sent) == order[window : window + 40]
        assert client.store.job_row(job.id)["publish_cursor"] == window + 40  # type: ignore[index]
        # The job's last slices end the window exactly at its last item.
        while top_up(client.store, client._celery, row):
            pass
        row = client.store.job_row(job.id)
        assert row is not None and row["publish_cursor"] == len(texts)
        assert sorted(set(sent_items(sent))) == sorted(order[window:])


def test_a_slice_the_broker_refuses_goes_back_to_the_window(
    settings: Settings, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"t{i}" for i in range(500)]
    with Client(settings) as client:
        sent = capture(client, monkeypatch)
        job = client.submit(texts, task=TASK, model=model)
        row = client.store.job_row(job.id)
        assert row is not None
        before = (row["publish_cursor"], row["publish_key"])

        def refuse(name: str, **kw: Any) -> None:
            raise ConnectionError("broker down")

        monkeypatch.setattr(client._celery, "send_task", refuse)
        with pytest.raises(BrokerError):
            top_up(client.store, client._celery, row)
        after = client.store.job_row(job.id)
        assert after is not None and (after["publish_cursor"], after["publish_key"]) == before
        # Once the broker is back, the slice goes out from where the window stood.
        sent.clear()
        monkeypatch.setattr(client._celery, "send_task", lambda name, **kw: sent.append(kw))
        assert top_up(client.store, client._celery, after) == 40
        assert sent_items(sent) == run_order(texts)[160:200]


def test_requeue_publishes_the_window_or_restarts_it(
    settings: Settings, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"t{i}" for i in range(500)]
    order = run_order(texts)
    with Client(settings) as client:
        sent = capture(client, monkeypatch)
        job = client.submit(texts, task=TASK, model=model)
        row = client.store.job_row(job.id)
        assert row is not None
        sent.clear()
        # Redis lost the window: everything published but pending goes out again.
        assert requeue(client.store, client._celery, row) == 160
        assert sent_items(sent) == order[:160]
        # The window's items are done, but the message that would move it on was lost: move it now.
        client.store.claim(job.id, order[:160])
        from pipeq.primitives import ItemResult

        client.store.record_batch(job.id, [ItemResult(i, "done", output=1) for i in order[:160]], None,
                                  worker_id=None, model_revision=None, precision="fp32", device="cpu")  # fmt: skip
        sent.clear()
        row = client.store.job_row(job.id)
        assert row is not None
        assert requeue(client.store, client._celery, row) == 40
        assert sent_items(sent) == order[160:200]


def test_requeue_opens_the_window_a_producer_never_opened(
    settings: Settings, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeq.store import NewItem, new_job_row

    with Client(settings) as client:
        sent = capture(client, monkeypatch)
        # Stored through the store API, as a producer that died before publishing leaves it.
        rows = [NewItem(i, None, f"t{i}", len(f"t{i}"))
                for i in range(500)]  # fmt: skip
        client.store.create_job(new_job_row("orphan", ServeKey(TASK, model), chunk_size=10), [rows])
        row = client.store.job_row("orphan")
        assert row is not None and (row["publish_cursor"], row["published_at"]) == (0, None)
        # A whole first window goes out, in the producer's chunk size, and the job counts as published.
        assert requeue(client.store, client._celery, row) == 10 * SLICE_CHUNKS * WINDOW_SLICES
        assert [len(m["kwargs"]["items"]) for m in sent] == [10] * SLICE_CHUNKS * WINDOW_SLICES
        row = client.store.job_row("orphan")
        assert row is not None and row["published_at"] is not None
        assert (row["publish_cursor"], row["chunk_size"]) == (160, 10)


@pytest.fixture
def worker_app(settings: Settings, model: str) -> Iterator[tuple[Celery, WorkerConfig]]:
    cfg = WorkerConfig(key=ServeKey(TASK, model), max_batch_size=8, warmup=False, max_batch_tokens=4096)
    app, ctx = create_worker_app(settings, cfg)
    ctx.start()
    yield app, cfg
    ctx.stop()


def test_a_small_job_does_not_wait_for_a_large_one(
    settings: Settings, model: str, worker_app: tuple[Celery, WorkerConfig]
) -> None:
    app, cfg = worker_app
    with Client(settings) as client:
        # Both jobs are queued before any worker runs: the large one first.
        large = client.submit([f"a long review number {i}" for i in range(800)], task=TASK, model=model)
        small = client.submit(["quick one", "and another"], task=TASK, model=model)
        with in_thread_worker(app, cfg.key.queue):
            small_state = small.wait(timeout=120)
            large_state = large.wait(timeout=300)
        assert small_state.done == 2 and large_state.done == 800
        # How much of the large job was finished when the small one was: from the store, not from a poll.
        with client.store.engine.connect() as conn:
            before = conn.execute(
                sa.select(sa.func.count())
                .select_from(Item.__table__)
                .where(Item.__table__.c.job_id == large.id, Item.__table__.c.finished_at <= small_state.finished_at)
            ).scalar_one()
    assert before < 400, "the small job ran after a few slices of the large one, not after all of it"


def test_priorities() -> None:
    redis, memory = Celery(broker="redis://localhost/0"), Celery(broker="memory://")
    # Redis serves its priority 0 first: pipeq's 9 (most urgent) becomes 0 there.
    assert [broker_priority(redis, p) for p in (0, 5, 9)] == [9, 4, 0]
    assert [broker_priority(memory, p) for p in (0, 5, 9)] == [0, 5, 9]


def test_which_brokers_mark_a_redelivery() -> None:
    marking = ("redis://localhost/0", "rediss://h:6380/1", "sentinel://a:26379;sentinel://b:26379", "amqp://g@h//")
    assert all(marks_redeliveries(url) for url in marking)
    assert not marks_redeliveries("memory://")


@pytest.mark.integration
def test_redis_marks_a_message_it_hands_back_and_not_a_first_delivery(redis_url: str) -> None:
    """What a worker's claim relies on (Store.claim): a message its consumer hands back (Celery rejects a
    lost pool child's message with requeue) comes back marked ``redelivered``; a first delivery does not."""
    import secrets

    from kombu import Connection

    with Connection(redis_url) as conn, conn.SimpleQueue(f"pipeq-test-{secrets.token_hex(4)}") as queue:
        queue.put({"job": "j", "items": [[0, "x"]]})
        first = queue.get(timeout=5)
        assert not first.delivery_info.get("redelivered")
        first.requeue()
        again = queue.get(timeout=5)
        assert again.payload == {"job": "j", "items": [[0, "x"]]}
        assert again.delivery_info.get("redelivered") is True
        again.ack()
        queue.clear()


def test_priority_out_of_range_is_refused(settings: Settings, model: str) -> None:
    with Client(settings) as client, pytest.raises(ConfigurationError, match="priority must be 0 to 9"):
        client.submit(["x"], task=TASK, model=model, priority=10)


@pytest.mark.integration
def test_a_higher_priority_job_runs_first_on_redis(
    sqlite_url: str, redis_url: str, model: str, start_worker: Any
) -> None:
    from pipeq.store import Store

    settings = Settings(broker_url=redis_url, database_url=sqlite_url, chunk_size=16)
    with Client(settings) as client:
        # Queued before any worker runs: the routine job first, the urgent one after it.
        routine = client.submit([f"routine {i}" for i in range(200)], task=TASK, model=model, precision="fp32")
        urgent = client.submit([f"urgent {i}" for i in range(20)], task=TASK, model=model, precision="fp32", priority=9)
        worker = start_worker("--task", TASK, "--model", model, "--precision", "fp32", "--no-warmup",
                              broker_url=redis_url, database_url=sqlite_url)  # fmt: skip
        worker.wait_ready(Store(sqlite_url), ServeKey(TASK, model).queue)
        urgent_state = urgent.wait(timeout=120)
        routine_state = routine.wait(timeout=120)
    assert (urgent_state.done, routine_state.done) == (20, 200)
    assert urgent_state.finished_at is not None and routine_state.started_at is not None
    assert urgent_state.finished_at <= routine_state.started_at, "the urgent job ran before any of the routine one"


def test_messages_hold_about_a_second_of_the_workers_measured_speed(sqlite_url: str) -> None:
    from pipeq import constants as C
    from pipeq.broker.window import chunk_size_for
    from pipeq.store import Store

    store = Store(sqlite_url)
    queue = ServeKey(TASK, "/m").queue
    big = 1_000_000

    def worker(wid: str, *, done: int = 0, busy: float = 0.0, warm: float | None = None) -> None:
        record = {"warmup_items_per_second": warm} if warm else {}
        row = {"id": wid, "host": "h", "pid": 1, "queue": queue, "task": TASK, "model": "/m", "precision": "fp32"}
        store.register_worker({**row, "device": "cpu", "status": "ready", "settings": record})
        store.heartbeat(wid, items_done=done, busy_seconds=busy)

    # Given no worker that measured anything: the default size
    assert chunk_size_for(store, queue, big, None) == C.DEFAULT_CHUNK_SIZE
    # Given a worker whose warm-up ran 1,500 items/s: a second of it
    worker("w1", warm=1500.0)
    assert chunk_size_for(store, queue, big, None) == 1500
    # Given workers that ran real chunks, the median one's running speed wins over warm-ups
    worker("w2", done=30_000, busy=10.0)
    worker("w3", done=20_000, busy=10.0, warm=99.0)
    assert chunk_size_for(store, queue, big, None) == 2000
    # Slow or very fast workers stay within bounds; an explicit size wins; a small job still spreads out
    for wid in ("w4", "w5", "w6"):
        worker(wid, done=10_000_000, busy=10.0)
    assert chunk_size_for(store, queue, big, None) == C.MAX_CHUNK_SIZE
    assert chunk_size_for(store, queue, big, 50) == 50
    assert chunk_size_for(store, queue, 100, None) == C.MIN_CHUNK_SIZE
