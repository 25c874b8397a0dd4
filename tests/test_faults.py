"""Break things on purpose while a job runs, then check the SQL store: every item exactly once.

Real ``pipeq worker`` processes serve a text-classification model through ``faultpipe`` (which
slows forward passes and fails on marked inputs) on real Redis and PostgreSQL. Each test injects
faults, lets the job finish, and hands the store to the ``ledger``: every item done or failed
with a reason, none missing, none counted twice, outputs equal to plain transformers'. The
session prints the totals ("fault injection: ... 0 lost, 0 duplicates").
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import faultpipe
from conftest import PG_ADMIN_URL, FaultLedger, WorkerProcess
from pipeq import Client, Settings
from pipeq.errors import BrokerError
from pipeq.routing import ServeKey
from pipeq.store import Store

pytestmark = pytest.mark.integration

#: Redelivery and reconciliation within seconds instead of the production hour / five minutes.
FAST_RECOVERY = {
    "PIPEQ_VISIBILITY_TIMEOUT": "6",
    "PIPEQ_BROKER_OPTIONS": json.dumps({"unacked_restore_interval": 1, "unacked_restore_throttle": 1}),
    "PIPEQ_STALLED_AFTER": "5",
    "PIPEQ_RECONCILE_INTERVAL": "1",
}
TEXTS = [f"review {i}: " + "the battery lasts long and the screen is sharp " * (1 + i % 5) for i in range(400)]


@pytest.fixture
def model(model_dir: Callable[[str], str]) -> str:
    return model_dir("text-classification")


@pytest.fixture
def serve(start_worker: Callable[..., WorkerProcess], model: str) -> Callable[..., WorkerProcess]:
    """Start a worker for the faulty pipeline (not waiting for it), at a pinned precision as a fleet runs:
    ``--precision auto`` would measure and gate precisions first, which only delays the faults."""

    def _serve(broker_url: str, database_url: str, *, delay: float = 0.0, env: dict[str, str] | None = None) -> Any:
        return start_worker(
            "--task", faultpipe.TASK, "--model", model, "--precision", "fp32",
            "--pipeline-class", "faultpipe:FaultyClassificationPipeline",
            "--model-class", "transformers:AutoModelForSequenceClassification",
            "--max-batch-size", "4", "--no-warmup",
            broker_url=broker_url,
            database_url=database_url,
            extra_env={**FAST_RECOVERY, "PIPEQ_TEST_FORWARD_DELAY": str(delay), **(env or {})},
        )  # fmt: skip

    return _serve


def queue_of(model: str) -> str:
    return ServeKey(faultpipe.TASK, model).queue


def submit(broker_url: str, database_url: str, model: str, texts: list[str], *, chunk_size: int = 16) -> str:
    with Client(Settings(broker_url=broker_url, database_url=database_url, chunk_size=chunk_size)) as client:
        return client.submit(texts, task=faultpipe.TASK, model=model).id


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120, *, logs: Any = None) -> None:
    """Poll ``check`` (store errors count as "not yet": a test may have cut the store off)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except sa.exc.OperationalError:
            pass
        time.sleep(0.2)
    tail = "" if logs is None else "\n".join(w.log()[-3000:] for w in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def finished(store: Store, job_id: str) -> int:
    return store.job(job_id).finished


def child_pids(store: Store, queue: str) -> list[int]:
    return [int(w["pid"]) for w in store.live_workers(queue) if w["status"] == "ready"]


def expected(model: str, texts: list[str]) -> dict[int, Any]:
    return dict(enumerate(faultpipe.reference_outputs(model, texts)))


def assert_exactly_once(report: dict[str, Any], total: int) -> None:
    assert report["lost"] == 0, "items lost"
    assert report["duplicates"] == 0, "items counted twice"
    assert report["changed"] == 0, "results differ from plain transformers"
    assert len(report["items"]) == total
    assert report["job"]["status"] == "done"


def checked_once(ledger: FaultLedger, url: str, job_id: str, model: str, texts: list[str]) -> dict[str, Any]:
    """The job's items counted after one fault (``FaultLedger.check``), each done exactly once with plain
    transformers' output; returns the report."""
    report = ledger.check(url, job_id, faults=1, expected=expected(model, texts))
    assert_exactly_once(report, len(texts))
    return report


def resumption(
    store: Store, job_id: str, since: float, *, timeout: float = 120, logs: Any = None
) -> tuple[float, float]:
    """Seconds from ``since`` (``time.monotonic()``) to the job's next result and to its end."""
    before, next_result = finished(store, job_id), None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = store.job(job_id)
        except sa.exc.OperationalError:
            time.sleep(0.2)
            continue
        now = time.monotonic() - since
        if next_result is None and (state.finished > before or state.is_final):
            next_result = now
        if state.is_final:
            assert next_result is not None
            return next_result, now
        time.sleep(0.2)
    tail = "" if logs is None else "\n".join(w.log()[-3000:] for w in logs)
    raise AssertionError(
        f"job {job_id} not done {timeout:.0f}s after the fault ({finished(store, job_id)} finished)\n{tail}"
    )


def items_run(*workers: WorkerProcess) -> int:
    """Items the workers' chunks ran to a result, by their logs: more than the job's items if any ran twice."""
    runs = re.findall(r"chunk: (\d+) done, (\d+) failed", "".join(w.log() for w in workers))
    return sum(int(done) + int(failed) for done, failed in runs)


# ------------------------------------------------------------------ 1, 7: killed workers


def test_killed_child_then_killed_worker_then_new_worker(
    pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:160]
    first = serve(redis_url, pg_url, delay=0.15)
    first.wait_ready(store, queue)
    job = submit(redis_url, pg_url, model, texts)
    wait_for("a first batch", lambda: finished(store, job) >= 8, logs=[first])
    # SIGKILL the pool child in the middle of a batch: Celery respawns it, the message is redelivered.
    (child,) = child_pids(store, queue)
    os.kill(child, signal.SIGKILL)
    wait_for("the respawned child to go on", lambda: finished(store, job) >= 48, logs=[first])
    # SIGKILL the whole worker: its unacknowledged message stays in Redis.
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    assert 0 < finished(store, job) < len(texts), "the worker died mid-job"
    second = serve(redis_url, pg_url)
    wait_for("the job to finish", lambda: store.job(job).is_final, logs=[first, second])
    report = ledger.check(pg_url, job, faults=2, expected=expected(model, texts))
    assert_exactly_once(report, len(texts))


def test_two_workers_and_a_replacement(
    pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:200]
    a = serve(redis_url, pg_url, delay=0.2)  # one worker alone would take 10 s: room for both to start
    b = serve(redis_url, pg_url, delay=0.2)
    a.wait_ready(store, queue)
    b.wait_ready(store, queue)
    job = submit(redis_url, pg_url, model, texts)

    def writers() -> int:
        with store.engine.connect() as conn:
            sql = sa.text("SELECT count(DISTINCT worker_id) FROM batches WHERE job_id = :j")
            return int(conn.execute(sql, {"j": job}).scalar_one())

    # "ready" in the store is a loaded model; wait until both workers have also taken work off the queue.
    wait_for("both workers to write", lambda: writers() >= 2, logs=[a, b])
    os.killpg(a.proc.pid, signal.SIGKILL)
    a.proc.wait(timeout=10)
    assert finished(store, job) < len(texts), "the worker was killed after the job ended"
    c = serve(redis_url, pg_url)
    wait_for("the job to finish", lambda: store.job(job).is_final, logs=[a, b, c])
    checked_once(ledger, pg_url, job, model, texts)


#: Production recovery settings: only a takeover can recover a dead worker's message within minutes.
PRODUCTION_RECOVERY = {
    "PIPEQ_VISIBILITY_TIMEOUT": "3600",
    "PIPEQ_BROKER_OPTIONS": "{}",
    "PIPEQ_STALLED_AFTER": "300",
    "PIPEQ_RECONCILE_INTERVAL": "60",
}


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def child_of(store: Store, queue: str, worker: WorkerProcess) -> dict[str, Any]:
    """The store's row of ``worker``'s pool child."""
    (row,) = [w for w in store.live_workers(queue) if parent_pid(int(w["pid"])) == worker.proc.pid]
    return row


@pytest.mark.parametrize(
    "recovery",
    [PRODUCTION_RECOVERY, {**FAST_RECOVERY, "PIPEQ_DEAD_AFTER": "3"}],
    ids=["takeover-alone", "takeover-racing-redelivery"],
)
def test_a_killed_worker_is_taken_over_in_seconds(
    pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger, recovery: dict[str, str]
) -> None:
    """SIGKILL a whole worker mid-message while another serves the queue: the survivor queues the dead
    worker's claimed items again within ``dead_after`` (30 s by default), not after Redis's visibility
    timeout (an hour) or the stalled-job reconciler (five minutes). Racing Redis's own redelivery of the
    dead message (second case), every item is still written exactly once."""
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:240]
    # Both live before the job exists, so the slow one gets messages however long either took to load.
    a = serve(redis_url, pg_url, delay=0.75, env=recovery)
    b = serve(redis_url, pg_url, delay=0.05, env=recovery)
    wait_for("two workers", lambda: len(store.live_workers(queue)) == 2, logs=[a, b])
    victim = child_of(store, queue, a)
    job = submit(redis_url, pg_url, model, texts)
    # Its claim (the lease on its row) says it holds a message, the moment it takes one: a heartbeat
    # (every 10 s) could miss a message the slow worker holds for a few seconds.
    wait_for("the first worker to hold a message", lambda: holds(store, queue, a, job), logs=[a])
    os.killpg(a.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    a.proc.wait(timeout=10)
    assert finished(store, job) < len(texts), "the worker was killed after the job ended"
    wait_for("the job to finish", lambda: store.job(job).is_final, timeout=120, logs=[a, b])
    recovered = time.monotonic() - killed
    row = next(w for w in _all_rows(store) if w["id"] == victim["id"])
    assert row["status"] == "lost", "the survivor declared the dead worker lost"
    checked_once(ledger, pg_url, job, model, texts)
    racing = "PIPEQ_DEAD_AFTER" in recovery
    ledger.recovery(f"dead worker taken over ({'racing redelivery' if racing else 'default timeouts'})", recovered)
    assert recovered < 60, f"the job finished {recovered:.0f}s after the kill"


def row_of(store: Store, worker_id: str) -> dict[str, Any]:
    return next(w for w in _all_rows(store) if w["id"] == worker_id)


def test_a_worker_killed_while_it_starts_holds_no_message(
    pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    """A worker takes no message before its children are ready: one killed while its model loads (another
    worker serving the queue) leaves every message to the live one, and the job ends with nothing to
    queue again (before, the starting worker's parent held a message with no claim for the reconciler)."""
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:160]
    live = serve(redis_url, pg_url, delay=0.3, env=PRODUCTION_RECOVERY)
    live.wait_ready(store, queue)
    starting = serve(redis_url, pg_url, env={**PRODUCTION_RECOVERY, "PIPEQ_TEST_LOAD_DELAY": "60"})
    wait_for("the second worker to register", lambda: any(w["status"] == "loading" for w in store.live_workers(queue)))
    wait_for("its consumer to start", lambda: "ready." in starting.log(), logs=[starting])
    job = submit(redis_url, pg_url, model, texts)
    time.sleep(2)  # a consumer that took messages would have taken one by now
    assert not store.job(job).is_final, "the job ended before the fault"
    os.killpg(starting.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    starting.proc.wait(timeout=10)
    next_result, done = resumption(store, job, killed, logs=[live, starting])
    report = checked_once(ledger, pg_url, job, model, texts)
    assert report["job"]["requeues"] == 0, "the starting worker held a message that had to be queued again"
    ledger.timed("worker killed during its start-up", report, next_result, done, "the kill")
    assert done < 60


@pytest.mark.parametrize(
    ("kills", "every"),
    [
        pytest.param(6, 3.0, marks=[pytest.mark.chaos]),
        pytest.param(23, 9.0, marks=[pytest.mark.chaos, pytest.mark.timeout(600)]),
    ],
    ids=["6-kills", "23-kills"],
)
def test_chaos_sigkills_a_random_worker_every_few_seconds(
    kills: int, every: float, pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    """Three workers; every few seconds one of them, picked at random (loading or serving), is SIGKILLed and a
    replacement started, while jobs keep the queue busy (a new one whenever fewer than its size are pending).
    With production timeouts every job ends within a minute of the last kill: each dead worker's claim is
    taken over, and no message is held where nothing can find it."""
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS
    workers = [serve(redis_url, pg_url, delay=0.2, env=PRODUCTION_RECOVERY) for _ in range(3)]
    wait_for("three workers", lambda: len(child_pids(store, queue)) == 3, logs=workers)
    jobs: list[str] = []

    def keep_busy(until: float) -> None:
        while True:
            if sum(store.job(j).pending for j in jobs) < len(texts):
                jobs.append(submit(redis_url, pg_url, model, texts))
            if time.monotonic() >= until:
                return
            time.sleep(0.5)

    pick = random.Random(kills)
    for _ in range(kills):
        keep_busy(time.monotonic() + every)
        victim = pick.choice(workers)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        workers[workers.index(victim)] = serve(redis_url, pg_url, delay=0.2, env=PRODUCTION_RECOVERY)
    last_kill = time.monotonic()
    before, next_result = sum(finished(store, j) for j in jobs), None
    while not all(store.job(j).is_final for j in jobs):
        assert time.monotonic() - last_kill < 180, (
            f"jobs not done 180 s after the last kill\n{workers[0].log()[-3000:]}"
        )
        if next_result is None and sum(finished(store, j) for j in jobs) > before:
            next_result = time.monotonic() - last_kill
        time.sleep(0.2)
    done = time.monotonic() - last_kill
    reference = expected(model, texts)
    reports = [ledger.check(pg_url, j, faults=kills if n == 0 else 0, expected=reference) for n, j in enumerate(jobs)]
    ledger.tests -= len(reports) - 1  # one test, however many jobs it checked
    for report in reports:
        assert_exactly_once(report, len(texts))
    merged = {
        "items": [item for r in reports for item in r["items"]],
        **{key: sum(r[key] for r in reports) for key in ("lost", "duplicates", "changed")},
    }
    what = f"chaos, {kills} SIGKILLs of a random worker of 3 every {every:.0f}s with replacements ({len(jobs)} jobs)"
    ledger.timed(what, merged, done if next_result is None else next_result, done, "the last kill")
    assert done < 60, f"the jobs ended {done:.0f}s after the last kill"


def holds(store: Store, queue: str, worker: WorkerProcess, job_id: str) -> bool:
    """Whether ``worker``'s pool child has claimed items of ``job_id`` that are still pending."""
    lease = child_of(store, queue, worker)["lease"]
    if not lease or lease["job"] != job_id:
        return False
    return bool(store.pending_inputs(job_id, lease["idxs"]))


def _all_rows(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM workers")).mappings()]


def test_a_worker_in_a_long_forward_pass_is_not_taken_over(
    pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    """A 60 s forward pass: the worker's heartbeats come from their own thread, so a live worker on the
    queue, looking for dead ones every second (dead after 3 s), takes nothing over."""
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:4]  # one batch, one message
    env = {**PRODUCTION_RECOVERY, "PIPEQ_DEAD_AFTER": "3"}
    slow = serve(redis_url, pg_url, delay=60, env=env)
    slow.wait_ready(store, queue)
    job = submit(redis_url, pg_url, model, texts)
    wait_for("the slow worker to take the message", lambda: child_of(store, queue, slow)["current_job"] == job)
    watcher = serve(redis_url, pg_url, env=env)
    wait_for("the watcher to beat", lambda: len(store.live_workers(queue)) == 2, logs=[slow, watcher])
    assert not store.job(job).is_final, "the forward pass ended before the watcher looked for dead workers"
    wait_for("the job to finish", lambda: store.job(job).is_final, timeout=150, logs=[slow, watcher])
    assert "marked lost" not in watcher.log(), watcher.log()[-3000:]
    assert all(w["status"] != "lost" for w in _all_rows(store))
    report = checked_once(ledger, pg_url, job, model, texts)
    assert {r["attempts"] for r in report["items"]} == {1}, "nothing ran twice"


# ------------------------------------------------------------------ 2: graceful stop


def test_sigterm_commits_the_running_batch_and_hands_back_the_rest(
    pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:256]
    worker = serve(redis_url, pg_url, delay=0.3)
    worker.wait_ready(store, queue)
    # Messages of 64 items (a job spreads over 4 messages a live worker), 16 batches of 4: the worker's
    # two forward streams start them two at a time, so SIGTERM after the first commit always finds
    # batches of the running message not started. (With 64 texts, messages of 16 had 4 batches, and
    # SIGTERM could land when all of them had started: nothing was left to hand back.)
    job = submit(redis_url, pg_url, model, texts, chunk_size=len(texts))
    assert store.job_row(job)["chunk_size"] == 64
    wait_for("a first batch", lambda: finished(store, job) >= 4, logs=[worker])
    # As docker stop or Kubernetes would: SIGTERM to the main process only.
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=60) == 0, worker.log()[-3000:]
    assert re.search(r"handed \d+ unstarted items of job", worker.log()), worker.log()[-3000:]
    state = store.job(job)
    assert 0 < state.finished < len(texts)
    with store.engine.connect() as conn:
        attempts = dict(conn.execute(sa.text("SELECT status, max(attempts) FROM items GROUP BY status")).all())
    assert attempts.get("pending") == 0, "unstarted items were handed back without an attempt counted"
    replacement = serve(redis_url, pg_url)
    wait_for("the job to finish", lambda: store.job(job).is_final, logs=[worker, replacement])
    report = checked_once(ledger, pg_url, job, model, texts)
    assert {r["attempts"] for r in report["items"]} == {1}, "no item ran twice"


# ------------------------------------------------------------------ 3: broker restarts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server of the test's own, on its own port and directory; stopped by pid."""

    def __init__(self, tmp_path: Path, *, aof: bool) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--save", "", "--appendonly", "yes" if aof else "no", "--appendfsync", "always",
            "--logfile", str(tmp_path / "redis.log"),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(self.args)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., OwnRedis]]:
    servers: list[OwnRedis] = []

    def _start(*, aof: bool) -> OwnRedis:
        server = OwnRedis(tmp_path, aof=aof)
        server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.kill()


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_mid_job(
    aof: bool, pg_url: str, own_redis: Any, model: str, serve: Any, ledger: FaultLedger
) -> None:
    redis_server = own_redis(aof=aof)
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:120]
    worker = serve(redis_server.url, pg_url, delay=0.15)
    worker.wait_ready(store, queue)
    job = submit(redis_server.url, pg_url, model, texts)
    wait_for("a first batch", lambda: finished(store, job) >= 8, logs=[worker])
    redis_server.kill()  # SIGKILL: with AOF (fsync always) the queue survives; without, it is gone
    time.sleep(1)
    redis_server.start()
    wait_for("the job to finish", lambda: store.job(job).is_final, timeout=180, logs=[worker])
    report = checked_once(ledger, pg_url, job, model, texts)
    if not aof:
        assert report["job"]["requeues"] >= 1, "only the reconciler can recover messages Redis forgot"


