"""The shadow check (``--shadow-fraction``, on by default at a lower precision): a sample of items through fp32 too.

The figures add up on the job (``jobs.shadow``): items compared, how many kept their top label, the
largest score difference and the lowest cosine similarity, with the thresholds they are judged by
(``pipeq.agreement``), so ``pipeq status`` and the report say what the lower precision costs and warn
when it costs more than the thresholds allow.

The fp32 runs happen on a thread of their own, off the path results take: the writer thread hands
each committed batch's sampled items over and goes on, and the shadow thread runs them in batches
(``SHADOW_BATCH`` items, or whatever has waited ``SHADOW_SECONDS``), on as many torch threads as one
forward stream has, so it takes its share of the cores instead of stalling the writes (and with them
the forward passes) or spreading over every core at once. A sample's figures land on the job within
about ``SHADOW_SECONDS`` of its results; ``drain`` waits for them. When the thread falls
``SHADOW_BACKLOG`` items behind (a large ``--shadow-fraction``), the writer waits for it: the sample
is never cut short.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipeq import constants as C
from pipeq.agreement import Comparison, Thresholds, compare, merge
from pipeq.precisions import REFERENCE
from pipeq.primitives import ItemResult
from pipeq.store import Store
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines.batched.runtime import PipelineRuntime, set_torch_threads
from pipeq.worker.loading import load_pipeline

log = logging.getLogger(__name__)


def in_sample(job_id: str, idx: int, fraction: float) -> bool:
    """Whether item ``idx`` of a job is in the shadow sample: the same answer on every worker and delivery."""
    digest = hashlib.sha1(f"{job_id}:{idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class _Sample:
    """A sampled item, committed at the worker's precision, waiting for its fp32 run."""

    job_id: str
    params: dict[str, Any]
    idx: int
    value: Any
    output: Any
    queued: float


