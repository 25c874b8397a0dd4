"""The Python API and the CLI on fakes: the memory:// broker, SQLite and an in-thread Celery worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import count_rows
from pipeq import Client, Settings
from pipeq.cli import app as cli_app
from pipeq.errors import InputError, ModelNotFoundError, UnsupportedTaskError
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig

TASK = "text-classification"


def test_submit_wait_results_in_input_order(settings: Settings, thread_worker: WorkerConfig, sqlite_url: str) -> None:
    client = Client(settings)
    texts = [{"id": f"r{i}", "text": "word " * (i % 7 + 1)} for i in range(23)] + [{"text": "我非常讨厌这个！"}]
    job = client.submit(texts, task="sentiment-analysis", model=thread_worker.key.model, params={"top_k": None})
    state = job.wait(timeout=60)
    assert (state.status, state.done, state.failed, state.total) == ("done", 24, 0, 24)
    rows = list(job.results())
    assert [r["index"] for r in rows] == list(range(24))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(23)] + [None]
    # top_k=None passed through: every label with its score, as transformers returns it
    assert {d["label"] for d in rows[0]["output"]} == {"alpha", "beta", "gamma"}
    assert all(r["timing"]["forward_ms"] > 0 and r["timing"]["batch_size"] <= 4 for r in rows)
    assert count_rows(sqlite_url, "batches") >= 6  # max_batch_size=4: micro-batches, not one per message


def test_chunks_are_messages_of_many_items(
    settings: Settings, model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []
    with Client(settings, chunk_size=10) as client:
        monkeypatch.setattr(client._celery, "send_task", lambda name, **kw: sent.append(kw))
        job = client.submit([f"text {i}" * (i + 1) for i in range(25)], task=TASK, model=model_dir(TASK))
    assert [len(m["kwargs"]["items"]) for m in sent] == [10, 10, 5]
    assert all(m["queue"] == ServeKey(TASK, model_dir(TASK)).queue for m in sent)
    assert json.dumps(sent[0]["kwargs"])  # JSON on the wire
    sizes = [len(x) for m in sent for _, x in m["kwargs"]["items"]]
    assert sizes == sorted(sizes, reverse=True)  # the job is sorted by length before it is chunked
    assert sorted(i for m in sent for i, _ in m["kwargs"]["items"]) == list(range(25))
    assert job.status().total == 25


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"task": "summarization"}, UnsupportedTaskError, "5.x removed"),
        ({"task": "question-answering"}, UnsupportedTaskError, "not offered by the installed transformers"),
        ({"task": "image-classification"}, UnsupportedTaskError, "not a text task"),
        ({"task": "no-such-task"}, UnsupportedTaskError, "unknown task 'no-such-task'"),
        ({"model": "/no/such/model"}, ModelNotFoundError, "does not exist"),
        ({"model": "nobody/not-cached-model"}, ModelNotFoundError, "HF_HUB_OFFLINE"),
        ({"inputs": ["ok", ""]}, InputError, "<inputs>:2: text is empty"),
        ({"inputs": []}, InputError, "holds no items"),
    ],
)
def test_bad_submissions_store_nothing(
    client: Client,
    model_dir: Callable[[str], str],
    sqlite_url: str,
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    args: dict[str, Any] = {"inputs": ["fine"], "task": TASK, "model": model_dir(TASK), **kwargs}
    with pytest.raises(error, match=message):
        client.submit(args.pop("inputs"), **args)
    assert count_rows(sqlite_url, "jobs") == 0 and count_rows(sqlite_url, "items") == 0


def test_cancel_before_any_worker(client: Client, model_dir: Callable[[str], str]) -> None:
    job = client.submit(["a", "b", "c"], task=TASK, model=model_dir(TASK))
    assert job.cancel() == 3
    state = job.wait(timeout=5)
    assert (state.status, state.cancelled) == ("cancelled", 3)
    assert {r["status"] for r in job.results()} == {"cancelled"}


# ------------------------------------------------------------------------------ CLI


def run_cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli_app, args, env=env, input=stdin)


def test_cli_submit_wait_status_results(tmp_path: Path, settings: Settings, thread_worker: WorkerConfig) -> None:
    env = {"PIPEQ_BROKER_URL": settings.broker_url, "PIPEQ_DATABASE_URL": settings.database_url}
    src = tmp_path / "in.csv"
    src.write_text("id,text\n1,good\n2,bad\n3,我非常讨厌这个！\n", encoding="utf-8")
    out = run_cli(
        [
            "submit",
            str(src),
            "--task",
            "sentiment-analysis",
            "--model",
            thread_worker.key.model,
            "--wait",
            "--param",
            'function_to_apply="sigmoid"',
        ],
        env,
    )
    assert out.exit_code == 0, out.output
    job_id = out.stdout.strip().splitlines()[-1]
    assert len(job_id) == 32
    status = run_cli(["status", job_id, "--json"], env)
    assert json.loads(status.stdout)["done"] == 3
    for fmt in ("jsonl", "csv", "parquet"):
        target = tmp_path / f"out.{fmt}"
        res = run_cli(["results", job_id, "--format", fmt, "-o", str(target)], env)
        assert res.exit_code == 0, res.output
        assert target.stat().st_size > 0
    lines = [json.loads(x) for x in run_cli(["results", job_id], env).stdout.splitlines()]
    assert [r["id"] for r in lines] == ["1", "2", "3"] and all(r["status"] == "done" for r in lines)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == ["1", "2", "3"]


def test_cli_bad_file_names_line_and_queues_nothing(
    tmp_path: Path, settings: Settings, model_dir: Callable[[str], str]
) -> None:
    env = {"PIPEQ_BROKER_URL": settings.broker_url, "PIPEQ_DATABASE_URL": settings.database_url}
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"text": 3}\n')
    out = run_cli(["submit", str(src), "--task", TASK, "--model", model_dir(TASK)], env)
    assert out.exit_code == 2
    assert "bad.jsonl:2: field 'text' must be a string, got int" in out.output
    assert count_rows(settings.database_url, "jobs") == 0


def test_cli_param_parsing_and_stdin(settings: Settings, thread_worker: WorkerConfig) -> None:
    env = {"PIPEQ_BROKER_URL": settings.broker_url, "PIPEQ_DATABASE_URL": settings.database_url}
    out = run_cli(
        ["submit", "-", "--task", TASK, "--model", thread_worker.key.model, "--param", "top_k=2", "--wait"],
        env,
        stdin="one\ntwo\n",
    )
    assert out.exit_code == 0, out.output
    job_id = out.stdout.strip().splitlines()[-1]
    rows = [json.loads(x) for x in run_cli(["results", job_id], env).stdout.splitlines()]
    assert [len(r["output"]) for r in rows] == [2, 2]
    bad = run_cli(
        ["submit", "-", "--task", TASK, "--model", thread_worker.key.model, "--param", "oops"], env, stdin="x\n"
    )
    assert bad.exit_code == 2 and "--param expects KEY=VALUE" in bad.output


def test_cli_wait_exits_1_when_items_fail(settings: Settings, thread_worker: WorkerConfig) -> None:
    env = {"PIPEQ_BROKER_URL": settings.broker_url, "PIPEQ_DATABASE_URL": settings.database_url}
    # truncation=false: the over-long text fails in forward, the short ones finish.
    stdin = "short one\n" + "word " * 400 + "\nshort two\n"
    out = run_cli(
        ["submit", "-", "--task", TASK, "--model", thread_worker.key.model, "--param", "truncation=false", "--wait"],
        env,
        stdin=stdin,
    )
    assert out.exit_code == 1, out.output
    job_id = out.stdout.strip().splitlines()[-1]
    rows = [json.loads(x) for x in run_cli(["results", job_id], env).stdout.splitlines()]
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert rows[1]["error"].startswith("forward: ") and rows[1]["output"] is None


def test_precision_left_out_follows_the_live_workers(client: Client, model_dir: Callable[[str], str]) -> None:
    model = model_dir(TASK)
    assert client.submit(["a"], task=TASK, model=model).status().precision == "fp32", "no live worker: fp32"
    # A worker started with --precision auto chose bf16: a job that names no precision goes to it.
    client.store.register_worker(
        {"id": "w-auto", "host": "h", "pid": 1, "queue": ServeKey(TASK, model, "bf16").queue, "task": TASK,
         "model": model, "precision": "bf16", "device": "cpu", "status": "ready", "settings": {}}
    )  # fmt: skip
    assert client.submit(["a"], task=TASK, model=model).status().precision == "bf16"
    assert client.submit(["a"], task=TASK, model=model, precision="int8").status().precision == "int8"