def test_redis_restarted_without_persistence_is_noticed_in_seconds(
    pg_url: str, own_redis: Any, model: str, serve: Any, ledger: FaultLedger
) -> None:
    """Redis comes back after 3 s with its queue gone: the worker finds its queue empty and nothing of the job
    claimed, and publishes the job's window again within ``lost_after`` (15 s), not the stalled-job
    reconciler's five minutes; no item runs twice."""
    redis_server = own_redis(aof=False)
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:400]  # past the first window: it moves
    worker = serve(redis_server.url, pg_url, delay=0.15, env=PRODUCTION_RECOVERY)
    worker.wait_ready(store, queue)
    job = submit(redis_server.url, pg_url, model, texts)
    wait_for("a first batch", lambda: finished(store, job) >= 8, logs=[worker])
    redis_server.kill()
    time.sleep(3)
    redis_server.start()  # empty: no queue, no unacknowledged messages
    back = time.monotonic()
    next_result, done = resumption(store, job, back, logs=[worker])
    report = checked_once(ledger, pg_url, job, model, texts)
    assert report["job"]["requeues"] >= 1 and "none of its items held by a live worker" in worker.log()
    assert items_run(worker) == len(texts), "an item ran twice"
    ledger.timed("Redis restarted without persistence (down 3 s)", report, next_result, done, "Redis's return")
    assert next_result < 60, f"the job went on {next_result:.0f}s after Redis came back"


