"""The README's tour and the manual's examples, run command for command, with the hub models swapped for local ones."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeq import Client, Settings
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.tasks import normalize_task

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"
TOUR = "Five-minute tour"
SENTIMENT = "Examples: English and Chinese sentiment"
CUSTOM = "Example: a custom pipeline (pair classification)"
EN_MODEL = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
ZH_MODEL = "uer/roberta-base-finetuned-dianping-chinese"
MRPC_MODEL = "sgugger/finetuned-bert-mrpc"
TINY_LABELS = {"alpha", "beta", "gamma"}


def code_blocks(title: str, lang: str = "bash", doc: Path = README) -> list[str]:
    """The ``lang`` code blocks of the section of ``doc`` (the README, or a page of docs/) that starts with ``## title``
    or ``### title``, up to the next heading."""
    section = re.split(rf"\n###? {re.escape(title)}", doc.read_text(), maxsplit=1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def run_block(block: str, *, cwd: Path, env: dict[str, str], start_worker: Any, store: Store) -> list[str]:
    """Carry out one README block: heredocs become files, `pipeq ... &` a worker, the rest CLI calls.

    ``NAME=value`` before a command sets that variable for it (a relative PYTHONPATH is taken from
    ``cwd``, where a user would run the block). Returns the stdout of each CLI call.
    """
    outputs: list[str] = []
    job_id = None
    starting: list[tuple[Any, str]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if heredoc := re.match(r"cat > (\S+) <<'(\w+)'", line):
            body = []
            for inner in lines:
                if inner == heredoc.group(2):
                    break
                body.append(inner + "\n")
            (cwd / heredoc.group(1)).write_text("".join(body), encoding="utf-8")
            continue
        args = shlex.split(line.replace("JOB", job_id or "JOB"))
        extra_env: dict[str, str] = {}
        while re.fullmatch(r"[A-Z_]+=.*", args[0]):
            name, value = args.pop(0).split("=", 1)
            extra_env[name] = str((cwd / value).resolve()) if name == "PYTHONPATH" else value
        assert args[0] == "pipeq", line
        if args[-1] == "&":
            worker = start_worker(
                *args[2:-1],
                broker_url=env["PIPEQ_BROKER_URL"],
                database_url=env["PIPEQ_DATABASE_URL"],
                extra_env=extra_env,
            )
            key = ServeKey(
                normalize_task(args[args.index("--task") + 1]),
                args[args.index("--model") + 1],
                args[args.index("--precision") + 1],
            )
            starting.append((worker, key.queue))
            continue
        for worker, queue in starting:  # the workers of a block start side by side
            worker.wait_ready(store, queue)
        starting.clear()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeq", *args[1:]], cwd=cwd, env={**os.environ, **env, **extra_env},
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
        if args[1] == "submit":
            job_id = proc.stdout.strip().splitlines()[-1]
        outputs.append(proc.stdout)
    assert not starting, "a block started workers it never used"
    return outputs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_readme_tour(tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any) -> None:
    # Given: the README's tour, its hub model replaced by a copy of the tiny classifier
    (block,) = code_blocks(TOUR)
    model = str(shutil.copytree(model_dir("text-classification"), tmp_path / "model"))
    url = f"sqlite:///{tmp_path / 'pipeq.db'}"
    env = {"PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": url}
    store = Store(url)

    # When: it runs as written: migrate, an int8 worker, submit, watch, results, report
    _, submitted, watched, _, report = run_block(
        block.replace(EN_MODEL, model), cwd=tmp_path, env=env, start_worker=start_worker, store=store
    )

    # Then: the watch returned once the job was done, and results.csv has every review, in input order
    job_id = submitted.strip().splitlines()[-1]
    assert store.job(job_id).status == "done", watched
    rows = read_csv(tmp_path / "results.csv")
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"] and {r["status"] for r in rows} == {"done"}
    assert all(json.loads(r["output"])["label"] in TINY_LABELS for r in rows)
    assert all(float(r["forward_ms"]) > 0 for r in rows)
    (worker,) = store.live_workers(ServeKey("text-classification", model, "int8").queue)
    assert {r["worker_id"] for r in rows} == {worker["id"]} and worker["quantization"] == "torch-dynamic-int8"
    # And: the report sums up the job: its three items done, its batches and where they ran
    assert f"job {job_id} [text-classification int8] done" in report, report
    assert "items: 3 total, 3 done, 0 failed" in report and "quantization torch-dynamic-int8" in report, report


def test_readme_sentiment_examples(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    # Given: the getting-started page's two blocks, each hub model replaced by its own copy of the tiny classifier
    local = {
        hub: str(shutil.copytree(model_dir("text-classification"), tmp_path / f"model{i}"))
        for i, hub in enumerate((EN_MODEL, ZH_MODEL))
    }
    url = f"sqlite:///{tmp_path / 'pipeq.db'}"
    env = {"PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": url}
    english, chinese = code_blocks(SENTIMENT, doc=DOCS / "getting-started.md")
    for hub, path in local.items():
        english, chinese = english.replace(hub, path), chinese.replace(hub, path)
    assert {f"--precision {p} &" in block for p in ("fp32", "int8") for block in (english, chinese)} == {True}
    store = Store(url)

    # When: both blocks run as written (four workers, four jobs)
    run_block(english, cwd=tmp_path, env=env, start_worker=start_worker, store=store)
    run_block(chinese, cwd=tmp_path, env=env, start_worker=start_worker, store=store)

    # Then: every variant finished every review, in input order, on a worker of its own precision
    results = {
        ("en", "fp32"): read_csv(tmp_path / "sentiment_en_fp32.csv"),
        ("en", "int8"): read_csv(tmp_path / "sentiment_en_int8.csv"),
        ("zh", "fp32"): read_jsonl(tmp_path / "sentiment_zh_fp32.jsonl"),
        ("zh", "int8"): read_jsonl(tmp_path / "sentiment_zh_int8.jsonl"),
    }
    for (lang, precision), rows in results.items():
        model = local[EN_MODEL if lang == "en" else ZH_MODEL]
        workers = store.live_workers(ServeKey("text-classification", model, precision).queue)
        assert len(workers) == 1, (lang, precision, workers)
        (worker,) = workers
        want_ids = ["r1", "r2", "r3"] if lang == "en" else ["z1", "z2", "z3"]
        assert [r["id"] for r in rows] == want_ids and {r["status"] for r in rows} == {"done"}
        outputs = [json.loads(r["output"]) if lang == "en" else r["output"] for r in rows]
        assert {o["label"] for o in outputs} <= TINY_LABELS and all(0 < o["score"] <= 1 for o in outputs)
        ran_on = {r["worker_id"] if lang == "en" else r["timing"]["worker_id"] for r in rows}
        assert ran_on == {worker["id"]}, (lang, precision)
        assert worker["precision"] == precision
        # int8 on the CPU is torch dynamic quantization (bitsandbytes is CUDA's); fp32 is the weights as saved
        assert worker["quantization"] == {"int8": "torch-dynamic-int8", "fp32": "none"}[precision]


def test_readme_custom_pipeline_example(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    # Given: the tasks page's PairClassificationPipeline saved as pairs.py where its commands run, and
    # its MRPC model replaced by a local classifier
    (code,) = code_blocks(CUSTOM, "python", doc=DOCS / "tasks.md")
    (tmp_path / "pairs.py").write_text(code, encoding="utf-8")
    (block,) = code_blocks(CUSTOM, "bash", doc=DOCS / "tasks.md")
    model = str(shutil.copytree(model_dir("text-classification"), tmp_path / "mrpc"))
    url = f"sqlite:///{tmp_path / 'pipeq.db'}"
    env = {"PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "pipeq", "-q", "db", "upgrade"], env={**os.environ, **env}, check=True)
    store = Store(url)

    # When: the block runs as written: a worker serving pairs.py, a job of text pairs
    *_, results = run_block(
        block.replace(MRPC_MODEL, model), cwd=tmp_path, env=env, start_worker=start_worker, store=store
    )

    # Then: each pair got what postprocess returns, computed on both texts of the pair
    rows = [json.loads(line) for line in results.splitlines()]
    assert [r["id"] for r in rows] == ["p1", "p2"] and {r["status"] for r in rows} == {"done"}
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    for row, pair in zip(rows, pairs, strict=True):
        out = row["output"]
        assert set(out) == {"label", "score", "logits"} and out["label"] in TINY_LABELS
        assert out["logits"] == pytest.approx(pair_logits(model, pair["text"], pair["other"]), abs=1e-4)
        assert out["score"] == pytest.approx(softmax_max(out["logits"]), abs=1e-6)

    # And: the class's own `second_text` parameter (the page's alternative) gives the same result
    with Client(Settings(broker_url=redis_url, database_url=url)) as client:
        job = client.submit(
            [pairs[1]["text"]], task="pair-classification", model=model, params={"second_text": pairs[1]["other"]}
        )
        assert job.wait(timeout=60).done == 1
        (same,) = [r["output"] for r in job.results()]
    assert same["logits"] == pytest.approx(rows[1]["output"]["logits"], abs=1e-4)


def pair_logits(model: str, text: str, other: str) -> list[float]:
    """The model's logits for one sentence pair, straight from transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    classifier = AutoModelForSequenceClassification.from_pretrained(model).eval()
    with torch.no_grad():
        logits = classifier(**tokenizer(text, text_pair=other, return_tensors="pt")).logits[0]
    return [float(x) for x in logits]


def softmax_max(logits: list[float]) -> float:
    import math

    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return max(exps) / sum(exps)
