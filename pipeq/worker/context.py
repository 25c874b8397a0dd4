"""Per-process worker state: the store, the one loaded pipeline, the heartbeat, and running a chunk."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipeq import constants as C
from pipeq.models import utcnow
from pipeq.models.store import ItemResult, Store
from pipeq.settings import Settings
from pipeq.worker.config import WorkerConfig
from pipeq.worker.loading import LoadedPipeline, load_pipeline, set_threads, warmup_inputs
from pipeq.worker.runtime import PipelineRuntime

log = logging.getLogger(__name__)


class WorkerContext:
    """What one pool child holds for its whole life; created in the parent, started in the child."""

    def __init__(self, settings: Settings, cfg: WorkerConfig) -> None:
        self.settings = settings
        self.cfg = cfg
        self.worker_id = uuid.uuid4().hex
        self.store: Store | None = None
        self.loaded: LoadedPipeline | None = None
        self.runtime: PipelineRuntime | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: Set to 1 by a pool child that could not load the pipeline (shared memory, made before fork).
        self.load_failed: Any = multiprocessing.Value("i", 0)
        #: Called by stop(): the app uses it to disconnect its process signals.
        self.on_stop: Callable[[], None] | None = None
        #: One thread that commits results in order, overlapping the next forward pass.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeq-writer")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the pipeline in this process (never in a parent that forks) and register with the store.

        Idempotent: the solo pool sends ``worker_process_init`` in a process that may have started already.
        """
        if self.runtime is not None:
            return
        self.worker_id = uuid.uuid4().hex  # each forked child is its own worker
        self._stop.clear()
        cfg, key = self.cfg, self.cfg.key
        self.store = Store(self.settings.database_url)
        self.store.register_worker(
            {
                "id": self.worker_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queue": key.queue,
                "task": key.task,
                "model": key.model,
                "revision": key.revision,
                "precision": key.precision,
                "device": cfg.device,
                "status": "loading",
                "settings": cfg.as_record(),
            }
        )
        threads = set_threads(cfg.threads, cfg.concurrency)
        self.loaded = load_pipeline(cfg)
        self.runtime = PipelineRuntime(
            self.loaded.pipe, key.task, max_batch_tokens=cfg.max_batch_tokens, max_batch_size=cfg.max_batch_size
        )
        warm_seconds = self._warm_up() if cfg.warmup else 0.0
        self.store.update_worker(
            self.worker_id,
            status="ready",
            resolved_revision=self.loaded.resolved_revision,
            footprint_bytes=self.loaded.footprint_bytes,
            load_seconds=self.loaded.load_seconds + warm_seconds,
            quantization=self.loaded.quantization,
            heartbeat_at=utcnow(),
        )
        self._heartbeat = threading.Thread(target=self._beat, name="pipeq-heartbeat", daemon=True)
        self._heartbeat.start()
        log.info("worker %s ready on %s (%d threads)", self.worker_id[:8], key.queue, threads)

    def mark_failed(self) -> None:
        """Record in the store that this process could not load its pipeline."""
        if self.store is None:
            return
        try:
            self.store.update_worker(self.worker_id, status="failed", stopped_at=utcnow())
        except Exception:
            log.warning("could not mark worker %s failed", self.worker_id[:8], exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._writer.shutdown(wait=True)
        if self.on_stop is not None:
            self.on_stop()
        if self.store is not None:
            try:
                self.store.update_worker(self.worker_id, status="stopped", stopped_at=utcnow())
            except Exception:
                log.warning("could not mark worker %s stopped", self.worker_id[:8], exc_info=True)
            self.store.close()

    def _beat(self) -> None:
        while not self._stop.wait(C.HEARTBEAT_INTERVAL):
            try:
                assert self.store is not None
                self.store.heartbeat(self.worker_id)
            except Exception:
                log.warning("heartbeat failed", exc_info=True)

    def _warm_up(self) -> float:
        assert self.runtime is not None and self.loaded is not None
        inputs = warmup_inputs(
            self.loaded.pipe,
            self.cfg.key.task,
            max_length=self.runtime.max_length,
            max_batch_tokens=self.cfg.max_batch_tokens,
            max_batch_size=self.cfg.max_batch_size,
        )
        t0 = time.perf_counter()
        try:
            for _ in self.runtime.run(list(enumerate(inputs)), {}):
                pass
        except Exception:
            log.warning("warm-up failed; continuing without it", exc_info=True)
        return time.perf_counter() - t0

    # -------------------------------------------------------------- running

    def run_chunk(self, job_id: str, items: list[list[Any]], sent_at: float | None) -> dict[str, int]:
        """Run one message's items and commit each micro-batch's results; returns counts."""
        assert self.store is not None and self.runtime is not None
        started = time.time()
        job = self.store.job_row(job_id)
        if job is None:
            log.warning("job %s is not in the store; dropping its message", job_id)
            return {"skipped": len(items)}
        if job["status"] in C.JOB_FINAL_STATES:
            return {"skipped": len(items)}
        attempts = self.store.claim(job_id, [int(idx) for idx, _ in items])
        todo = [(int(idx), value) for idx, value in items if int(idx) in attempts]
        counts = {"done": 0, "failed": 0, "skipped": len(items) - len(todo)}
        failures = self._unrunnable(job, todo, attempts)
        if failures:
            self._record(job_id, failures, None, counts)
            failed = {r.idx for r in failures}
            todo = [(idx, value) for idx, value in todo if idx not in failed]
        if not todo:
            return counts
        # A redelivered message may hold an input that kills the process: run it one input at a
        # time so every other input is committed and the culprit alone runs out of attempts.
        redelivered = any(attempts[idx] > 1 for idx, _ in todo)
        queue_wait_ms = max(0.0, (started - sent_at) * 1000) if sent_at else 0.0
        batches = self.runtime.run(
            todo, job["params"] or {}, queue_wait_ms=queue_wait_ms, max_batch_size=1 if redelivered else None
        )
        # Results are committed on the writer thread while the next batch runs (torch releases the
        # GIL in forward); the message is acknowledged only after every write has returned.
        stopped = threading.Event()
        pending: list[Future[None]] = []
        for results, timing in batches:
            if stopped.is_set():
                log.info("job %s cancelled or finished elsewhere; stopping its chunk", job_id[:8])
                break
            pending.append(self._writer.submit(self._record, job_id, results, timing, counts, stopped))
        for future in pending:
            future.result()  # re-raises a failed write: the task retries and the message is not acked
        log.info(
            "job %s chunk: %d done, %d failed, %d skipped in %.0f ms",
            job_id[:8],
            counts["done"],
            counts["failed"],
            counts["skipped"],
            (time.time() - started) * 1000,
        )
        return counts

    def _unrunnable(
        self, job: dict[str, Any], todo: list[tuple[int, Any]], attempts: dict[int, int]
    ) -> list[ItemResult]:
        """Items to fail without running: all of a job this worker does not serve, and exhausted ones."""
        key = self.cfg.key
        wanted = (job["task"], job["model"], job["precision"], job["revision"])
        served = (key.task, key.model, key.precision, key.revision)
        if wanted != served:
            error = f"job asks for {wanted} but this worker serves {served}"
            return [ItemResult(idx, C.ITEM_FAILED, error=error) for idx, _ in todo]
        error = (
            f"gave up after {C.MAX_ATTEMPTS} deliveries without a result "
            f"(the worker died or lost the store while running this item)"
        )
        return [ItemResult(idx, C.ITEM_FAILED, error=error) for idx, _ in todo if attempts[idx] > C.MAX_ATTEMPTS]

    def _record(
        self,
        job_id: str,
        results: list[ItemResult],
        timing: Any,
        counts: dict[str, int],
        stopped: threading.Event | None = None,
    ) -> None:
        assert self.store is not None and self.loaded is not None
        outcome = self.store.record_batch(
            job_id,
            results,
            timing,
            worker_id=self.worker_id,
            model_revision=self.loaded.resolved_revision,
            precision=self.cfg.key.precision,
            device=self.cfg.device,
        )
        counts["done"] += outcome.done
        counts["failed"] += outcome.failed
        counts["skipped"] += outcome.skipped
        if stopped is not None and results and outcome.skipped == len(results):
            # Nothing was pending any more: the job was cancelled (or another delivery finished it).
            stopped.set()