def test_redis_at_maxmemory_refuses_a_submit_and_the_job_runs_once_it_has_room(
    pg_url: str, own_redis: Any, model: str, serve: Any, ledger: FaultLedger
) -> None:
    """Redis full (``maxmemory``, ``noeviction``) when a job is submitted: the submit fails loudly with the job
    stored but not queued, and once Redis has room again a live worker publishes it within ``lost_after``
    (15 s) with no command from the user; every item runs once."""
    import redis

    redis_server = own_redis(aof=False)
    admin = redis.Redis.from_url(redis_server.url)
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:200]
    worker = serve(redis_server.url, pg_url, delay=0.05, env=PRODUCTION_RECOVERY)
    worker.wait_ready(store, queue)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # below what it holds: every write that needs memory is refused
    with pytest.raises(BrokerError, match="stored but not queued"):
        submit(redis_server.url, pg_url, model, texts)
    (job,) = [j.id for j in store.recent_jobs(1)]
    assert store.job(job).pending == len(texts) and "maxmemory" in (store.job(job).error or "")
    admin.config_set("maxmemory", "0")
    room = time.monotonic()
    next_result, done = resumption(store, job, room, logs=[worker])
    report = checked_once(ledger, pg_url, job, model, texts)
    assert items_run(worker) == len(texts), "an item ran twice"
    ledger.timed("Redis at maxmemory during a submit", report, next_result, done, "Redis's room")
    assert next_result < 60, f"the job went on {next_result:.0f}s after Redis had room"


