"""How far a lower precision's outputs are from fp32's: per-item comparisons, per-task metrics and thresholds.

Two users: ``--precision auto``'s gate, which runs calibration texts through each candidate and fp32
when a worker starts and refuses a precision that disagrees too much, and the shadow check, which
does the same for a sample of each job's items and warns in ``pipeq status`` and the report. Both
add comparisons up into one figures record (``merge``) and judge it by one rule (``shortfalls``).
Values only: nothing here touches a model, the store or the broker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeq import constants as C
from pipeq.errors import ConfigurationError
from pipeq.vectors import Vector

#: Keys naming an output's label: classification, aggregated and raw token classification, fill-mask's token.
_LABEL_KEYS = ("label", "entity_group", "entity", "token_str")
#: Keys that place an entity in its text (token classification): entities match on these and the label.
_SPAN_KEYS = ("start", "end", "index")
#: Keys of generated text (generation, summarisation, translation): compared for identity.
_TEXT_KEYS = ("generated_text", "summary_text", "translation_text")


@dataclass(frozen=True)
class Thresholds:
    """Least agreement with fp32 a lower precision must keep (``--min-agreement`` and the options beside it)."""

    #: Share of items whose top label (entities, top token, generated text) is fp32's, among items where it counts.
    min_agreement: float = C.DEFAULT_MIN_AGREEMENT
    #: A top label counts only where fp32's top two probabilities are more than this apart (closer is a tie).
    label_margin: float = C.DEFAULT_LABEL_MARGIN
    #: Largest difference of any probability from fp32's (classification and zero-shot).
    max_score_diff: float = C.DEFAULT_MAX_SCORE_DIFF
    #: Least cosine of a vector to fp32's (embeddings), on every text.
    min_cosine: float = C.DEFAULT_MIN_COSINE

    def __post_init__(self) -> None:
        for name in ("min_agreement", "label_margin", "max_score_diff", "min_cosine"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")

    def as_record(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Thresholds:
        """The thresholds a figures record was judged by; the defaults for a record without them."""
        known = {k: float(v) for k, v in (record or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class TaskAgreement:
    """What agreement means for one task: what is compared, what is judged, and how calibration runs."""

    #: What the label comparison compares, for messages ("top label", "entity spans and labels").
    label_name: str = "top label"
    #: Which figures a threshold judges.
    labels: bool = False
    scores: bool = False
    cosine: bool = False
    #: Parameters of the calibration run (all scores for a margin; pooled vectors; a few greedy tokens).
    params: Mapping[str, Any] = field(default_factory=dict)
    #: The calibration texts need the tokenizer's mask token (fill-mask).
    masked: bool = False


#: Candidate labels of the zero-shot calibration run.
_ZERO_SHOT_LABELS = ["food", "travel", "technology", "weather", "sport", "money", "health"]
_GENERATED = TaskAgreement("generated tokens", labels=True, params={"max_new_tokens": 16, "do_sample": False})

#: Agreement by task: a new task's meaning of "the same output" is one entry here.
AGREEMENTS: dict[str, TaskAgreement] = {
    "text-classification": TaskAgreement(labels=True, scores=True, params={"top_k": None}),
    "zero-shot-classification": TaskAgreement(labels=True, scores=True, params={"candidate_labels": _ZERO_SHOT_LABELS}),
    "token-classification": TaskAgreement("entity spans and labels", labels=True),
    "feature-extraction": TaskAgreement("embedding cosine", cosine=True, params={"pooling": "mean"}),
    "fill-mask": TaskAgreement("top token", labels=True, masked=True),
    "text-generation": _GENERATED,
    "text2text-generation": _GENERATED,
    "summarization": _GENERATED,
    "translation": _GENERATED,
}
#: An unknown or custom task: judge whatever its outputs let ``compare`` measure.
_ANY = TaskAgreement("top label", labels=True, scores=True, cosine=True)


def task_agreement(task: str) -> TaskAgreement:
    return AGREEMENTS.get(task, _ANY)


@dataclass(frozen=True)
class Comparison:
    """How one output differs from its fp32 counterpart (None: not measurable for this kind of output)."""

    label_agree: bool | None = None
    score_diff: float | None = None
    cosine: float | None = None
    #: fp32's lead of its top label over the next (a lower bound where only the top score is known);
    #: None where there is no such thing (entities, generated text): the label comparison always counts.
    margin: float | None = None


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


def _margin(scores: dict[Any, float]) -> float | None:
    """The top score's lead over the second; for a single score p, its least possible lead 2p - 1."""
    ranked = sorted(scores.values(), reverse=True)
    if len(ranked) >= 2:
        return ranked[0] - ranked[1]
    return 2 * ranked[0] - 1 if ranked else None


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


def _generated(value: Any) -> str | None:
    entry = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(entry, dict):
        for key in _TEXT_KEYS:
            if isinstance(entry.get(key), str):
                return str(entry[key])
    return None


