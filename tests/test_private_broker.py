"""No Redis: ``submit`` and ``worker`` fail at once with the command that starts one; ``demo`` runs its own.

The private broker is exercised for real: redis-server and the embedded fakeredis server start,
answer and are gone afterwards (also after a Ctrl-C); Celery's Redis transport with late acks
redelivers a killed worker's message through the embedded server; and ``pipeq demo`` runs end to
end on real MiniLM weights in a network namespace of its own, where nothing answers at the
default broker URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

import faultpipe
from conftest import FaultLedger, WorkerProcess, count_rows, unavailable
from pipeq import Client, Settings
from pipeq import constants as C
from pipeq.broker.private import EMBEDDED, REDIS_SERVER, free_port, private_broker
from pipeq.broker.probe import check_broker, ping
from pipeq.demo import demo_broker
from pipeq.errors import BrokerUnreachableError
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.vectors import Vector

KINDS = [REDIS_SERVER, EMBEDDED]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def gone(pid: int) -> bool:
    """True once process ``pid`` no longer exists (a stopped child is reaped by its parent, or by init)."""
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.1)
    return False


def pipeq(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeq", *args], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True
    )


# ------------------------------------------------------------------ the probe and failing fast


def test_the_probe_tells_an_answering_redis_from_a_closed_port(redis_url: str) -> None:
    assert ping(redis_url) is None
    closed = f"redis://127.0.0.1:{free_port()}/0"
    assert "refused" in str(ping(closed)).lower()
    check_broker(Settings(broker_url=redis_url))
    check_broker(Settings(broker_url="memory://"))  # not a Redis: nothing to probe
    check_broker(Settings(broker_url=f"{closed};{redis_url}"))  # failover: one answering is enough
    with pytest.raises(BrokerUnreachableError) as caught:
        check_broker(Settings(broker_url=closed.replace("127.0.0.1", "user:secret@127.0.0.1")))
    assert "secret" not in str(caught.value)


def test_submit_and_worker_fail_at_once_with_the_command_that_starts_redis(
    tmp_path: Path, sqlite_url: str, model_dir: Callable[[str], str]
) -> None:
    # Given a broker URL where nothing listens
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = {"PIPEQ_BROKER_URL": broker, "PIPEQ_DATABASE_URL": sqlite_url}
    model = model_dir("text-classification")
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    advice = f"no Redis answers at {broker} "
    start = f"start one with: redis-server --port {port} --save '' --daemonize yes (or `docker compose up -d redis`)"
    # When texts are submitted: exit 3 with the probe's error, not a publish that gave up; nothing stored
    out = pipeq("submit", str(src), "--task", "text-classification", "--model", model, env=env)
    assert out.returncode == 3, out.stderr
    assert advice in out.stderr and start in out.stderr
    assert "stored but not queued" not in out.stderr
    assert count_rows(sqlite_url, "jobs") == 0
    # When a worker is started: exit 3 with the same advice, before it loads or registers anything
    out = pipeq("worker", "--task", "text-classification", "--model", model, "--no-warmup", env=env)
    assert out.returncode == 3, out.stderr
    assert advice in out.stderr and start in out.stderr
    assert count_rows(sqlite_url, "workers") == 0
    # And from Python: the same error before anything is stored
    with Client(Settings(broker_url=broker, database_url=sqlite_url)) as client:
        with pytest.raises(BrokerUnreachableError, match="no Redis answers"):
            client.submit(["one"], task="text-classification", model=model)
    assert count_rows(sqlite_url, "jobs") == 0


def test_the_demo_only_replaces_the_default_broker(tmp_path: Path, redis_url: str) -> None:
    # A broker that answers is used as it is
    with demo_broker(Settings(broker_url=redis_url)) as settings:
        assert settings.broker_url == redis_url
    # A broker the user chose that does not answer is an error (exit 3), not a private broker
    broker = f"redis://127.0.0.1:{free_port()}/0"
    out = pipeq("demo", env={"PIPEQ_BROKER_URL": broker, "PIPEQ_DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}"})
    assert out.returncode == 3, out.stderr
    assert f"no Redis answers at {broker}" in out.stderr and "private" not in out.stderr


# ------------------------------------------------------------------ the private broker itself


@pytest.mark.parametrize("kind", KINDS)
def test_a_private_broker_answers_and_is_gone_afterwards(kind: str) -> None:
    import redis

    with private_broker(kind) as broker:
        assert broker.kind == kind
        client = redis.Redis.from_url(broker.url)
        client.rpush("q", "x")
        assert client.brpop(["q"], timeout=1) == (b"q", b"x")
        client.close()
    assert gone(broker.pid), f"the private {kind} (pid {broker.pid}) is still running"
    assert not port_open(broker.port)


@pytest.mark.parametrize("kind", KINDS)
def test_ctrl_c_stops_the_private_broker(kind: str) -> None:
    # Given a process holding a private broker (the broker in a session of its own, as the demo starts it)
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time\n"
            "from pipeq.broker.private import private_broker\n"
            f"with private_broker({kind!r}) as b:\n"
            "    print(b.pid, b.port, flush=True)\n"
            "    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    pid, port = map(int, holder.stdout.readline().split())
    assert port_open(port)
    # When it gets a Ctrl-C
    holder.send_signal(signal.SIGINT)
    holder.wait(timeout=60)
    # Then its broker was stopped on the way out
    assert "KeyboardInterrupt" in (holder.stderr.read() if holder.stderr else "")
    assert gone(pid) and not port_open(port)


# ------------------------------------------------------------------ Celery on the embedded broker

#: Redelivery within seconds; pipeq's own recovery (takeovers, the reconciler) off, so only the
#: broker can bring a dead worker's message back.
BROKER_ONLY_RECOVERY = {
    "PIPEQ_VISIBILITY_TIMEOUT": "6",
    "PIPEQ_BROKER_OPTIONS": json.dumps({"unacked_restore_interval": 1, "unacked_restore_throttle": 1}),
    "PIPEQ_DEAD_AFTER": "0",
    "PIPEQ_RECONCILE_INTERVAL": "0",
}


def wait_for(what: str, check: Callable[[], bool], logs: list[WorkerProcess], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(w.log()[-3000:] for w in logs))


@pytest.mark.integration
def test_late_acks_and_redelivery_work_on_the_embedded_broker(
    sqlite_url: str, model_dir: Callable[[str], str], start_worker: Callable[..., WorkerProcess], ledger: FaultLedger
) -> None:
    model = model_dir("text-classification")
    queue = ServeKey(faultpipe.TASK, model).queue
    texts = [f"review {i}: " + "the battery lasts long " * (1 + i % 5) for i in range(160)]

    def serve(broker_url: str, delay: float) -> WorkerProcess:
        return start_worker(
            "--task", faultpipe.TASK, "--model", model, "--precision", "fp32",
            "--pipeline-class", "faultpipe:FaultyClassificationPipeline",
            "--model-class", "transformers:AutoModelForSequenceClassification",
            "--max-batch-size", "4", "--no-warmup",
            broker_url=broker_url, database_url=sqlite_url,
            extra_env={**BROKER_ONLY_RECOVERY, "PIPEQ_TEST_FORWARD_DELAY": str(delay)},
        )  # fmt: skip

    with private_broker(EMBEDDED) as broker:
        store = Store(sqlite_url)
        first = serve(broker.url, delay=0.15)
        first.wait_ready(store, queue)
        with Client(Settings(broker_url=broker.url, database_url=sqlite_url, chunk_size=16)) as client:
            job = client.submit(texts, task=faultpipe.TASK, model=model).id

        def finished() -> int:
            return store.job(job).finished

        wait_for("a first batch", lambda: finished() >= 8, [first])
        # SIGKILL the pool child mid-batch: Celery rejects its message (acks_late), the broker requeues it
        (child,) = [int(w["pid"]) for w in store.live_workers(queue) if w["status"] == "ready"]
        os.kill(child, signal.SIGKILL)
        wait_for("the respawned child to go on", lambda: finished() >= 48, [first])
        # SIGKILL the whole worker: its unacknowledged message stays on the broker
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
        assert 0 < finished() < len(texts), "the worker died mid-job"
        # A new worker gets it back after the visibility timeout: takeovers and the reconciler are off
        second = serve(broker.url, delay=0.0)
        wait_for("the job to finish", lambda: store.job(job).is_final, [first, second])
        report = ledger.check(sqlite_url, job, faults=2)
        store.close()
    assert (report["lost"], report["duplicates"]) == (0, 0)
    assert report["job"]["status"] == "done" and report["job"]["requeues"] == 0
    assert all(r["status"] == "done" for r in report["items"])


# ------------------------------------------------------------------ the demo with no Redis anywhere

#: Run inside the network namespace: the demo, then whether its private broker is still there.
DEMO_DRIVER = r"""
import json, os, re, socket, subprocess, sys, time
out = subprocess.run([sys.executable, "-m", "pipeq", "demo"], capture_output=True, text=True)
found = re.search(r"a private one \((.+?), pid (\d+), redis://127\.0\.0\.1:(\d+)/0", out.stderr)
report = {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr[-6000:]}
if found:
    pid, port = int(found.group(2)), int(found.group(3))
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    with socket.socket() as sock:
        report.update(kind=found.group(1), pid_alive=os.path.exists(f"/proc/{pid}"),
                      port_open=sock.connect_ex(("127.0.0.1", port)) == 0)
