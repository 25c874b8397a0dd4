"""Two items of one job with the same id are refused at submit, naming both lines; nothing is stored.

The database finds them (an index on a job's items by id), page by page, on SQLite and PostgreSQL;
``--allow-duplicate-ids`` / ``allow_duplicate_ids=True`` keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from conftest import count_rows
from pipeq import Client, Settings
from pipeq import constants as C
from pipeq.cli import app as cli_app
from pipeq.errors import DuplicateIdError, InputError
from pipeq.producer.lines import Lines
from pipeq.store import schema as db

TASK = "text-classification"


@pytest.fixture
def model(model_dir: Callable[[str], str]) -> str:
    return model_dir(TASK)


@pytest.fixture
def env(store_url: str) -> dict[str, str]:
    """The CLI's environment: the memory:// broker (nothing to probe) and the store of the test."""
    return {"PIPEQ_BROKER_URL": "memory://", "PIPEQ_DATABASE_URL": store_url}


def submit(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(cli_app, ["submit", *args], env=env)


def test_cli_names_both_lines_and_stores_nothing(tmp_path: Path, env: dict[str, str], model: str) -> None:
    # Given a JSON lines file whose line 7 repeats the id of line 2, with blank lines and an item
    # without an id between them (so a line is not its item's index plus one)
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": "z", "text": "one"}\n'
        '{"id": "a", "text": "two"}\n'
        "\n"
        '{"text": "no id"}\n'
        '{"id": "b", "text": "four"}\n'
        "\n"
        '{"id": "a", "text": "seven"}\n'
    )
    # When it is submitted
    out = submit(env, str(src), "--task", TASK, "--model", model)
    # Then it is refused as bad input, naming both lines, and nothing is stored
    assert out.exit_code == 2, out.output
    assert f'{src}:7: duplicate id "a" (first on line 2)' in out.output
    assert "--allow-duplicate-ids" in out.output
    assert count_rows(env["PIPEQ_DATABASE_URL"], "jobs") == 0 and count_rows(env["PIPEQ_DATABASE_URL"], "items") == 0

    # When it is submitted with --allow-duplicate-ids, both items are stored under their id
    out = submit(env, str(src), "--task", TASK, "--model", model, "--allow-duplicate-ids")
    assert out.exit_code == 0, out.output
    results = CliRunner().invoke(cli_app, ["results", out.stdout.split()[-1]], env=env)
    rows = [json.loads(line) for line in results.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["z", "a", None, "b", "a"]


def test_csv_lines_count_quoted_newlines(tmp_path: Path, env: dict[str, str], model: str) -> None:
    # Given a CSV whose second record spans three lines and whose id 7 comes back (quoted) on line 6
    src = tmp_path / "in.csv"
    src.write_text('id,text\n7,first\n8,"spans\nthree\nlines"\n"7",again\n')
    out = submit(env, str(src), "--task", TASK, "--model", model)
    assert out.exit_code == 2, out.output
    assert f'{src}:6: duplicate id "7" (first on line 2)' in out.output
    assert count_rows(env["PIPEQ_DATABASE_URL"], "items") == 0


def test_a_duplicate_pages_apart_is_found_by_the_database(store_url: str, model: str) -> None:
    # Given more items than one insert page, the id of item 3 repeated far into the third page
    n = 2 * C.INSERT_BATCH_ROWS + 1_000
    inputs: list[Any] = [{"id": f"id-{i}", "text": f"text {i}"} for i in range(n)]
    second = 2 * C.INSERT_BATCH_ROWS + 500
    inputs[second] = {"id": "id-3", "text": "again"}
    inputs.append({"id": "id-3", "text": "and again"})  # a later repeat is not the one reported
    with Client(Settings(broker_url="memory://", database_url=store_url)) as client:
        # When it is submitted from Python
        with pytest.raises(DuplicateIdError) as caught:
            client.submit(inputs, task=TASK, model=model)
        # Then the first repeat is named with its first occurrence (positions counted from 1)
        assert str(caught.value).startswith(f'<inputs>:{second + 1}: duplicate id "id-3" (first on line 4);')
        assert isinstance(caught.value, InputError)
        assert (caught.value.first, caught.value.second) == (3, second)
        assert count_rows(store_url, "jobs") == 0 and count_rows(store_url, "items") == 0
        # And allow_duplicate_ids stores every item as given
        job = client.submit(inputs, task=TASK, model=model, allow_duplicate_ids=True)
        assert job.status().total == n + 1
        ids = [r["id"] for r in job.results()]
        assert ids.count("id-3") == 3


def test_items_without_ids_are_never_duplicates(store_url: str, model: str) -> None:
    with Client(Settings(broker_url="memory://", database_url=store_url)) as client:
        job = client.submit(["same text", "same text", {"text": "same text"}], task=TASK, model=model)
        assert job.status().total == 3
        # the same ids in two jobs are two jobs' business
        first = client.submit([{"id": "a", "text": "x"}], task=TASK, model=model)
        again = client.submit([{"id": "a", "text": "x"}], task=TASK, model=model)
        assert {r["id"] for r in first.results()} == {r["id"] for r in again.results()} == {"a"}


def test_a_frames_duplicate_index_is_named_by_row(store_url: str, model: str) -> None:
    import pandas as pd

    series = pd.Series(["x", "y", "z"], index=["r1", "r2", "r1"])
    with Client(Settings(broker_url="memory://", database_url=store_url)) as client:
        with pytest.raises(DuplicateIdError, match=r'^<Series>:3: duplicate id "r1" \(first on line 1\)'):
            client.submit(series, task=TASK, model=model)


def test_the_id_index_migrates_down_and_up(store_url: str) -> None:
    def indexes() -> set[str]:
        engine = sa.create_engine(store_url)
        with engine.connect() as conn:
            names = {ix["name"] for ix in sa.inspect(conn).get_indexes("items")}
        engine.dispose()
        return {str(name) for name in names}

    assert "ix_items_job_id_input_id" in indexes()
    db.downgrade(store_url, "0007")
    assert "ix_items_job_id_input_id" not in indexes()
    db.upgrade(store_url)
    assert "ix_items_job_id_input_id" in indexes()


def test_lines_keep_one_pair_per_change_of_offset() -> None:
    lines = Lines()
    for idx in range(100_000):
        lines.note(idx, idx + 1)  # a JSONL file without blank lines
    assert len(lines) == 1 and lines.line(0) == 1 and lines.line(99_999) == 100_000
    lines.note(100_000, 100_005)  # four blank lines, then more
    lines.note(100_001, 100_006)
    assert len(lines) == 2
    assert (lines.line(99_999), lines.line(100_000), lines.line(100_001)) == (100_000, 100_005, 100_006)