def test_redis_with_aof_down_longer_than_the_reconnects(
    pg_url: str, own_redis: Any, model: str, serve: Any, ledger: FaultLedger
) -> None:
    """Redis with AOF away for 20 s while a worker runs the message that ends a slice of the job: the
    worker's consumer retries (2, 4, 6 ... s apart) and comes back to the kept queue, and the next slice,
    which the worker could not publish (its producer retries for about a second), is published again
    once the queue runs dry with the job unfinished and nothing of it held."""
    redis_server = own_redis(aof=True)
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:300]  # a fifth slice, beyond the first window
    worker = serve(redis_server.url, pg_url, delay=0.5, env=PRODUCTION_RECOVERY)
    worker.wait_ready(store, queue)
    job = submit(redis_server.url, pg_url, model, texts)

    def running_a_slice_end() -> bool:
        lease = child_of(store, queue, worker)["lease"] or {}
        return bool(lease.get("slice_end")) and bool(store.pending_inputs(job, lease["idxs"]))

    wait_for("the worker to run the message that ends the first slice", running_a_slice_end, logs=[worker])
    redis_server.kill()
    time.sleep(20)
    redis_server.start()
    back = time.monotonic()
    next_result, done = resumption(store, job, back, logs=[worker])
    report = checked_once(ledger, pg_url, job, model, texts)
    assert "could not publish its next slice" in worker.log(), worker.log()[-3000:]
    ledger.timed("Redis with AOF down 20 s", report, next_result, done, "Redis's return")
    assert next_result < 60, f"the job went on {next_result:.0f}s after Redis came back"
    assert done < 90, f"the job ended {done:.0f}s after Redis came back"


