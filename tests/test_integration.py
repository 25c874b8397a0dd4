"""End to end on real services: Redis broker, PostgreSQL (and SQLite) store, real ``pipeq worker`` processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from transformers import pipeline

from pipeq import Client, Settings
from pipeq.producer.writers import COLUMNS
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.worker.loading import local_revision
from test_runtime import assert_close

pytestmark = pytest.mark.integration

TASK = "text-classification"
TEXTS = [
    "I've been waiting for a HuggingFace course my whole life.",
    "I hate this so much!",
    "我一直都在等待 HuggingFace 课程。",
    "我非常讨厌这个！",
    "ok",
    "word " * 400,  # over the model's maximum: truncated and flagged
] * 20


def cli(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeq", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out = list(conn.execute(sa.text(sql), params).mappings())
    engine.dispose()
    return out


def test_cli_end_to_end_on_postgres_and_redis(
    tmp_path: Path, pg_url: str, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    # Given a real worker serving the model on Redis, with PostgreSQL as the store
    model = model_dir(TASK)
    env = {"PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": pg_url}
    worker = start_worker(
        "--task",
        "sentiment-analysis",
        "--model",
        model,
        "--precision",
        "fp32",
        "--max-batch-size",
        "16",
        broker_url=redis_url,
        database_url=pg_url,
    )
    store = Store(pg_url)
    worker.wait_ready(store, ServeKey(TASK, model).queue)
    src = tmp_path / "reviews.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(TEXTS)),
        encoding="utf-8",
    )
    # When a job is submitted through the CLI and waited for
    out = cli("submit", str(src), "--task", "sentiment-analysis", "--model", model, "--wait", env=env)
    assert out.returncode == 0, out.stderr + worker.log()[-3000:]
    job_id = out.stdout.strip().splitlines()[-1]
    # Then every item is stored once, done, with what transformers itself returns
    items = rows(pg_url, "select * from items where job_id = :j order by idx", j=job_id)
    assert [r["idx"] for r in items] == list(range(len(TEXTS)))
    assert {r["status"] for r in items} == {"done"}
    want = pipeline(TASK, model=model)(TEXTS, truncation=True)
    assert_close([r["output"] for r in items], json.loads(json.dumps(want)))
    assert [r["truncated"] for r in items] == [t.startswith("word") for t in TEXTS]
    assert [r["input_id"] for r in items] == [f"r{i}" for i in range(len(TEXTS))]
    # with timing per micro-batch, linked from each item
    batches = rows(pg_url, "select * from batches where job_id = :j", j=job_id)
    assert sum(b["size"] for b in batches) == len(TEXTS) and all(b["size"] <= 16 for b in batches)
    assert all(b["forward_ms"] > 0 and b["padded_tokens"] >= b["real_tokens"] > 0 for b in batches)
    assert {r["batch_id"] for r in items} == {b["id"] for b in batches}
    job = Store(pg_url).job_row(job_id)
    assert job is not None
    assert (job["status"], job["n_done"], job["n_failed"], job["total"]) == ("done", 120, 0, 120)
    assert job["started_at"] is not None and job["finished_at"] >= job["started_at"]
    # and the worker recorded its footprint and load time
    workers = rows(pg_url, "select * from workers")
    assert workers[0]["footprint_bytes"] > 0 and workers[0]["load_seconds"] > 0
    assert workers[0]["precision"] == "fp32" and workers[0]["status"] == "ready"
    # And results come back as CSV in input order
    csv_out = cli("results", job_id, "--format", "csv", env=env)
    assert csv_out.returncode == 0
    assert csv_out.stdout.splitlines()[0] == ",".join(COLUMNS)  # timing spread into columns of its own
    assert len(csv_out.stdout.splitlines()) == len(TEXTS) + 1
    status = json.loads(cli("status", job_id, "--json", env=env).stdout)
    assert status["done"] == 120 and status["pending"] == 0


def test_python_api_int8_on_sqlite(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert cli("db", "upgrade", env={"PIPEQ_DATABASE_URL": url}).returncode == 0
    model = model_dir(TASK)
    worker = start_worker(
        "--task",
        TASK,
        "--model",
        model,
        "--precision",
        "int8",
        "--concurrency",
        "2",
        broker_url=redis_url,
        database_url=url,
    )
    store = Store(url)
    worker.wait_ready(store, ServeKey(TASK, model, "int8").queue)
    with Client(Settings(broker_url=redis_url, database_url=url, chunk_size=16)) as client:
        job = client.submit(
            [{"text": t, "id": i} for i, t in enumerate(TEXTS)],
            task=TASK,
            model=model,
            precision="int8",
            params={"top_k": 2},
        )
        state = job.wait(timeout=120)
        results = list(job.results())
    assert (state.status, state.done, state.failed) == ("done", len(TEXTS), 0)
    # A local folder's revision names its files (both pool children loaded the same ones).
    assert {r["timing"]["model_revision"] for r in results} == {local_revision(model)}
    assert all(len(r["output"]) == 2 for r in results)
    live = store.live_workers(ServeKey(TASK, model, "int8").queue)
    assert {w["quantization"] for w in live} == {"torch-dynamic-int8"}


def test_custom_pipeline_class(
    tmp_path: Path, pg_url: str, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    # The seed's PairClassificationPipeline, registered by the worker under its own task name.
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pairs.py").write_text(
        textwrap.dedent("""
        import numpy as np
        from transformers import Pipeline

        def softmax(outputs):
            maxes = np.max(outputs, axis=-1, keepdims=True)
            shifted_exp = np.exp(outputs - maxes)
            return shifted_exp / shifted_exp.sum(axis=-1, keepdims=True)

        class PairClassificationPipeline(Pipeline):
            def _sanitize_parameters(self, **kwargs):
                preprocess_kwargs = {}
                if "second_text" in kwargs:
                    preprocess_kwargs["second_text"] = kwargs["second_text"]
                return preprocess_kwargs, {}, {}

            def preprocess(self, text, second_text=None):
                return self.tokenizer(text, text_pair=second_text, return_tensors="pt")

            def _forward(self, model_inputs):
                return self.model(**model_inputs)

            def postprocess(self, model_outputs):
                logits = model_outputs.logits[0].float().numpy()
                probabilities = softmax(logits)
                best_class = np.argmax(probabilities)
                label = self.model.config.id2label[best_class]
                score = probabilities[best_class].item()
                return {"label": label, "score": score, "logits": logits.tolist()}
    """)
    )
    model = model_dir(TASK)
    worker = start_worker(
        "--task",
        "pair-classification",
        "--model",
        model,
        "--precision",
        "fp32",
        "--pipeline-class",
        "userpkg.pairs:PairClassificationPipeline",
        "--model-class",
        "transformers:AutoModelForSequenceClassification",
        broker_url=redis_url,
        database_url=pg_url,
        extra_env={"PYTHONPATH": str(tmp_path)},
    )
    store = Store(pg_url)
    worker.wait_ready(store, ServeKey("pair-classification", model).queue)
    with Client(Settings(broker_url=redis_url, database_url=pg_url)) as client:
        job = client.submit(
            ["a cat sat on the mat", "我非常讨厌这个！"],
            task="pair-classification",
            model=model,
            params={"second_text": "a cat was sitting"},
        )
        assert job.wait(timeout=60).done == 2
        outputs = [r["output"] for r in job.results()]
    assert all(set(o) == {"label", "score", "logits"} and o["label"] in {"alpha", "beta", "gamma"} for o in outputs)


def test_worker_start_errors_are_clear(tmp_path: Path) -> None:
    env = {"PIPEQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PIPEQ_BROKER_URL": "memory://"}
    out = cli("worker", "--task", "summarization", "--model", str(tmp_path), env=env)
    assert out.returncode == 2 and "5.x removed" in out.stderr
    out = cli("worker", "--task", TASK, "--model", str(tmp_path / "missing"), env=env)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = cli("worker", "--task", TASK, "--model", str(tmp_path), "--precision", "int4", env=env)
    assert out.returncode == 2 and "unknown precision 'int4'" in out.stderr
    out = cli("worker", "--task", TASK, "--model", str(tmp_path), "--device", "gpu0", env=env)
    assert out.returncode == 2 and "unknown device 'gpu0'" in out.stderr
    # This machine's torch is a CPU build: a CUDA device is refused before anything loads.
    (tmp_path / "config.json").write_text("{}")
    out = cli("worker", "--task", TASK, "--model", str(tmp_path), "--precision", "fp16", "--device", "cuda:0", env=env)
    assert out.returncode == 2 and "cuda:0 asked for, but torch sees no CUDA device" in out.stderr


def test_worker_flag_and_model_errors_come_before_torch_and_transformers_are_imported(
    tmp_path: Path, model_dir: Callable[[str], str]
) -> None:
    # Given a worker command with one mistake each (importing transformers' pipelines takes seconds)
    bad = {
        "unknown precision 'int4'": ["--model", model_dir(TASK), "--precision", "int4"],
        "does not exist": ["--model", str(tmp_path / "missing")],
        "unknown device 'gpu0'": ["--model", model_dir(TASK), "--device", "gpu0"],
        "nothing to compare": ["--model", model_dir(TASK), "--precision", "fp32", "--shadow-fraction", "0.1"],
    }
    script = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from pipeq.cli import app
        result = CliRunner().invoke(app, ["worker", "--task", "text-classification", *sys.argv[1:]])
        heavy = sorted(m for m in ("torch", "transformers.pipelines") if m in sys.modules)
        print(result.exit_code, heavy, result.output.replace("\\n", " "))
        """
    )
    env = {**os.environ, "PIPEQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PIPEQ_BROKER_URL": "memory://"}
    for error, args in bad.items():
        # When the command runs
        out = subprocess.run(
            [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120
        )
        # Then it exits 2 with its error, and neither torch nor transformers' pipelines were imported
        assert out.stdout.startswith("2 [] ") and error in out.stdout, (error, out.stdout, out.stderr[-2000:])


def test_worker_that_cannot_load_its_model_exits_2(tmp_path: Path, model_dir: Callable[[str], str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir(TASK), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    env = {"PIPEQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PIPEQ_BROKER_URL": "memory://"}
    assert cli("db", "upgrade", env=env).returncode == 0
    out = cli("worker", "--task", TASK, "--model", str(broken), "--precision", "fp32", env=env, timeout=120)
    assert out.returncode == 2
    assert "could not load its pipeline" in out.stderr and "SafetensorError" in out.stderr
    statuses = {r["status"] for r in rows(env["PIPEQ_DATABASE_URL"], "select status from workers")}
    assert statuses == {"failed"}


def test_hub_model_from_the_cache_offline_records_its_revision(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    # Given a hub id that exists only in a local Hugging Face cache, and no network (HF_HUB_OFFLINE=1)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--pipeq-tests--tiny-classifier"
    shutil.copytree(model_dir(TASK), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    env = {
        "PIPEQ_BROKER_URL": redis_url,
        "PIPEQ_DATABASE_URL": url,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
    }
    assert cli("db", "upgrade", env=env).returncode == 0
    worker = start_worker(
        "--task",
        TASK,
        "--model",
        "pipeq-tests/tiny-classifier",
        "--precision",
        "fp32",
        broker_url=redis_url,
        database_url=url,
        extra_env={"HF_HUB_CACHE": env["HF_HUB_CACHE"]},
    )
    worker.wait_ready(Store(url), ServeKey(TASK, "pipeq-tests/tiny-classifier").queue)
    # When a job names the hub id
    out = cli(
        "submit", "-", "--task", TASK, "--model", "pipeq-tests/tiny-classifier", "--wait", env=env, stdin="good\nbad\n"
    )
    assert out.returncode == 0, out.stderr
    # Then it runs, and every result records the commit it was computed with
    results = [json.loads(x) for x in cli("results", out.stdout.split()[-1], env=env).stdout.splitlines()]
    assert [r["status"] for r in results] == ["done", "done"]
    assert {r["timing"]["model_revision"] for r in results} == {commit}
    assert rows(url, "select resolved_revision from workers")[0]["resolved_revision"] == commit
    # And an uncached hub id is refused at the door
    missing = cli("submit", "-", "--task", TASK, "--model", "pipeq-tests/not-cached", env=env, stdin="x\n")
    assert missing.returncode == 2 and "HF_HUB_OFFLINE" in missing.stderr
