"""Fixtures that start real things (stores, brokers, worker processes) and tear them down.

Redis and PostgreSQL are the machine's own (127.0.0.1:6379, 127.0.0.1:5432). Locally a missing
service skips the tests that need it; under CI=true it fails them, as CI must test for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

import tinymodels  # noqa: E402

REDIS_URL = os.environ.get("PIPEQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get("PIPEQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(what: str) -> None:
    """Skip locally, fail in CI: an unreachable service is never a pass there."""
    if IN_CI:
        pytest.fail(f"{what} is not reachable; CI must run against the real service")
    pytest.skip(f"{what} is not reachable")


# ------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """Build (once per session) a tiny model for a task and return its directory."""
    built: dict[str, str] = {}

    def _get(kind: str) -> str:
        if kind not in built:
            built[kind] = tinymodels.build(kind, tmp_path_factory.mktemp(kind.replace("-", "_")))
        return built[kind]

    return _get


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return tinymodels.minilm_dir()


# ------------------------------------------------------------------ stores


def _pg_reachable() -> bool:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, dropped afterwards."""
    import sqlalchemy as sa

    from pipeq.store import schema as db

    if not _pg_reachable():
        unavailable("PostgreSQL at 127.0.0.1:5432")
    name = f"pipeq_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    db.upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite file."""
    from pipeq.store import schema as db

    url = f"sqlite:///{tmp_path / 'pipeq.db'}"
    db.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def store(store_url: str) -> Iterator[Any]:
    from pipeq.store import Store

    s = Store(store_url)
    yield s
    s.close()


# ------------------------------------------------------------------ broker


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception:
        unavailable(f"Redis at {REDIS_URL}")
    return REDIS_URL


# ------------------------------------------------------------------ in-process workers

IN_PROCESS_TASK = "text-classification"


@pytest.fixture
def settings(sqlite_url: str) -> Any:
    """An in-process broker (memory://) and an SQLite store: no service needed."""
    from pipeq import Settings

    return Settings(broker_url="memory://", database_url=sqlite_url)


@pytest.fixture
def client(settings: Any) -> Iterator[Any]:
    from pipeq import Client

    with Client(settings) as c:
        yield c


@pytest.fixture
def worker_batch_size() -> int:
    """Rows per forward pass of ``thread_worker`` (a test module may override it)."""
    return 4


@contextmanager
def in_thread_worker(app: Any, queue: str) -> Iterator[Any]:
    """Celery's embedded test worker (solo pool, in a thread) consuming ``queue``; yields the WorkController.

    Celery's loop drains the broker with a fixed 2 s timeout and, told to stop, runs one more drain before it
    returns: on the memory broker every stop waited 2 to 4 s for nothing. Here its drains last 0.1 s at most
    (so the memory transport also polls for messages every 0.1 s instead of every second); what the worker
    does with a message is unchanged.
    """
    from celery.contrib.testing.worker import start_worker as start_thread_worker
    from kombu.transport import memory

    drain = memory.Transport.drain_events

    def short_drain(self: Any, connection: Any, timeout: float | None = None) -> Any:
        return drain(self, connection, timeout=None if timeout is None else min(timeout, 0.1))

    memory.Transport.drain_events = short_drain
    try:
        with start_thread_worker(app, pool="solo", perform_ping_check=False, queues=[queue], shutdown_timeout=30) as w:
            yield w
    finally:
        memory.Transport.drain_events = drain


@pytest.fixture
def thread_worker(
    settings: Any, model_dir: Callable[[str], str], tmp_path: Path, worker_batch_size: int
) -> Iterator[Any]:
    """A real Celery worker (solo pool, in a thread) on the memory broker, serving a private copy of the
    tiny text-classification model (so each test has a queue of its own); yields its WorkerConfig."""
    import shutil

    from pipeq.routing import ServeKey
    from pipeq.worker.app import create_worker_app
    from pipeq.worker.config import WorkerConfig

    model = shutil.copytree(model_dir(IN_PROCESS_TASK), tmp_path / "model")
    cfg = WorkerConfig(key=ServeKey(IN_PROCESS_TASK, str(model)), max_batch_size=worker_batch_size, warmup=False)
    app, ctx = create_worker_app(settings, cfg)
    ctx.start()
    with in_thread_worker(app, cfg.key.queue):
        yield cfg
    ctx.stop()


@pytest.fixture
def thread_embedding_worker(settings: Any, model_dir: Callable[[str], str]) -> Iterator[str]:
    """A real Celery worker (solo pool, in a thread) on the memory broker serving the tiny
    feature-extraction model, batches of 4; yields the model."""
    from pipeq.routing import ServeKey
    from pipeq.worker.app import create_worker_app
    from pipeq.worker.config import WorkerConfig

    cfg = WorkerConfig(
        key=ServeKey("feature-extraction", model_dir("feature-extraction")), max_batch_size=4, warmup=False
    )
    app, ctx = create_worker_app(settings, cfg)
    ctx.start()
    with in_thread_worker(app, cfg.key.queue):
        yield cfg.key.model
    ctx.stop()