# ------------------------------------------------------------------ 4: store outage


@pytest.mark.parametrize("down", [6, pytest.param(60, marks=[pytest.mark.chaos])], ids=["6s", "60s"])
def test_postgres_cut_off_mid_job(
    down: int, pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    """PostgreSQL refuses every connection for ``down`` seconds while two workers run a job (the minute-long
    outage outlasts ``PIPEQ_DEAD_AFTER``): they retry without acknowledging, neither declares the other lost,
    and the job goes on once the store is back."""
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:160]
    workers = [serve(redis_url, pg_url, delay=0.15, env=PRODUCTION_RECOVERY) for _ in range(2)]
    for worker in workers:
        worker.wait_ready(store, queue)
    job = submit(redis_url, pg_url, model, texts)
    wait_for("a first batch", lambda: finished(store, job) >= 8, logs=workers)
    name = pg_url.rsplit("/", 1)[1]
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name})
    store.engine.dispose()
    time.sleep(down)  # every connection refused meanwhile: the workers retry with backoff
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    admin.dispose()
    back = time.monotonic()
    next_result, done = resumption(store, job, back, timeout=180, logs=workers)
    assert any("store unreachable" in w.log() for w in workers)
    assert not any("marked lost" in w.log() for w in workers), "a store outage declared a worker lost"
    report = checked_once(ledger, pg_url, job, model, texts)
    ledger.timed(f"PostgreSQL refusing connections for {down} s", report, next_result, done, "PostgreSQL's return")
    assert next_result < 60, f"the job went on {next_result:.0f}s after PostgreSQL came back"


# ------------------------------------------------------------------ 5: poison items


