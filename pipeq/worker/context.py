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
from dataclasses import replace
from typing import Any

from celery import Celery

from pipeq import constants as C
from pipeq.broker.publish import publish_chunks
from pipeq.broker.reconcile import reconcile, republish_lost, take_over
from pipeq.broker.window import top_up
from pipeq.cache import CacheScope
from pipeq.errors import BrokerError, ConfigurationError, StoreError
from pipeq.primitives import BatchTiming, ItemResult, Lease, utcnow
from pipeq.routing import check_params
from pipeq.settings import Settings, mask_url
from pipeq.store import Store, is_transient
from pipeq.worker.config import WorkerConfig
from pipeq.worker.contact import StoreContact
from pipeq.worker.engines import build_engine, engine_name
from pipeq.worker.engines.base import Engine
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import (
    LoadedPipeline,
    load_pipeline,
    local_revision,
    set_threads,
    set_tokenizer_threads,
    warmup_inputs,
)
from pipeq.worker.measure import throughput
from pipeq.worker.memory import release_free_memory
from pipeq.worker.metrics import WorkerMetrics
from pipeq.worker.shadow import ShadowCheck
from pipeq.worker.writer import Recorder, WriteBehind

log = logging.getLogger(__name__)


class WorkerContext:
    """What one pool child holds for its whole life; created in the parent, started in the child."""

    def __init__(self, settings: Settings, cfg: WorkerConfig) -> None:
        self.settings = settings
        self.cfg = cfg
        self.worker_id = uuid.uuid4().hex
        self.store: Store | None = None
        self.loaded: LoadedPipeline | None = None
        self.runtime: Engine | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: Set to 1 by a pool child that could not load the pipeline (shared memory, made before fork).
        self.load_failed: Any = multiprocessing.Value("i", 0)
        #: Pool children that finished ``start`` (model loaded, start-up measured): the parent takes no
        #: message before all of them have (see ``pipeq.worker.app``).
        self.ready_children: Any = multiprocessing.Value("i", 0)
        #: Called by stop(): the app uses it to disconnect its process signals.
        self.on_stop: Callable[[], None] | None = None
        #: Set to 1 by the parent when a warm shutdown begins: children stop after their running batch.
        self.shutting_down: Any = multiprocessing.Value("i", 0)
        #: The app, for handing unstarted work back and for the reconciler (None when used directly).
        self.celery: Celery | None = None
        #: The job whose chunk runs now, and items finished by this process (reported on heartbeats).
        self.current_job: str | None = None
        #: Seconds spent running chunks (writes to the store are counted by the recorder).
        self.busy_seconds = 0.0
        #: Prometheus metrics of this process; None (and prometheus_client never imported) without a metrics port.
        self.metrics: WorkerMetrics | None = None
        #: Writes results exactly once; the writer thread commits them in order, overlapping the next forward pass.
        self.recorder: Recorder | None = None
        self._behind: WriteBehind | None = None
        #: The fp32 copy of the model that ``--shadow-fraction`` compares outputs with.
        self.shadow: ShadowCheck | None = None
        #: Why this worker runs nothing more: the weights under its model path changed after it loaded them.
        self.stale: str | None = None
        #: Jobs this worker has said it will not run (each said once in its log).
        self._stepped_aside: set[str] = set()
        #: Whether this worker has reached the store long enough, without a break, to judge others dead.
        self.contact = StoreContact(settings.dead_after, self._beat_every())

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
                "precision_choice": cfg.precision_choice,
            }
        )
        # Heartbeats from the start: a worker loading a large model is not dead (see take_over).
        self._heartbeat = threading.Thread(target=self._beat, name="pipeq-heartbeat", daemon=True)
        self._heartbeat.start()
        threads = set_threads(cfg.resolved_threads)
        tokenizer_threads = set_tokenizer_threads(cfg.resolved_tokenizer_threads)
        self.loaded = load_pipeline(cfg)
        # The engine and the worker row learn how the model was placed (``cfg.multi_device``).
        cfg = self.cfg = replace(cfg, placement=self.loaded.placed)
        self.runtime = build_engine(self.loaded.pipe, cfg, threads)
        streams = self.runtime.streams
        if cfg.shadow_share:
            # On a CPU the fp32 copy runs on as many torch threads as one forward stream (one where a single
            # stream has every core): its share of the cores, not all of them at once.
            on_cpu = cfg.device == "cpu"
            self.shadow = ShadowCheck.load(
                self.store, cfg, torch_threads=(self.runtime.stream_threads or 1) if on_cpu else None
            )
        self.recorder = Recorder(
            self.store,
            worker_id=self.worker_id,
            model_revision=self.loaded.resolved_revision,
            precision=key.precision,
            device=cfg.device,
            shadow=self.shadow,
        )
        self._behind = WriteBehind(self.recorder)
        warm_seconds, speed, warm = self._warm_up() if cfg.warmup else (0.0, None, False)
        record = cfg.as_record()
        cheap = warm_seconds < C.THREAD_TRIAL_MAX_SECONDS
        if speed and warm and cheap and cfg.threads is None and threads > 1 and cfg.device == "cpu" and streams == 1:
            began = time.perf_counter()
            threads, speed, record["torch_threads_measured"] = self._choose_threads(threads, speed)
            warm_seconds += time.perf_counter() - began
        record["torch_threads"] = threads
        record["forward_streams"] = streams
        record["engine"] = engine_name(key.task)
        if self.runtime.min_chunk_items:
            record["min_chunk_items"] = self.runtime.min_chunk_items
        record["tokenizer_threads"] = tokenizer_threads
        if speed:
            # What producers size this worker's messages by until it has run real chunks (see broker.window).
            record["warmup_items_per_second"] = round(speed, 1)
        self.store.update_worker(
            self.worker_id,
            status="ready",
            resolved_revision=self.loaded.resolved_revision,
            footprint_bytes=self.loaded.footprint_bytes,
            load_seconds=self.loaded.load_seconds + warm_seconds,
            quantization=self.loaded.quantization,
            settings=record,
            heartbeat_at=utcnow(),
        )
        log.info("worker %s ready on %s (%d threads, %d streams)", self.worker_id[:8], key.queue, threads, streams)
        if cfg.metrics_port is not None:
            self.metrics = WorkerMetrics(cfg)
            self.metrics.model_loaded(self.loaded.footprint_bytes, self.loaded.load_seconds + warm_seconds)
            self.recorder.metrics = self.metrics

    @property
    def items_done(self) -> int:
        """Items this process moved to a final state."""
        return self.recorder.items_done if self.recorder is not None else 0

    @property
    def write_seconds(self) -> float:
        """Seconds this process spent writing results (the SQL share of its busy time)."""
        return self.recorder.write_seconds if self.recorder is not None else 0.0

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
        if self._behind is not None:
            self._behind.close()
        if self.shadow is not None:
            self.shadow.close()  # after the writer: it hands the last samples over
        if self.runtime is not None:
            self.runtime.close()
        if self.on_stop is not None:
            self.on_stop()
        if self.store is not None:
            try:
                self.store.update_worker(
                    self.worker_id,
                    status="stopped",
                    stopped_at=utcnow(),
                    current_job=None,
                    items_done=self.items_done,
                    busy_seconds=self.busy_seconds,
                    write_seconds=self.write_seconds,
                )
            except Exception:
                log.warning("could not mark worker %s stopped", self.worker_id[:8], exc_info=True)
            self.store.close()

    def _beat_every(self) -> float:
        """Seconds between heartbeats: a few within ``dead_after``, so that one late beat is not a death."""
        dead_after = self.settings.dead_after
        return min(C.HEARTBEAT_INTERVAL, dead_after / C.HEARTBEATS_PER_DEAD_AFTER or C.HEARTBEAT_INTERVAL)

    def _beat(self) -> None:
        """A heartbeat (with the current job and totals) and a look for dead workers on this queue, a few
        times per ``dead_after``; a look for jobs whose messages the broker lost, a few times per
        ``lost_after``; a reconciler pass every ``reconcile_interval``.

        Its own thread, so a long forward pass (torch releases the GIL) never silences it. It looks for
        dead workers only after ``dead_after`` seconds of unbroken contact with the store (``StoreContact``):
        an outage or a long-held lock delays every worker's heartbeats, and is nobody's death.
        """
        interval, dead_after = self.settings.reconcile_interval, self.settings.dead_after
        beat_every = self._beat_every()
        lost_after = self.settings.lost_after
        look_every = lost_after / C.LOST_CHECKS_PER_LOST_AFTER
        next_beat = time.monotonic()
        # A reconcile interval of 0 turns the worker's own reconciler off (it must not make this loop spin).
        next_reconcile = next_beat if interval > 0 else float("inf")
        next_look = next_beat + look_every if lost_after > 0 else float("inf")
        while not self._stop.wait(max(0.0, min(next_beat, next_reconcile, next_look) - time.monotonic())):
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + beat_every
                self._heartbeat_once()
                if dead_after > 0 and self.contact.may_judge():
                    self._take_over(dead_after)
            if now >= next_look:
                next_look = now + look_every
                self._republish_lost(lost_after)
            if interval > 0 and now >= next_reconcile:
                next_reconcile = now + interval
                self._reconcile()

    def _heartbeat_once(self) -> None:
        assert self.store is not None
        began = time.monotonic()
        try:
            alive = self.store.heartbeat(
                self.worker_id,
                current_job=self.current_job,
                status=C.WORKER_STALE if self.stale else "ready" if self.runtime is not None else "loading",
                items_done=self.items_done,
                busy_seconds=self.busy_seconds,
                write_seconds=self.write_seconds,
            )
        except Exception as exc:
            self.contact.lost()
            log.warning("heartbeat failed: %s", mask_url(str(exc)))
            return
        self.contact.reached(began)
        if not alive:
            log.warning(
                "worker %s had been declared lost (no heartbeat for %.0fs): its claimed items were queued again "
                "(results stay exactly once); it counts as live again",
                self.worker_id[:8],
                self.settings.dead_after,
            )

    def _take_over(self, dead_after: float) -> None:
        if self.celery is None or self.store is None or self.shutting_down.value:
            return
        began = time.monotonic()
        try:
            take_over(self.store, self.celery, dead_after=dead_after, queues=[self.cfg.key.queue])
            self.contact.reached(began)
        except Exception as exc:
            self.contact.lost()
            log.warning("looking for dead workers failed: %s: %s", type(exc).__name__, mask_url(str(exc)))

    def _republish_lost(self, lost_after: float) -> None:
        if self.celery is None or self.store is None or self.runtime is None or self.shutting_down.value:
            return  # a worker still loading holds nothing and serves nothing yet
        try:
            republish_lost(self.store, self.celery, lost_after=lost_after, queues=[self.cfg.key.queue])
        except Exception as exc:
            log.warning("looking for jobs the broker lost failed: %s: %s", type(exc).__name__, mask_url(str(exc)))

    def _reconcile(self) -> None:
        if self.celery is None or self.store is None or self.shutting_down.value:
            return
        try:
            reconcile(
                self.store,
                self.celery,
                stalled_after=self.settings.stalled_after,
                queues=[self.cfg.key.queue],
            )
        except Exception as exc:
            log.warning("reconciler pass failed: %s: %s", type(exc).__name__, mask_url(str(exc)))

    def _warmup_inputs(self) -> list[Any]:
        assert self.runtime is not None and self.loaded is not None
        return warmup_inputs(
            self.loaded.pipe,
            self.cfg.key.task,
            max_length=self.runtime.max_length,
            max_batch_tokens=self.cfg.batch_tokens,
            max_batch_size=self.cfg.max_batch_size,
        )

    def _warm_up(self) -> tuple[float, float | None, bool]:
        """Run batches of every shape once: (seconds it took, items/s, whether that speed is of warm shapes).

        When the pass is cheap it runs a second time, on warm shapes, for the speed.
        """
        assert self.runtime is not None
        if not isinstance(self.runtime, PipelineRuntime):
            return 0.0, None, False  # the sequence engine warms itself up as it is built
        items = list(enumerate(self._warmup_inputs()))
        t0 = time.perf_counter()
        try:
            for _ in self.runtime.run(items, {}):
                pass
            first = time.perf_counter() - t0
            if not items or first > C.WARMUP_SPEED_PASS_SECONDS:
                # Too slow to run twice: its speed (first passes over each shape included) is a low estimate.
                return first, len(items) / first if items and first > 0 else None, False
            # The shapes are warm now: this pass is the model's running speed.
            speed = throughput(self.runtime, [value for _, value in items], min_seconds=0.0, warm_up=False)
            return time.perf_counter() - t0, speed, True
        except Exception:
            log.warning("warm-up failed; continuing without it", exc_info=True)
            return time.perf_counter() - t0, None, False

    def _choose_threads(self, threads: int, speed: float) -> tuple[int, float, dict[str, float]]:
        """Torch threads for the forward pass: all this child's cores, or one fewer, whichever runs faster.

        The prepare and writer threads need a core too. Where the model's forward pass is cheap next
        to tokenizing and writing (small models, fast precisions), torch's threads on every core keep
        taking that core away from them, and one thread fewer can be faster; where the forward pass
        dominates, all cores are. This machine's speed drifts, so the two are timed in turns, each
        keeps its best pass, and one fewer wins only by a clear margin (``FEWER_THREADS_GAIN``).
        """
        import torch

        assert isinstance(self.runtime, PipelineRuntime)
        inputs = self._warmup_inputs()
        best = {threads: speed, threads - 1: 0.0}
        for n in (threads - 1, threads, threads - 1):
            torch.set_num_threads(n)
            best[n] = max(best[n], throughput(self.runtime, inputs, min_seconds=0.0, warm_up=False))
        measured = {str(n): round(v, 1) for n, v in best.items()}
        if best[threads - 1] > best[threads] * C.FEWER_THREADS_GAIN:
            log.info("torch threads: %d (%s items/s by threads)", threads - 1, measured)
            torch.set_num_threads(threads - 1)
            return threads - 1, best[threads - 1], measured
        torch.set_num_threads(threads)
        return threads, best[threads], measured

    # -------------------------------------------------------------- running

    def run_chunk(
        self,
        job_id: str,
        items: list[list[Any]],
        sent_at: float | None,
        *,
        slice_end: bool = False,
        redelivered: bool | None = None,
    ) -> dict[str, int]:
        """Run one message's items and commit each micro-batch's results; returns counts.

        ``slice_end`` marks the last message of a slice of the job: once it is done, this worker
        publishes the job's next slice (see ``pipeq.broker.window``). ``redelivered``: whether the
        broker delivers this message again, None where it cannot tell (see ``Store.claim``).

        An unreachable store is retried with backoff for ``store_retry_budget`` seconds (the same
        claim is kept, so retries count no extra attempt); after that StoreError is raised and the
        message goes back to the queue unacknowledged.
        """
        budget = self.settings.store_retry_budget
        deadline = time.monotonic() + budget
        claim: dict[str, dict[int, int]] = {}
        delay = 0.5
        self.current_job = job_id
        began = time.perf_counter()
        try:
            while True:
                try:
                    return self._run_chunk(job_id, items, sent_at, claim, slice_end, redelivered)
                except Exception as exc:
                    if not is_transient(exc):
                        self._count_failed_delivery(job_id, claim, redelivered)
                        raise
                    self.contact.lost()
                    if time.monotonic() + delay > deadline:
                        raise StoreError(
                            f"the store was unreachable for {budget:.0f}s: {type(exc).__name__}: "
                            f"{mask_url(str(getattr(exc, 'orig', exc)))}"
                        ) from None
                    name = type(exc).__name__
                    log.warning("store unreachable (%s); retrying job %s's chunk in %.1fs", name, job_id[:8], delay)
                    time.sleep(delay)
                    delay = min(delay * 2, C.STORE_RETRY_MAX_SLEEP)
        finally:
            self.current_job = None
            if self.recorder is not None:
                self.recorder.cache = None
            release_free_memory()  # or a long job of uneven texts keeps growing the heap (see memory.py)
            self.busy_seconds += time.perf_counter() - began

    def _count_failed_delivery(self, job_id: str, claim: dict[str, dict[int, int]], redelivered: bool | None) -> None:
        """A first delivery that raised is acknowledged (Celery acks a failed task) and never comes back
        marked: count its attempt on the items it left pending, so that a message queued again for them
        (``pipeq reconcile``) runs them one at a time and one that keeps failing runs out of attempts."""
        if redelivered is not False or "prior" not in claim or self.store is None:
            return  # nothing claimed, or the claim counted the attempt already
        try:
            self.store.count_lost_delivery(job_id, list(claim["prior"]))
        except Exception:
            log.warning("could not count the failed delivery of job %s's chunk", job_id[:8], exc_info=True)

    def _run_chunk(
        self,
        job_id: str,
        items: list[list[Any]],
        sent_at: float | None,
        claim: dict[str, dict[int, int]],
        slice_end: bool,
        redelivered: bool | None,
    ) -> dict[str, int]:
        assert self.store is not None and self.runtime is not None
        started = time.time()
        job = self.store.job_row(job_id)
        if job is None:
            log.warning("job %s is not in the store; dropping its message", job_id)
            return {"skipped": len(items)}
        if job["status"] in C.JOB_FINAL_STATES:
            return {"skipped": len(items)}
        idxs = [int(idx) for idx, _ in items]
        if "prior" not in claim:
            lease = Lease(self.worker_id, slice_end)
            claim["prior"] = self.store.claim(job_id, idxs, lease=lease, redelivered=redelivered)
            prior = claim["prior"]
        else:  # a retry after the store came back: the same delivery, no new attempt
            still = self.store.attempts(job_id, idxs)
            prior = {idx: n for idx, n in claim["prior"].items() if idx in still}
        todo = [(int(idx), value) for idx, value in items if int(idx) in prior]
        counts = {"done": 0, "failed": 0, "skipped": len(items) - len(todo)}
        if not todo:  # a duplicate delivery: the first one ran it, and moved the job's window on
            return counts
        if self._not_run_here(job, todo, slice_end, counts):
            return counts
        params = job["params"] or {}
        if job["use_cache"]:
            todo = self._from_cache(job, todo, counts)
        if self.shadow is not None:
            self.shadow.begin(job_id, params, todo, sampled=(job["shadow"] or {}).get("sampled", 0))
        queue_wait_ms = max(0.0, (started - sent_at) * 1000) if sent_at else 0.0
        if any(prior[idx] > 0 for idx, _ in todo):
            # Redelivered: an input in it may kill the process. Run one input at a time, counting each
            # attempt as it starts, so batch-mates get committed and the culprit alone runs out.
            handed = self._one_by_one(job_id, todo, prior, params, queue_wait_ms, counts)
        else:
            assert self._behind is not None
            steps = self.runtime.stream(todo, params, queue_wait_ms=queue_wait_ms)
            handed = self._behind.run(job_id, steps, counts, keep_going=lambda: not self.shutting_down.value)
        left = [(idx, value) for idx, value in todo if idx not in handed]
        if left and self.shutting_down.value:
            self._hand_back(job, left, slice_end)
            counts["handed_back"] = len(left)
        elif left:
            log.info("job %s cancelled or finished elsewhere; stopping its chunk", job_id[:8])
        elif slice_end and self.celery is not None:
            counts["published"] = self._next_slice(job)
        log.info(
            "job %s chunk: %d done, %d failed, %d skipped in %.0f ms",
            job_id[:8],
            counts["done"],
            counts["failed"],
            counts["skipped"],
            (time.time() - started) * 1000,
        )
        return counts

    def _next_slice(self, job: dict[str, Any]) -> int:
        """Publish the job's next slice (this message ended one); returns the items published."""
        assert self.store is not None and self.celery is not None
        try:
            return top_up(self.store, self.celery, job)
        except BrokerError as exc:
            # The chunk's results are committed; the slice is published again once the job's queue is found
            # empty with nothing of the job held by a live worker (``republish_lost``, within ``lost_after``).
            log.warning("job %s: could not publish its next slice: %s", job["id"][:8], exc)
            return 0

    def _hand_back(self, job: dict[str, Any], left: list[tuple[int, Any]], slice_end: bool) -> None:
        """The worker is stopping (or leaves the job to others): queue the chunk's unstarted items again, with
        their attempt taken back."""
        assert self.store is not None
        self.store.release(job["id"], [idx for idx, _ in left])
        if self.celery is None:
            log.warning("job %s: %d unstarted items left for the reconciler", job["id"][:8], len(left))
            return
        publish_chunks(
            self.celery,
            job["id"],
            job["queue"],
            left,
            chunk_size=len(left),
            priority=job["priority"],
            slice_end=slice_end,  # whoever finishes the rest moves the job's window on
        )
        why = "stopping" if self.shutting_down.value else "another model revision"
        log.info("%s: handed %d unstarted items of job %s back to the queue", why, len(left), job["id"][:8])

    def _not_run_here(
        self, job: dict[str, Any], todo: list[tuple[int, Any]], slice_end: bool, counts: dict[str, int]
    ) -> bool:
        """Whether this worker fails the chunk (``_refused``) or leaves it alone (another model revision)."""
        refused = self._refused(job, todo)
        if refused:
            self._record(job["id"], refused, None, counts)
            return True
        other = self._other_revision(job)
        if other:
            self._step_aside(job, todo, other, slice_end, counts)
        return bool(other)

    def _other_revision(self, job: dict[str, Any]) -> str | None:
        """Why this worker must not run ``job``: its weights are not the job's (None when they are, or unknown).

        A job runs on one model revision, that of the first worker that claims from it (``Store.bind_revision``).
        A local folder's revision is looked at again before every chunk (a few ``stat`` calls): weights replaced
        or overwritten in place (memory-mapped safetensors then serve the new bytes) make this worker stale.
        """
        assert self.store is not None and self.loaded is not None
        mine, model = self.loaded.resolved_revision, self.cfg.key.model
        if self.stale is None and mine is not None and mine.startswith("local-"):
            now = local_revision(model)
            if now != mine:
                self.stale = (
                    f"the weights under {model} changed after this worker loaded them ({mine}, now {now}): "
                    f"it runs nothing more; restart it to serve the new ones"
                )
                log.error("worker %s: %s", self.worker_id[:8], self.stale)
                self.store.update_worker(self.worker_id, status=C.WORKER_STALE)
        if self.stale is not None:
            return self.stale
        if mine is None:
            return None
        bound = job["resolved_revision"] or self.store.bind_revision(job["id"], mine)
        if bound is None or bound == mine:
            return None
        return (
            f"job {job['id'][:8]} runs {model} at revision {bound}, this worker has {mine} (its weights were replaced)"
        )

    def _step_aside(
        self, job: dict[str, Any], todo: list[tuple[int, Any]], reason: str, slice_end: bool, counts: dict[str, int]
    ) -> None:
        """Leave a chunk of a job on another model revision to a live worker that has the job's; fail it if none has.

        The message goes back to the queue after a pause (``STEP_ASIDE_PAUSE``), so that it does not spin
        between this worker and the queue while the right one is busy.
        """
        assert self.store is not None
        bound = self.store.job_row(job["id"]) or job
        able = [
            w["id"][:8]
            for w in self.store.live_workers(self.cfg.key.queue)
            if w["id"] != self.worker_id
            and w["status"] == "ready"
            and (bound["resolved_revision"] is None or w["resolved_revision"] == bound["resolved_revision"])
        ]
        if able and self.celery is not None:
            if job["id"] not in self._stepped_aside:
                self._stepped_aside.add(job["id"])
                log.warning("%s: leaving its items to worker(s) %s", reason, ", ".join(able))
            time.sleep(C.STEP_ASIDE_PAUSE)
            self._hand_back(job, todo, slice_end)
            counts["handed_back"] = len(todo)
            return
        error = f"{reason}; no live worker has the job's revision"
        log.error("%s: its items fail", error)
        self.store.set_job_error(job["id"], error)
        self._record(job["id"], [ItemResult(idx, C.ITEM_FAILED, error=error) for idx, _ in todo], None, counts)

    def _refused(self, job: dict[str, Any], todo: list[tuple[int, Any]]) -> list[ItemResult]:
        """Failed results for all of a job this worker must not run (none if it may).

        A job that names another configuration, parameters that would pick code or a model
        (written to the store by something other than pipeq's client), or parameters the
        pipeline's own ``_sanitize_parameters`` rejects never reaches the pipeline: its items fail
        with the reason at once instead of failing one delivery after another.
        """
        key = self.cfg.key
        wanted = (job["task"], job["model"], job["precision"], job["revision"])
        served = (key.task, key.model, key.precision, key.revision)
        if wanted != served:
            error = f"job asks for {wanted} but this worker serves {served}"
        else:
            try:
                check_params(job["params"], job["task"])
            except ConfigurationError as exc:
                error = str(exc)
            else:
                assert self.runtime is not None
                try:  # the pipeline's own check of its parameters, before any input runs
                    self.runtime.stage_params(job["params"] or {})
                    return []
                except Exception as exc:
                    error = f"invalid parameters for {key.task}: {type(exc).__name__}: {exc}"
        return [ItemResult(idx, C.ITEM_FAILED, error=error) for idx, _ in todo]

    def _from_cache(
        self, job: dict[str, Any], todo: list[tuple[int, Any]], counts: dict[str, int]
    ) -> list[tuple[int, Any]]:
        """Write the items whose output the result cache holds (one lookup); returns the others, to run.

        Their outputs go into the cache as their batches are written.
        """
        assert self.store is not None and self.loaded is not None and self.recorder is not None
        self.recorder.cache = scope = CacheScope.of(job, self.loaded.resolved_revision, todo)
        found = self.store.cache_get(sorted(set(scope.keys.values())))
        if not found:
            return todo
        hits = [
            ItemResult(idx, C.ITEM_DONE, output=found[scope.keys[idx]], cached=True)
            for idx, _ in todo
            if scope.keys[idx] in found
        ]
        self._record(job["id"], hits, None, counts)
        return [(idx, value) for idx, value in todo if scope.keys[idx] not in found]

    def _one_by_one(
        self,
        job_id: str,
        todo: list[tuple[int, Any]],
        prior: dict[int, int],
        params: dict[str, Any],
        queue_wait_ms: float,
        counts: dict[str, int],
    ) -> set[int]:
        assert self.store is not None and self.runtime is not None
        stopped = threading.Event()
        handed: set[int] = set()
        for idx, value in todo:
            if stopped.is_set() or self.shutting_down.value:
                break
            n = 1 if prior[idx] == 0 else self.store.start_attempt(job_id, idx)
            handed.add(idx)
            if n is None:
                continue  # finished by another delivery meanwhile
            if n > C.MAX_ATTEMPTS:
                error = (
                    f"gave up after {C.MAX_ATTEMPTS} deliveries without a result "
                    f"(the worker died or lost the store while running this item)"
                )
                self._record(job_id, [ItemResult(idx, C.ITEM_FAILED, error=error)], None, counts, stopped)
                continue
            for results, timing in self.runtime.run([(idx, value)], params, queue_wait_ms=queue_wait_ms):
                self._record(job_id, results, timing, counts, stopped)
        return handed

    def _record(
        self,
        job_id: str,
        results: list[ItemResult],
        timing: BatchTiming | None,
        counts: dict[str, int],
        stopped: threading.Event | None = None,
    ) -> None:
        """Commit one batch's results now, on this thread."""
        assert self.recorder is not None
        self.recorder.record(job_id, [(results, timing)], counts, stopped)
