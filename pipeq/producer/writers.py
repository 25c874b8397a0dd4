"""Write a job's results as JSONL, CSV, Parquet, OpenAI batch output or Arrow record batches, in input order."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

from pipeq.errors import ConfigurationError
from pipeq.primitives import JobProgress
from pipeq.producer import openai_batch

#: Result formats ``pipeq results`` writes.
RESULT_FORMATS = ("jsonl", "csv", "parquet", "openai-batch")
#: A result row's ``timing`` keys, spread into columns of their own in CSV, Parquet and data frames.
TIMING_COLUMNS = (
    "batch_id",
    "batch_size",
    "n_tokens",
    "queue_wait_ms",
    "preprocess_ms",
    "forward_ms",
    "postprocess_ms",
    "batch_total_ms",
    "attempts",
    "model_revision",
    "worker_id",
)
#: Flat columns of a CSV, Parquet or Arrow row; ``output`` is JSON text there (its shape differs by task).
COLUMNS = ("index", "id", "status", "output", "error", "truncated", "cached", *TIMING_COLUMNS)
#: Rows per Arrow record batch (one Parquet write, one page of a data frame).
BATCH_ROWS = 10_000


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ``Job.results()`` row as flat columns: output as JSON text, timing spread out."""
    timing = row["timing"]
    return {
        **{k: row[k] for k in ("index", "id", "status", "error", "truncated", "cached")},
        "output": None if row["output"] is None else json.dumps(row["output"], ensure_ascii=False),
        **{k: timing[k] for k in TIMING_COLUMNS},
    }


def arrow_schema() -> Any:
    """The Arrow schema of flat result rows (``COLUMNS``)."""
    import pyarrow as pa

    ints = ("index", "batch_id", "batch_size", "n_tokens", "attempts")
    floats = ("queue_wait_ms", "preprocess_ms", "forward_ms", "postprocess_ms", "batch_total_ms")
    types = {
        **dict.fromkeys(ints, pa.int64()),
        **dict.fromkeys(floats, pa.float64()),
        "truncated": pa.bool_(),
        "cached": pa.bool_(),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in COLUMNS])


def arrow_batches(rows: Iterable[dict[str, Any]], size: int = BATCH_ROWS) -> Iterator[Any]:
    """Flat result rows as Arrow record batches of at most ``size`` rows; only one batch is held at a time."""
    import pyarrow as pa

    schema = arrow_schema()
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(flat_row(row))
        if len(batch) >= size:
            yield pa.RecordBatch.from_pylist(batch, schema=schema)
            batch = []
    if batch:
        yield pa.RecordBatch.from_pylist(batch, schema=schema)


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    return n


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow(flat_row(row))
        n += 1
    return n


def write_parquet(rows: Iterable[dict[str, Any]], path: str) -> int:
    import pyarrow.parquet as pq

    schema = arrow_schema()
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in arrow_batches(rows):
            writer.write_batch(batch)
            n += batch.num_rows
        if n == 0:
            writer.write_table(schema.empty_table())
    return n


def write_results(
    rows: Iterable[dict[str, Any]],
    fmt: str,
    *,
    out: IO[str] | None = None,
    path: str | None = None,
    job: JobProgress | None = None,
) -> int:
    """Write rows in ``fmt`` to ``path`` (or ``out`` for text formats); returns the rows (lines) written.

    ``openai-batch`` needs the ``job``: one line per request, and only for a finished embeddings job.
    """
    if fmt not in RESULT_FORMATS:
        raise ConfigurationError(f"unknown result format {fmt!r}; choose {', '.join(RESULT_FORMATS)}")
    if fmt == "parquet":
        if path is None:
            raise ConfigurationError("parquet results need a file: pass -o FILE")
        return write_parquet(rows, path)
    writer = {"jsonl": write_jsonl, "csv": write_csv}.get(fmt) or openai_batch.writer_for(job)
    if path is not None:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            return writer(rows, fh)
    assert out is not None
    return writer(rows, out)
