"""The shadow check (``--shadow-fraction``, on by default at a lower precision): a sample of items through fp32 too.

The figures add up on the job (``jobs.shadow``): items compared, how many kept their top label, the
largest score difference and the lowest cosine similarity, with the thresholds they are judged by
(``pipeq.agreement``), so ``pipeq status`` and the report say what the lower precision costs and warn
when it costs more than the thresholds allow.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from pipeq import constants as C
from pipeq.agreement import Comparison, Thresholds, compare, merge
from pipeq.precisions import REFERENCE
from pipeq.primitives import ItemResult
from pipeq.store import Store
from pipeq.worker.config import WorkerConfig
from pipeq.worker.loading import load_pipeline
from pipeq.worker.runtime import PipelineRuntime

log = logging.getLogger(__name__)


def in_sample(job_id: str, idx: int, fraction: float) -> bool:
    """Whether item ``idx`` of a job is in the shadow sample: the same answer on every worker and delivery."""
    digest = hashlib.sha1(f"{job_id}:{idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class ShadowCheck:
    """An fp32 copy of the worker's model and the sample of the chunk running now."""

    def __init__(
        self,
        store: Store,
        runtime: PipelineRuntime,
        *,
        fraction: float,
        precision: str,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.fraction = fraction
        self.precision = precision
        self.thresholds = thresholds or Thresholds()
        self._job_id = ""
        self._params: dict[str, Any] = {}
        #: Inputs of the running chunk's sampled items, by idx.
        self._inputs: dict[int, Any] = {}

    @classmethod
    def load(cls, store: Store, cfg: WorkerConfig) -> ShadowCheck:
        """Load the worker's model again at fp32 (same revision and device)."""
        loaded = load_pipeline(cfg.with_precision(REFERENCE))
        runtime = PipelineRuntime(
            loaded.pipe, cfg.key.task, max_batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size
        )
        log.info(
            "shadow check: %g%% of items also run at %s (--shadow-fraction 0: off)", 100 * cfg.shadow_share, REFERENCE
        )
        return cls(store, runtime, fraction=cfg.shadow_share, precision=cfg.key.precision, thresholds=cfg.thresholds)

    def begin(self, job_id: str, params: dict[str, Any], items: Sequence[tuple[int, Any]]) -> None:
        """Pick the sample of a chunk about to run."""
        self._job_id, self._params = job_id, params
        self._inputs = {idx: value for idx, value in items if in_sample(job_id, idx, self.fraction)}

    def after_write(self, job_id: str, results: Sequence[ItemResult]) -> None:
        """Run a written batch's sampled, computed items at fp32 and add the comparison to the job.

        A failure here is logged and costs only the sample: the items are committed already.
        """
        if job_id != self._job_id:
            return
        fresh = (r for r in results if r.status == C.ITEM_DONE and not r.cached)
        picked = {r.idx: r.output for r in fresh if r.idx in self._inputs}
        if not picked:
            return
        try:
            began = time.perf_counter()
            reference: dict[int, Any] = {}
            for batch, _timing in self.runtime.run([(idx, self._inputs[idx]) for idx in picked], self._params):
                reference.update((r.idx, r.output) for r in batch if r.status == C.ITEM_DONE)
            found = [compare(output, reference[idx]) for idx, output in picked.items() if idx in reference]
            seconds = time.perf_counter() - began
            if found:
                self.store.update_shadow(job_id, lambda current: self._add(current, found, seconds))
        except Exception:
            log.warning("shadow check of %d items of job %s failed", len(picked), job_id[:8], exc_info=True)

    def _add(self, current: dict[str, Any] | None, found: list[Comparison], seconds: float) -> dict[str, Any]:
        """The job's figures with ``found`` added, and the seconds the fp32 runs took (the check's cost)."""
        figures = merge(current, self.precision, found, self.thresholds)
        figures["seconds"] = round((current or {}).get("seconds", 0.0) + seconds, 3)
        return figures
