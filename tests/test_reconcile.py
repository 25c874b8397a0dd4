"""The reconciler queues again what a stalled job still has pending, once, and only when the queue is idle.

It also queues a job whose producer stored it and never published it, once that commit is old; and
``pipeq reconcile`` / ``pipeq resume JOB`` say what they queued, with the documented exit codes (docs/cli.md).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import update
from typer.testing import CliRunner

from conftest import FaultLedger
from pipeq import Client, Settings
from pipeq import constants as C
from pipeq.broker.publish import publish_chunks
from pipeq.broker.reconcile import reconcile, republish_lost
from pipeq.cli import app as cli_app
from pipeq.errors import BrokerError
from pipeq.models import Job, JobCount
from pipeq.primitives import ItemResult, Lease, utcnow
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row
from pipeq.worker.config import WorkerConfig

KEY = ServeKey("text-classification", "/models/m")


@pytest.fixture
def celery() -> Iterator[Celery]:
    app = Celery("reconcile-test", broker="memory://", set_as_current=False)
    drain(app, KEY.queue)  # the memory transport is shared by every app in this process
    yield app
    drain(app, KEY.queue)
    app.close()


def item_rows(job_id: str, n: int, start: int = 0) -> list[NewItem]:
    return [NewItem(i, None, f"text {i}", len(f"text {i}")) for i in range(start, start + n)]


def store_job(store: Store, job_id: str, n: int, *, key: ServeKey = KEY) -> None:
    """Commit a job as submit does, and publish none of it: its producer died right after the commit."""
    store.create_job(new_job_row(job_id, key, chunk_size=4), [item_rows(job_id, n)])


def age(store: Store, job_id: str, seconds: float, columns: tuple[str, ...] = ("activity_at",)) -> None:
    """Set the job's ``columns`` and its writers' last claim or write (its last activity) to ``seconds`` ago."""
    long_ago = utcnow() - timedelta(seconds=seconds)
    with store.engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(dict.fromkeys(columns, long_ago)))
        counts = JobCount.__table__
        conn.execute(update(counts).where(counts.c.job_id == job_id).values(updated_at=long_ago))


def add_job(store: Store, job_id: str, n: int, *, idle_for: float, key: ServeKey = KEY) -> None:
    store_job(store, job_id, n, key=key)
    store.open_window(job_id, chunk_size=4, items=n)  # as submit does: all of it published
    age(store, job_id, idle_for, ("activity_at", "published_at"))


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
    age(store, "lost", 600)
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
    from pipeq.models import Worker

    settings = Settings(broker_url="memory://", database_url=store_url)
    add_job(store, "job1", 3, idle_for=0)
    out = run_cli(["status", "job1"], settings)
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
    out = run_cli(["status", "job1", "--json"], settings)
    status = json.loads(out.stdout)
    assert [w["current_job"] for w in status["workers"]["live"]] == ["job1"]
    assert [w["host"] for w in status["workers"]["stale"]] == ["gone"]
    out = run_cli(["workers"], settings)
    assert "42 items, running job job1" in out.output and "1 stale workers" in out.output and "gone:9" in out.output


# ------------------------------------------------- jobs whose messages the broker lost


def test_a_job_with_nothing_on_the_broker_is_published_again_after_lost_after(store: Store, celery: Celery) -> None:
    # Given: a published job whose messages are gone (Redis restarted without persistence), idle for 20 s
    live_worker(store)
    add_job(store, "gone", 10, idle_for=20)
    # Then: the stalled-job reconciler waits its five minutes, while the look for lost jobs publishes it now
    assert reconcile(store, celery, stalled_after=300) == []
    (requeued,) = republish_lost(store, celery, lost_after=15)
    assert (requeued.job_id, requeued.items, requeued.lost, requeued.unpublished) == ("gone", 10, True, False)
    assert sorted(i for m in drain(celery, KEY.queue) for i, _ in m["items"]) == list(range(10))
    # And a second look right away sends nothing twice
    assert republish_lost(store, celery, lost_after=15) == []
    assert store.job_row("gone")["requeues"] == 1  # type: ignore[index]


def test_a_job_is_not_lost_while_its_queue_holds_messages_or_a_live_worker_holds_its_items(
    store: Store, celery: Celery
) -> None:
    live_worker(store)
    worker_id = f"w-{KEY.queue[-6:]}"
    add_job(store, "held", 6, idle_for=20)
    # A live worker running a long batch of it: its claim is on its row, its items pending.
    store.claim("held", [0, 1], lease=Lease(worker_id))
    age(store, "held", 20)
    assert republish_lost(store, celery, lost_after=15) == []
    # Too recent: a job moved 5 s ago is not lost.
    record = {"worker_id": worker_id, "model_revision": None, "precision": "fp32", "device": "cpu"}
    store.record_batch("held", [ItemResult(i, C.ITEM_DONE, output=1) for i in (0, 1)], None, **record)
    age(store, "held", 5)
    assert republish_lost(store, celery, lost_after=15) == []
    # Idle long enough, its claim done, but a message waits on its queue (perhaps its own): left alone.
    age(store, "held", 20)
    publish_chunks(celery, "other", KEY.queue, [(0, "x")], chunk_size=1)
    assert republish_lost(store, celery, lost_after=15) == []
    assert [m["job_id"] for m in drain(celery, KEY.queue)] == ["other"]
    # Once the queue is empty, the rest of it goes back: only its pending items.
    (requeued,) = republish_lost(store, celery, lost_after=15)
    assert requeued.items == 4
    assert sorted(i for m in drain(celery, KEY.queue) for i, _ in m["items"]) == [2, 3, 4, 5]


def test_cli_reconcile_finds_a_job_the_broker_lost(store: Store, store_url: str, celery: Celery) -> None:
    settings = Settings(broker_url="memory://", database_url=store_url)
    live_worker(store)
    add_job(store, "gone", 7, idle_for=20)
    out = run_cli(["reconcile"], settings, env={"PIPEQ_LOST_AFTER": "30"})
    assert (out.exit_code, out.stdout, out.stderr) == (0, "", "no dead workers and no stalled jobs\n")
    out = run_cli(["reconcile", "--lost-after", "10"], settings)
    assert (out.exit_code, out.stdout) == (
        0,
        "re-queued 7 pending items of job gone (no message of it on the broker)\n",
    )
    assert len(drain(celery, KEY.queue)) == 2


# ------------------------------------------------- jobs stored but never published


def test_a_job_stored_but_never_published_is_published_once_its_commit_is_old(store: Store, celery: Celery) -> None:
    # Given: a job whose producer died right after the commit, on a queue that is busy with another job
    live_worker(store)
    store_job(store, "orphan", 10)
    add_job(store, "running", 3, idle_for=600)
    store.claim("running", [0])
    # When the commit is recent, the producer may still be publishing it: nothing is sent.
    assert reconcile(store, celery, stalled_after=300) == []
    assert drain(celery, KEY.queue) == []
    # Once the commit is older than the deadline, the job is published: a busy queue does not hold it back.
    age(store, "orphan", 600)
    (requeued,) = reconcile(store, celery, stalled_after=300)
    assert (requeued.job_id, requeued.items, requeued.unpublished) == ("orphan", 10, True)
    messages = drain(celery, KEY.queue)
    assert all(m["job_id"] == "orphan" for m in messages)
    assert sorted(i for m in messages for i, _ in m["items"]) == list(range(10))
    assert [len(m["items"]) for m in messages] == [4, 4, 2], "the producer's chunk size is kept"
    row = store.job_row("orphan")
    assert row is not None and row["published_at"] is not None
    assert (row["publish_cursor"], row["requeues"]) == (10, 1)
    # A second pass right away sends nothing.
    assert reconcile(store, celery, stalled_after=300) == []
    assert drain(celery, KEY.queue) == []


def test_a_submission_still_being_written_is_left_alone(store: Store, celery: Celery) -> None:
    live_worker(store)
    seen: list[list[dict[str, Any]]] = []

    def streamed() -> Iterator[list[NewItem]]:
        for start in range(0, 30, 10):
            seen.append(store.stalled_jobs(0))  # what a reconciler sees while the producer streams
            yield item_rows("big", 10, start)

    # Given: a big submission that started streaming its items ten minutes ago
    row = {**new_job_row("big", KEY), "created_at": utcnow() - timedelta(minutes=10)}
    assert store.create_job(row, streamed()) == 30
    # Then: while it streams the job is invisible, and just committed it is still its producer's to publish.
    assert seen == [[], [], []]
    assert reconcile(store, celery, stalled_after=300) == []
    assert drain(celery, KEY.queue) == []
    assert store.job_row("big")["published_at"] is None  # type: ignore[index]


def test_finished_or_cancelled_unpublished_jobs_are_not_published(store: Store, celery: Celery) -> None:
    live_worker(store)
    store_job(store, "cancelled", 3)
    store.cancel_job("cancelled")
    store_job(store, "finished", 2)
    store.claim("finished", [0, 1])
    store.record_batch("finished", [ItemResult(i, C.ITEM_DONE, output=1) for i in (0, 1)], None, worker_id=None,
                       model_revision=None, precision="fp32", device="cpu")  # fmt: skip
    for job_id in ("cancelled", "finished"):
        age(store, job_id, 600)
    assert reconcile(store, celery, stalled_after=300) == []
    assert drain(celery, KEY.queue) == []


class ProducerDied(BaseException):
    """Stands for the producer process being killed between its commit and its publish."""


def die(*_args: Any, **_kwargs: Any) -> int:
    raise ProducerDied


def refuse(*_args: Any, **_kwargs: Any) -> None:
    raise ConnectionError("Error 111 connecting to broker. Connection refused.")


def submit_unpublished(client: Client, how: str, texts: list[str], model: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Submit ``texts`` so that they are committed and never published; returns the job id."""
    with monkeypatch.context() as patch:
        if how == "producer died":
            patch.setattr("pipeq.producer.client.open_job", die)
            with pytest.raises(ProducerDied):
                client.submit(texts, task=KEY.task, model=model, precision="fp32")
        else:
            patch.setattr(client._celery, "send_task", refuse)
            with pytest.raises(BrokerError, match="stored but not queued"):
                client.submit(texts, task=KEY.task, model=model, precision="fp32")
    (job,) = client.store.recent_jobs(1)
    assert job.total == len(texts) and client.store.job_row(job.id)["published_at"] is None  # type: ignore[index]
    return job.id


