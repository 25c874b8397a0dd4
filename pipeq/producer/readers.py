"""Read a job's inputs from files, stdin or Python objects, validating every record.

Every problem is raised as an InputError naming the source and line (or row), before
anything is stored or queued.

A text-generation record holds a prompt (``text``, or the field ``--text-field`` names) or chat
``messages`` (a list of ``{"role", "content"}``; in a CSV cell, that list as JSON), never both, and
optionally its own sampling parameters as fields ``max_tokens``, ``temperature``, ``top_p``, ``seed``
and ``stop`` (``pipeq.generation.PARAM_KEYS``); its other fields are not read. A plain text (a line of a
.txt file, a string) is a prompt.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import orjson

from pipeq import generation
from pipeq.errors import InputError
from pipeq.producer import openai_batch
from pipeq.producer.records import RawRecords, Record, RecordSpec  # callers import them from here too
from pipeq.tasks import traits

#: How errors name inputs given as Python objects (``Client.submit([...])``).
OBJECTS_SOURCE = "<inputs>"
#: The field of a text-generation record that holds chat messages (instead of a prompt).
MESSAGES_FIELD = "messages"


def _decoded_line(raw: bytes, number: int, source: str) -> str:
    """Line ``number`` as text, failing clearly on bytes that are not UTF-8 (line 1 loses a byte-order mark)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"not valid UTF-8 (byte {exc.start} of the line: {raw[exc.start : exc.start + 4]!r}); "
            f"re-encode the file as UTF-8",
            source=source,
            line=number,
        ) from None
    return text.removeprefix("\ufeff") if number == 1 else text


