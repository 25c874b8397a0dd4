"""Prometheus metrics of a worker (``pipeq worker --metrics-port N``).

Pool children run the model, so prometheus_client runs in multiprocess mode: the parent points
``PROMETHEUS_MULTIPROC_DIR`` at a private directory before the pool forks, each child records into
its own files there, and the parent serves them all (plus its own queue-depth sample) on the port.
prometheus_client is imported only when a port is set.
"""

from __future__ import annotations

import atexit
import glob
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeq import constants as C
from pipeq.errors import ConfigurationError
from pipeq.primitives import PHASES, BatchTiming, ItemResult, WriteOutcome, parse_error
from pipeq.worker.config import WorkerConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

#: Environment variable that puts prometheus_client in multiprocess mode (read when it is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds between the parent's queue-depth samples (and its sweeps for exited children).
SAMPLE_INTERVAL = 5.0
#: Batch phases timed, as in the ``batches`` table.
#: Histogram buckets of a phase's duration, in seconds.
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Histogram buckets of inputs per micro-batch.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Labels every worker metric carries.
LABELS = ("task", "model", "precision")


def _labels(cfg: WorkerConfig) -> dict[str, str]:
    key = cfg.key
    return {"task": key.task, "model": os.path.basename(key.model.rstrip("/")), "precision": key.precision}


def failure_label(error: str | None) -> str:
    """The exception class named in an item's error, else ``other`` (a metric label of few values)."""
    parsed = parse_error(error)
    return parsed.exception if parsed else "other"


class WorkerMetrics:
    """The metrics one pool child records, created once its pipeline is loaded."""

    def __init__(self, cfg: WorkerConfig, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        #: A registry of this object's own (in multiprocess mode the parent reads the files instead).
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = _labels(cfg)
        reg = self.registry
        self._items = Counter("pipeq_items_processed", "Items finished", [*LABELS, "status"], registry=reg)
        self._tokens = Counter("pipeq_tokens_processed", "Real (unpadded) tokens run", LABELS, registry=reg)
        self._failures = Counter("pipeq_item_failures", "Failed items by exception", [*LABELS, "reason"], registry=reg)
        phase = Histogram(
            "pipeq_batch_phase_seconds",
            "Micro-batch phase durations",
            [*LABELS, "phase"],
            buckets=PHASE_BUCKETS,
            registry=reg,
        )
        size = Histogram("pipeq_batch_size", "Inputs per micro-batch", LABELS, buckets=SIZE_BUCKETS, registry=reg)
        footprint = Gauge(
            "pipeq_model_footprint_bytes", "Loaded model size", LABELS, multiprocess_mode="liveall", registry=reg
        )
        load = Gauge(
            "pipeq_model_load_seconds", "Model load and warm-up time", LABELS, multiprocess_mode="liveall", registry=reg
        )
        self._done = self._items.labels(**labels, status=C.ITEM_DONE)
        self._failed = self._items.labels(**labels, status=C.ITEM_FAILED)
        self._token_count = self._tokens.labels(**labels)
        self._phases = {name: phase.labels(**labels, phase=name) for name in PHASES}
        self._size = size.labels(**labels)
        self._footprint = footprint.labels(**labels)
        self._load = load.labels(**labels)
        self._labels = labels

    def observe_batch(self, timing: BatchTiming | None, outcome: WriteOutcome, failures: list[ItemResult]) -> None:
        """Count one committed write: its items by status, its tokens and phase times, its failures' reasons."""
        if outcome.done:
            self._done.inc(outcome.done)
        if outcome.failed:
            self._failed.inc(outcome.failed)
        for result in failures:
            self._failures.labels(**self._labels, reason=failure_label(result.error)).inc()
        if timing is None:
            return
        self._token_count.inc(timing.real_tokens)
        self._size.observe(timing.size)
        for name in PHASES:
            self._phases[name].observe(getattr(timing, f"{name}_ms") / 1000)

    def model_loaded(self, footprint_bytes: int, load_seconds: float) -> None:
        """Record the loaded model's size and how long loading (and warm-up) took."""
        self._footprint.set(footprint_bytes)
        self._load.set(load_seconds)


class QueueSampler:
    """In the parent: samples the queue's Redis length and removes the live gauges of exited children.

    Registered as a collector, so the sample is served as ``pipeq_queue_depth`` without touching
    prometheus_client's multiprocess files from the parent.
    """

    def __init__(self, cfg: WorkerConfig, broker_url: str, path: str) -> None:
        self.queue = cfg.key.queue
        self.labels = {**_labels(cfg), "queue": self.queue}
        self.path = path
        self.depth: float | None = None
        self._redis: Any = None
        if urlsplit(broker_url).scheme in ("redis", "rediss"):
            import redis

            self._redis = redis.Redis.from_url(broker_url, socket_timeout=SAMPLE_INTERVAL)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        if self._redis is None:
            return
        family = GaugeMetricFamily(
            "pipeq_queue_depth", "Messages waiting in the worker's queue", labels=list(self.labels)
        )
        family.add_metric(list(self.labels.values()), math.nan if self.depth is None else self.depth)
        yield family

    def sample(self) -> None:
        """One pass: the queue's length (all its priority lists), then the sweep for exited children."""
        from kombu.transport.redis import PRIORITY_STEPS, Channel
        from prometheus_client import multiprocess

        if self._redis is not None:
            keys = [self.queue] + [f"{self.queue}{Channel.sep}{step}" for step in PRIORITY_STEPS if step]
            try:
                pipe = self._redis.pipeline()
                for key in keys:
                    pipe.llen(key)
                self.depth = float(sum(pipe.execute()))
            except Exception as exc:  # any redis error: the sample is unknown until the next one
                self.depth = None
                log.warning("queue depth sample failed: %s: %s", type(exc).__name__, exc)
        for path in glob.glob(os.path.join(self.path, "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, self.path)

    def run(self) -> None:
        while True:
            self.sample()
            time.sleep(SAMPLE_INTERVAL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_metrics_server(port: int, cfg: WorkerConfig, broker_url: str) -> str:
    """In the worker's parent, before the pool forks: a private multiprocess directory, the server, the sampler.

    Returns the directory. Must run before anything in the process imports prometheus_client.
    """
    path = tempfile.mkdtemp(prefix="pipeq-metrics-")
    os.environ[MULTIPROC_ENV] = path
    parent = os.getpid()

    def _remove() -> None:
        if os.getpid() == parent:  # forked children inherit atexit handlers
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(_remove)
    try:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server
    except ImportError:
        raise ConfigurationError("--metrics-port needs prometheus-client: pip install 'pipeq[metrics]'") from None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    sampler = QueueSampler(cfg, broker_url, path)
    registry.register(sampler)
    try:
        start_http_server(port, registry=registry)
    except (OSError, OverflowError) as exc:
        raise ConfigurationError(f"cannot serve metrics on port {port}: {exc}") from None
    threading.Thread(target=sampler.run, name="pipeq-metrics-sampler", daemon=True).start()
    log.info("serving Prometheus metrics on port %d", port)
    return path
