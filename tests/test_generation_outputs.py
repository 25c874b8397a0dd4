"""A generation job's outputs on SQLite and PostgreSQL: the three timing columns written and read back, the
migration that adds them, results and exports, OpenAI batch response bodies, and the report's token figures."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from pipeq import Job, generation
from pipeq import constants as C
from pipeq.cli import app as cli_app
from pipeq.errors import ConfigurationError, StoreError
from pipeq.primitives import BatchTiming, ItemResult
from pipeq.producer.openai_batch import CANCELLED_CODE, FAILED_CODE
from pipeq.producer.writers import COLUMNS, GENERATION_COLUMNS, TIMING_COLUMNS, column_names, write_results
from pipeq.report import build_report
from pipeq.report.html import write_html
from pipeq.report.text import format_text
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row
from pipeq.store import schema as db

MODEL = "/models/tiny-gpt"
WRITE: dict[str, Any] = {"worker_id": None, "model_revision": None, "precision": "fp32", "device": "cpu"}
WORKER_A = "a" * 32
WORKER_B = "b" * 32
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def chat(text: str) -> dict[str, Any]:
    return generation.stored_input(messages=[{"role": "user", "content": text}])


def prompt(text: str) -> dict[str, Any]:
    return generation.stored_input(prompt=text, params={"max_tokens": 8})


def store_generation_job(store: Store, job_id: str, inputs: list[dict[str, Any]]) -> str:
    rows = [NewItem(i, f"req-{i}", x, len(json.dumps(x))) for i, x in enumerate(inputs)]
    store.create_job(new_job_row(job_id, ServeKey(generation.TASK, MODEL)), [rows])
    return job_id


def generated(
    idx: int, text: str, *, prompt_tokens: int, tokens: int, first_ms: float, decode_ms: float, finish: str = "stop"
) -> ItemResult:
    """A generated item's result as the sequence engine hands it over."""
    return ItemResult(
        idx,
        C.ITEM_DONE,
        output=generation.output(text, finish, prompt_tokens, tokens),
        n_tokens=prompt_tokens,
        first_token_ms=first_ms,
        decode_ms=decode_ms,
        output_tokens=tokens,
    )


def timing(size: int, total_ms: float, finished: datetime) -> BatchTiming:
    return BatchTiming(
        size=size,
        rows=size,
        real_tokens=size,
        padded_tokens=size,
        queue_wait_ms=0.0,
        preprocess_ms=0.0,
        forward_ms=total_ms,
        postprocess_ms=0.0,
        total_ms=total_ms,
        started_at=finished - timedelta(milliseconds=total_ms),
        finished_at=finished,
    )


