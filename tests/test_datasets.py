"""Hugging Face datasets in (``Client.submit(dataset)``) and out (``Job.to_dataset()``), on the memory:// broker,
SQLite and an in-thread Celery worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import numpy as np
import pytest

from conftest import count_rows
from pipeq import Client, Settings
from pipeq.errors import InputError
from pipeq.producer import frames
from pipeq.producer.writers import COLUMNS

TEXTS = ["good", "bad", "我非常讨厌这个！", "word " * 9, "ok then"]
IDS = ["a", "b", "c", "d", "e"]


def dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"id": IDS, "text": TEXTS, "label": [1, 0, 0, 1, 1]})


def test_a_dataset_and_a_stream_of_one_are_submitted_in_their_order(
    client: Client, thread_embedding_worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Dataset, the same rows shuffled by a selection, and the Dataset as a stream
    monkeypatch.setattr(frames, "READ_BATCH_ROWS", 2)  # read two rows at a time
    params = {"pooling": "mean"}
    inputs = {
        "dataset": (dataset(), IDS),
        "selection": (dataset().select([4, 2, 0]), ["e", "c", "a"]),
        "stream": (dataset().to_iterable_dataset(num_shards=1), IDS),
    }
    vectors = {}
    for kind, (data, ids) in inputs.items():
        # When each is submitted and run
        job = client.submit(data, task="feature-extraction", model=thread_embedding_worker, params=params)
        assert job.wait(timeout=60).done == len(ids), kind
        # Then each row is an item in the dataset's order, with its id
        assert [r["id"] for r in job.results()] == ids, kind
        vectors[kind] = dict(zip(ids, job.to_numpy(), strict=True))
    for key in ("e", "c", "a"):
        np.testing.assert_array_equal(vectors["selection"][key], vectors["dataset"][key])
        np.testing.assert_array_equal(vectors["stream"][key], vectors["dataset"][key])


def test_a_stream_whose_columns_are_unknown_until_it_yields(client: Client, thread_embedding_worker: str) -> None:
    def rows() -> Iterator[dict[str, Any]]:
        yield from ({"text": text, "id": f"g{i}"} for i, text in enumerate(TEXTS))

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.column_names is None
    job = client.submit(stream, task="feature-extraction", model=thread_embedding_worker, params={"pooling": "cls"})
    assert job.wait(timeout=60).done == len(TEXTS)
    assert [r["id"] for r in job.results()] == [f"g{i}" for i in range(len(TEXTS))]


def test_results_come_back_as_a_dataset(client: Client, thread_embedding_worker: str) -> None:
    # Given a pooled-embedding job and a job with JSON outputs (a vector per token)
    pooled = client.submit(
        dataset(), task="feature-extraction", model=thread_embedding_worker, params={"pooling": "mean"}
    )
    tokens = client.submit(TEXTS[:2], task="feature-extraction", model=thread_embedding_worker)
    pooled.wait(timeout=60)
    tokens.wait(timeout=60)
    # When their results are read as datasets
    out = pooled.to_dataset()
    # Then they hold to_arrow's columns, the embeddings as fixed-size float32 lists
    assert isinstance(out, datasets.Dataset) and out.num_rows == len(TEXTS)
    assert out.column_names == pooled.to_arrow().column_names and "embedding" in out.column_names
    dim = pooled.embedding_dim()
    assert out.features["embedding"] == datasets.List(datasets.Value("float32"), length=dim)
    assert out.data.table.schema.field("embedding").type.list_size == dim
    np.testing.assert_array_equal(np.asarray(out.with_format("numpy")["embedding"]), pooled.to_numpy())
    assert out["id"] == IDS and out["status"] == ["done"] * len(TEXTS)
    plain = tokens.to_dataset()
    assert plain.column_names == list(COLUMNS)
    assert [json.loads(x) for x in plain["output"]] == [r["output"] for r in tokens.results()]


def test_a_dataset_without_the_text_column_stores_nothing(settings: Settings, model_dir: Callable[[str], str]) -> None:
    data = datasets.Dataset.from_dict({"body": ["a", "b"]})
    with Client(settings) as client, pytest.raises(InputError, match=r"<Dataset>: missing column 'text'"):
        client.submit(data, task="feature-extraction", model=model_dir("feature-extraction"))
    with Client(settings) as client, pytest.raises(InputError, match=r"<IterableDataset>:2: field 'text' is empty"):
        client.submit(
            datasets.Dataset.from_dict({"text": ["a", " "]}).to_iterable_dataset(),
            task="feature-extraction",
            model=model_dir("feature-extraction"),
        )
    assert count_rows(settings.database_url, "jobs") == 0


def test_datasets_stays_unimported() -> None:
    code = "import sys, pipeq; from pipeq.producer import client; assert 'datasets' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
