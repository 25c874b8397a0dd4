"""pandas, Arrow and Hugging Face datasets in and out: inputs read a batch of rows at a time, results built a
page at a time.

pandas and datasets stay optional: an object is taken for one of theirs only when its library is already
imported, and only ``Job.to_pandas`` and ``Job.to_dataset`` import them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pipeq import generation
from pipeq.errors import ConfigurationError, InputError
from pipeq.producer.readers import MESSAGES_FIELD, Record, RecordSpec, make_record
from pipeq.producer.writers import arrow_schema, page_batches
from pipeq.tasks import traits

#: Rows of a frame turned into Python objects at a time, so a big frame is never copied whole.
READ_BATCH_ROWS = 8192

#: One batch of rows: the column names and, for each, its values as Python objects.
Columns = tuple[list[str], list[list[Any]]]


def _pandas_type(obj: Any) -> str | None:
    pd = sys.modules.get("pandas")
    if pd is None:
        return None
    if isinstance(obj, pd.Series):
        return "series"
    if isinstance(obj, pd.DataFrame):
        return "frame"
    return None


def _hf_type(obj: Any) -> str | None:
    """``"dataset"`` or ``"iterable"`` for a Hugging Face ``Dataset`` or ``IterableDataset``, else None."""
    hf = sys.modules.get("datasets")
    if hf is None:
        return None
    if isinstance(obj, hf.Dataset):
        return "dataset"
    if isinstance(obj, hf.IterableDataset):
        return "iterable"
    return None


def _is_dataset(obj: Any) -> bool:
    ds = sys.modules.get("pyarrow.dataset")
    return ds is not None and isinstance(obj, ds.Dataset)


def is_frame(obj: Any) -> bool:
    """Whether ``obj`` is a pandas Series/DataFrame, Arrow data (Table, RecordBatch, reader, Dataset, stream) or a
    Hugging Face Dataset or IterableDataset."""
    pa = sys.modules.get("pyarrow")
    return (
        _pandas_type(obj) is not None
        or _hf_type(obj) is not None
        or _is_dataset(obj)
        or hasattr(obj, "__arrow_c_stream__")
        or (pa is not None and isinstance(obj, pa.Table | pa.RecordBatch | pa.RecordBatchReader))
    )


def _generation_columns(spec: RecordSpec, present: list[Any], source: str) -> list[Any]:
    """A text-generation frame's columns: its prompt or messages column (or both, a row holding one), the
    sampling parameter columns it has, and its id column."""
    inputs = [name for name in (spec.text_field, MESSAGES_FIELD) if name in present]
    if not inputs:
        shown = ", ".join(map(str, present)) or "none"
        raise InputError(
            f"missing column {spec.text_field!r} (prompts) or {MESSAGES_FIELD!r} (chat messages) "
            f"(columns present: {shown})",
            source=source,
        )
    own = [name for name in (*generation.PARAM_KEYS, spec.id_field) if name and name in present]
    return inputs + own


def _columns(spec: RecordSpec, present: list[Any], source: str) -> list[Any]:
    """The columns a record needs (missing ones fail now) and the id column when there is one."""
    if spec.task == generation.TASK:
        return _generation_columns(spec, present, source)
    table_input = traits(spec.task).table_input
    needed = ["table", "query"] if table_input else [spec.text_field]
    if spec.pair_field and not table_input:
        needed.append(spec.pair_field)
    for name in needed:
        if name not in present:
            shown = ", ".join(map(str, present)) or "none"
            raise InputError(f"missing column {name!r} (columns present: {shown})", source=source)
    if spec.id_field and spec.id_field in present:
        needed.append(spec.id_field)
    return needed


def _series(obj: Any, spec: RecordSpec, source: str) -> Iterator[Columns]:
    if spec.pair_field or traits(spec.task).table_input:
        raise InputError("a Series holds single texts; pass a DataFrame with the columns the task needs", source=source)
    names = [spec.text_field] + ([spec.id_field] if spec.id_field else [])
    for start in range(0, len(obj), READ_BATCH_ROWS):
        part = obj.iloc[start : start + READ_BATCH_ROWS]
        values = [part.tolist()]
        if spec.id_field:
            values.append(part.index.tolist())
        yield names, values


def _dataframe(obj: Any, spec: RecordSpec, source: str) -> Iterator[Columns]:
    names = _columns(spec, list(obj.columns), source)
    for start in range(0, len(obj), READ_BATCH_ROWS):
        yield names, [obj[name].iloc[start : start + READ_BATCH_ROWS].tolist() for name in names]


def _arrow(obj: Any, spec: RecordSpec, source: str) -> Iterator[Columns]:
    import pyarrow as pa

    if isinstance(obj, pa.RecordBatch):
        obj = pa.Table.from_batches([obj])
    if _is_dataset(obj):
        names = _columns(spec, obj.schema.names, source)
        batches: Iterable[Any] = obj.to_batches(columns=names, batch_size=READ_BATCH_ROWS)
    else:
        reader = obj if isinstance(obj, pa.RecordBatchReader) else pa.RecordBatchReader.from_stream(obj)
        names = _columns(spec, reader.schema.names, source)
        batches = reader
    for batch in batches:
        for start in range(0, batch.num_rows, READ_BATCH_ROWS):
            part = batch.slice(start, READ_BATCH_ROWS)
            yield names, [part.column(name).to_pylist() for name in names]


def _hf_dataset(obj: Any, spec: RecordSpec, source: str) -> Iterator[Columns]:
    """A Hugging Face Dataset (its rows in its order, a selection or shuffle included) or IterableDataset
    (streamed), read as Arrow a batch of rows at a time."""
    names: list[Any] | None = None
    if obj.column_names is not None:  # None: a stream whose columns are known once it yields
        names = _columns(spec, list(obj.column_names), source)
        obj = obj.select_columns(names)
    for batch in obj.with_format("arrow").iter(batch_size=READ_BATCH_ROWS):
        if names is None:
            names = _columns(spec, batch.column_names, source)
        yield names, [batch.column(name).to_pylist() for name in names]


def frame_source(obj: Any) -> str:
    """How errors name a frame: ``<DataFrame>``, ``<Table>``, ..."""
    return f"<{type(obj).__name__}>"


def read_frame(obj: Any, spec: RecordSpec) -> Iterator[Record]:
    """Yield validated records from a pandas or Arrow object; errors name the row, counted from 1."""
    source = frame_source(obj)
    kind = _pandas_type(obj) or _hf_type(obj)
    chunks = {"series": _series, "frame": _dataframe, "dataset": _hf_dataset, "iterable": _hf_dataset}.get(
        kind or "", _arrow
    )
    line = 0
    for names, values in chunks(obj, spec, source):
        for cells in zip(*values, strict=True):
            line += 1
            record = make_record(dict(zip(names, cells, strict=True)), spec, source, line)
            if record is not None:
                yield record


def results_reader(
    pages: Iterable[Mapping[str, list[Any]]], *, embedding_dim: int | None = None, generation: bool = False
) -> Any:
    """A job's result pages (``Store.iter_result_pages``) as a pyarrow RecordBatchReader of flat columns:
    one record batch a page, built when it is read (``generation``: a generation job's, with its three
    columns more)."""
    import pyarrow as pa

    schema = arrow_schema(embedding_dim, generation=generation)
    batches = page_batches(pages, embedding_dim=embedding_dim, generation=generation)
    return pa.RecordBatchReader.from_batches(schema, batches)


def results_table(
    pages: Iterable[Mapping[str, list[Any]]], *, embedding_dim: int | None = None, generation: bool = False
) -> Any:
    """A job's result pages as a pyarrow Table of flat columns, one record batch a page."""
    return results_reader(pages, embedding_dim=embedding_dim, generation=generation).read_all()


