"""What a worker process does with one message, checked in the store (no broker needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pipeq import constants as C
from pipeq.models.store import Store, new_job_row
from pipeq.routing import ServeKey
from pipeq.settings import Settings
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext

TASK = "text-classification"


@pytest.fixture
def ctx(sqlite_url: str, model_dir: Callable[[str], str]) -> Iterator[WorkerContext]:
    context = WorkerContext(
        Settings(broker_url="memory://", database_url=sqlite_url),
        WorkerConfig(key=ServeKey(TASK, model_dir(TASK)), max_batch_size=4, warmup=False),
    )
    context.start()
    yield context
    context.stop()


def submit(store: Store, key: ServeKey, texts: list[str], job_id: str = "job") -> list[list[object]]:
    rows = [
        {"job_id": job_id, "idx": i, "input_id": None, "input": t, "status": "pending", "attempts": 0}
        for i, t in enumerate(texts)
    ]
    store.create_job(
        new_job_row(job_id, key),
        [rows],
    )
    return [[i, t] for i, t in enumerate(texts)]


def test_duplicate_delivery_changes_nothing(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(10)])
    first = ctx.run_chunk("job", message, None)
    before = list(store.iter_results("job"))
    second = ctx.run_chunk("job", message, None)
    assert (first["done"], second.get("done", 0), second["skipped"]) == (10, 0, 10)
    assert list(store.iter_results("job")) == before
    assert store.job("job").status == C.JOB_DONE


def test_redelivered_message_runs_one_input_at_a_time(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(6)])
    store.claim("job", list(range(6)))  # a first delivery whose worker died
    ctx.run_chunk("job", message, None)
    sizes = {row["batch_size"] for row in store.iter_results("job")}
    assert sizes == {1}
    assert {row["attempts"] for row in store.iter_results("job")} == {2}


def test_items_out_of_attempts_are_failed_not_run(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, ["killer", "fine"])
    for _ in range(C.MAX_ATTEMPTS):
        store.claim("job", [0])  # item 0 was delivered MAX_ATTEMPTS times and never finished
    counts = ctx.run_chunk("job", message, None)
    assert (counts["done"], counts["failed"]) == (1, 1)
    rows = list(store.iter_results("job"))
    assert rows[0]["status"] == "failed" and "gave up after 3 deliveries" in rows[0]["error"]
    assert rows[1]["status"] == "done"


def test_a_job_for_another_configuration_is_refused(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    other = ServeKey(TASK, ctx.cfg.key.model, "int8")
    message = submit(store, other, ["a", "b"])
    ctx.run_chunk("job", message, None)
    rows = list(store.iter_results("job"))
    assert {r["status"] for r in rows} == {"failed"}
    assert "but this worker serves" in rows[0]["error"]


def test_cancelled_job_is_not_run(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, ["a", "b"])
    store.cancel_job("job")
    assert ctx.run_chunk("job", message, None) == {"skipped": 2}
    assert {r["status"] for r in store.iter_results("job")} == {"cancelled"}


def test_worker_row_records_load(ctx: WorkerContext, sqlite_url: str) -> None:
    (row,) = Store(sqlite_url).live_workers(ctx.cfg.key.queue)
    assert row["status"] == "ready" and row["footprint_bytes"] > 0 and row["load_seconds"] > 0
    assert row["settings"]["max_batch_size"] == 4
