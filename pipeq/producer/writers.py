"""Write a job's results as JSONL, CSV, Parquet, OpenAI batch output or Arrow record batches, in input order.

A pooled-embedding job's Parquet and Arrow rows hold an ``embedding`` column of
``fixed_size_list<float32>[dim]`` in place of ``output``, read from the stored bytes of a page at a
time (``pipeq.vectors.stack``): no value is parsed or handled one by one in Python. A generation job's
rows have three more columns (``GENERATION_COLUMNS``), which no other job's rows carry.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import IO, Any

from pipeq.errors import ConfigurationError
from pipeq.primitives import JobProgress
from pipeq.producer import openai_batch
from pipeq.vectors import Vector, stack

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
#: A generated item's figures (``pipeq.generation``): the tokens it generated, the milliseconds to its first
#: one and from that one to its last. In a generation job's ``timing`` and flat rows only, after ``n_tokens``
#: (its prompt's tokens).
GENERATION_COLUMNS = ("output_tokens", "first_token_ms", "decode_ms")
#: A result row's own columns, before its ``timing`` spread out.
_ROW_COLUMNS = ("index", "id", "status", "output", "error", "truncated", "cached")
#: Flat columns of a CSV, Parquet or Arrow row; ``output`` is JSON text there (its shape differs by task).
COLUMNS = (*_ROW_COLUMNS, *TIMING_COLUMNS)
#: The column of a pooled-embedding job's Arrow and Parquet rows that holds its vectors, in place of ``output``.
EMBEDDING = "embedding"
#: Rows per Arrow record batch (one Parquet write, one page of a data frame).
BATCH_ROWS = 10_000


def timing_columns(*, generation: bool = False) -> tuple[str, ...]:
    """A result row's ``timing`` keys: ``TIMING_COLUMNS``, with ``GENERATION_COLUMNS`` after ``n_tokens`` for a
    generation job."""
    if not generation:
        return TIMING_COLUMNS
    at = TIMING_COLUMNS.index("n_tokens") + 1
    return (*TIMING_COLUMNS[:at], *GENERATION_COLUMNS, *TIMING_COLUMNS[at:])


def column_names(embedding_dim: int | None = None, *, generation: bool = False) -> tuple[str, ...]:
    """The flat columns: ``COLUMNS``, with ``embedding`` in place of ``output`` for a pooled-embedding job and
    ``GENERATION_COLUMNS`` after ``n_tokens`` for a generation job."""
    row = _ROW_COLUMNS if embedding_dim is None else tuple(EMBEDDING if n == "output" else n for n in _ROW_COLUMNS)
    return (*row, *timing_columns(generation=generation))


def flat_row(row: dict[str, Any], *, generation: bool = False) -> dict[str, Any]:
    """A ``Job.results()`` row as flat columns: output as JSON text, timing spread out."""
    timing = row["timing"]
    output = row["output"]
    if isinstance(output, Vector):
        output = output.tolist()
    return {
        **{k: row[k] for k in ("index", "id", "status", "error", "truncated", "cached")},
        "output": None if output is None else json.dumps(output, ensure_ascii=False),
        **{k: timing[k] for k in timing_columns(generation=generation)},
    }


def arrow_schema(embedding_dim: int | None = None, *, generation: bool = False) -> Any:
    """The Arrow schema of flat result rows (``column_names``); ``embedding`` is ``fixed_size_list<float32>[dim]``."""
    import pyarrow as pa

    ints = ("index", "batch_id", "batch_size", "n_tokens", "output_tokens", "attempts")
    floats = (
        "queue_wait_ms", "preprocess_ms", "forward_ms", "postprocess_ms", "batch_total_ms", "first_token_ms",
        "decode_ms",
    )  # fmt: skip
    types = {
        **dict.fromkeys(ints, pa.int64()),
        **dict.fromkeys(floats, pa.float64()),
        "truncated": pa.bool_(),
        "cached": pa.bool_(),
    }
    if embedding_dim is not None:
        types[EMBEDDING] = pa.list_(pa.float32(), embedding_dim)
    names = column_names(embedding_dim, generation=generation)
    return pa.schema([(name, types.get(name, pa.string())) for name in names])


def embedding_array(outputs: list[Any], dim: int) -> Any:
    """Pooled outputs (``Vector``s, or JSON lists stored before vectors were binary) as a
    ``fixed_size_list<float32>[dim]`` array; a row without one (failed, pending) is null."""
    import pyarrow as pa

    values, present = stack(outputs, dim)
    mask = None if present.all() else pa.array(~present)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=mask)


#: Result columns that the store's pages (``Store.iter_result_pages``) name otherwise.
_STORE_NAMES = {"index": "idx", "id": "input_id", "batch_total_ms": "total_ms"}


def _json_text(output: Any) -> str | None:
    if isinstance(output, Vector):
        output = output.tolist()
    return None if output is None else json.dumps(output, ensure_ascii=False)


def page_batches(
    pages: Iterable[Mapping[str, list[Any]]], *, embedding_dim: int | None = None, generation: bool = False
) -> Iterator[Any]:
    """Pages of a job's results as the store reads them ({column: values}) as Arrow record batches, a column at a
    time: the same columns and values as ``arrow_batches`` over ``Job.results()`` rows, with no dict per row."""
    import pyarrow as pa

    schema = arrow_schema(embedding_dim, generation=generation)
    for page in pages:
        arrays = []
        for field in schema:
            if field.name == EMBEDDING:
                assert embedding_dim is not None
                arrays.append(embedding_array(page["output"], embedding_dim))
            elif field.name == "output":
                arrays.append(pa.array([_json_text(o) for o in page["output"]], type=field.type))
            elif field.name == "cached":
                arrays.append(pa.array([bool(c) for c in page["cached"]], type=field.type))
            else:
                arrays.append(pa.array(page[_STORE_NAMES.get(field.name, field.name)], type=field.type))
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _record_batch(rows: list[dict[str, Any]], schema: Any, embedding_dim: int | None, generation: bool) -> Any:
    import pyarrow as pa

    if embedding_dim is None:
        return pa.RecordBatch.from_pylist([flat_row(row, generation=generation) for row in rows], schema=schema)
    flat = [flat_row({**row, "output": None}, generation=generation) for row in rows]
    embedding = embedding_array([row["output"] for row in rows], embedding_dim)
    arrays = [
        embedding if field.name == EMBEDDING else pa.array([r[field.name] for r in flat], type=field.type)
        for field in schema
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def arrow_batches(
    rows: Iterable[dict[str, Any]],
    size: int = BATCH_ROWS,
    *,
    embedding_dim: int | None = None,
    generation: bool = False,
) -> Iterator[Any]:
    """Flat result rows as Arrow record batches of at most ``size`` rows; only one batch is held at a time.

    With ``embedding_dim``, the rows' outputs are pooled embeddings, written as the ``embedding`` column;
    with ``generation``, the rows are a generation job's, with its ``GENERATION_COLUMNS``.
    """
    schema = arrow_schema(embedding_dim, generation=generation)
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield _record_batch(batch, schema, embedding_dim, generation)
            batch = []
    if batch:
        yield _record_batch(batch, schema, embedding_dim, generation)


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    return n


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str], *, generation: bool = False) -> int:
    writer = csv.DictWriter(out, fieldnames=column_names(generation=generation))
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow(flat_row(row, generation=generation))
        n += 1
    return n


def parquet_path(path: str | None) -> str:
    """The file Parquet results go to (Parquet cannot stream to stdout)."""
    if path is None:
        raise ConfigurationError("parquet results need a file: pass -o FILE")
    return path


def write_parquet(reader: Any, path: str) -> int:
    """Write a pyarrow RecordBatchReader of results to a Parquet file a batch at a time; returns the row count."""
    import pyarrow.parquet as pq

    schema = reader.schema
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in reader:
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
    embedding_dim: int | None = None,
    generation: bool = False,
) -> int:
    """Write rows in ``fmt`` to ``path`` (or ``out`` for text formats); returns the rows (lines) written.

    ``openai-batch`` needs the ``job``: one line per request, and only for a finished embeddings job with
    pooling or generation job. ``embedding_dim``: the rows hold a pooled-embedding job's vectors, which
    Parquet gets as its ``embedding`` column (the text formats write them as lists of floats either way).
    ``generation``: the rows are a generation job's, whose CSV and Parquet have its ``GENERATION_COLUMNS``.
    """
    if fmt not in RESULT_FORMATS:
        raise ConfigurationError(f"unknown result format {fmt!r}; choose {', '.join(RESULT_FORMATS)}")
    if fmt == "parquet":
        import pyarrow as pa

        batches = arrow_batches(rows, embedding_dim=embedding_dim, generation=generation)
        schema = arrow_schema(embedding_dim, generation=generation)
        return write_parquet(pa.RecordBatchReader.from_batches(schema, batches), parquet_path(path))
    writers: dict[str, Callable[[Iterable[dict[str, Any]], IO[str]], int]] = {
        "jsonl": write_jsonl,
        "csv": partial(write_csv, generation=generation),
    }
    writer = writers.get(fmt) or openai_batch.writer_for(job)
    if path is not None:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            return writer(rows, fh)
    assert out is not None
    return writer(rows, out)