def results_frame(
    pages: Iterable[Mapping[str, list[Any]]], *, embedding_dim: int | None = None, generation: bool = False
) -> Any:
    """A job's result pages as a pandas DataFrame of flat columns, ``output`` decoded to Python objects
    (a pooled-embedding job's ``embedding`` column holds a float32 array per row, None where there is none)."""
    try:
        import pandas as pd
    except ImportError:
        raise ConfigurationError("Job.to_pandas() needs pandas: pip install pandas") from None
    table = results_table(pages, embedding_dim=embedding_dim, generation=generation)
    frame = table.to_pandas()
    if embedding_dim is None:
        outputs = [None if text is None else json.loads(text) for text in table.column("output").to_pylist()]
        frame["output"] = pd.Series(outputs, index=frame.index, dtype=object)
    return frame


def results_dataset(
    pages: Iterable[Mapping[str, list[Any]]], *, embedding_dim: int | None = None, generation: bool = False
) -> Any:
    """A job's result pages as a Hugging Face ``datasets.Dataset`` of ``results_table``'s columns (a pooled
    embedding as a fixed-size list of float32, ``List(Value("float32"), length=dim)`` in its features)."""
    try:
        import datasets
    except ImportError:
        raise ConfigurationError("Job.to_dataset() needs datasets: pip install 'pipeq[datasets]'") from None
    return datasets.Dataset(results_table(pages, embedding_dim=embedding_dim, generation=generation))
