"""A job's report from the store: throughput over time, per-phase timing, batch shapes, failures, workers.

Everything is read-only SQL: counts and sums are aggregated by the database; only the batches' timing
columns are streamed (a few numbers a batch) to take percentiles and time buckets. Items are never
loaded one by one, so a million-item job reports in the time its batches take to read; a generation job
also streams three numbers per generated item, for the percentiles of its time to first token and decode time.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

import numpy as np

from pipeq.generation import TASK as GENERATION_TASK
from pipeq.primitives import PHASES, WORK_PHASES, JobProgress, parse_error, utcnow
from pipeq.store import Store

#: Percentiles reported for each phase.
PERCENTILES = (50, 95, 99)
#: Percentiles of a generation job's time to first token and decode time per token.
GENERATION_PERCENTILES = (50, 90)
#: Most time buckets in the throughput timeline.
MAX_BUCKETS = 60
#: Shortest time bucket in seconds for a job long enough to fill ``MIN_BUCKETS`` of them.
MIN_BUCKET_SECONDS = 1.0
#: Fewest buckets of a job that ran for any time at all: a 1-second job gets tenths of a second, so its
#: chart has a line, not one point.
MIN_BUCKETS = 10
#: Bins of the batch latency (total_ms) histogram.
LATENCY_BINS = 40
#: Label of batches whose worker row is gone (or was never registered).
UNKNOWN_WORKER = "unknown"
#: Longest failure reason kept; the example keeps the whole error.
MAX_REASON_CHARS = 80

#: Variable parts of other error texts, masked so that one cause makes one reason.
_VARIABLE = ((re.compile(r"\([^()]*\)"), "(…)"), (re.compile(r"'[^']*'|\"[^\"]*\""), "'…'"), (re.compile(r"\d+"), "N"))


@dataclass
class JobSummary(JobProgress):
    """The job's row and counts (``JobProgress``), and how long it took."""

    wall_seconds: float = 0.0
    items_per_second: float = 0.0

    @classmethod
    def of(cls, progress: JobProgress) -> JobSummary:
        started = progress.started_at is not None
        return cls(
            **{f.name: getattr(progress, f.name) for f in fields(JobProgress)},
            wall_seconds=progress.elapsed() if started else 0.0,
            items_per_second=progress.rate if started else 0.0,
        )


@dataclass
class ModelInfo:
    """What served the job, from its batches and its workers' rows."""

    precision: str
    revisions: list[str]
    devices: list[str]
    quantization: list[str]
    footprint_bytes: int | None
    load_seconds: float | None
    #: How ``--precision auto`` chose, one line per distinct choice of the workers that served the job.
    precision_choices: list[str] = field(default_factory=list)


@dataclass
class PhaseStats:
    """One timing phase over all batches, in milliseconds; share is of the summed total_ms."""

    name: str
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    sum_ms: float
    share: float | None


@dataclass
class Histogram:
    """Counts between consecutive edges (len(edges) == len(counts) + 1)."""

    edges: list[float]
    counts: list[int]


@dataclass
class BatchShapes:
    """Micro-batch sizes and how much of each padded forward pass was real tokens."""

    batches: int
    items: int
    mean_items: float | None
    mean_rows: float | None
    #: [rows per forward pass, batches] pairs, ascending.
    rows_histogram: list[tuple[int, int]]
    real_tokens: int
    padded_tokens: int
    padding_efficiency: float | None


@dataclass
class Throughput:
    """Items finished per time bucket (by the batch's finished_at), overall and per worker."""

    start: datetime | None
    bucket_seconds: float
    items: list[int]
    per_worker: dict[str, list[int]]


@dataclass
class FailureReason:
    """Failed items sharing a reason (stage and exception class, or the error's masked text)."""

    reason: str
    count: int
    example_idx: int
    example_error: str


@dataclass
class WorkerShare:
    """One worker's part of the job, with its configuration from the workers table."""

    worker_id: str
    host: str | None
    pid: int | None
    device: str | None
    precision: str | None
    quantization: str | None
    footprint_bytes: int | None
    load_seconds: float | None
    items: int
    batches: int
    busy_seconds: float
    share: float
    real_tokens: int
    padded_tokens: int
    padding_efficiency: float | None
    #: The summary of how ``--precision auto`` chose this worker's precision (None: given with --precision).
    precision_choice: str | None = None
    #: Mean milliseconds per batch of each work phase.
    phase_mean_ms: dict[str, float] = field(default_factory=dict)
    #: A generation job's only: the tokens its items generated, and those over its busy time.
    output_tokens: int | None = None
    output_tokens_per_second: float | None = None


@dataclass
class GenerationStats:
    """A generation job's tokens: the output tokens its items generated over the job's wall time, and the
    percentiles of its items' time to first token and decode time per output token (milliseconds; None
    where no item has one)."""

    items: int
    output_tokens: int
    output_tokens_per_second: float | None
    first_token_p50_ms: float | None
    first_token_p90_ms: float | None
    #: An item's ``decode_ms`` over its ``output_tokens - 1`` (the gaps between its tokens after the first;
    #: an item of one token has none).
    decode_per_token_p50_ms: float | None
    decode_per_token_p90_ms: float | None