class ShadowCheck:
    """An fp32 copy of the worker's model, the sample of the chunk running now, and the thread that compares."""

    def __init__(
        self,
        store: Store,
        runtime: PipelineRuntime,
        *,
        fraction: float,
        precision: str,
        max_items: int = C.SHADOW_MAX_ITEMS,
        thresholds: Thresholds | None = None,
        torch_threads: int | None = None,
        batch: int = C.SHADOW_BATCH,
        wait_seconds: float = C.SHADOW_SECONDS,
        backlog: int = C.SHADOW_BACKLOG,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.fraction = fraction
        self.max_items = max_items
        self.precision = precision
        self.thresholds = thresholds or Thresholds()
        self.batch, self.wait_seconds, self.backlog = batch, wait_seconds, max(backlog, batch)
        self._job_id = ""
        self._params: dict[str, Any] = {}
        #: Inputs of the running chunk's sampled items, by idx.
        self._inputs: dict[int, Any] = {}
        self._cond = threading.Condition()
        self._waiting: list[_Sample] = []
        self._running = 0  # samples taken by the thread and not yet recorded
        self._flush = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, args=(torch_threads,), name="pipeq-shadow", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, store: Store, cfg: WorkerConfig, *, torch_threads: int | None = None) -> ShadowCheck:
        """Load the worker's model again at fp32 (same revision and device)."""
        loaded = load_pipeline(cfg.with_precision(REFERENCE))
        runtime = PipelineRuntime(
            loaded.pipe,
            cfg.key.task,
            max_batch_tokens=cfg.batch_tokens,
            max_batch_size=cfg.max_batch_size,
            prepare_ahead=0,  # everything on the shadow thread
        )
        log.info(
            "shadow check: %g%% of items also run at %s (--shadow-fraction 0: off)", 100 * cfg.shadow_share, REFERENCE
        )
        return cls(
            store,
            runtime,
            fraction=cfg.shadow_share,
            precision=cfg.key.precision,
            max_items=cfg.shadow_max_items,
            thresholds=cfg.thresholds,
            torch_threads=torch_threads,
        )

    def begin(self, job_id: str, params: dict[str, Any], items: Sequence[tuple[int, Any]], *, sampled: int = 0) -> None:
        """Pick the sample of a chunk about to run; ``sampled``: items of the job compared so far (its
        ``jobs.shadow``), so that a job stops being sampled at ``max_items`` (0: no cap)."""
        self._job_id, self._params = job_id, params
        picked = [(idx, value) for idx, value in items if in_sample(job_id, idx, self.fraction)]
        if self.max_items:
            picked = picked[: max(0, self.max_items - sampled)]
        self._inputs = dict(picked)

    def after_write(self, job_id: str, results: Sequence[ItemResult]) -> None:
        """Hand a written batch's sampled, computed items to the shadow thread (waits only while it is
        ``backlog`` items behind). The items are committed already: nothing here can fail them."""
        if job_id != self._job_id:
            return
        now = time.monotonic()
        picked = [
            _Sample(job_id, self._params, r.idx, self._inputs[r.idx], r.output, now)
            for r in results
            if r.status == C.ITEM_DONE and not r.cached and r.idx in self._inputs
        ]
        if not picked:
            return
        with self._cond:
            while len(self._waiting) >= self.backlog and not self._closed:
                self._cond.wait()
            self._waiting.extend(picked)
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Run what waits now and wait until its figures are recorded; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flush = True
            self._cond.notify_all()
            try:
                while (self._waiting or self._running) and self._thread.is_alive():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._flush = False
        return True

    def close(self, timeout: float = C.SHADOW_STOP_SECONDS) -> None:
        """Check what waits (for at most ``timeout`` seconds), then stop the thread."""
        if not self.drain(timeout):
            with self._cond:
                left = len(self._waiting) + self._running
            log.warning("shadow check: stopping with %d sampled items not compared after %.0fs", left, timeout)
        with self._cond:
            self._closed = True
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        self.runtime.close()

    def _loop(self, torch_threads: int | None) -> None:
        set_torch_threads(torch_threads)
        while True:
            with self._cond:
                while not self._closed and not self._due():
                    oldest = self._waiting[0].queued if self._waiting else None
                    self._cond.wait(None if oldest is None else max(0.0, oldest + self.wait_seconds - time.monotonic()))
                if self._closed:
                    return
                taken, self._waiting = self._waiting[: self.batch], self._waiting[self.batch :]
                self._running = len(taken)
                self._cond.notify_all()  # room in the backlog
            try:
                self._compare(taken)
            finally:
                with self._cond:
                    self._running = 0
                    self._cond.notify_all()

    def _due(self) -> bool:
        """Whether the thread has enough to run now: a batch, a sample that waited long enough, or a drain."""
        if not self._waiting:
            return False
        waited = time.monotonic() - self._waiting[0].queued
        return self._flush or len(self._waiting) >= self.batch or waited >= self.wait_seconds

    def _compare(self, samples: list[_Sample]) -> None:
        """Run ``samples`` at fp32, job by job, and add the comparisons to each job's figures."""
        jobs: dict[str, list[_Sample]] = {}
        for sample in samples:
            jobs.setdefault(sample.job_id, []).append(sample)
        for job_id, picked in jobs.items():
            try:
                began = time.perf_counter()
                reference: dict[int, Any] = {}
                for batch, _timing in self.runtime.run([(s.idx, s.value) for s in picked], picked[0].params):
                    reference.update((r.idx, r.output) for r in batch if r.status == C.ITEM_DONE)
                found = [compare(s.output, reference[s.idx]) for s in picked if s.idx in reference]
                seconds = time.perf_counter() - began
                if found:
                    self.store.update_shadow(job_id, partial(self._add, found=found, seconds=seconds))
            except Exception:
                log.warning("shadow check of %d items of job %s failed", len(picked), job_id[:8], exc_info=True)

    def _add(self, current: dict[str, Any] | None, found: list[Comparison], seconds: float) -> dict[str, Any]:
        """The job's figures with ``found`` added, and the seconds the fp32 runs took (the check's cost)."""
        figures = merge(current, self.precision, found, self.thresholds)
        figures["seconds"] = round((current or {}).get("seconds", 0.0) + seconds, 3)
        return figures