with socket.socket() as sock:
    report["default_port_open"] = sock.connect_ex(("127.0.0.1", 6379)) == 0
print(json.dumps(report))
"""


def in_network_namespace(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a network namespace of its own (only a loopback, where nothing listens)."""
    unshare, ip, sh = shutil.which("unshare"), shutil.which("ip") or "/sbin/ip", shutil.which("sh")
    if unshare is None or sh is None or not Path(ip).exists():
        unavailable("unshare, sh and ip (util-linux, iproute2)")
    probe = subprocess.run([str(unshare), "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        unavailable("unprivileged network namespaces (unshare -rn)")
    script = f'{ip} link set lo up && exec "$@"'
    return subprocess.run(
        [str(unshare), "-rn", str(sh), "-c", script, "sh", *command], env=env, cwd=cwd, capture_output=True, text=True
    )


@pytest.mark.integration
def test_the_demo_runs_with_no_redis_reachable(tmp_path: Path, minilm_dir: str) -> None:
    """A fresh machine: no Redis, not even a redis-server binary (the demo's redis-server kind starts and
    stops as the tests above show; one whole demo run is enough)."""
    # Given a network where nothing answers at the default broker URL, and no redis-server on PATH
    kind = EMBEDDED
    store_url = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEQ_")}
    env.update(PIPEQ_DATABASE_URL=store_url, PIPEQ_MINILM_PATH=minilm_dir, HF_HUB_OFFLINE="1")
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's bin: no redis-server there
    # When the demo runs
    done = in_network_namespace([sys.executable, "-c", DEMO_DRIVER], env, tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # Then it ran on a private broker of that kind, and completed with nothing failed
    assert report["rc"] == 0, report["stderr"]
    assert not report["default_port_open"]
    assert report["kind"] == kind, report["stderr"]
    assert f"no Redis answers at {C.DEFAULT_BROKER_URL}: this demo runs a private one ({kind}" in report["stderr"]
    assert "stored embeddings (30 texts, 0 failed)" in report["stdout"]
    neighbours = re.findall(r"^    (\d\.\d{3})  ", report["stdout"], flags=re.M)
    assert len(neighbours) >= 10 and all(0 < float(s) < 1 for s in neighbours)
    # And the private broker is gone: no process left, its port closed
    assert report["pid_alive"] is False and report["port_open"] is False
    # And the store holds real embeddings: one unit vector of 384 dimensions per text, not all alike
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("select status, vector from items order by idx")).all()
    engine.dispose()
    assert len(rows) == 30 and {r.status for r in rows} == {"done"}
    vectors = np.asarray([Vector(bytes(r.vector)).array() for r in rows])
    assert vectors.shape == (30, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    similarity = vectors @ vectors.T
    assert similarity[~np.eye(30, dtype=bool)].max() < 0.99  # thirty different texts, thirty different vectors
