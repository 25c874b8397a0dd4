"""The README's sentiment examples, run command for command, with the hub models swapped for local ones."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeq.models.store import Store
from pipeq.routing import ServeKey

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_MODELS = (
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
    "uer/roberta-base-finetuned-dianping-chinese",
)


def example_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("### Examples: English and Chinese sentiment", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def run_block(block: str, *, cwd: Path, env: dict[str, str], start_worker: Any, store: Store) -> list[str]:
    """Carry out one README block: heredocs become files, `pipeq ... &` a worker, the rest CLI calls."""
    outputs: list[str] = []
    job_id = None
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
        assert args[0] == "pipeq", line
        if args[-1] == "&":
            worker = start_worker(
                *args[2:-1], broker_url=env["PIPEQ_BROKER_URL"], database_url=env["PIPEQ_DATABASE_URL"]
            )
            i = args.index("--model")
            worker.wait_ready(
                store, ServeKey("text-classification", args[i + 1], args[args.index("--precision") + 1]).queue
            )
            continue
        proc = subprocess.run(
            [sys.executable, "-m", "pipeq", *args[1:]], cwd=cwd, env={**os.environ, **env},
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
        if args[1] == "submit":
            job_id = proc.stdout.strip().splitlines()[-1]
        outputs.append(proc.stdout)
    return outputs


def test_readme_sentiment_examples(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    import shutil

    local = {hub: str(shutil.copytree(model_dir("text-classification"), tmp_path / f"model{i}")) for i, hub in
             enumerate(HUB_MODELS)}  # fmt: skip
    url = f"sqlite:///{tmp_path / 'pipeq.db'}"
    env = {"PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": url}
    english, chinese = example_blocks()
    for hub, path in local.items():
        english, chinese = english.replace(hub, path), chinese.replace(hub, path)
    store = Store(url)
    run_block(english, cwd=tmp_path, env=env, start_worker=start_worker, store=store)
    with open(tmp_path / "sentiment_en.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"] and {r["status"] for r in rows} == {"done"}
    assert all(json.loads(r["output"])["label"] for r in rows)
    *_, results = run_block(chinese, cwd=tmp_path, env=env, start_worker=start_worker, store=store)
    rows = [json.loads(line) for line in results.splitlines()]
    assert [r["id"] for r in rows] == ["z1", "z2", "z3"] and {r["status"] for r in rows} == {"done"}
    int8 = store.live_workers(ServeKey("text-classification", local[HUB_MODELS[1]], "int8").queue)
    assert {w["quantization"] for w in int8} == {"torch-dynamic-int8"}