@dataclass
class JobReport:
    """Everything ``pipeq report`` shows about one job."""

    job: JobSummary
    model: ModelInfo
    phases: list[PhaseStats]
    batches: BatchShapes
    latency: Histogram
    throughput: Throughput
    failures: list[FailureReason]
    workers: list[WorkerShare]
    generated_at: datetime
    #: Only for a generation job.
    generation: GenerationStats | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (datetimes as ISO 8601 strings)."""
        report = _jsonable(asdict(self))
        report["job"]["pending"] = self.job.pending
        return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def failure_reason(error: str | None) -> str:
    """The part of an item's error that names its cause, shared by items that failed alike."""
    lines = (error or "").strip().splitlines()
    if not lines:
        return "(no error text)"
    text = lines[0]
    parsed = parse_error(text)
    if parsed is not None:
        return f"{parsed.stage}: {parsed.exception}"
    for pattern, mask in _VARIABLE:
        text = pattern.sub(mask, text)
    text = text.split(":", 1)[0].strip()
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def time_buckets(span_seconds: float) -> tuple[int, float]:
    """(count, width in seconds) of equal buckets that cover the span exactly, so none is partly empty:
    one a second, at least ``MIN_BUCKETS`` (shorter ones for a short job), at most ``MAX_BUCKETS``."""
    if span_seconds <= 0:
        return 1, MIN_BUCKET_SECONDS
    n = max(MIN_BUCKETS, min(MAX_BUCKETS, int(span_seconds // MIN_BUCKET_SECONDS)))
    return n, span_seconds / n


def build_report(store: Store, job_id: str) -> JobReport:
    """Read a job's report from the store; raises JobNotFoundError for an unknown job."""
    job = JobSummary.of(store.job(job_id))
    workers = _worker_shares(store, job_id)
    generation = _generation(store, job, workers) if job.task == GENERATION_TASK else None
    rows_histogram = store.batch_rows_histogram(job_id)
    revisions = store.batch_revisions(job_id)
    failures = _failures(store, job_id)
    timing = _stream_timing(store, job_id, *store.batch_span(job_id))
    return JobReport(
        job=job,
        model=_model_info(job.precision, revisions, workers),
        phases=timing.phases(),
        batches=_batch_shapes(workers, rows_histogram),
        latency=timing.latency(),
        throughput=timing.throughput,
        failures=failures,
        workers=workers,
        generated_at=utcnow(),
        generation=generation,
    )


def _worker_shares(store: Store, job_id: str) -> list[WorkerShare]:
    sums = store.batch_sums_by_worker(job_id)
    rows = store.workers_by_id([s[0] for s in sums if s[0] is not None])
    all_items = sum(int(s[2] or 0) for s in sums)
    shares = []
    for worker_id, n, items, real, padded, total_ms, pre, fwd, post in sums:
        w = rows.get(worker_id, {})
        shares.append(
            WorkerShare(
                worker_id=worker_id or UNKNOWN_WORKER,
                host=w.get("host"),
                pid=w.get("pid"),
                device=w.get("device"),
                precision=w.get("precision"),
                quantization=w.get("quantization"),
                footprint_bytes=w.get("footprint_bytes"),
                load_seconds=w.get("load_seconds"),
                items=int(items or 0),
                batches=int(n),
                busy_seconds=float(total_ms or 0) / 1000,
                share=int(items or 0) / all_items if all_items else 0.0,
                real_tokens=int(real or 0),
                padded_tokens=int(padded or 0),
                padding_efficiency=_ratio(real, padded),
                phase_mean_ms={"preprocess": pre / n, "forward": fwd / n, "postprocess": post / n},
                precision_choice=(w.get("precision_choice") or {}).get("summary"),
            )
        )
    shares.sort(key=lambda s: (-s.items, s.worker_id))
    return shares


def _generation(store: Store, job: JobSummary, workers: list[WorkerShare]) -> GenerationStats:
    """A generation job's token figures; sets each worker's output tokens and tokens per busy second."""
    by_worker = store.output_tokens_by_worker(job.id)
    tokens_of = {worker_id or UNKNOWN_WORKER: tokens for worker_id, _, tokens in by_worker}
    for w in workers:
        w.output_tokens = tokens_of.get(w.worker_id, 0)
        w.output_tokens_per_second = _ratio(w.output_tokens, w.busy_seconds)
    first_token, per_token = array("d"), array("d")
    for first_ms, decode_ms, tokens in store.iter_generation_timing(job.id):
        if first_ms is not None:
            first_token.append(first_ms)
        if decode_ms is not None and tokens > 1:
            per_token.append(decode_ms / (tokens - 1))
    output_tokens = sum(tokens for _, _, tokens in by_worker)
    ttft = _percentiles(first_token)
    tpot = _percentiles(per_token)
    return GenerationStats(
        items=sum(n for _, n, _ in by_worker),
        output_tokens=output_tokens,
        output_tokens_per_second=_ratio(output_tokens, job.wall_seconds),
        first_token_p50_ms=ttft[0],
        first_token_p90_ms=ttft[1],
        decode_per_token_p50_ms=tpot[0],
        decode_per_token_p90_ms=tpot[1],
    )


def _percentiles(values: array[float]) -> list[float | None]:
    """``GENERATION_PERCENTILES`` of ``values``; None each when there are none."""
    if not values:
        return [None] * len(GENERATION_PERCENTILES)
    found = np.percentile(np.frombuffer(values, dtype=np.float64), GENERATION_PERCENTILES)
    return [float(p) for p in found]


def _ratio(num: float | None, den: float | None) -> float | None:
    return float(num or 0) / float(den) if den else None


def _model_info(precision: str, revisions: list[str], workers: list[WorkerShare]) -> ModelInfo:
    footprints = [w.footprint_bytes for w in workers if w.footprint_bytes is not None]
    loads = [w.load_seconds for w in workers if w.load_seconds is not None]
    return ModelInfo(
        precision=precision,
        revisions=revisions,
        devices=sorted({w.device for w in workers if w.device}),
        quantization=sorted({w.quantization for w in workers if w.quantization}),
        footprint_bytes=max(footprints) if footprints else None,
        load_seconds=sum(loads) / len(loads) if loads else None,
        precision_choices=sorted({w.precision_choice for w in workers if w.precision_choice}),
    )


def _batch_shapes(workers: list[WorkerShare], rows_histogram: list[tuple[int, int]]) -> BatchShapes:
    n = sum(w.batches for w in workers)
    items = sum(w.items for w in workers)
    rows = sum(r * c for r, c in rows_histogram)
    real = sum(w.real_tokens for w in workers)
    padded = sum(w.padded_tokens for w in workers)
    return BatchShapes(
        batches=n,
        items=items,
        mean_items=items / n if n else None,
        mean_rows=rows / n if n else None,
        rows_histogram=rows_histogram,
        real_tokens=real,
        padded_tokens=padded,
        padding_efficiency=_ratio(real, padded),
    )


def _failures(store: Store, job_id: str) -> list[FailureReason]:
    """Group failed items by reason; the database first collapses identical error texts."""
    reasons: dict[str, FailureReason] = {}
    for error, n, idx in store.failure_groups(job_id):
        key = failure_reason(error)
        seen = reasons.get(key)
        if seen is None:
            reasons[key] = FailureReason(key, n, idx, error or "")
        else:
            seen.count += n
            if idx < seen.example_idx:
                seen.example_idx, seen.example_error = idx, error or ""
    return sorted(reasons.values(), key=lambda r: (-r.count, r.reason))


class _Timing:
    """Per-batch timing columns streamed into arrays, and the throughput buckets filled on the way."""

    def __init__(self, start: datetime | None, end: datetime | None) -> None:
        self.columns: dict[str, array[float]] = {name: array("d") for name in PHASES}
        self.start = start
        span = (end - start).total_seconds() if start and end else 0.0
        self.n_buckets, self.width = time_buckets(max(span, 0.0)) if start else (0, MIN_BUCKET_SECONDS)
        self.throughput = Throughput(start, self.width, [0] * self.n_buckets, {})

    def add(self, row: Iterable[Any]) -> None:
        worker_id, size, finished_at, *phase_ms = row
        for name, value in zip(PHASES, phase_ms, strict=True):
            self.columns[name].append(float(value))
        finished = finished_at
        assert finished is not None and self.start is not None  # both columns are NOT NULL
        seconds = (finished - self.start).total_seconds()
        bucket = min(max(int(seconds // self.width), 0), self.n_buckets - 1)
        series = self.throughput.per_worker.setdefault(worker_id or UNKNOWN_WORKER, [0] * self.n_buckets)
        series[bucket] += int(size)
        self.throughput.items[bucket] += int(size)

    def phases(self) -> list[PhaseStats]:
        total = self.columns["total"]
        if not total:
            return []
        total_sum = float(np.sum(total))
        stats = []
        for name in PHASES:
            values = np.frombuffer(self.columns[name], dtype=np.float64)
            p50, p95, p99 = (float(p) for p in np.percentile(values, PERCENTILES))
            share = None
            if name in WORK_PHASES or name == "total":
                share = float(values.sum()) / total_sum if total_sum else None
            stats.append(
                PhaseStats(
                    name=name,
                    mean_ms=float(values.mean()),
                    p50_ms=p50,
                    p95_ms=p95,
                    p99_ms=p99,
                    max_ms=float(values.max()),
                    sum_ms=float(values.sum()),
                    share=share,
                )
            )
        return stats

    def latency(self) -> Histogram:
        if not self.columns["total"]:
            return Histogram([], [])
        values = np.frombuffer(self.columns["total"], dtype=np.float64)
        counts, edges = np.histogram(values, bins=LATENCY_BINS, range=(0.0, float(values.max()) or 1.0))
        return Histogram([float(e) for e in edges], [int(c) for c in counts])


def _stream_timing(store: Store, job_id: str, start: datetime | None, end: datetime | None) -> _Timing:
    timing = _Timing(start, end)
    if start is None:
        return timing
    for row in store.iter_batch_timing(job_id):
        timing.add(row)
    return timing