def run_cli(args: list[str], settings: Settings, *, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    """Invoke ``pipeq`` in-process on ``settings``' URLs (and ``env``).

    The CLI points the root logger at the runner's stderr, closed once the call returns: the
    logging set-up is put back, so a worker thread logging later does not write to a closed stream.
    """
    env = {"PIPEQ_BROKER_URL": settings.broker_url, "PIPEQ_DATABASE_URL": settings.database_url, **(env or {})}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(cli_app, args, env=env, input=stdin)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def assert_each_item_ran_once(ledger: FaultLedger, database_url: str, job_id: str, total: int) -> None:
    report = ledger.check(database_url, job_id, faults=1)
    assert (report["lost"], report["duplicates"]) == (0, 0)
    assert [(r["status"], r["attempts"]) for r in report["items"]] == [("done", 1)] * total
    assert report["job"]["n_done"] == total


@pytest.mark.parametrize("how", ["producer died", "broker refused"])
def test_cli_reconcile_finishes_a_job_that_was_never_published(
    how: str,
    settings: Settings,
    thread_worker: WorkerConfig,
    ledger: FaultLedger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = [f"review {i}: " + "good " * (i % 5 + 1) for i in range(37)]
    with Client(settings, chunk_size=8) as client:
        # Given: a job committed to the store whose publish never happened
        job_id = submit_unpublished(client, how, texts, thread_worker.key.model, monkeypatch)
        # When: a reconciler pass runs with a zero deadline
        out = run_cli(["reconcile", "--stalled-after", "0"], settings)
        assert out.exit_code == 0, out.output
        assert out.stdout == f"published 37 pending items of job {job_id} (stored but never queued)\n"
        # Then: the worker runs it to the end, every item once
        state = client.job(job_id).wait(timeout=120)
    assert (state.status, state.done, state.failed) == ("done", 37, 0)
    assert_each_item_ran_once(ledger, settings.database_url, job_id, len(texts))
    assert run_cli(["reconcile", "--stalled-after", "0"], settings).stdout == "", "nothing left to queue"


def test_cli_reconcile_output_and_exit_codes(store: Store, store_url: str, celery: Celery) -> None:
    settings = Settings(broker_url="memory://", database_url=store_url)
    live_worker(store)
    out = run_cli(["reconcile"], settings)
    assert (out.exit_code, out.stdout, out.stderr) == (0, "", "no dead workers and no stalled jobs\n")
    # Given: a published job that stalled, and one that was never published
    add_job(store, "lost", 5, idle_for=600)
    store_job(store, "orphan", 3)
    age(store, "orphan", 600)
    out = run_cli(["reconcile"], settings)
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == [
        "re-queued 5 pending items of job lost (no message of it on the broker)",
        "published 3 pending items of job orphan (stored but never queued)",
    ]
    assert sorted((m["job_id"], i) for m in drain(celery, KEY.queue) for i, _ in m["items"]) == [
        *(("lost", i) for i in range(5)),
        *(("orphan", i) for i in range(3)),
    ]
    # A store without pipeq's schema: exit 3 (store unreachable), the reason on stderr.
    out = run_cli(["reconcile", "--database-url", "sqlite:///:memory:"], settings)
    assert out.exit_code == 3 and out.stdout == "" and "has no pipeq schema or an older one" in out.stderr


def test_cli_resume_queues_one_jobs_pending_items(
    settings: Settings, thread_worker: WorkerConfig, ledger: FaultLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"text number {i}" for i in range(21)]
    with Client(settings, chunk_size=8) as client:
        # Given: a job the broker refused at submit
        job_id = submit_unpublished(client, "broker refused", texts, thread_worker.key.model, monkeypatch)
        # When: it is resumed by hand
        out = run_cli(["resume", job_id], settings)
        assert (out.exit_code, out.stdout) == (0, f"re-queued 21 pending items of job {job_id}\n"), out.output
        # Then: it runs to the end, every item once, and is marked published
        state = client.job(job_id).wait(timeout=120)
        assert client.store.job_row(job_id)["published_at"] is not None  # type: ignore[index]
    assert (state.status, state.done) == ("done", 21)
    assert_each_item_ran_once(ledger, settings.database_url, job_id, len(texts))
    # A finished job has nothing left to queue.
    out = run_cli(["resume", job_id], settings)
    assert (out.exit_code, out.stdout) == (0, f"re-queued 0 pending items of job {job_id}\n")
    # An unknown job: exit 2 (bad usage, nothing queued) with the reason on stderr, nothing on stdout.
    out = run_cli(["resume", "no-such-job"], settings)
    assert (out.exit_code, out.stdout) == (2, "")
    assert out.stderr == "pipeq: error: no job 'no-such-job' in the store\n"


@pytest.mark.integration
def test_a_worker_publishes_a_job_its_producer_died_before_publishing(
    pg_url: str,
    redis_url: str,
    model_dir: Callable[[str], str],
    tmp_path: Any,
    start_worker: Any,
    ledger: FaultLedger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_runtime import reference

    model = str(shutil.copytree(model_dir(KEY.task), tmp_path / "model"))  # a Redis queue of this test's own
    texts = [f"review {i}: " + "the screen is sharp " * (i % 4 + 1) for i in range(60)]
    settings = Settings(broker_url=redis_url, database_url=pg_url, chunk_size=8)
    # Given: a producer that died between committing its job and publishing it
    with Client(settings) as client:
        job_id = submit_unpublished(client, "producer died", texts, model, monkeypatch)
    # When: a worker starts whose periodic reconciler has a short deadline
    worker = start_worker("--task", KEY.task, "--model", model, "--precision", "fp32", "--no-warmup",
                          broker_url=redis_url, database_url=pg_url,
                          extra_env={"PIPEQ_STALLED_AFTER": "2", "PIPEQ_RECONCILE_INTERVAL": "0.5"})  # fmt: skip
    store = Store(pg_url)
    worker.wait_ready(store, ServeKey(KEY.task, model).queue)
    # Then: the worker publishes and runs it, every item once, with plain transformers' outputs
    with Client(settings) as client:
        state = client.job(job_id).wait(timeout=120)
    assert (state.status, state.done) == ("done", len(texts)), worker.log()[-3000:]
    expected = dict(enumerate(reference(KEY.task, model, texts, {})))
    report = ledger.check(pg_url, job_id, faults=1, expected=expected)
    assert (report["lost"], report["duplicates"], report["changed"]) == (0, 0, 0)
    assert report["job"]["published_at"] is not None and report["job"]["requeues"] == 1
    assert "was stored but never published" in worker.log()
    store.close()