def columns_of(url: str) -> set[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        names = {c["name"] for c in sa.inspect(conn).get_columns("items")}
    engine.dispose()
    return names


# ------------------------------------------------------------------ the store


def test_generation_timing_round_trips_and_encoder_items_leave_it_null(store: Store, store_url: str) -> None:
    # Given a generation job of three items: two generated (one with a batch timing row, one without), one failed
    store_generation_job(store, "gen", [chat("hi"), prompt("once upon"), chat("boom")])
    first = generated(0, "hello 我", prompt_tokens=7, tokens=5, first_ms=0.1 + 0.2, decode_ms=12345.678)
    second = generated(1, "a time", prompt_tokens=3, tokens=1, first_ms=2.5e-3, decode_ms=0.0, finish="length")
    failed = ItemResult(2, C.ITEM_FAILED, error="decode: RuntimeError: out of memory")
    now = datetime.now(UTC)
    assert store.record_batch("gen", [first], timing(1, 9.0, now), **WRITE).done == 1
    assert store.record_batch("gen", [second, failed], None, **WRITE).failed == 1
    # Then every value comes back exactly, and the failed item has none
    rows = list(store.iter_results("gen"))
    got = [(r["first_token_ms"], r["decode_ms"], r["output_tokens"], r["n_tokens"]) for r in rows]
    assert got == [(0.1 + 0.2, 12345.678, 5, 7), (2.5e-3, 0.0, 1, 3), (None, None, None, None)]
    assert rows[0]["output"] == generation.output("hello 我", "stop", 7, 5)
    assert store.job("gen").status == C.JOB_DONE
    # And an encoder job's items, JSON and vector alike, leave the three columns NULL
    from pipeq.vectors import Vector

    store.create_job(new_job_row("enc", ServeKey("text-classification", "/m")), [[NewItem(0, None, "a", 1)]])
    store.create_job(
        new_job_row("vec", ServeKey("feature-extraction", "/m"), params={"pooling": "mean"}),
        [[NewItem(0, None, "a", 1)]],
    )
    store.record_batch("enc", [ItemResult(0, C.ITEM_DONE, output={"label": "x"}, n_tokens=2)], None, **WRITE)
    store.record_batch("vec", [ItemResult(0, C.ITEM_DONE, output=Vector.encode(np.ones(4)))], None, **WRITE)
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        nulls = conn.execute(
            sa.text(
                "SELECT count(*) FROM items WHERE job_id IN ('enc', 'vec') AND status = 'done' "
                "AND first_token_ms IS NULL AND decode_ms IS NULL AND output_tokens IS NULL"
            )
        ).scalar_one()
    engine.dispose()
    assert nulls == 2


def test_downgrade_drops_the_columns_and_upgrade_adds_them_again(store_url: str) -> None:
    with Store(store_url) as store:
        store_generation_job(store, "gen", [chat("hi")])
        result = generated(0, "hello", prompt_tokens=2, tokens=3, first_ms=4.0, decode_ms=5.0)
        store.record_batch("gen", [result], None, **WRITE)
    # When the store goes back to the schema before
    db.downgrade(store_url, "0013")
    assert not {"first_token_ms", "decode_ms", "output_tokens"} & columns_of(store_url)
    with Store(store_url) as store:
        with pytest.raises(StoreError, match=r"missing .*items\.decode_ms.*pipeq db upgrade"):
            store.check_schema()
    # Then upgraded again, the item keeps its output and its timing starts empty
    db.upgrade(store_url)
    with Store(store_url) as store:
        store.check_schema()
        (row,) = store.iter_results("gen")
    assert row["output"] == generation.output("hello", "stop", 2, 3)
    assert (row["first_token_ms"], row["decode_ms"], row["output_tokens"]) == (None, None, None)


# ------------------------------------------------------------------ results and exports


@pytest.fixture
def finished_generation(sqlite_url: str) -> Job:
    """A finished generation job: a chat item, a prompt item, a failed one and a cancelled one."""
    store = Store(sqlite_url)
    store_generation_job(store, "gen", [chat("hi"), prompt("once upon"), chat("boom"), prompt("never run")])
    results = [
        generated(0, "Hello!", prompt_tokens=9, tokens=3, first_ms=11.5, decode_ms=20.0),
        generated(1, " a time", prompt_tokens=2, tokens=8, first_ms=7.25, decode_ms=70.0, finish="length"),
        ItemResult(2, C.ITEM_FAILED, error="decode: RuntimeError: out of memory"),
    ]
    store.record_batch("gen", results, timing(3, 50.0, datetime.now(UTC)), **WRITE)
    assert store.cancel_job("gen") == 1
    return Job(store, "gen")


def test_results_of_a_generation_job_hold_its_three_figures(finished_generation: Job) -> None:
    rows = list(finished_generation.results())
    assert [r["timing"]["output_tokens"] for r in rows] == [3, 8, None, None]
    assert [r["timing"]["first_token_ms"] for r in rows] == [11.5, 7.25, None, None]
    assert [r["timing"]["decode_ms"] for r in rows] == [20.0, 70.0, None, None]
    assert rows[0]["timing"]["n_tokens"] == 9  # the prompt's tokens
    assert "input" not in rows[0]
    assert [r["input"] for r in finished_generation.results(inputs=True)][:2] == [chat("hi"), prompt("once upon")]


def test_exports_of_a_generation_job_have_the_columns_after_n_tokens(finished_generation: Job, tmp_path: Path) -> None:
    names = column_names(generation=True)
    at = names.index("n_tokens")
    assert names[at + 1 : at + 4] == GENERATION_COLUMNS
    assert [n for n in names if n not in GENERATION_COLUMNS] == list(COLUMNS)
    # CSV
    out = io.StringIO()
    assert finished_generation.export("csv", out=out) == 4
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(table[0]) == list(names)
    assert [(r["output_tokens"], r["first_token_ms"], r["decode_ms"]) for r in table[:3]] == [
        ("3", "11.5", "20.0"),
        ("8", "7.25", "70.0"),
        ("", "", ""),
    ]
    # JSONL
    out = io.StringIO()
    finished_generation.export("jsonl", out=out)
    first = json.loads(out.getvalue().splitlines()[0])
    assert first["output"]["generated_text"] == "Hello!" and first["timing"]["output_tokens"] == 3
    # Parquet, Arrow and pandas: typed columns, the same from the store's pages as from result rows
    target = tmp_path / "gen.parquet"
    assert finished_generation.export("parquet", path=str(target)) == 4
    written = pq.read_table(target)
    assert written.column_names == list(names)
    assert written.schema.field("output_tokens").type == pa.int64()
    assert written.schema.field("first_token_ms").type == pa.float64()
    assert written.column("decode_ms").to_pylist() == [20.0, 70.0, None, None]
    assert written.equals(finished_generation.to_arrow())
    from_rows = tmp_path / "rows.parquet"
    write_results(finished_generation.results(), "parquet", path=str(from_rows), generation=True)
    assert pq.read_table(from_rows).equals(written)
    frame = finished_generation.to_pandas()
    assert frame["output_tokens"].tolist()[:2] == [3, 8]
    assert frame["output"][1] == generation.output(" a time", "length", 2, 8)


def test_an_encoder_jobs_exports_have_no_generation_columns(store: Store) -> None:
    store.create_job(new_job_row("enc", ServeKey("text-classification", "/m")), [[NewItem(0, "x", "a", 1)]])
    store.record_batch("enc", [ItemResult(0, C.ITEM_DONE, output={"label": "x"}, n_tokens=2)], None, **WRITE)
    job = Job(store, "enc")
    (row,) = job.results()
    assert list(row["timing"]) == list(TIMING_COLUMNS)
    assert job.to_arrow().column_names == list(COLUMNS)
    out = io.StringIO()
    job.export("csv", out=out)
    assert out.getvalue().splitlines()[0] == ",".join(COLUMNS)


# ------------------------------------------------------------------ OpenAI batch output

#: The Batch API's output line and the two response bodies, as documented.
LINE_KEYS = {"id", "custom_id", "response", "error"}
BODY_KEYS = {"id", "object", "created", "model", "choices", "usage"}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_openai_batch_output_answers_chat_items_and_prompt_items_in_their_own_form(
    finished_generation: Job, sqlite_url: str
) -> None:
    # When the finished job is written as an OpenAI batch output file (through the CLI)
    out = CliRunner().invoke(cli_app, ["results", "gen", "--format", "openai-batch", "--database-url", sqlite_url])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    # Then there is one line per item, its custom_id the item's id
    assert [line["custom_id"] for line in lines] == ["req-0", "req-1", "req-2", "req-3"]
    assert all(set(line) == LINE_KEYS for line in lines)
    finished_at = finished_generation.status().finished_at
    assert finished_at is not None
    # And the chat item's body is a /v1/chat/completions response
    chat_line, completion_line, failed, cancelled = lines
    assert chat_line["error"] is None and chat_line["response"]["status_code"] == 200
    body = chat_line["response"]["body"]
    assert set(body) == BODY_KEYS
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL and body["created"] == int(finished_at.timestamp())
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    # And the prompt item's body is a /v1/completions response
    body = completion_line["response"]["body"]
    assert set(body) == BODY_KEYS and set(body["usage"]) == USAGE_KEYS
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": " a time", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}
    # And the failed and the cancelled items carry the API's error object, no response
    assert failed["response"] is None
    assert failed["error"] == {"code": FAILED_CODE, "message": "decode: RuntimeError: out of memory"}
    assert cancelled["response"] is None and cancelled["error"]["code"] == CANCELLED_CODE
    assert len({line["id"] for line in lines}) == 4


def test_openai_batch_output_of_generation_rows_needs_their_inputs(finished_generation: Job) -> None:
    with pytest.raises(ConfigurationError, match=r"inputs=True"):
        write_results(
            finished_generation.results(), "openai-batch", out=io.StringIO(), job=finished_generation.status()
        )


def test_openai_batch_output_of_an_unserved_task_names_both_kinds_of_job(store: Store) -> None:
    store.create_job(new_job_row("enc", ServeKey("text-classification", "/m")), [[NewItem(0, "x", "a", 1)]])
    store.record_batch("enc", [ItemResult(0, C.ITEM_DONE, output={"label": "x"})], None, **WRITE)
    with pytest.raises(ConfigurationError, match=r"feature-extraction jobs with pooling.*text-generation jobs"):
        Job(store, "enc").export("openai-batch", out=io.StringIO())


# ------------------------------------------------------------------ the report


def register(store: Store, worker_id: str) -> None:
    store.register_worker(
        {
            "id": worker_id,
            "host": f"host-{worker_id[0]}",
            "pid": 1,
            "queue": "q",
            "task": generation.TASK,
            "model": MODEL,
            "precision": "fp32",
            "device": "cpu",
            "status": "ready",
        }
    )


def test_report_of_a_generation_job_gives_tokens_per_second_and_latency_percentiles(
    store: Store, tmp_path: Path
) -> None:
    # Given 10 generated items: item i has i + 2 output tokens, i + 1 ms to its first token and i + 1 ms per
    # later token; worker A wrote items 0-5 in 2 steps of 100 ms each, worker B items 6-9 in one of 400 ms.
    # Item 10 generated a single token (no decode gap), item 11 failed.
    store_generation_job(store, "gen", [prompt(f"p{i}") for i in range(12)])
    register(store, WORKER_A)
    register(store, WORKER_B)
    results = [
        generated(i, "x", prompt_tokens=4, tokens=i + 2, first_ms=float(i + 1), decode_ms=float((i + 1) * (i + 1)))
        for i in range(10)
    ]
    single = generated(10, "y", prompt_tokens=4, tokens=1, first_ms=100.0, decode_ms=0.0)
    failed = ItemResult(11, C.ITEM_FAILED, error="decode: RuntimeError: boom")
    steps = [(results[0:3], WORKER_A, 100.0), (results[3:6], WORKER_A, 100.0), (results[6:10], WORKER_B, 400.0)]
    for k, (part, worker, ms) in enumerate(steps):
        store.record_batch(
            "gen", part, timing(len(part), ms, T0 + timedelta(seconds=k)), **{**WRITE, "worker_id": worker}
        )
    store.record_batch("gen", [single, failed], None, **WRITE)
    # When the report is built
    report = build_report(store, "gen")
    g = report.generation
    assert g is not None
    # Then the job's output tokens are summed over its generated items and divided by its wall time
    total = sum(i + 2 for i in range(10)) + 1
    assert (g.items, g.output_tokens) == (11, total)
    assert g.output_tokens_per_second == pytest.approx(total / report.job.wall_seconds)
    # And each worker's over its busy time (its batches' total_ms)
    a, b = sorted(report.workers, key=lambda w: w.worker_id)
    assert (a.output_tokens, b.output_tokens) == (sum(range(2, 8)), sum(range(8, 12)))
    assert a.output_tokens_per_second == pytest.approx(sum(range(2, 8)) / 0.2)
    assert b.output_tokens_per_second == pytest.approx(sum(range(8, 12)) / 0.4)
    # And time to first token counts every generated item; decode per token those with more than one token
    ttft = [float(i + 1) for i in range(10)] + [100.0]
    assert (g.first_token_p50_ms, g.first_token_p90_ms) == pytest.approx(tuple(np.percentile(ttft, [50, 90])))
    assert (g.decode_per_token_p50_ms, g.decode_per_token_p90_ms) == pytest.approx((5.5, 9.1))
    # And text, HTML and JSON show them
    text = format_text(report)
    assert f"generation: {total:,} output tokens from 11 items" in text
    assert "time to first token p50 6.00 ms" in text and "decode per token p50 5.50 ms, p90 9.10 ms" in text
    assert "out tok/s" in text
    page = write_html(report, tmp_path / "gen.html").read_text()
    assert "output tok/s" in page and "decode per token p50 5.50 ms" in page
    assert json.loads(json.dumps(report.as_dict()))["generation"]["output_tokens"] == total


def test_report_of_an_encoder_job_shows_no_generation_figures(store: Store, tmp_path: Path) -> None:
    store.create_job(new_job_row("enc", ServeKey("text-classification", "/m")), [[NewItem(0, None, "a", 1)]])
    register(store, WORKER_A)
    store.record_batch(
        "enc",
        [ItemResult(0, C.ITEM_DONE, output={"label": "x"})],
        timing(1, 5.0, T0),
        **{**WRITE, "worker_id": WORKER_A},
    )
    report = build_report(store, "enc")
    assert report.generation is None and report.workers[0].output_tokens is None
    text = format_text(report)
    assert "generation:" not in text and "tok/s" not in text
    assert "tok/s" not in write_html(report, tmp_path / "enc.html").read_text()
