"""Input files are read in every format and bad input is refused with the line that is wrong."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeq.errors import InputError
from pipeq.producer.readers import RecordSpec, read_objects, read_path

SPEC = RecordSpec(task="text-classification")


def records(path: Path | str, spec: RecordSpec = SPEC, **kw: object) -> list[tuple[object, str | None]]:
    return [(r.input, r.input_id) for r in read_path(str(path), spec, **kw)]  # type: ignore[arg-type]


def test_jsonl_with_ids(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": 7, "text": "good"}\n\n{"text": "bad", "other": 1}\n', encoding="utf-8")
    assert records(f) == [("good", "7"), ("bad", None)]


def test_csv_custom_fields(tmp_path: Path) -> None:
    f = tmp_path / "in.csv"
    f.write_text('key,review\nr1,"great, really"\nr2,"multi\nline"\n', encoding="utf-8")
    spec = RecordSpec(task="text-classification", text_field="review", id_field="key")
    assert records(f, spec) == [("great, really", "r1"), ("multi\nline", "r2")]


def test_parquet(tmp_path: Path) -> None:
    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "我非常讨厌这个！"]}), f)
    assert records(f) == [("one", "a"), ("我非常讨厌这个！", "b")]


def test_txt_one_text_a_line_trailing_blank_lines_ignored(tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("first\r\nsecond\n\n\n", encoding="utf-8")
    assert records(f) == [("first", None), ("second", None)]


def test_stdin_is_sniffed() -> None:
    assert records("-", stdin=io.BytesIO(b'{"text": "x"}\n')) == [("x", None)]
    assert records("-", stdin=io.BytesIO(b"plain text\n")) == [("plain text", None)]


def test_text_pairs_and_tables() -> None:
    pair = RecordSpec(task="text-classification", pair_field="hypothesis")
    got = list(read_objects([{"text": "a", "hypothesis": "b"}], pair))
    assert got[0].input == {"text": "a", "text_pair": "b"}
    table = RecordSpec(task="table-question-answering")
    got = list(read_objects([{"table": {"c": ["1"]}, "query": "q?"}], table))
    assert got[0].input == {"table": {"c": ["1"]}, "query": "q?"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n{"text": "broken"\n', "in.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', "in.jsonl:2: missing field 'text' (fields present: body)"),
        (b'{"text": 12}\n', "in.jsonl:1: field 'text' must be a string, got int"),
        (b'{"text": null}\n', "in.jsonl:1: field 'text' must be a string, got a missing value"),
        (b'{"text": "   "}\n', "in.jsonl:1: field 'text' is empty"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "in.jsonl:2: not valid UTF-8"),
        (b'["a list"]\n', "in.jsonl:1: a record must be an object or a string, got list"),
        (b'{"text": "x", "id": [1]}\n', "in.jsonl:1: id field 'id' must be a string or an integer"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "in.jsonl"
    f.write_bytes(content)
    with pytest.raises(InputError) as err:
        records(f)
    assert message in str(err.value)


def test_one_megabyte_text_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"text": "x" * 1_048_576}) + "\n")
    with pytest.raises(InputError, match=r"in.jsonl:1: field 'text' is 1,048,576 characters, over the limit"):
        records(f)


def test_blank_lines_between_texts_are_empty_texts(tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("a\n\nb\n")
    with pytest.raises(InputError, match=r"in.txt:2: text is empty"):
        records(f)
    assert records(f, RecordSpec(task="text-classification", skip_empty=True)) == [("a", None), ("b", None)]


def test_hundred_thousand_empty_lines_hold_no_items(tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("\n" * 100_000)
    assert records(f) == []  # the client refuses an input with no items (see test_submit)


def test_csv_row_with_extra_fields(tmp_path: Path) -> None:
    f = tmp_path / "in.csv"
    f.write_text('text\nok\n"a","b"\n')
    with pytest.raises(InputError, match=r"in.csv:3: row has 2 fields, the header has 1"):
        records(f)


def test_csv_with_a_quote_left_open_is_refused_at_the_line_it_opens(tmp_path: Path) -> None:
    f = tmp_path / "in.csv"
    f.write_text('text,id\nfine,1\n"never closed, 2\nthe rest,3\nof the file,4\n')
    with pytest.raises(InputError, match=r"in.csv:3: malformed CSV: .*a quote opened here is never closed"):
        records(f)
    # A quoted field may span lines when it is closed: that is still one record.
    f.write_text('text,id\n"two\nlines",1\nnext,2\n')
    assert [text for text, _ in records(f)] == ["two\nlines", "next"]


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot tell the format"):
        records(tmp_path / "in.xlsx")
    with pytest.raises(InputError, match="no such file"):
        records(tmp_path / "missing.jsonl")


def test_not_parquet(tmp_path: Path) -> None:
    f = tmp_path / "in.parquet"
    f.write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        records(f)


def test_python_objects_are_numbered_from_one() -> None:
    with pytest.raises(InputError, match=r"<inputs>:2: text must be a string, got int|<inputs>:2: a record"):
        list(read_objects(["ok", 5], SPEC))
    with pytest.raises(InputError, match="not a single str"):
        list(read_objects("just one string", SPEC))


def test_format_errors_name_the_registered_formats(tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("good\n")
    with pytest.raises(InputError, match="unknown input format 'xlsx'; choose one of jsonl, csv, parquet, txt"):
        records(f, input_format="xlsx")
    with pytest.raises(InputError, match=r"use one of \.jsonl, \.csv, \.parquet, \.txt \(or pass --input-format\)"):
        records(tmp_path / "in.xlsx")
    ndjson = tmp_path / "in.ndjson"  # a second suffix of one format
    ndjson.write_text('{"text": "good"}\n')
    assert records(ndjson) == records(f) == [("good", None)]
