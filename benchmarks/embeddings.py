"""Embedding jobs: per-token feature-extraction against pooled sentence vectors, end to end.

    python benchmarks/embeddings.py            # 1,000 English texts, all-MiniLM-L6-v2, int8, 2 workers
    python benchmarks/embeddings.py --n 300 --precision bf16 --workers 1

For each output form it prints texts/s from submit to the last committed result, the store's size
per 1,000 texts, and the worker children's share of busy time spent in SQL writes; and the
in-process ceiling (pipeq's runtime over the same texts, no queue, no SQL). Needs Redis on localhost
(database 13); the store is SQLite in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import corpus
import run  # sets the environment (offline Hub, quiet logs) before pipeq loads transformers

from pipeq import Client, Settings
from pipeq.demo import EMBEDDING_PARAMS, minilm_path
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import load_pipeline

TASK = "feature-extraction"
FORMS = {"per-token": {}, "pooled": EMBEDDING_PARAMS}


def ceiling(model: str, precision: str, texts: list[str], params: dict[str, object]) -> float:
    """Texts/s of pipeq's runtime in this process (after one warm-up pass)."""
    pipe = load_pipeline(WorkerConfig(key=ServeKey(TASK, model, precision), warmup=False)).pipe
    rt = PipelineRuntime(pipe, TASK)
    for _ in rt.run(list(enumerate(texts[:64])), params):
        pass
    t0 = time.perf_counter()
    for _ in rt.run(list(enumerate(texts)), params):
        pass
    return run.rate(len(texts), time.perf_counter() - t0)


def end_to_end(
    model: str, precision: str, texts: list[str], params: dict[str, object], workers: int, work: Path
) -> dict[str, float]:
    path = work / f"store-{time.time_ns()}.db"
    url = f"sqlite:///{path}"
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    proc, store, live = run.start_worker(model, precision, url, "--threads", threads, workers=workers, task=TASK)
    try:
        with Client(Settings(broker_url=run.REDIS, database_url=url)) as client:
            state, elapsed = run.run_job(client, texts, task=TASK, model=model, precision=precision, params=params)
        if state.done != len(texts):
            raise SystemExit(f"job ended {state.status} with {state.failed} failed")
    finally:
        run.stop_worker(proc)
    ids = {w["id"] for w in live}
    rows = [w for w in run._all_workers(store) if w["id"] in ids]
    store.close()
    busy = sum(w["busy_seconds"] or 0.0 for w in rows)
    return {
        "rate": run.rate(len(texts), elapsed),
        "store_mb_per_1000": path.stat().st_size / 1e6 * 1000 / len(texts),
        "sql_share": sum(w["write_seconds"] or 0.0 for w in rows) / busy if busy else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    model, texts = minilm_path(), corpus.english(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        for form, params in FORMS.items():
            figures = {"form": form, "ceiling": ceiling(model, args.precision, texts, params)}
            figures.update(end_to_end(model, args.precision, texts, params, args.workers, Path(tmp)))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}), flush=True)


if __name__ == "__main__":
    main()
