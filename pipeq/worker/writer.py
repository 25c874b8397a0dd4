"""Committing results: the recorder (exactly-once writes with their fallbacks) and the writer thread.

The writer thread finishes each micro-batch (unbatch, ``postprocess``, JSON values) as soon as the
model hands it over, and commits the finished batches of a chunk together: when ``WRITE_SECONDS``
have passed since the first of them, when ``WRITE_GROUP`` batches or ``WRITE_ITEMS`` items are
waiting, or when the chunk has no more batches. The store then sees one transaction for many
batches (a PostgreSQL commit waits for its WAL flush, several milliseconds on an ordinary disk, and
every commit updates the job's row), while results still appear within a fraction of a second. A
chunk's message is acknowledged only after every write of it has returned, so results that were
not committed when a worker died are simply computed again by the next delivery.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeq import constants as C
from pipeq.cache import CacheScope
from pipeq.primitives import BatchTiming, ItemResult, WriteOutcome
from pipeq.store import Store, is_transient
from pipeq.worker.engines.base import Step

if TYPE_CHECKING:
    from pipeq.worker.metrics import WorkerMetrics
    from pipeq.worker.shadow import ShadowCheck

log = logging.getLogger(__name__)

#: Most micro-batches committed in one transaction.
WRITE_GROUP = 32
#: Most items committed in one transaction.
WRITE_ITEMS = 2048
#: Longest a finished batch waits for others to share its transaction (also how late a cancellation is seen).
WRITE_SECONDS = 0.25
#: Finished steps that may wait for the writer before the forward loop waits (memory stays flat).
WRITE_QUEUE = 4

Batch = tuple[Sequence[ItemResult], BatchTiming | None]


class Recorder:
    """Writes results to the store exactly once, and accounts for them (counts, metrics, shadow check)."""

    def __init__(
        self,
        store: Store,
        *,
        worker_id: str,
        model_revision: str | None,
        precision: str,
        device: str,
        metrics: WorkerMetrics | None = None,
        shadow: ShadowCheck | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.model_revision = model_revision
        self.precision = precision
        self.device = device
        self.metrics = metrics
        self.shadow = shadow
        #: Items this process moved to a final state, and seconds spent writing (reported on heartbeats).
        self.items_done = 0
        self.write_seconds = 0.0
        #: The result-cache keys of the running chunk when its job uses the cache.
        self.cache: CacheScope | None = None

    def record(
        self,
        job_id: str,
        batches: Sequence[Batch],
        counts: dict[str, int],
        stopped: threading.Event | None = None,
    ) -> None:
        """Commit ``batches`` (one transaction when it can); a write that finds nothing pending sets ``stopped``.

        A connection problem is raised (the chunk is retried as a whole, and ``stopped`` is set); a
        write the store refuses is retried batch by batch, then item by item, failing the bad items.
        """
        try:
            began = time.perf_counter()
            try:
                outcomes = self._write(job_id, batches)
            except Exception as exc:
                if is_transient(exc):
                    raise
                if len(batches) == 1:
                    outcomes = [self._write_items(job_id, *batches[0], error=exc)]
                else:  # find the batch the store refuses
                    outcomes = [self._write_alone(job_id, results, timing) for results, timing in batches]
            self.write_seconds += time.perf_counter() - began
        except BaseException:
            if stopped is not None:
                stopped.set()  # no point running more batches: the chunk is retried as a whole
            raise
        for (results, timing), outcome in zip(batches, outcomes, strict=True):
            self.items_done += outcome.done + outcome.failed
            if self.metrics is not None:
                self.metrics.observe_batch(timing, outcome, [r for r in results if r.status == C.ITEM_FAILED])
            counts["done"] += outcome.done
            counts["failed"] += outcome.failed
            counts["skipped"] += outcome.skipped
            if stopped is not None and results and outcome.skipped == len(results):
                # Nothing was pending any more: the job was cancelled (or another delivery finished it).
                stopped.set()
            if self.shadow is not None and outcome.done:
                self.shadow.after_write(job_id, results)

    def _write(self, job_id: str, batches: Sequence[Batch]) -> list[WriteOutcome]:
        return self.store.record_batches(
            job_id,
            batches,
            worker_id=self.worker_id,
            model_revision=self.model_revision,
            precision=self.precision,
            device=self.device,
            cache_scope=self.cache,
        )

    def _write_alone(self, job_id: str, results: Sequence[ItemResult], timing: BatchTiming | None) -> WriteOutcome:
        try:
            return self._write(job_id, [(results, timing)])[0]
        except Exception as exc:
            if is_transient(exc):
                raise
            return self._write_items(job_id, results, timing, error=exc)

    def _write_items(
        self, job_id: str, results: Sequence[ItemResult], timing: BatchTiming | None, *, error: Exception
    ) -> WriteOutcome:
        """The store refused a batch's write (not a connection problem): write items alone, failing the bad ones."""
        log.warning("store refused a batch of job %s (%s); writing its items one by one", job_id[:8], error)
        total = WriteOutcome()
        for result in results:
            try:
                outcome = self._write(job_id, [([result], timing)])[0]
                timing = None  # the batch's timing is stored once
            except Exception as exc:
                if is_transient(exc):
                    raise
                reason = f"store: {type(exc).__name__}: {getattr(exc, 'orig', exc)}"[:2000]
                outcome = self._write(job_id, [([ItemResult(result.idx, C.ITEM_FAILED, error=reason)], None)])[0]
            total = WriteOutcome(
                done=total.done + outcome.done,
                failed=total.failed + outcome.failed,
                cancelled=total.cancelled + outcome.cancelled,
                skipped=total.skipped + outcome.skipped,
            )
        return total