def compare(served: Any, reference: Any) -> Comparison:
    """Top-label agreement and score difference of labelled outputs, identity of generated text, vectors' cosine."""
    if _scored(served) and _scored(reference):  # text classification, top label only
        margin = _margin({_label(reference): reference["score"]})
        return Comparison(_label(served) == _label(reference), abs(served["score"] - reference["score"]), None, margin)
    if isinstance(served, dict) and isinstance(reference, dict) and {"labels", "scores"} <= served.keys():
        a = dict(zip(served["labels"], served["scores"], strict=True))  # zero-shot classification
        b = dict(zip(reference.get("labels", []), reference.get("scores", []), strict=True))
        return Comparison(_top(a) == _top(b), _largest_diff(a, b), None, _margin(b))
    if isinstance(served, list) and isinstance(reference, list) and all(map(_scored, served + reference)):
        if any(key in entry for entry in served + reference for key in _SPAN_KEYS):  # entities
            a = {(_label(e), *(e.get(k) for k in _SPAN_KEYS)): e["score"] for e in served}
            b = {(_label(e), *(e.get(k) for k in _SPAN_KEYS)): e["score"] for e in reference}
            return Comparison(a.keys() == b.keys(), _largest_diff(a, b))
        a = {_label(e): e["score"] for e in served}  # classification with top_k, fill-mask's tokens
        b = {_label(e): e["score"] for e in reference}
        return Comparison(_top(a) == _top(b), _largest_diff(a, b), None, _margin(b))
    text_a, text_b = _generated(served), _generated(reference)
    if text_a is not None and text_b is not None:
        return Comparison(label_agree=text_a == text_b)
    u, v = _vector(served), _vector(reference)
    if u is not None and v is not None and u.shape == v.shape:
        norms = float(np.linalg.norm(u) * np.linalg.norm(v))
        if norms > 0:
            return Comparison(cosine=float(u @ v) / norms)
    return Comparison()


def merge(
    current: Mapping[str, Any] | None, precision: str, found: Sequence[Comparison], thresholds: Thresholds
) -> dict[str, Any]:
    """Figures with ``found`` added: items compared, label agreement (all, and where fp32's margin is clear),
    the largest score difference and the lowest and mean cosine; with the thresholds they are judged by."""
    figures = dict(current or {"sampled": 0, "labelled": 0, "label_agree": None})
    labelled = [c.label_agree for c in found if c.label_agree is not None]
    if labelled:
        figures["labelled"] = figures.get("labelled", 0) + len(labelled)
        figures["label_agree"] = (figures.get("label_agree") or 0) + sum(labelled)
    clear = [c.label_agree for c in found if c.label_agree is not None and _clear(c, thresholds)]
    figures["clear"] = figures.get("clear", 0) + len(clear)
    figures["clear_agree"] = figures.get("clear_agree", 0) + sum(clear)
    for name, values, pick in (
        ("max_score_diff", [c.score_diff for c in found], max),
        ("min_cosine", [c.cosine for c in found], min),
    ):
        known = [x for x in (*values, figures.get(name)) if x is not None and math.isfinite(x)]
        figures[name] = pick(known) if known else None
    cosines = [c.cosine for c in found if c.cosine is not None and math.isfinite(c.cosine)]
    if cosines:
        figures["cosines"] = figures.get("cosines", 0) + len(cosines)
        figures["cosine_sum"] = figures.get("cosine_sum", 0.0) + sum(cosines)
    figures["precision"] = precision
    figures["sampled"] = figures.get("sampled", 0) + len(found)
    figures["thresholds"] = thresholds.as_record()
    return figures


def _clear(c: Comparison, thresholds: Thresholds) -> bool:
    return c.margin is None or c.margin > thresholds.label_margin


def mean_cosine(figures: Mapping[str, Any]) -> float | None:
    n = figures.get("cosines") or 0
    return float(figures["cosine_sum"]) / n if n else None


def shortfalls(figures: Mapping[str, Any], task: str, thresholds: Thresholds | None = None) -> list[str]:
    """Each way ``figures`` fall below the thresholds (theirs unless given), in words; [] when they pass."""
    rule = task_agreement(task)
    limits = thresholds or Thresholds.from_record(figures.get("thresholds"))
    found: list[str] = []
    clear, agree = figures.get("clear") or 0, figures.get("clear_agree") or 0
    if rule.labels and clear and agree / clear < limits.min_agreement:
        found.append(f"{rule.label_name} identical on {100 * agree / clear:.1f}% < {100 * limits.min_agreement:g}%")
    diff = figures.get("max_score_diff")
    if rule.scores and diff is not None and diff > limits.max_score_diff:
        found.append(f"probability difference max {diff:.3f} > {limits.max_score_diff:g}")
    low = figures.get("min_cosine")
    if rule.cosine and low is not None and low < limits.min_cosine:
        found.append(f"embedding cosine min {low:.3f} < {limits.min_cosine:g}")
    return found


def describe_agreement(figures: Mapping[str, Any], task: str) -> str:
    """The figures a task is judged by, in words: "embedding cosine min 0.9998, mean 0.9999 on 62 texts"."""
    rule = task_agreement(task)
    parts: list[str] = []
    clear, agree = figures.get("clear") or 0, figures.get("clear_agree") or 0
    if rule.labels and clear:
        parts.append(f"{rule.label_name} identical on {100 * agree / clear:.1f}% of {clear}")
    if rule.scores and figures.get("max_score_diff") is not None:
        parts.append(f"probability difference max {figures['max_score_diff']:.3f}")
    if rule.cosine and figures.get("min_cosine") is not None:
        mean = mean_cosine(figures)
        parts.append(f"embedding cosine min {figures['min_cosine']:.4f}" + (f", mean {mean:.4f}" if mean else ""))
    n = figures.get("sampled", 0)
    return f"{', '.join(parts)} on {n} texts" if parts else f"{n} texts compared"