def test_poison_items_fail_alone_with_reasons(
    sqlite_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    store, queue = Store(sqlite_url), queue_of(model)
    texts = TEXTS[:40]
    poison = {5: "POISON-PRE", 12: "POISON-FWD", 20: "POISON-POST", 27: "POISON-KILL"}
    for idx, marker in poison.items():
        texts[idx] = f"{marker} {texts[idx]}"
    worker = serve(redis_url, sqlite_url)
    worker.wait_ready(store, queue)
    job = submit(redis_url, sqlite_url, model, texts)
    wait_for("the job to finish", lambda: store.job(job).is_final, timeout=180, logs=[worker])
    clean = [i for i in range(len(texts)) if i not in poison]
    reference = expected(model, texts)
    report = ledger.check(sqlite_url, job, faults=len(poison), expected={i: reference[i] for i in clean})
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["changed"] == 0
    errors = {r["idx"]: r["error"] for r in report["items"] if r["status"] == "failed"}
    assert set(errors) == set(poison), "only the poisoned items fail"
    assert errors[5].startswith("preprocess: ValueError: the tokenizer cannot read this input")
    assert errors[12].startswith("forward: IndexError")
    assert errors[20].startswith("postprocess: RuntimeError: postprocess cannot handle this output")
    assert "gave up after 3 deliveries" in errors[27], "the input that kills the worker is dead-lettered"


# ------------------------------------------------------------------ 6: duplicate delivery


def test_forced_duplicate_delivery_changes_nothing(
    pg_url: str, redis_url: str, model: str, serve: Any, ledger: FaultLedger
) -> None:
    # One chunk of 16 items takes 4 batches x 1 s; Redis hands an unacknowledged message back after
    # 1 s. Whichever worker did not take the chunk is idle, so its restore timer (every 1 s) runs and
    # it takes the copy while the first delivery is still running: the chunk is delivered twice.
    store, queue, texts = Store(pg_url), queue_of(model), TEXTS[:16]
    env = {"PIPEQ_VISIBILITY_TIMEOUT": "1"}
    a = serve(redis_url, pg_url, delay=1.0, env=env)
    b = serve(redis_url, pg_url, delay=1.0, env=env)
    a.wait_ready(store, queue)
    b.wait_ready(store, queue)
    job = submit(redis_url, pg_url, model, texts)
    assert store.job_row(job)["chunk_size"] == len(texts), "the job is a single message"
    wait_for("the job to finish", lambda: store.job(job).is_final, logs=[a, b])
    time.sleep(3)  # let any late copy arrive and be skipped
    checked_once(ledger, pg_url, job, model, texts)
    logs = a.log() + b.log()
    deliveries = re.findall(r"chunk: (\d+) done, (\d+) failed, (\d+) skipped", logs)
    assert len(deliveries) >= 2, f"the chunk was delivered once: {deliveries}"
    assert sum(int(done) + int(failed) for done, failed, _ in deliveries) == len(texts), "no item ran twice"


# ------------------------------------------------------------------ 8: bad input at the door


BAD_FILES: list[tuple[str, bytes, str]] = [
    ("malformed.jsonl", b'{"text": "ok"}\n{"text": "broken"\n', "malformed.jsonl:2: malformed JSON"),
    ("latin1.jsonl", '{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"), "latin1.jsonl:2: not valid UTF-8"),
    ("missing.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "missing.jsonl:2: missing field 'text'"),
    ("number.jsonl", b'{"text": "ok"}\n{"text": 3}\n', "number.jsonl:2: field 'text' must be a string, got int"),
    ("empty.csv", b'text\nok\n""\n', "empty.csv:3: field 'text' is empty"),
    ("huge.jsonl", json.dumps({"text": "x" * 1_048_576}).encode() + b"\n", "huge.jsonl:1: field 'text' is 1,048,576"),
    ("blank.txt", b"\n" * 100_000, "holds no items"),
]


def test_bad_input_at_the_door_queues_nothing(
    tmp_path: Path, pg_url: str, redis_url: str, model: str, ledger: FaultLedger
) -> None:
    import redis
    from typer.testing import CliRunner

    from pipeq.cli import app

    env = {"PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": pg_url}
    runner = CliRunner()
    cases: list[tuple[list[str], str]] = []
    for name, content, message in BAD_FILES:
        (tmp_path / name).write_bytes(content)
        cases.append(([str(tmp_path / name), "--task", "text-classification", "--model", model], message))
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    cases += [
        ([str(good), "--task", "translation", "--model", model], "removed"),
        ([str(good), "--task", "text-classification", "--model", str(tmp_path / "nowhere")], "does not exist"),
        ([str(good), "--task", "text-classification", "--model", model, "--precision", "int4"], "precision"),
    ]
    for args, message in cases:
        out = runner.invoke(app, ["submit", *args], env=env)
        assert out.exit_code == 2, (args, out.output)
        assert message in out.output, (args, out.output)
    with Store(pg_url).engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar_one() == 0
    assert redis.Redis.from_url(redis_url).llen(ServeKey("text-classification", model).queue) == 0
    ledger.faults += len(cases)


# ------------------------------------------------------------------ 9: the store's lock held past dead_after


def _two_live_workers(database_url: str, model: str) -> tuple[Any, list[Any]]:
    """Two started workers on one queue, dead after 1.5 s of silence (a heartbeat and a look every 0.5 s)."""
    from pipeq.worker.app import create_worker_app
    from pipeq.worker.config import WorkerConfig

    settings = Settings(broker_url="memory://", database_url=database_url, dead_after=1.5, reconcile_interval=0)
    key = ServeKey("text-classification", model)
    contexts = []
    for _ in range(2):
        _, ctx = create_worker_app(settings, WorkerConfig(key=key, warmup=False))
        contexts.append(ctx)
        ctx.start()
    return key, contexts


def _none_lost_then_a_silent_one_is(store: Store, key: ServeKey, contexts: list[Any], log: str) -> None:
    """Both workers live, none ever declared lost; then one whose heartbeats stop is declared lost by the other."""
    rows = _all_rows(store)
    assert [w["status"] for w in rows] == ["ready", "ready"], rows
    assert "marked lost" not in log
    assert len(store.live_workers(key.queue)) == 2
    dead = contexts[1]
    dead._stop.set()  # its heartbeat thread ends; the process goes on, as a hung one would
    wait_for("the silent worker to be declared lost", lambda: row_of(store, dead.worker_id)["status"] == "lost")
    assert row_of(store, contexts[0].worker_id)["status"] == "ready"


def test_a_store_lock_held_past_dead_after_declares_no_worker_lost(
    sqlite_url: str, model: str, ledger: FaultLedger, caplog: pytest.LogCaptureFixture
) -> None:
    """A long SQLite write (a large submit holds BEGIN IMMEDIATE) keeps every heartbeat waiting longer than
    ``dead_after``: the store was busy, nobody died. Two live workers, each looking for dead ones every
    half second, declare neither the other nor themselves lost."""
    import sqlite3

    store = Store(sqlite_url)
    key, contexts = _two_live_workers(sqlite_url, model)
    try:
        time.sleep(2.0)  # both have beaten and looked for dead workers a few times
        # When another writer holds the store's lock for 4 s (more than dead_after)
        lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        time.sleep(4.0)
        lock.execute("COMMIT")
        lock.close()
        time.sleep(3.0)  # the heartbeats that waited land, and the judges look again
        # Then no worker was declared lost; one that does stop beating still is
        _none_lost_then_a_silent_one_is(store, key, contexts, caplog.text)
    finally:
        for ctx in contexts:
            ctx.stop()
        store.close()
    ledger.faults += 1


def test_a_postgres_outage_past_dead_after_declares_no_worker_lost(
    pg_url: str, model: str, ledger: FaultLedger, caplog: pytest.LogCaptureFixture
) -> None:
    """Every worker's heartbeats fail while PostgreSQL refuses connections for longer than ``dead_after``:
    the first worker back must not declare the others lost, as they are only reconnecting too."""
    store = Store(pg_url)
    key, contexts = _two_live_workers(pg_url, model)
    try:
        time.sleep(2.0)
        # When the store refuses every connection for 4 s (more than dead_after)
        name = pg_url.rsplit("/", 1)[1]
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name}
            )
        time.sleep(4.0)
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        store.engine.dispose()
        time.sleep(3.0)  # the workers reconnect, beat, and look for dead ones again
        # Then no worker was declared lost; one that does stop beating still is
        _none_lost_then_a_silent_one_is(store, key, contexts, caplog.text)
    finally:
        for ctx in contexts:
            ctx.stop()
        store.close()
    ledger.faults += 1


# ------------------------------------------------------------------ 10: a full disk under SQLite


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs of the test's own (mounting needs root, as in the test container)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr.decode()}"
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_under_sqlite_fails_submit_with_exit_3_and_no_input_text(
    small_disk: Path, tmp_path: Path, model: str, ledger: FaultLedger
) -> None:
    from pipeq.store import schema as db

    # Given an SQLite store on a disk with about 1 MB left, and 2 MB of texts to submit
    url = f"sqlite:///{small_disk / 'pipeq.db'}"
    db.upgrade(url)
    ballast = small_disk / "ballast"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast.write_bytes(b"\0" * (free - 1_000_000))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"private-text-{i} " + "x" * 1000}) + "\n" for i in range(2000)))
    env = {**os.environ, "PIPEQ_BROKER_URL": "memory://", "PIPEQ_DATABASE_URL": url}
    args = [sys.executable, "-m", "pipeq", "submit", str(texts), "--task", "text-classification", "--model", model]

    # When it is submitted
    full = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)

    # Then it fails with the store's exit code and one clear line, none of the texts in it
    assert full.returncode == 3, full.stderr[-3000:]
    assert "private-text" not in full.stderr and "private-text" not in full.stdout
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "store is full" in full.stderr, full.stderr
    # and nothing was half-stored
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA quick_check")).scalar_one() == "ok"
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar_one() == 0
    engine.dispose()

    # When space is freed, the same submit works
    ballast.unlink()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    job_id = again.stdout.strip().splitlines()[-1]
    with Store(url) as store:
        assert store.job(job_id).total == 2000
    ledger.faults += 1


