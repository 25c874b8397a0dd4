"""What a worker process does with one message, checked in the store (no broker needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pipeq import constants as C
from pipeq.primitives import ItemResult
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row
from pipeq.worker.context import WorkerContext

TASK = "text-classification"


def submit(
    store: Store, key: ServeKey, texts: list[str], job_id: str = "job", params: dict[str, Any] | None = None
) -> list[list[object]]:
    rows = [NewItem(i, None, t, len(t)) for i, t in enumerate(texts)]
    store.create_job(new_job_row(job_id, key, params=params), [rows])
    return [[i, t] for i, t in enumerate(texts)]


def test_parameters_the_pipeline_rejects_fail_the_job_at_once(ctx: WorkerContext, sqlite_url: str) -> None:
    # Written to the store by anything (the client cannot know every pipeline's parameters): the
    # pipeline's own check refuses them before any input runs, with the reason, on the first delivery.
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, ["good", "also good"], params={"function_to_apply": "cubic"})
    counts = ctx.run_chunk("job", message, None)
    assert counts["failed"] == 2
    rows = list(store.iter_results("job"))
    assert {r["status"] for r in rows} == {C.ITEM_FAILED}
    assert all(r["error"].startswith("invalid parameters for text-classification: KeyError") for r in rows)
    assert {r["attempts"] for r in rows} == {1}
    assert store.job("job").is_final


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


def test_a_broker_marked_first_delivery_runs_batched_and_its_redelivery_one_input_at_a_time(
    ctx: WorkerContext, sqlite_url: str
) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(6)])
    store.claim("job", list(range(6)), redelivered=False)  # a first delivery whose pool child died
    assert store.attempts("job", list(range(6))) == dict.fromkeys(range(6), 0)
    ctx.run_chunk("job", message, None, redelivered=True)  # the broker hands the message back, marked
    assert {row["batch_size"] for row in store.iter_results("job")} == {1}
    assert {row["attempts"] for row in store.iter_results("job")} == {2}


def test_a_broker_marked_first_delivery_counts_one_attempt_an_item(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(6)])
    ctx.run_chunk("job", message, None, redelivered=False)
    rows = list(store.iter_results("job"))
    assert {row["status"] for row in rows} == {"done"} and max(row["batch_size"] for row in rows) > 1
    assert {row["attempts"] for row in rows} == {1}


def test_a_first_delivery_that_raises_counts_its_attempt_before_it_is_acknowledged(
    ctx: WorkerContext, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(4)])
    assert ctx.runtime is not None

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug outside any one input")

    monkeypatch.setattr(ctx.runtime, "stream", broken)
    with pytest.raises(RuntimeError, match="a bug outside"):
        ctx.run_chunk("job", message, None, redelivered=False)
    # Celery acknowledges a failed task, and no marked redelivery follows: the attempt is counted now,
    # so the items queued again (pipeq reconcile) run one at a time and run out of attempts.
    assert store.attempts("job", [0, 1, 2, 3]) == dict.fromkeys(range(4), 1)


def test_items_out_of_attempts_are_failed_not_run(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, ["killer", "fine"])
    store.claim("job", [0])
    for _ in range(C.MAX_ATTEMPTS - 1):
        store.start_attempt("job", 0)  # item 0 ran MAX_ATTEMPTS times and never finished
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


def test_stopping_worker_commits_its_batch_and_hands_the_rest_back(
    ctx: WorkerContext, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery

    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(12)])
    ctx.celery = Celery("t", broker="memory://", set_as_current=False)
    assert ctx.runtime is not None
    stream = ctx.runtime.stream

    def stop_during_first_batch(*args: Any, **kwargs: Any) -> Iterator[Any]:
        steps = stream(*args, **kwargs)
        try:
            for n, step in enumerate(steps):
                if n == 0:
                    ctx.shutting_down.value = 1  # SIGTERM arrives while the first batch runs
                yield step
        finally:
            steps.close()

    monkeypatch.setattr(ctx.runtime, "stream", stop_during_first_batch)
    counts = ctx.run_chunk("job", message, None)
    assert (counts["done"], counts["handed_back"]) == (4, 8), "the running batch (of 4) commits, the rest goes back"
    rows = list(store.iter_results("job"))
    assert sum(r["status"] == "done" for r in rows) == counts["done"]
    left = [r for r in rows if r["status"] == "pending"]
    assert len(left) == counts["handed_back"] and {r["attempts"] for r in left} == {0}, "unstarted: no attempt"
    with ctx.celery.connection_for_read() as conn:  # the memory broker is shared by the whole test process
        queue, handed = conn.SimpleQueue(ctx.cfg.key.queue), []
        while not handed:
            payload = queue.get(timeout=5).payload[1]
            handed = [i for i, _ in payload["items"]] if payload["job_id"] == "job" else []
        assert sorted(handed) == sorted(r["idx"] for r in left)


def test_unreachable_store_is_retried_without_counting_attempts(
    ctx: WorkerContext, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(8)])
    assert ctx.store is not None
    real = ctx.store.record_batches
    outages = {"left": 3}

    def flaky(*args: object, **kwargs: object) -> object:
        if outages["left"]:
            outages["left"] -= 1
            raise OperationalError("UPDATE items", {}, Exception("server closed the connection unexpectedly"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ctx.store, "record_batches", flaky)
    monkeypatch.setattr("pipeq.worker.context.time.sleep", lambda _s: None)
    ctx.run_chunk("job", message, None)
    rows = list(store.iter_results("job"))
    assert {r["status"] for r in rows} == {"done"} and {r["attempts"] for r in rows} == {1}
    assert store.job("job").done == 8


def test_store_down_past_the_budget_hands_the_message_back(
    ctx: WorkerContext, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from sqlalchemy.exc import OperationalError

    from pipeq.errors import StoreError

    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, ["a", "b"])
    assert ctx.store is not None

    def down(*args: object, **kwargs: object) -> object:
        raise OperationalError("SELECT", {}, Exception("connection refused postgresql://u:secret@db/x"))

    monkeypatch.setattr(ctx.store, "job_row", down)
    monkeypatch.setattr("pipeq.worker.context.time.sleep", lambda _s: None)
    ctx.settings = replace(ctx.settings, store_retry_budget=2.0)
    with pytest.raises(StoreError) as err:
        ctx.run_chunk("job", message, None)
    assert "secret" not in str(err.value) and "u:***@" in str(err.value)
    assert {r["status"] for r in store.iter_results("job")} == {"pending"}


def test_a_result_the_store_refuses_fails_alone(
    ctx: WorkerContext, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import DataError

    store = Store(sqlite_url)
    message = submit(store, ctx.cfg.key, [f"text {i}" for i in range(6)])
    assert ctx.store is not None
    real = ctx.store.record_batches

    def picky(job_id: str, batches: list[tuple[list[ItemResult], Any]], *args: object, **kwargs: object) -> object:
        if any(r.idx == 3 and r.status == "done" for results, _ in batches for r in results):
            raise DataError("UPDATE items", {}, Exception("unsupported Unicode escape sequence"))
        return real(job_id, batches, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ctx.store, "record_batches", picky)
    counts = ctx.run_chunk("job", message, None)
    assert (counts["done"], counts["failed"]) == (5, 1)
    rows = list(store.iter_results("job"))
    assert rows[3]["status"] == "failed" and "DataError" in rows[3]["error"]
    assert store.job("job").status == C.JOB_DONE


def test_warm_up_covers_batch_shapes_and_counts_as_load_time(
    sqlite_url: str, model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm-up runs batches from a few tokens up to the model's maximum before the worker says ready,
    and the worker row's load time includes it."""
    import time

    from pipeq import Settings
    from pipeq.worker.config import WorkerConfig
    from pipeq.worker.engines.batched.runtime import PipelineRuntime

    seen: list[int] = []
    real_run = PipelineRuntime.run

    def recording_run(self: PipelineRuntime, items: list[Any], params: dict[str, Any]) -> Iterator[Any]:
        seen.extend(len(self.pipe.tokenizer(text)["input_ids"]) for _, text in items)
        time.sleep(0.3)  # a slow warm-up, so its share of the load time is certain
        yield from real_run(self, items, params)

    monkeypatch.setattr(PipelineRuntime, "run", recording_run)
    cfg = WorkerConfig(key=ServeKey(TASK, model_dir(TASK)), max_batch_size=8, max_batch_tokens=512)
    context = WorkerContext(Settings(broker_url="memory://", database_url=sqlite_url), cfg)
    context.start()
    try:
        assert context.loaded is not None
        (row,) = Store(sqlite_url).live_workers(cfg.key.queue)
        assert row["status"] == "ready"
        assert row["load_seconds"] >= context.loaded.load_seconds + 0.3
        # Its speed on warm shapes is what producers size its first messages by.
        assert row["settings"]["warmup_items_per_second"] > 0
        # Short and long shapes, capped at the model's maximum (128 tokens for the tiny model).
        assert min(seen) <= 10 and 100 <= max(seen) <= 128
        assert len(set(seen)) >= 4
    finally:
        context.stop()


