"""pandas and Arrow inputs and result frames, on the memory:// broker, SQLite and an in-thread Celery worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import count_rows
from pipeq import Client, Job, Settings
from pipeq.errors import InputError
from pipeq.producer.writers import COLUMNS, TIMING_COLUMNS, arrow_batches, write_results
from pipeq.worker.config import WorkerConfig

TASK = "text-classification"
TEXTS = ["good", "bad", "我非常讨厌这个！", "word " * 9, "ok then"]


@pytest.fixture
def worker_batch_size() -> int:
    return 64


@pytest.fixture
def model(thread_worker: WorkerConfig) -> str:
    """The path of the model a thread worker serves (its own copy, so its own queue)."""
    return thread_worker.key.model


def assert_frames_match_results(job: Job) -> list[dict[str, Any]]:
    """to_arrow and to_pandas hold exactly ``job.results()``, in input order, with flat timing columns."""
    rows = list(job.results())
    table = job.to_arrow()
    assert table.column_names == list(COLUMNS)
    assert table.column("index").to_pylist() == [r["index"] for r in rows] == list(range(len(rows)))
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    assert [json.loads(x) for x in table.column("output").to_pylist()] == [r["output"] for r in rows]
    assert table.column("forward_ms").to_pylist() == [r["timing"]["forward_ms"] for r in rows]
    frame = job.to_pandas()
    assert list(frame.columns) == list(COLUMNS)
    assert frame["index"].tolist() == [r["index"] for r in rows]
    assert frame["output"].tolist() == [r["output"] for r in rows]
    assert frame["status"].tolist() == [r["status"] for r in rows]
    assert frame["batch_size"].tolist() == [r["timing"]["batch_size"] for r in rows]
    return rows


#: Each kind of frame input, and the ids its rows should get.
FRAME_INPUTS: dict[str, tuple[Callable[[], Any], list[str | None]]] = {
    "dataframe": (lambda: pd.DataFrame({"id": range(10, 15), "text": TEXTS, "x": 1.5}), ["10", "11", "12", "13", "14"]),
    "series": (lambda: pd.Series(TEXTS, index=[f"k{i}" for i in range(5)]), ["k0", "k1", "k2", "k3", "k4"]),
    "table": (lambda: pa.table({"text": TEXTS}), [None] * 5),
    "record-batch": (lambda: pa.table({"text": TEXTS, "id": list("abcde")}).to_batches()[0], list("abcde")),
    "reader": (lambda: pa.table({"text": TEXTS, "id": list("abcde")}).to_reader(max_chunksize=2), list("abcde")),
    "dataset": (lambda: ds.dataset(pa.table({"text": TEXTS, "id": list("abcde")})), list("abcde")),
}


def test_frame_inputs_round_trip(client: Client, model: str) -> None:
    for kind, (make, ids) in FRAME_INPUTS.items():
        # Given a pandas or Arrow input, When it is submitted and run
        job = client.submit(make(), task=TASK, model=model)
        state = job.wait(timeout=60)
        # Then every row is an item, in input order, with its id, and the frames hold the results
        assert (state.status, state.done, state.total) == ("done", 5, 5), kind
        rows = assert_frames_match_results(job)
        assert [r["id"] for r in rows] == ids, kind
        assert [r["status"] for r in rows] == ["done"] * 5, kind


def test_generator_of_5000_texts(client: Client, model: str) -> None:
    texts = (f"text number {i} " + "word " * (i % 13) for i in range(5000))
    job = client.submit(texts, task=TASK, model=model)
    assert job.wait(timeout=240).done == 5000
    rows = assert_frames_match_results(job)
    assert len(rows) == 5000 and {r["status"] for r in rows} == {"done"}
    assert job.to_arrow().num_rows == 5000


def test_column_aliases_and_pairs(client: Client, model_dir: Callable[[str], str]) -> None:
    frame = pd.DataFrame({"key": ["x", "y"], "premise": ["a cat", "a dog"], "hypothesis": ["an animal", "a car"]})
    job = client.submit(
        frame, task=TASK, model=model_dir(TASK), text_column="premise", pair_column="hypothesis", id_column="key"
    )
    assert next(client.store.iter_pending(job.id)) == [
        (0, {"text": "a cat", "text_pair": "an animal"}),
        (1, {"text": "a dog", "text_pair": "a car"}),
    ]
    assert [r["id"] for r in job.results()] == ["x", "y"]
    # a Series gives no ids when ids are turned off
    plain = client.submit(pd.Series(["a", "b"], index=[5, 6]), task=TASK, model=model_dir(TASK), id_field=None)
    assert [r["id"] for r in plain.results()] == [None, None]
    with pytest.raises(TypeError, match="pass text_field or text_column, not both"):
        client.submit(frame, task=TASK, model=model_dir(TASK), text_field="a", text_column="b")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: pd.DataFrame({"body": ["a"]}), r"<DataFrame>: missing column 'text' \(columns present: body\)"),
        (lambda: pd.DataFrame({"text": ["a", "b", 7]}), "<DataFrame>:3: field 'text' must be a string, got int"),
        (lambda: pd.DataFrame({"text": ["a", "  "]}), "<DataFrame>:2: field 'text' is empty"),
        (lambda: pd.DataFrame({"text": ["a", None]}), "<DataFrame>:2: field 'text' must be a string, got a missing"),
        (lambda: pd.Series(["a", "b", "c" * 101]), "<Series>:3: field 'text' is 101 characters, over the limit"),
        (lambda: pa.table({"text": ["a", None]}), "<Table>:2: field 'text' must be a string, got a missing value"),
        (lambda: pa.table({"text": [1, 2]}), "<Table>:1: field 'text' must be a string, got int"),
        (lambda: pa.table({"text": ["a"], "id": [1.5]}), "<Table>:1: id field 'id' must be a string or an integer"),
        (lambda: pd.DataFrame({"text": []}, dtype=str), "the input holds no items"),
    ],
)
def test_bad_frames_store_nothing(
    settings: Settings, model_dir: Callable[[str], str], make: Callable[[], Any], message: str
) -> None:
    with Client(settings, max_text_chars=100) as client, pytest.raises(InputError, match=message):
        client.submit(make(), task=TASK, model=model_dir(TASK))
    assert count_rows(settings.database_url, "jobs") == 0 and count_rows(settings.database_url, "items") == 0


def test_arrow_batches_stream_rows() -> None:
    """Result rows are pulled one batch at a time, never the whole job first."""
    pulled = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for i in range(250):
            pulled += 1
            timing = dict.fromkeys(TIMING_COLUMNS)
            yield {"index": i, "id": None, "status": "done", "output": [i], "error": None,
                   "truncated": False, "cached": False, "timing": timing}  # fmt: skip

    batches = arrow_batches(rows(), size=100)
    first = next(batches)
    assert first.num_rows == 100 and pulled == 100
    assert [b.num_rows for b in batches] == [100, 50] and pulled == 250


def test_csv_and_parquet_have_flat_timing_columns(client: Client, model: str, tmp_path: Path) -> None:
    job = client.submit(["fine", "dandy"], task=TASK, model=model)
    job.wait(timeout=60)
    target = tmp_path / "out.parquet"
    assert write_results(job.results(), "parquet", path=str(target)) == 2
    assert pq.read_table(target).equals(job.to_arrow())
    csv_path = tmp_path / "out.csv"
    write_results(job.results(), "csv", path=str(csv_path))
    assert pd.read_csv(csv_path)["batch_size"].tolist() == job.to_pandas()["batch_size"].tolist()


def test_pandas_stays_unimported() -> None:
    code = "import sys, pipeq; from pipeq.producer import frames; assert 'pandas' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
