"""Value types that cross pipeq's layers: what a worker hands the store, and what readers get back.

No I/O here (no SQL, no broker, no torch): the model runtime, the store and the reports all use
these, so a stage can be built and tested without a database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeq import constants as C

#: The timing phases of a micro-batch, in the order the reports show them.
PHASES = ("queue_wait", "preprocess", "forward", "postprocess", "total")
#: The phases in which a worker runs the model's pipeline.
WORK_PHASES = ("preprocess", "forward", "postprocess")


def utcnow() -> datetime:
    """Now, in UTC (pipeq stores every time in UTC)."""
    return datetime.now(UTC)


def describe_error(stage: str, exc: BaseException) -> str:
    """An item's error as pipeq stores it: ``stage: ExceptionClass: message`` (read back by ``parse_error``)."""
    return f"{stage}: {type(exc).__name__}: {exc}"


#: The head of an error written by ``describe_error``.
_ERROR = re.compile(r"^(?P<stage>\w+): (?P<cls>[A-Za-z_][\w.]*):")


def input_size(value: Any) -> int:
    """A cheap length of an input, for sorting (characters of its text, or of its JSON form)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(v) for v in value.values() if isinstance(v, str))
    return len(str(value))


@dataclass(frozen=True)
class ItemError:
    """The stage and exception class of an item error that pipeq's runtime wrote."""

    stage: str
    exception: str


def parse_error(error: str | None) -> ItemError | None:
    """The stage and exception class of ``error``, None when it is not in ``describe_error``'s form."""
    match = _ERROR.match(error or "")
    return ItemError(match.group("stage"), match.group("cls")) if match else None


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item, as a worker hands it to the store."""

    idx: int
    status: str
    output: Any = None
    error: str | None = None
    truncated: bool | None = None
    n_tokens: int | None = None
    #: True when the output was read from the result cache instead of computed.
    cached: bool | None = None
    #: Generation only: milliseconds from the item entering the engine to its first new token,
    #: then from that token to its last, and the tokens it generated (``n_tokens`` counts its prompt).
    first_token_ms: float | None = None
    decode_ms: float | None = None
    output_tokens: int | None = None


@dataclass
class BatchTiming:
    """Timing metadata of one micro-batch (milliseconds)."""

    size: int
    rows: int
    real_tokens: int
    padded_tokens: int
    queue_wait_ms: float
    preprocess_ms: float
    forward_ms: float
    postprocess_ms: float
    total_ms: float
    started_at: datetime
    finished_at: datetime


@dataclass(frozen=True)
class Lease:
    """Who claims a message's items, written on the worker's row with the claim (see ``Store.claim``)."""

    worker_id: str
    #: The message ends a slice of its job's window: whoever finishes it publishes the next slice.
    slice_end: bool = False

    def record(self, job_id: str, idxs: Sequence[int]) -> dict[str, Any]:
        return {"job": job_id, "idxs": [int(i) for i in idxs], "slice_end": self.slice_end}


@dataclass(frozen=True)
class WriteOutcome:
    """How many items one write moved to each final state (0 for a redelivered duplicate)."""

    done: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0


@dataclass
class JobProgress:
    """A job's row and counts, as status, wait and the progress bar show them."""

    id: str
    task: str
    model: str
    precision: str
    status: str
    total: int
    done: int
    failed: int
    cancelled: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: Items whose output came from the result cache.
    cache_hits: int = 0
    #: What ``--shadow-fraction`` measured (see ``pipeq.worker.shadow``), None without a shadow check.
    shadow: dict[str, Any] | None = None
    #: False while the job is stored but none of it was ever put on the broker (its publish failed).
    published: bool = True

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def pending(self) -> int:
        return self.total - self.finished

    @property
    def is_final(self) -> bool:
        return self.status in C.JOB_FINAL_STATES

    def elapsed(self, now: datetime | None = None) -> float:
        start = self.started_at or self.created_at
        end = self.finished_at or now or utcnow()
        return max((end - start).total_seconds(), 0.0)

    @property
    def rate(self) -> float:
        """Items finished per second since the first worker started on the job."""
        elapsed = self.elapsed()
        return self.finished / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if self.is_final:
            return 0.0
        return self.pending / rate if rate > 0 else None