def count_rows(url: str, table: str) -> int:
    """Rows in ``table`` of the store at ``url``."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text(f"select count(*) from {table}")).scalar_one()
    engine.dispose()
    return int(n)


@pytest.fixture
def ctx(sqlite_url: str, model_dir: Callable[[str], str]) -> Iterator[Any]:
    """A started WorkerContext (no broker) serving the tiny text-classification model, batches of 4."""
    from pipeq import Settings
    from pipeq.routing import ServeKey
    from pipeq.worker.config import WorkerConfig
    from pipeq.worker.context import WorkerContext

    context = WorkerContext(
        Settings(broker_url="memory://", database_url=sqlite_url),
        WorkerConfig(key=ServeKey(IN_PROCESS_TASK, model_dir(IN_PROCESS_TASK)), max_batch_size=4, warmup=False),
    )
    context.start()
    yield context
    context.stop()


# ------------------------------------------------------------------ workers


class WorkerProcess:
    """A real ``pipeq worker`` subprocess; stopped with SIGTERM (then SIGKILL) on teardown."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeq", "worker", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, store: Any, queue: str, timeout: float = 120, *, children: int = 1) -> None:
        """Wait until ``children`` of its pool children serve ``queue`` (loaded and warmed up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if sum(w["status"] == "ready" and w["queue"] == queue for w in store.live_workers()) >= children:
                return
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``pipeq worker`` subprocesses against given URLs; all are stopped afterwards."""
    started: list[WorkerProcess] = []

    def _start(
        *args: str, broker_url: str, database_url: str, extra_env: dict[str, str] | None = None
    ) -> WorkerProcess:
        env = {**os.environ, "PIPEQ_BROKER_URL": broker_url, "PIPEQ_DATABASE_URL": database_url, **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        proc = WorkerProcess(list(args), env, tmp_path / f"worker-{len(started)}.log")
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.stop()


# ------------------------------------------------------------------ fault ledger


class FaultLedger:
    """What the fault-injection tests did and found, summed over the session and printed at the end."""

    def __init__(self) -> None:
        self.faults = 0
        self.items = 0
        self.lost = 0
        self.duplicates = 0
        self.changed = 0
        self.tests = 0
        #: (what, seconds): how long a job took to finish after a fault, where a test measures it.
        self.recoveries: list[tuple[str, float]] = []
        #: One line a timed fault (``timed``).
        self.timings: list[str] = []

    def recovery(self, what: str, seconds: float) -> None:
        self.recoveries.append((what, seconds))

    def timed(self, what: str, report: dict[str, Any], next_result: float, done: float, since: str) -> None:
        """One fault's line for the summary: its job's items and how long it took to go on and to end."""
        self.timings.append(
            f"{what}: {len(report['items']):,} items checked, {report['lost']} lost, {report['duplicates']} "
            f"duplicated, {report['changed']} changed; next result {next_result:.1f}s and job done {done:.1f}s "
            f"after {since}"
        )

    def check(
        self, database_url: str, job_id: str, *, faults: int, expected: dict[int, Any] | None = None
    ) -> dict[str, Any]:
        """Count the job's items in the store: each exactly once and final, counters matching, outputs unchanged.

        ``expected`` maps an item's index to its reference output (a label and score, or a generated item's whole
        output) for items that must be done.
        """
        import sqlalchemy as sa

        from pipeq.store import Store

        store = Store(database_url)
        job = store.job_row(job_id)  # counts summed over the job's writers
        store.close()
        assert job is not None, f"no job {job_id}"
        engine = sa.create_engine(database_url)
        with engine.connect() as conn:
            items = list(
                conn.execute(
                    sa.text("SELECT idx, status, output, error, attempts FROM items WHERE job_id = :j ORDER BY idx"),
                    {"j": job_id},
                ).mappings()
            )
        engine.dispose()
        final = [r for r in items if r["status"] in ("done", "failed")]
        counted = job["n_done"] + job["n_failed"] + job["n_cancelled"]
        lost = job["total"] - len(final)
        # The primary key makes a second row impossible; a result written twice would count twice.
        duplicates = (len(items) - len({r["idx"] for r in items})) + max(0, counted - len(final))
        changed = 0
        for r in items:
            want = (expected or {}).get(r["idx"])
            if want is None:
                continue
            out = json.loads(r["output"]) if isinstance(r["output"], str) else r["output"]
            if r["status"] != "done":
                changed += 1
            elif "label" in want:  # a classifier's: the same label, the score within fp32's noise
                changed += out["label"] != want["label"] or abs(out["score"] - want["score"]) > 1e-4
            else:  # a generated item's: the same text, token counts and finish reason
                changed += out != want
        self.tests += 1
        self.faults += faults
        self.items += len(items)
        self.lost += lost
        self.duplicates += duplicates
        self.changed += changed
        return {"job": dict(job), "items": items, "lost": lost, "duplicates": duplicates, "changed": changed}


_LEDGER = FaultLedger()


@pytest.fixture
def ledger() -> FaultLedger:
    return _LEDGER


def pytest_terminal_summary(terminalreporter: Any) -> None:
    led = _LEDGER
    if led.tests:
        terminalreporter.write_line(
            f"fault injection: {led.tests} tests, {led.faults} faults injected, {led.items:,} items checked, "
            f"{led.lost} lost, {led.duplicates} duplicates, {led.changed} changed results"
        )
    for what, seconds in led.recoveries:
        terminalreporter.write_line(f"fault injection: {what}: job done {seconds:.1f}s after the kill")
    for line in led.timings:
        terminalreporter.write_line(f"fault injection: {line}")