@dataclass
class _Entry:
    job_id: str
    step: Step
    counts: dict[str, int]
    stopped: threading.Event
    future: Future[None]


class _Flush:
    """Sent after a chunk's last batch: commit what waits now."""


_FLUSH = _Flush()


class WriteBehind:
    """One thread that finishes steps and commits them in order, a chunk's batches grouped."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        group: int = WRITE_GROUP,
        items: int = WRITE_ITEMS,
        seconds: float = WRITE_SECONDS,
        depth: int = WRITE_QUEUE,
    ) -> None:
        self.recorder = recorder
        self.group, self.items, self.seconds = group, items, seconds
        self._queue: queue.Queue[_Entry | _Flush | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._loop, name="pipeq-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def run(
        self, job_id: str, steps: Generator[Step, None, None], counts: dict[str, int], keep_going: Callable[[], bool]
    ) -> set[int]:
        """Hand each step to the writer as the model produces it; returns the items handed over.

        Stops taking steps when ``keep_going`` says so (the worker is stopping) or a write found
        nothing pending (cancelled) or failed. Returns after every write has returned; a failed
        write is re-raised, so the message is not acknowledged.
        """
        stopped = threading.Event()
        futures: list[Future[None]] = []
        handed: set[int] = set()
        try:
            while not stopped.is_set() and keep_going():
                step = next(steps, None)
                if step is None:
                    break
                handed.update(step.idxs)
                future: Future[None] = Future()
                self._queue.put(_Entry(job_id, step, counts, stopped, future))
                futures.append(future)
        finally:
            steps.close()  # stop preparing batches that will not run
            self._queue.put(_FLUSH)
            errors = []
            for future in futures:
                try:
                    future.result()
                except Exception as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]
        return handed

    def _loop(self) -> None:
        waiting: list[tuple[_Entry, Batch]] = []
        deadline = 0.0
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if waiting else None
            try:
                entry = self._queue.get(timeout=timeout)
            except queue.Empty:
                entry = _FLUSH  # the first waiting batch has waited long enough
            if entry is None or isinstance(entry, _Flush):
                self._commit(waiting)
                waiting = []
                if entry is None:
                    return
                continue
            if waiting and (waiting[0][0].job_id != entry.job_id or waiting[0][0].counts is not entry.counts):
                self._commit(waiting)  # another chunk's batches never share a transaction
                waiting = []
            finished = self._finish(entry)
            if finished is None:
                continue
            if not waiting:
                deadline = time.monotonic() + self.seconds
            waiting.append((entry, finished))
            if len(waiting) >= self.group or sum(len(b[0]) for _, b in waiting) >= self.items:
                self._commit(waiting)
                waiting = []

    @staticmethod
    def _finish(entry: _Entry) -> Batch | None:
        """Unbatch and postprocess the step now, so its model outputs are freed while it waits to be written."""
        try:
            return entry.step.finish()
        except BaseException as exc:  # a bug in unbatching: the chunk is not acknowledged
            log.error("finishing a batch of job %s failed", entry.job_id[:8], exc_info=True)
            entry.stopped.set()
            entry.future.set_exception(exc)
            return None

    def _commit(self, waiting: list[tuple[_Entry, Batch]]) -> None:
        if not waiting:
            return
        first = waiting[0][0]
        try:
            self.recorder.record(first.job_id, [batch for _, batch in waiting], first.counts, first.stopped)
        except BaseException as exc:
            for entry, _ in waiting:
                entry.future.set_exception(exc)
            return
        for entry, _ in waiting:
            entry.future.set_result(None)
