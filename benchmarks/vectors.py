"""Pooled embeddings in the store, JSON text against binary vectors: bytes per 1,000 texts, and the time
``pipeq results --format parquet`` takes to export 100,000 of them.

    python benchmarks/vectors.py                          # 1,000 texts for sizes, 100,000 vectors exported
    python benchmarks/vectors.py --n 300 --export-n 20000 --no-pg

The vectors are real: all-MiniLM-L6-v2 (fp32, ``pooling=mean``, ``normalize=true``) over ``--n``
English texts, run in this process by pipeq's runtime (``benchmarks/corpus.py`` texts). They are
written through pipeq's own store path (``Store.record_batches``, what a worker's writer calls) as

- ``json``: the list of floats in ``items.output``, what pipeq stored before vectors were binary;
- ``float32``, ``float16``: a ``pipeq.vectors.Vector`` in ``items.vector`` (``--param dtype=...``).

Sizes: the store with the job's items pending (inputs only) and again with every result written,
both compacted (SQLite ``VACUUM``: page count x page size; PostgreSQL ``VACUUM FULL`` then
``pg_total_relation_size('items')``, TOAST and indexes included). "results" is the growth per 1,000
texts, "whole items" the table (or SQLite file) per 1,000 with the inputs, "value" the average size
of the stored value itself (``length``; PostgreSQL ``pg_column_size``).

Page sizes (``--page-sizes``): SQLite stores are made with 16 KB pages (``pipeq.store.engine``); the
whole items table per 1,000 texts with float32 vectors for SQLite's default 4 KB and for 16 KB pages,
over texts of several lengths (the corpus's texts joined to about 200 to 8,000 characters), 4,000
items each, so that the fixed pages of the other tables weigh little.

Export: ``--export-n`` items (the real vectors over and over) in a SQLite store, then the wall time of
``python -m pipeq results JOB --format parquet -o FILE`` in a subprocess (interpreter start and imports
included). "json (before)" is a job stored as JSON whose export writes ``output`` as JSON text, as
pipeq did before; the others write the ``embedding`` column of ``fixed_size_list<float32>[384]``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import benchenv  # noqa: E402  (before torch)
import corpus  # noqa: E402
import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from pipeq import constants as C  # noqa: E402
from pipeq.demo import EMBEDDING_PARAMS, minilm_path  # noqa: E402
from pipeq.primitives import ItemResult  # noqa: E402
from pipeq.routing import ServeKey  # noqa: E402
from pipeq.store import Store, new_job_row  # noqa: E402
from pipeq.store import schema as db  # noqa: E402
from pipeq.vectors import Vector  # noqa: E402
from pipeq.worker.config import WorkerConfig  # noqa: E402
from pipeq.worker.engines.batched.runtime import PipelineRuntime  # noqa: E402
from pipeq.worker.loading import load_pipeline  # noqa: E402

TASK = "feature-extraction"
#: How each form is stored: (storage type for Vector.encode, or None for JSON; the job's params).
FORMS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "json": (None, EMBEDDING_PARAMS),
    "float32": ("float32", EMBEDDING_PARAMS),
    "float16": ("float16", {**EMBEDDING_PARAMS, "dtype": "float16"}),
}
#: Items per store write: a worker's writer commits up to 32 batches of 64 in one transaction.
WRITE_ITEMS = 2048


def embed(texts: list[str]) -> np.ndarray:
    """Real all-MiniLM-L6-v2 sentence vectors of ``texts`` (fp32, mean-pooled, normalized), as pipeq computes them."""
    model = minilm_path()
    pipe = load_pipeline(WorkerConfig(key=ServeKey(TASK, model, "fp32"), warmup=False)).pipe
    out: dict[int, Any] = {}
    for results, _ in PipelineRuntime(pipe, TASK).run(list(enumerate(texts)), EMBEDDING_PARAMS):
        out.update((r.idx, r.output) for r in results if r.status == C.ITEM_DONE)
    return np.stack([np.asarray(out[i]) for i in range(len(texts))])


def fill(store: Store, texts: list[str], n: int, form: str) -> str:
    """Store a job of ``n`` pending items (``texts`` repeated) with the parameters of ``form``; returns its id."""
    params = FORMS.get(form, (None, {}))[1]
    job_id = f"vectors-{form}".replace(" ", "-").replace("(", "").replace(")", "")[:32]
    rows = ({"job_id": job_id, "idx": i, "input_id": None, "input": texts[i % len(texts)], "status": "pending",
             "attempts": 0} for i in range(n))  # fmt: skip
    store.create_job(new_job_row(job_id, ServeKey(TASK, minilm_path()), params=params), _pages(rows))
    return job_id


def write_results(store: Store, job_id: str, vectors: np.ndarray, n: int, form: str) -> None:
    """Write every item's result (``vectors`` repeated) as ``form`` stores it, through the store's result write."""
    dtype = FORMS.get(form, (None, {}))[0]
    for start in range(0, n, WRITE_ITEMS):
        results = []
        for i in range(start, min(n, start + WRITE_ITEMS)):
            v = vectors[i % len(vectors)]
            output = v.tolist() if dtype is None else Vector.encode(v, dtype)
            results.append(ItemResult(i, C.ITEM_DONE, output=output, n_tokens=1))
        store.record_batches(job_id, [(results, None)], worker_id=None, model_revision=None, precision="fp32",
                             device="cpu")  # fmt: skip


def _pages(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    for row in rows:
        page.append(row)
        if len(page) >= C.INSERT_BATCH_ROWS:
            yield page
            page = []
    if page:
        yield page


def _sqlite_bytes(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM")
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
    engine.dispose()
    return int(pages) * int(size)


def _pg_bytes(url: str) -> int:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM FULL items")
        size = conn.exec_driver_sql("SELECT pg_total_relation_size('items')").scalar_one()
    engine.dispose()
    return int(size)


def _value_bytes(url: str, pg: bool) -> float:
    size = "pg_column_size" if pg else "length"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        value = conn.exec_driver_sql(f"SELECT avg(coalesce({size}(vector), {size}(output))) FROM items").scalar_one()
    engine.dispose()
    return float(value)


def sizes(url: str, texts: list[str], vectors: np.ndarray, form: str, pg: bool) -> dict[str, float]:
    db.upgrade(url)
    n = len(texts)
    measure = _pg_bytes if pg else _sqlite_bytes
    with Store(url) as store:
        job_id = fill(store, texts, n, form)
        before = measure(url)
        write_results(store, job_id, vectors, n, form)
    after = measure(url)
    return {
        "results_mb_per_1000": (after - before) / n * 1000 / 1e6,
        "whole_mb_per_1000": after / n * 1000 / 1e6,
        "value_bytes": _value_bytes(url, pg),
    }


@contextmanager
def sqlite_url(work: Path, name: str) -> Iterator[str]:
    path = work / f"{name}.db"
    yield f"sqlite:///{path}"
    path.unlink(missing_ok=True)


def page_size_table(texts: list[str], vectors: np.ndarray, work: Path, page_sizes: list[int]) -> None:
    """Print the whole SQLite file per 1,000 float32 results for each page size and text length."""
    n = 4000
    print(f"\n| mean text chars | {' | '.join(f'{p // 1024} KB pages, MB / 1,000' for p in page_sizes)} |")
    print(f"| --- | {' | '.join('---' for _ in page_sizes)} |")
    for chars in (200, 1000, 3000, 8000):
        long = _texts_of(texts, chars, n)
        row = []
        for page_size in page_sizes:
            path = work / f"pages-{page_size}-{chars}.db"
            with closing(sqlite3.connect(path)) as conn:  # the file's first table fixes its page size
                conn.execute(f"PRAGMA page_size={page_size}")
                conn.execute("CREATE TABLE made_before (x INTEGER)")
                conn.commit()
            url = f"sqlite:///{path}"
            db.upgrade(url)
            with Store(url) as store:
                job_id = fill(store, long, n, "float32")
                write_results(store, job_id, vectors, n, "float32")
            row.append(f"{_sqlite_bytes(url) / n * 1000 / 1e6:.2f}")
            path.unlink()
        mean = np.mean([len(t) for t in long])
        print(f"| {mean:,.0f} | {' | '.join(row)} |", flush=True)


def _texts_of(texts: list[str], chars: int, n: int) -> list[str]:
    """``n`` texts of about ``chars`` characters on average (uneven: exponentially distributed), from ``texts``."""
    rng = np.random.default_rng(0)
    joined = " ".join(texts)
    out = []
    for _ in range(n):
        size = max(10, int(rng.exponential(chars)))
        start = int(rng.integers(0, max(1, len(joined) - size)))
        out.append(joined[start : start + size])
    return out


def export_seconds(work: Path, texts: list[str], vectors: np.ndarray, n: int, form: str) -> float:
    """Wall seconds of ``pipeq results --format parquet`` over ``n`` stored vectors (checked: ``n`` rows written)."""
    with sqlite_url(work, f"export-{form.split()[0]}-{len(form)}") as url:
        db.upgrade(url)
        with Store(url) as store:
            job_id = fill(store, texts, n, form)
            write_results(store, job_id, vectors, n, "json" if form.startswith("json") else form)
        target = work / "export.parquet"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "pipeq", "-q", "results", job_id, "--format", "parquet", "-o", str(target),
               "--database-url", url]  # fmt: skip
        began = time.perf_counter()
        proc = subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - began
        if f"wrote {n:,} rows" not in proc.stderr:
            raise SystemExit(f"pipeq results did not write {n:,} rows: {proc.stderr}")
        target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="texts embedded and stored for the sizes")
    parser.add_argument("--export-n", type=int, default=100_000, help="vectors exported to Parquet")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--no-sizes", action="store_true", help="only the export")
    parser.add_argument("--page-sizes", default="4096,16384", help="SQLite page sizes compared ('' to skip)")
    args = parser.parse_args()
    texts = corpus.english(args.n)
    vectors = embed(texts)
    print(f"{len(texts)} texts, {vectors.shape[1]} dimensions, {np.mean([len(t) for t in texts]):.0f} chars on average")
    print("\n| store | form | results MB / 1,000 texts | whole items MB / 1,000 | stored value, bytes |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for form in FORMS if not args.no_sizes else ():
            with sqlite_url(work, f"size-{form}") as url:
                f = sizes(url, texts, vectors, form, pg=False)
            print(f"| SQLite | {form} | {f['results_mb_per_1000']:.2f} | {f['whole_mb_per_1000']:.2f} | "
                  f"{f['value_bytes']:,.0f} |", flush=True)  # fmt: skip
        if not args.no_pg and not args.no_sizes:
            for form in FORMS:
                with benchenv.fresh_pg_database("pipeq_vectors") as url:
                    f = sizes(url, texts, vectors, form, pg=True)
                print(f"| PostgreSQL | {form} | {f['results_mb_per_1000']:.2f} | {f['whole_mb_per_1000']:.2f} | "
                      f"{f['value_bytes']:,.0f} |", flush=True)  # fmt: skip
        if args.page_sizes:
            page_size_table(texts, vectors, work, [int(p) for p in args.page_sizes.split(",")])
        print(f"\n| export of {args.export_n:,} vectors to Parquet (SQLite store) | seconds |")
        print("| --- | --- |")
        for form in ("json (before)", *FORMS):
            print(f"| {form} | {export_seconds(work, texts, vectors, args.export_n, form):.1f} |", flush=True)


if __name__ == "__main__":
    main()