@pytest.mark.parametrize(("device_streams", "threads", "expected"), [(None, 2, 2), (1, 2, 1), (None, 1, 1)])
def test_a_cpu_worker_runs_a_forward_stream_per_torch_thread(
    sqlite_url: str, model_dir: Any, device_streams: int | None, threads: int, expected: int
) -> None:
    """By default a CPU worker runs as many forward passes at once as it has torch threads, each on one
    of them, and says so on its row; ``--streams 1`` keeps one forward pass on every thread."""
    from pipeq import Settings
    from pipeq.worker.config import WorkerConfig

    cfg = WorkerConfig(key=ServeKey(TASK, model_dir(TASK)), threads=threads, streams=device_streams, warmup=False)
    context = WorkerContext(Settings(broker_url="memory://", database_url=sqlite_url), cfg)
    context.start()
    try:
        assert context.runtime is not None
        assert context.runtime.streams == expected
        assert context.runtime.stream_threads == (threads // expected if expected > 1 else None)
        (row,) = Store(sqlite_url).live_workers(cfg.key.queue)
        assert (row["settings"]["forward_streams"], row["settings"]["torch_threads"]) == (expected, threads)
        # And it runs a message's items to the same results either way
        counts = context.run_chunk("job", submit(Store(sqlite_url), cfg.key, [f"text {i}" for i in range(9)]), None)
        assert counts["done"] == 9
    finally:
        context.stop()


def test_streams_are_checked_against_threads_and_the_device() -> None:
    from pipeq.errors import ConfigurationError
    from pipeq.worker.config import WorkerConfig

    key = ServeKey(TASK, "m")
    with pytest.raises(ConfigurationError, match="--streams 4 needs at least as many --threads"):
        WorkerConfig(key=key, threads=2, streams=4)
    with pytest.raises(ConfigurationError, match="--streams must be at least 1"):
        WorkerConfig(key=key, streams=0)
    assert WorkerConfig(key=key, device="cuda:0").resolved_streams(8) == 1
    assert WorkerConfig(key=key).resolved_streams(32) == C.MAX_CPU_STREAMS
    assert WorkerConfig(key=key, streams=3).resolved_streams(2) == 2
