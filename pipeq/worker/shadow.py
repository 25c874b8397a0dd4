"""The int8 guard (``--shadow-fraction``): run a sample of items through an fp32 copy of the model too.

The figures add up on the job (``jobs.shadow``): items compared, how many kept their top label, the
largest score difference and the lowest cosine similarity, so a user sees what the lower precision costs.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeq import constants as C
from pipeq.precisions import REFERENCE
from pipeq.primitives import ItemResult
from pipeq.store import Store
from pipeq.vectors import Vector
from pipeq.worker.config import WorkerConfig
from pipeq.worker.loading import load_pipeline
from pipeq.worker.runtime import PipelineRuntime

log = logging.getLogger(__name__)

#: Keys naming an output's label: classification, aggregated and raw token classification.
_LABEL_KEYS = ("label", "entity_group", "entity")
#: Keys that place an entity in its text (token classification): entities match on these and the label.
_SPAN_KEYS = ("start", "end", "index")


def in_sample(job_id: str, idx: int, fraction: float) -> bool:
    """Whether item ``idx`` of a job is in the shadow sample: the same answer on every worker and delivery."""
    digest = hashlib.sha1(f"{job_id}:{idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class Comparison:
    """How one output differs from its fp32 counterpart (None: not measurable for this kind of output)."""

    label_agree: bool | None = None
    score_diff: float | None = None
    cosine: float | None = None


def _label(entry: Any) -> str | None:
    if isinstance(entry, dict):
        for key in _LABEL_KEYS:
            if key in entry:
                return str(entry[key])
    return None


def _scored(entry: Any) -> bool:
    return _label(entry) is not None and isinstance(entry.get("score"), int | float)


def _largest_diff(a: dict[Any, float], b: dict[Any, float]) -> float | None:
    return max((abs(a[k] - b[k]) for k in a.keys() & b.keys()), default=None)


def _top(scores: dict[Any, float]) -> Any:
    return max(scores, key=scores.__getitem__) if scores else None


def _vector(value: Any) -> Any:
    """A nested list of numbers, or a stored pooled embedding, as a flat float array; None for anything else."""
    if isinstance(value, Vector):
        return value.array().astype(np.float64)
    if not isinstance(value, list):
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):  # ragged, or not numbers
        return None
    return array.ravel() if array.size else None


def compare(served: Any, reference: Any) -> Comparison:
    """Top-label agreement and score difference of labelled outputs, cosine similarity of vectors."""
    if _scored(served) and _scored(reference):  # text classification
        return Comparison(_label(served) == _label(reference), abs(served["score"] - reference["score"]))
    if isinstance(served, dict) and isinstance(reference, dict) and {"labels", "scores"} <= served.keys():
        a = dict(zip(served["labels"], served["scores"], strict=True))  # zero-shot classification
        b = dict(zip(reference.get("labels", []), reference.get("scores", []), strict=True))
        return Comparison(_top(a) == _top(b), _largest_diff(a, b))
    if isinstance(served, list) and isinstance(reference, list) and all(map(_scored, served + reference)):
        if any(key in entry for entry in served + reference for key in _SPAN_KEYS):  # entities
            a = {(_label(e), *(e.get(k) for k in _SPAN_KEYS)): e["score"] for e in served}
            b = {(_label(e), *(e.get(k) for k in _SPAN_KEYS)): e["score"] for e in reference}
            return Comparison(a.keys() == b.keys(), _largest_diff(a, b))
        a = {_label(e): e["score"] for e in served}  # classification with top_k
        b = {_label(e): e["score"] for e in reference}
        return Comparison(_top(a) == _top(b), _largest_diff(a, b))
    u, v = _vector(served), _vector(reference)
    if u is not None and v is not None and u.shape == v.shape:
        norms = float(np.linalg.norm(u) * np.linalg.norm(v))
        if norms > 0:
            return Comparison(cosine=float(u @ v) / norms)
    return Comparison()


def merge(current: dict[str, Any] | None, precision: str, found: Sequence[Comparison]) -> dict[str, Any]:
    """The job's shadow figures with ``found`` added."""
    figures = dict(current or {"sampled": 0, "labelled": 0, "label_agree": None})
    labelled = [c.label_agree for c in found if c.label_agree is not None]
    if labelled:
        figures["labelled"] = figures.get("labelled", 0) + len(labelled)
        figures["label_agree"] = (figures.get("label_agree") or 0) + sum(labelled)
    for name, values, pick in (
        ("max_score_diff", [c.score_diff for c in found], max),
        ("min_cosine", [c.cosine for c in found], min),
    ):
        known = [x for x in (*values, figures.get(name)) if x is not None and math.isfinite(x)]
        figures[name] = pick(known) if known else None
    figures["precision"] = precision
    figures["sampled"] = figures.get("sampled", 0) + len(found)
    return figures


class ShadowCheck:
    """An fp32 copy of the worker's model and the sample of the chunk running now."""

    def __init__(self, store: Store, runtime: PipelineRuntime, *, fraction: float, precision: str) -> None:
        self.store = store
        self.runtime = runtime
        self.fraction = fraction
        self.precision = precision
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
        log.info("shadow check: %.0f%% of items also run at fp32", 100 * cfg.shadow_fraction)
        return cls(store, runtime, fraction=cfg.shadow_fraction, precision=cfg.key.precision)

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
            reference: dict[int, Any] = {}
            for batch, _timing in self.runtime.run([(idx, self._inputs[idx]) for idx in picked], self._params):
                reference.update((r.idx, r.output) for r in batch if r.status == C.ITEM_DONE)
            found = [compare(output, reference[idx]) for idx, output in picked.items() if idx in reference]
            if found:
                self.store.update_shadow(job_id, lambda current: merge(current, self.precision, found))
        except Exception:
            log.warning("shadow check of %d items of job %s failed", len(picked), job_id[:8], exc_info=True)