def _decoded_lines(stream: IO[bytes], source: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, failing clearly on bytes that are not UTF-8."""
    for number, raw in enumerate(stream, start=1):
        yield number, _decoded_line(raw, number, source)


def _check_text(value: Any, what: str, spec: RecordSpec, source: str, line: int) -> str | None:
    if not isinstance(value, str):
        missing = value is None or (isinstance(value, float) and math.isnan(value))  # null, or a pandas NaN
        got = "a missing value" if missing else type(value).__name__
        raise InputError(f"{what} must be a string, got {got}", source=source, line=line)
    if not value.strip():
        if spec.skip_empty:
            return None
        raise InputError(f"{what} is empty (pass --skip-empty to drop empty texts)", source=source, line=line)
    if len(value) > spec.max_text_chars:
        raise InputError(
            f"{what} is {len(value):,} characters, over the limit of {spec.max_text_chars:,} (--max-text-chars)",
            source=source,
            line=line,
        )
    return value


def _input_id(record: dict[str, Any], spec: RecordSpec, source: str, line: int) -> str | None:
    if not spec.id_field or spec.id_field not in record or record[spec.id_field] is None:
        return None
    value = record[spec.id_field]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InputError(
            f"id field {spec.id_field!r} must be a string or an integer, got {type(value).__name__}",
            source=source,
            line=line,
        )
    return str(value)


def _field(record: dict[str, Any], name: str, source: str, line: int) -> Any:
    if name not in record:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise InputError(f"missing field {name!r} (fields present: {present})", source=source, line=line)
    return record[name]


def _missing(value: Any) -> bool:
    """Whether a cell holds no value: absent, null, a pandas NaN, or an empty CSV cell."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _param_value(name: str, value: Any) -> Any:
    """A record's sampling parameter as ``generation.check_params`` takes it: a number written as text
    (a CSV cell) is read as that number, and a whole float (a pandas column with gaps) as an integer."""
    if name == "stop":
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if name in ("max_tokens", "seed") and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _generation_record(raw: Any, spec: RecordSpec, source: str, line: int) -> Record | None:
    """A text-generation record: a prompt or chat messages, and the record's own sampling parameters."""
    if isinstance(raw, str):
        text = _check_text(raw, "text", spec, source, line)
        return None if text is None else Record(line, generation.stored_input(prompt=text), None, len(text))
    if not isinstance(raw, dict):
        raise InputError(f"a record must be an object or a string, got {type(raw).__name__}", source=source, line=line)
    input_id = _input_id(raw, spec, source, line)
    has_prompt = not _missing(raw.get(spec.text_field))
    has_messages = not _missing(raw.get(MESSAGES_FIELD))
    if has_prompt and has_messages:
        raise InputError(
            f"a record holds a prompt ({spec.text_field!r}) or chat {MESSAGES_FIELD!r}, not both",
            source=source,
            line=line,
        )
    if not has_prompt and not has_messages and spec.text_field not in raw:
        present = ", ".join(sorted(map(str, raw))) or "none"
        raise InputError(
            f"a {generation.TASK} record needs a prompt in {spec.text_field!r} (--text-field) or chat "
            f"{MESSAGES_FIELD!r} (fields present: {present})",
            source=source,
            line=line,
        )
    own = {k: _param_value(k, raw[k]) for k in generation.PARAM_KEYS if k in raw and not _missing(raw[k])}
    params = generation.check_params(own, source=source, line=line)
    if not has_messages:
        text = _check_text(raw[spec.text_field], f"field {spec.text_field!r}", spec, source, line)
        if text is None:
            return None
        return Record(line, generation.stored_input(prompt=text, params=params), input_id, len(text))
    value = raw[MESSAGES_FIELD]
    if isinstance(value, str) and value.lstrip().startswith("["):  # a CSV cell: the list as JSON
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InputError(f"'messages' holds malformed JSON ({exc})", source=source, line=line) from None
    messages = generation.check_messages(value, source=source, line=line)
    size = sum(len(m["content"]) for m in messages)
    if size > spec.max_text_chars:
        raise InputError(
            f"the messages are {size:,} characters, over the limit of {spec.max_text_chars:,} (--max-text-chars)",
            source=source,
            line=line,
        )
    return Record(line, generation.stored_input(messages=messages, params=params), input_id, size)


def make_record(raw: Any, spec: RecordSpec, source: str, line: int) -> Record | None:
    """Validate one raw record; None when it is an empty text that ``skip_empty`` drops."""
    if spec.task == generation.TASK:
        return _generation_record(raw, spec, source, line)
    if isinstance(raw, str):
        if traits(spec.task).table_input:
            raise InputError(f"{spec.task} needs records with 'table' and 'query'", source=source, line=line)
        text = _check_text(raw, "text", spec, source, line)
        return None if text is None else Record(line, text, None, len(text))
    if not isinstance(raw, dict):
        raise InputError(f"a record must be an object or a string, got {type(raw).__name__}", source=source, line=line)
    input_id = _input_id(raw, spec, source, line)
    if traits(spec.task).table_input:
        table = _field(raw, "table", source, line)
        if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
            raise InputError("'table' must map column names to lists of cells", source=source, line=line)
        query = _check_text(_field(raw, "query", source, line), "field 'query'", spec, source, line)
        if query is None:
            return None
        return Record(line, {"table": table, "query": query}, input_id, len(query))
    text = _check_text(_field(raw, spec.text_field, source, line), f"field {spec.text_field!r}", spec, source, line)
    if text is None:
        return None
    if spec.pair_field:
        pair = _check_text(_field(raw, spec.pair_field, source, line), f"field {spec.pair_field!r}", spec, source, line)
        if pair is None:
            return None
        return Record(line, {"text": text, "text_pair": pair}, input_id, len(text) + len(pair))
    return Record(line, text, input_id, len(text))


@dataclass(frozen=True)
class Source:
    """Where a job's records are read from: a file path, or ``-`` for standard input."""

    path: str
    stdin: IO[bytes] | None = None

    @property
    def name(self) -> str:
        """How errors name the source."""
        return "<stdin>" if self.path == "-" else self.path

    @contextmanager
    def stream(self) -> Iterator[IO[bytes]]:
        """The source opened as a binary stream."""
        if self.path == "-":
            yield self.stdin if self.stdin is not None else sys.stdin.buffer
            return
        with open(self.path, "rb") as fh:
            yield fh


def _streamed(read: Callable[[IO[bytes], str], RawRecords]) -> Callable[[Source], RawRecords]:
    """A reader of binary streams as a reader of sources (a file opened in binary, or stdin)."""

    def read_source(source: Source) -> RawRecords:
        with source.stream() as stream:
            yield from read(stream, source.name)

    return read_source


def _jsonl(stream: IO[bytes], source: str) -> RawRecords:
    """Records of a JSON Lines stream. Each line is parsed by orjson straight from its bytes; a line it
    refuses (blank, a byte-order mark, bytes that are not UTF-8, JSON it does not take such as NaN, or
    malformed) is read again by the standard library, which accepts or names the problem as always."""
    loads, refused = orjson.loads, orjson.JSONDecodeError
    for number, raw in enumerate(stream, start=1):
        try:
            value = loads(raw)
        except refused:
            text = _decoded_line(raw, number, source)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"malformed JSON ({exc.msg} at column {exc.colno})", source=source, line=number
                ) from None
        yield number, value


def _txt(stream: IO[bytes], source: str) -> RawRecords:
    pending_blank: list[int] = []
    for line, text in _decoded_lines(stream, source):
        text = text.rstrip("\r\n")
        if not text.strip():
            # Trailing blank lines are not texts; blank lines between texts are (and get checked).
            pending_blank.append(line)
            continue
        for blank in pending_blank:
            yield blank, ""
        pending_blank.clear()
        yield line, text


