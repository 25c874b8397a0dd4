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
from pipeq.errors import BrokerError, ConfigurationError
from pipeq.models.store import Store, new_job_row
from pipeq.routing import ServeKey
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
        rows = [{"job_id": "evil", "idx": 0, "input_id": None, "input": "x", "status": "pending", "attempts": 0}]
        store.create_job(new_job_row("evil", cfg.key, params={"trust_remote_code": True}), [rows])
        client._celery.send_task(C.CHUNK_TASK_NAME, kwargs={"job_id": "evil", "items": [[0, "x"]]}, queue=cfg.key.queue)
        client.job("evil").wait(timeout=60)
        (row,) = client.job("evil").results()
    assert row["status"] == "failed" and "may not set trust_remote_code" in row["error"]


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
    assert "hunter2" not in dump and "stored but not queued" in dump


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
