"""Let nothing in: no pickle on the wire, no code or model chosen by a job, no credentials leaked."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kombu import Queue

from pipeq import Client, Settings
from pipeq import constants as C
from pipeq.errors import BrokerError, ConfigurationError, InputError
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row
from pipeq.worker.config import WorkerConfig

TASK = "text-classification"


class _Exploit:
    """Unpickling this creates a directory: proof that a worker deserialized a pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@pytest.fixture
def served(settings: Settings, thread_worker: WorkerConfig) -> tuple[Settings, WorkerConfig]:
    return settings, thread_worker


def test_a_pickled_message_is_never_deserialized(served: tuple[Settings, WorkerConfig], tmp_path: Path) -> None:
    settings, cfg = served
    marker = tmp_path / "pwned"
    with Client(settings) as client:
        # A hostile producer puts a pickle on the worker's queue, shaped like a real task message.
        with client._celery.connection_for_write() as conn:
            conn.Producer().publish(
                ((), {"job_id": "x", "items": _Exploit(str(marker))}, {}),
                serializer="pickle",
                exchange="",
                routing_key=cfg.key.queue,
                declare=[Queue(cfg.key.queue)],
                headers={"task": C.CHUNK_TASK_NAME, "id": uuid.uuid4().hex, "lang": "py"},
            )
        # A real job queued behind it finishes, so the worker has seen (and refused) the pickle.
        job = client.submit(["fine", "also fine"], task=TASK, model=cfg.key.model)
        assert job.wait(timeout=60).done == 2
    assert not marker.exists(), "the worker unpickled a message"


def test_a_job_cannot_pick_code_or_models_through_parameters(
    served: tuple[Settings, WorkerConfig], tmp_path: Path
) -> None:
    settings, cfg = served
    with Client(settings) as client:
        with pytest.raises(ConfigurationError, match="may not set model, trust_remote_code"):
            client.submit(["x"], task=TASK, model=cfg.key.model, params={"trust_remote_code": True, "model": "/x"})
        # Written straight into the store (bypassing the client), the worker still refuses it.
        store = Store(settings.database_url)
        rows = [NewItem(0, None, "x", 1)]
        store.create_job(new_job_row("evil", cfg.key, params={"trust_remote_code": True}), [rows])
        client._celery.send_task(C.CHUNK_TASK_NAME, kwargs={"job_id": "evil", "items": [[0, "x"]]}, queue=cfg.key.queue)
        client.job("evil").wait(timeout=60)
        (row,) = client.job("evil").results()
    assert row["status"] == "failed" and "may not set trust_remote_code" in row["error"]