def _csv(stream: IO[bytes], source: str) -> RawRecords:
    """Rows of a CSV file with a header, read strictly: a quote left open is an error naming the line
    where its record starts (a lenient reader would take the rest of the file as one field)."""
    lines = (text for _, text in _decoded_lines(stream, source))
    reader = csv.DictReader(lines, strict=True)
    start = 1  # the line the record being read starts on
    try:
        if not reader.fieldnames:
            return
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise InputError(
                    f"row has {len(row) - 1 + len(row[None])} fields, the header has {len(reader.fieldnames)}",
                    source=source,
                    line=reader.line_num,
                )
            yield reader.line_num, row
            start = reader.line_num + 1
    except csv.Error as exc:
        hint = " (a quote opened here is never closed)" if "end of data" in str(exc) else ""
        raise InputError(f"malformed CSV: {exc}{hint}", source=source, line=start) from None


def _parquet(source: Source) -> RawRecords:
    """Rows of a Parquet file, opened by path (Arrow reads it natively, with random access)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}", source=source.name) from None
    row = 0
    for batch in pf.iter_batches(batch_size=8192):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _sniff(stream: IO[bytes], source: str) -> RawRecords:
    buffered = io.BufferedReader(stream)  # type: ignore[type-var]
    head = buffered.peek(64).lstrip()
    yield from (_jsonl if head.startswith(b"{") else _txt)(buffered, source)


@dataclass(frozen=True)
class InputFormat:
    """An input file format: its ``--input-format`` name, the file suffixes that mean it, and its reader."""

    name: str
    #: Lower-case suffixes, the one shown in messages first.
    suffixes: tuple[str, ...]
    #: Yields (line or row number, raw record) pairs; a record is validated by ``make_record`` afterwards.
    read: Callable[[Source], RawRecords]
    #: Validates the raw records of a whole source instead (a format whose records are checked
    #: against one another, or become several items each); ``make_record`` one by one when None.
    validate: Callable[[RawRecords, RecordSpec, str], Iterator[Record]] | None = None
    #: The format's own rule on ids replaces the store's check that ids are unique within a job
    #: (openai-batch: each ``custom_id`` once, the k items of one request sharing it).
    checks_ids: bool = False


#: Every input file format, by name (``--input-format``); a new format is one entry.
INPUT_FORMATS: dict[str, InputFormat] = {
    f.name: f
    for f in (
        InputFormat("jsonl", (".jsonl", ".ndjson", ".json"), _streamed(_jsonl)),
        InputFormat("csv", (".csv",), _streamed(_csv)),
        InputFormat("parquet", (".parquet",), _parquet),
        InputFormat("txt", (".txt",), _streamed(_txt)),
        # OpenAI Batch API request files are JSON lines too: only --input-format picks this one.
        InputFormat("openai-batch", (), _streamed(_jsonl), openai_batch.records, checks_ids=True),
    )
}
#: File suffixes and the format each means.
FORMATS = {suffix: f.name for f in INPUT_FORMATS.values() for suffix in f.suffixes}
#: Standard input with no ``--input-format``: JSON lines when it starts with ``{``, else lines of text.
_SNIFF = InputFormat("sniff", (), _streamed(_sniff))


def detect_format(path: str, explicit: str | None = None) -> str:
    """The input format from ``--input-format`` or the file's suffix (``sniff`` for stdin)."""
    if explicit:
        if explicit not in INPUT_FORMATS:
            raise InputError(f"unknown input format {explicit!r}; choose one of {', '.join(INPUT_FORMATS)}")
        return explicit
    if path == "-":
        return _SNIFF.name
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        shown = ", ".join(f.suffixes[0] for f in INPUT_FORMATS.values() if f.suffixes)
        raise InputError(
            f"cannot tell the format of {path!r} from its suffix; use one of {shown} (or pass --input-format)"
        )
    return FORMATS[suffix]


def read_path(
    path: str, spec: RecordSpec, *, input_format: str | None = None, stdin: IO[bytes] | None = None
) -> Iterator[Record]:
    """Yield validated records from a file (or ``-`` for stdin)."""
    name = detect_format(path, input_format)
    fmt = _SNIFF if name == _SNIFF.name else INPUT_FORMATS[name]
    source = Source(path, stdin)
    if path != "-" and not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    yield from (fmt.validate or _records)(fmt.read(source), spec, source.name)


def read_objects(objects: Iterable[Any], spec: RecordSpec, source: str = OBJECTS_SOURCE) -> Iterator[Record]:
    """Yield validated records from Python strings or dicts (the ``Client.submit`` path).

    Errors name the item by its position, counted from 1 like file lines.
    """
    if isinstance(objects, str | bytes | dict):
        raise InputError(f"inputs must be an iterable of texts or records, not a single {type(objects).__name__}")
    yield from _records(enumerate(objects, start=1), spec, source)


def _records(raw: Iterable[tuple[int, Any]], spec: RecordSpec, source: str) -> Iterator[Record]:
    for line, value in raw:
        record = make_record(value, spec, source, line)
        if record is not None:
            yield record
