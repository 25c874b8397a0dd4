"""Prometheus metrics: the recording module on its own, and a real ``pipeq worker --metrics-port``."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from kombu.transport.redis import Channel
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeq import Client, Settings
from pipeq.primitives import BatchTiming, ItemResult, WriteOutcome
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.worker.config import WorkerConfig
from pipeq.worker.metrics import QueueSampler, WorkerMetrics, failure_label

TASK = "text-classification"


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a scrape as (name, labels, value)."""
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def value(scraped: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in scraped if n == name and labels.items() <= lab.items())


def timing(size: int, real_tokens: int, forward_ms: float) -> BatchTiming:
    now = datetime.now(UTC)
    return BatchTiming(
        size=size, rows=size, real_tokens=real_tokens, padded_tokens=real_tokens + 5, queue_wait_ms=20.0,
        preprocess_ms=2.0, forward_ms=forward_ms, postprocess_ms=1.0, total_ms=forward_ms + 3.0,
        started_at=now, finished_at=now,
    )  # fmt: skip


def test_worker_metrics_count_batches() -> None:
    # Given a worker's metrics
    cfg = WorkerConfig(key=ServeKey(TASK, "/models/tiny-bert/", "int8"))
    metrics = WorkerMetrics(cfg)
    metrics.model_loaded(12_345, 1.5)
    # When two batches and a write of unrunnable items are observed
    failed = ItemResult(3, "failed", error="forward: RuntimeError: CUDA out of memory")
    metrics.observe_batch(timing(4, 40, 100.0), WriteOutcome(done=3, failed=1), [failed])
    metrics.observe_batch(timing(2, 10, 300.0), WriteOutcome(done=2), [])
    gave_up = ItemResult(9, "failed", error="gave up after 3 deliveries without a result")
    metrics.observe_batch(None, WriteOutcome(failed=1), [gave_up])
    # Then the scrape shows items by status, tokens, phase times, sizes, failures and the model
    scraped = samples(generate_latest(metrics.registry).decode())
    labels = {"task": TASK, "model": "tiny-bert", "precision": "int8"}
    assert value(scraped, "pipeq_items_processed_total", **labels, status="done") == 5
    assert value(scraped, "pipeq_items_processed_total", status="failed") == 2
    assert value(scraped, "pipeq_tokens_processed_total", **labels) == 50
    assert value(scraped, "pipeq_batch_phase_seconds_count", phase="forward") == 2
    assert value(scraped, "pipeq_batch_phase_seconds_sum", phase="forward") == pytest.approx(0.4)
    assert value(scraped, "pipeq_batch_phase_seconds_sum", phase="total") == pytest.approx(0.406)
    assert value(scraped, "pipeq_batch_phase_seconds_bucket", phase="forward", le="0.25") == 1
    assert value(scraped, "pipeq_batch_size_bucket", le="2.0") == 1
    assert value(scraped, "pipeq_batch_size_sum") == 6
    assert value(scraped, "pipeq_item_failures_total", reason="RuntimeError") == 1
    assert value(scraped, "pipeq_item_failures_total", reason="other") == 1
    assert value(scraped, "pipeq_model_footprint_bytes", **labels) == 12_345
    assert value(scraped, "pipeq_model_load_seconds") == 1.5


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("forward: RuntimeError: boom: again", "RuntimeError"),
        ("store: psycopg.errors.DataError: bad", "psycopg.errors.DataError"),
        ("job asks for ('a', 'b') but this worker serves ('c', 'd')", "other"),
        (None, "other"),
    ],
)
def test_failure_label(error: str | None, reason: str) -> None:
    assert failure_label(error) == reason


def test_queue_sampler_counts_priority_lists_and_sweeps_exited_children(tmp_path: Path) -> None:
    cfg = WorkerConfig(key=ServeKey(TASK, "/m/tiny"))
    sampler = QueueSampler(cfg, "redis://127.0.0.1:1/0", str(tmp_path))
    sampler._redis = fakeredis.FakeRedis()
    queue = cfg.key.queue
    sampler._redis.rpush(queue, "a", "b")
    sampler._redis.rpush(f"{queue}{Channel.sep}6", "c")
    sampler._redis.rpush("some-other-queue", "d")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    for pid in (exited.pid, os.getpid()):
        (tmp_path / f"gauge_liveall_{pid}.db").write_bytes(b"")
    # When the parent samples
    sampler.sample()
    # Then the depth counts every priority list of the queue, and only the exited child's live gauges go
    [family] = list(sampler.collect())
    assert [(s.labels["queue"], s.value) for s in family.samples] == [(queue, 3.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gauge_liveall_{os.getpid()}.db"]


def test_queue_depth_only_for_redis(tmp_path: Path) -> None:
    sampler = QueueSampler(WorkerConfig(key=ServeKey(TASK, "/m/tiny")), "memory://", str(tmp_path))
    sampler.sample()
    assert list(sampler.collect()) == []


# ------------------------------------------------------------------ a real worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return samples(response.read().decode())


@pytest.mark.integration
def test_worker_serves_metrics(pg_url: str, redis_url: str, model_dir: Callable[[str], str], start_worker: Any) -> None:
    # Given a real prefork worker with two children and a metrics port
    model, port = model_dir(TASK), free_port()
    worker = start_worker(
        "--task", TASK, "--model", model, "--precision", "fp32", "--concurrency", "2", "--no-warmup",
        "--metrics-port", str(port), broker_url=redis_url, database_url=pg_url,
    )  # fmt: skip
    store = Store(pg_url)
    worker.wait_ready(store, ServeKey(TASK, model).queue)
    # When a job runs
    texts = [f"review number {i}: " + "good " * (i % 9) for i in range(40)]
    with Client(Settings(broker_url=redis_url, database_url=pg_url)) as client:
        job = client.submit(texts, task=TASK, model=model)
        state = job.wait(timeout=120)
    assert state.done == 40, worker.log()[-3000:]
    # Then the parent serves what the children recorded, and the queue depth it samples
    scraped = scrape(port)
    assert value(scraped, "pipeq_items_processed_total", status="done", task=TASK, precision="fp32") == 40
    assert value(scraped, "pipeq_batch_phase_seconds_count", phase="forward") >= 1
    assert value(scraped, "pipeq_tokens_processed_total") > 40
    footprints = [v for n, _, v in scraped if n == "pipeq_model_footprint_bytes"]
    assert footprints and all(v > 0 for v in footprints)
    deadline = time.monotonic() + 15
    depth = [v for n, lab, v in scraped if n == "pipeq_queue_depth" and lab["queue"] == ServeKey(TASK, model).queue]
    while (not depth or math.isnan(depth[0])) and time.monotonic() < deadline:
        time.sleep(1)
        depth = [v for n, _, v in scrape(port) if n == "pipeq_queue_depth"]
    assert depth and depth[0] >= 0
    store.close()