def count_rows(url: str) -> tuple[int, int]:
    """(jobs, items) in the store at ``url``."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        counts = tuple(conn.execute(sa.text(f"select count(*) from {t}")).scalar_one() for t in ("jobs", "items"))
    engine.dispose()
    return counts  # type: ignore[return-value]


def test_a_job_over_the_item_limit_is_refused_whole(
    store_url: str, model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One more than an insert batch: the first batch is already written when the limit is hit.
    limit = C.INSERT_BATCH_ROWS + 1
    texts = [f"t{i}" for i in range(limit + 1)]
    with Client(Settings(broker_url="memory://", database_url=store_url, max_job_items=limit)) as client:
        sent: list[dict[str, Any]] = []
        monkeypatch.setattr(client._celery, "send_task", lambda name, **kw: sent.append(kw))
        with pytest.raises(InputError) as err:
            client.submit(texts, task=TASK, model=model_dir(TASK))
        assert str(err.value) == f"line {limit + 1}: job has more than {limit:,} items (PIPEQ_MAX_JOB_ITEMS)"
        assert count_rows(store_url) == (0, 0) and sent == [], "nothing stored, nothing queued"
        # Exactly at the limit is accepted.
        assert client.submit(texts[:limit], task=TASK, model=model_dir(TASK)).status().total == limit
        assert sent


def test_the_cli_names_the_item_limit(settings: Settings, model_dir: Callable[[str], str]) -> None:
    from test_reconcile import run_cli

    args = ["submit", "-", "--task", TASK, "--model", model_dir(TASK)]
    out = run_cli(args, settings, env={"PIPEQ_MAX_JOB_ITEMS": "2"}, stdin="a\nb\nc\n")
    assert (out.exit_code, out.stdout) == (2, "")
    assert "line 3: job has more than 2 items (PIPEQ_MAX_JOB_ITEMS)" in out.stderr
    assert count_rows(settings.database_url) == (0, 0)


def test_outputs_never_carry_another_jobs_inputs(served: tuple[Settings, WorkerConfig]) -> None:
    from test_runtime import assert_close, reference

    settings, cfg = served
    english = [{"id": f"en-{i}", "text": f"I loved this phone, review {i}. " * (1 + i % 4)} for i in range(14)]
    chinese = [{"id": f"zh-{i}", "text": f"我非常讨厌这个，第{i}条评论。" * (1 + i % 3)} for i in range(14)]
    params = {"top_k": None}  # every label's score: a swapped input shows in all of them
    # Given: two jobs back to back on the same queue, in chunks of 3, all run by one worker
    with Client(settings, chunk_size=3) as client:
        jobs = [client.submit(texts, task=TASK, model=cfg.key.model, params=params) for texts in (english, chinese)]
        states = [job.wait(timeout=120) for job in jobs]
        results = [list(job.results()) for job in jobs]
    assert [(s.status, s.done) for s in states] == [("done", 14), ("done", 14)]
    # Then: each result is what plain transformers gives for that job's own input, under that job's own id.
    wants = [reference(TASK, cfg.key.model, [r["text"] for r in texts], params) for texts in (english, chinese)]
    assert wants[0] != wants[1], "the two jobs' inputs give different outputs, so a mix-up would show"
    for texts, rows, want in zip((english, chinese), results, wants, strict=True):
        assert [r["id"] for r in rows] == [t["id"] for t in texts]
        for row, expected in zip(rows, want, strict=True):
            assert_close(row["output"], expected, row["id"])


def test_broker_credentials_are_masked_in_errors_and_the_store(
    sqlite_url: str, model_dir: Callable[[str], str]
) -> None:
    settings = Settings(broker_url="redis://:hunter2@127.0.0.1:1/0", database_url=sqlite_url)
    with Client(settings) as client, pytest.raises(BrokerError) as err:
        client.submit(["x"], task=TASK, model=model_dir(TASK))
    assert "hunter2" not in str(err.value) and ":***@127.0.0.1:1" in str(err.value)
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        dump = "\n".join(
            str(tuple(r)) for t in ("jobs", "items", "workers") for r in conn.execute(sa.text(f"select * from {t}"))
        )
    engine.dispose()
    assert "hunter2" not in dump
    assert dump == "", "the broker is asked before anything is stored"


@pytest.mark.integration
def test_worker_logs_and_rows_never_show_passwords(
    pg_url: str, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    # PostgreSQL here trusts local connections, so a password in the URL is accepted and ignored.
    url = pg_url.replace("postgres@", "postgres:topsecret@")
    model = model_dir(TASK)
    worker = start_worker("--task", TASK, "--model", model, "--precision", "fp32",
                          broker_url=redis_url, database_url=url)  # fmt: skip
    store = Store(pg_url)
    worker.wait_ready(store, ServeKey(TASK, model).queue)
    with Client(Settings(broker_url=redis_url, database_url=url)) as client:
        assert client.submit(["a", "b"], task=TASK, model=model).wait(timeout=60).done == 2
    worker.stop()
    assert "topsecret" not in worker.log() and "postgres:***@" in worker.log()
    with store.engine.connect() as conn:
        dump = "\n".join(
            str(tuple(r))
            for t in ("jobs", "items", "batches", "workers")
            for r in conn.execute(sa.text(f"select * from {t}"))
        )
    assert "topsecret" not in dump


def test_a_store_error_never_shows_the_values_bound_to_its_statement(store: Store) -> None:
    """An error's message (logs, the CLI's one line) names the statement but not the users' texts in it."""
    with pytest.raises(sa.exc.DBAPIError) as caught, store.writer.begin() as conn:
        conn.execute(sa.text("INSERT INTO no_such_table (x) VALUES (:x)"), {"x": "private text of a user"})
    assert "private text" not in str(caught.value)
    from pipeq.store.engine import store_error

    line = str(store_error(caught.value))
    assert "private text" not in line and "no_such_table" in line and "\n" not in line
