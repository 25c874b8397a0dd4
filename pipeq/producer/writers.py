"""Write a job's results as JSONL, CSV or Parquet, streaming in input order."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

from pipeq.errors import ConfigurationError

#: Result formats ``pipeq results`` writes.
RESULT_FORMATS = ("jsonl", "csv", "parquet")
#: Flat columns of a CSV or Parquet row; ``output`` and ``timing`` are JSON text there.
COLUMNS = ("index", "id", "status", "output", "error", "truncated", "timing")


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: row[k] for k in ("index", "id", "status", "error", "truncated")},
        "output": None if row["output"] is None else json.dumps(row["output"], ensure_ascii=False),
        "timing": json.dumps(row["timing"]),
    }


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
        writer.writerow(_flat(row))
        n += 1
    return n


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(_flat(row))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_parquet(rows: Iterable[dict[str, Any]], path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("id", pa.string()),
            ("status", pa.string()),
            ("output", pa.string()),
            ("error", pa.string()),
            ("truncated", pa.bool_()),
            ("timing", pa.string()),
        ]
    )
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in _batches(rows, 10_000):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
        if n == 0:
            writer.write_table(schema.empty_table())
    return n


def write_results(
    rows: Iterable[dict[str, Any]], fmt: str, *, out: IO[str] | None = None, path: str | None = None
) -> int:
    """Write rows in ``fmt`` to ``path`` (or ``out`` for text formats); returns the row count."""
    if fmt not in RESULT_FORMATS:
        raise ConfigurationError(f"unknown result format {fmt!r}; choose {', '.join(RESULT_FORMATS)}")
    if fmt == "parquet":
        if path is None:
            raise ConfigurationError("parquet results need a file: pass -o FILE")
        return write_parquet(rows, path)
    writer = write_jsonl if fmt == "jsonl" else write_csv
    if path is not None:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            return writer(rows, fh)
    assert out is not None
    return writer(rows, out)