# ------------------------------------------------------------------ 11: weights replaced under one model path


def _revisions(url: str, job_id: str) -> dict[str, set[str | None]]:
    """The model revisions that wrote a job's items, by item status."""
    engine = sa.create_engine(url)
    sql = sa.text(
        "SELECT i.status, b.model_revision FROM items i LEFT JOIN batches b ON b.id = i.batch_id WHERE i.job_id = :j"
    )
    found: dict[str, set[str | None]] = {}
    with engine.connect() as conn:
        for status, revision in conn.execute(sql, {"j": job_id}):
            found.setdefault(status, set()).add(revision)
    engine.dispose()
    return found


def test_weights_replaced_under_one_model_path_are_never_mixed_in_one_job(
    sqlite_url: str,
    model: str,
    tmp_path: Path,
    ledger: FaultLedger,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A local folder has no commit hash: its weights are replaced (overwritten in place, as a training run's
    checkpoint is) while a worker serves them, and a second worker starts on the new ones. The job that
    began on the old weights is never finished with the new ones, by either worker."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeq import constants as C
    from pipeq.worker.app import create_worker_app
    from pipeq.worker.config import WorkerConfig

    monkeypatch.setattr(C, "STEP_ASIDE_PAUSE", 0.0, raising=False)
    path = shutil.copytree(model, tmp_path / "model")
    key = ServeKey("text-classification", str(path))
    settings = Settings(broker_url="memory://", database_url=sqlite_url, dead_after=0, reconcile_interval=0)
    store = Store(sqlite_url)
    started = []

    def start_worker() -> Any:
        _, ctx = create_worker_app(settings, WorkerConfig(key=key, max_batch_size=4, warmup=False))
        ctx.start()
        started.append(ctx)
        return ctx

    def submit_texts(texts: list[str]) -> str:
        with Client(settings) as client:
            return client.submit(texts, task=key.task, model=key.model).id

    def run(ctx: Any, job_id: str, idxs: range) -> dict[str, int]:
        return dict(ctx.run_chunk(job_id, [[i, v] for i, v in store.pending_inputs(job_id, list(idxs))], None))

    try:
        # Given a worker on the old weights that ran half of a job
        old = start_worker()
        first = submit_texts(TEXTS[:16])
        assert run(old, first, range(8))["done"] == 8
        # When the weights are overwritten in place and a second worker starts on the new ones
        weights = load_file(path / "model.safetensors")
        save_file({name: t + 0.5 for name, t in weights.items()}, path / "model.safetensors")
        new = start_worker()
        assert old.loaded.resolved_revision != new.loaded.resolved_revision
        # Then the new worker leaves the job's other half to the old one, which is live,
        assert run(new, first, range(8, 16)).get("handed_back") == 8
        # and the old one, whose weights changed under it, runs nothing more: with nobody left that has
        # the job's weights, its items fail with the reason, and the job's error says so
        assert run(old, first, range(8, 16)).get("failed") == 8
        assert "changed after this worker loaded them" in (store.job(first).error or "")
        # A new job runs on the new weights only, whoever gets its messages first
        second = submit_texts(TEXTS[:8])
        assert run(old, second, range(8)).get("handed_back") == 8
        assert run(new, second, range(8))["done"] == 8

        # No job mixes revisions: each one's results come from one worker's weights, named on them
        assert _revisions(sqlite_url, first) == {"done": {old.loaded.resolved_revision}, "failed": {None}}
        assert _revisions(sqlite_url, second) == {"done": {new.loaded.resolved_revision}}
        assert store.job_row(first)["resolved_revision"] == old.loaded.resolved_revision
        assert store.job_row(second)["resolved_revision"] == new.loaded.resolved_revision
        assert {w["id"]: w["status"] for w in _all_rows(store)} == {old.worker_id: "stale", new.worker_id: "ready"}
    finally:
        for ctx in started:
            ctx.stop()
        store.close()
    ledger.faults += 1


# ------------------------------------------------------------------ generation


def test_a_worker_killed_mid_generation_loses_and_repeats_nothing(
    pg_url: str, redis_url: str, model_dir: Callable[[str], str], start_worker: Any, tmp_path: Path, ledger: FaultLedger
) -> None:
    """SIGKILL a worker while its sequence engine has rows decoding: a new worker runs what was not committed,
    every item is done once, and each output is what the engine gives the prompt in process."""
    import shutil

    from transformers import pipeline

    from pipeq.worker.engines.sequence.engine import SequenceEngine

    task = "text-generation"
    model = str(shutil.copytree(model_dir("causal-lm-endless"), tmp_path / "lm"))
    store, queue = Store(pg_url), ServeKey(task, model).queue
    prompts = [f"item {i}: " + "words to go on from " * (i % 7) for i in range(24)]
    params = {"max_tokens": 60}

    def serve() -> WorkerProcess:
        return start_worker(
            "--task", task, "--model", model, "--max-batch-size", "2", "--concurrency", "1", "--no-warmup",
            broker_url=redis_url, database_url=pg_url, extra_env=FAST_RECOVERY,
        )  # fmt: skip

    first = serve()
    first.wait_ready(store, queue)
    with Client(Settings(broker_url=redis_url, database_url=pg_url)) as client:
        job = client.submit(prompts, task=task, model=model, params=params).id
    wait_for("a first item", lambda: finished(store, job) >= 2, logs=[first])
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    assert 0 < finished(store, job) < len(prompts), "the worker died mid-job"
    second = serve()
    wait_for("the job to finish", lambda: store.job(job).is_final, timeout=180, logs=[first, second])
    engine = SequenceEngine(pipeline(task, model=model), max_rows=8, kv_tokens=100_000)
    want = {r.idx: r.output for results, _ in engine.run(list(enumerate(prompts)), params) for r in results}
    report = ledger.check(pg_url, job, faults=1, expected=want)
    assert_exactly_once(report, len(prompts))
