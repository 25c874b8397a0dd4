"""The whole job as a user waits for it: ``pipeq submit FILE --wait``, an id on every record, timed from
the command's start to its exit, beside the best loop a user could write in one process.

    python benchmarks/wholejob.py                                  # DistilBERT-sized fp32, MiniLM int8, tiny
    python benchmarks/wholejob.py --models distilbert --stores sqlite --layouts 1x2,2x1
    python benchmarks/wholejob.py --million                        # 100,000 and 1,000,000 items, tiny model
    python benchmarks/wholejob.py --results benchmarks/RESULTS.md  # replace the wholejob block there

Texts: English paragraphs of uneven length with a long tail (benchmarks/corpus.py), written as JSON Lines
with an ``"id"`` on every record; the length distribution in tokens is printed with the results. Models:

- ``distilbert``: DistilBERT-base sized classifier (random weights), fp32;
- ``minilm``: the real all-MiniLM-L6-v2 encoder with a classification head, int8 (dynamic quantization);
- ``tiny``: a 1-layer, 64-wide BERT (random weights): the model costs little, so pipeq's own path shows.

For each model and store, in turns: (A) the in-process loop, (B) pipeq's whole job, (A) again, and so on
(``--rounds``). The loop is what a careful user writes around the model in one process: tokenize every text
once (truncated at --max-length), sort the whole input by token length, cut batches by the worker's own
token budget, pad, forward under ``inference_mode``, softmax and top label per text. Its clock counts the
tokenizing. (B) runs against one ``pipeq worker`` started (and warmed) beforehand on a fresh store, as a
user's fleet is; its clock starts when ``pipeq submit`` is started and stops when it exits.
ratio = B / mean(the A before it, the A after it): this machine drifts 10-30% within minutes.

Also printed per whole job: the seconds until the job was stored and published ("submit s"), and the
padding efficiency of its batches (real / padded tokens, from the store's batch rows).

``--million`` times each step of a large job on the near-free model, at 100,000 and 1,000,000 items on
each store: ``pipeq submit`` (its peak RSS), the worker's run (submit's end to the job's last result; the
worker's peak RSS, pool children included), ``pipeq results --format parquet``, ``pipeq report``, and
the store's size; then the cost per item at 1M over that at 100k (linear: 1.0).

Needs Redis (database 11 unless PIPEQ_BENCH_WHOLEJOB_REDIS_URL says otherwise) and a PostgreSQL server
where databases may be created (PIPEQ_BENCH_PG_URL). Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchenv  # noqa: E402  (before torch)
import corpus  # noqa: E402
import torch  # noqa: E402

from pipeq import constants as C  # noqa: E402
from pipeq.demo import minilm_path  # noqa: E402
from pipeq.store import Store  # noqa: E402
from pipeq.store import schema as db  # noqa: E402

TASK = "text-classification"
REDIS = os.environ.get("PIPEQ_BENCH_WHOLEJOB_REDIS_URL", "redis://127.0.0.1:6379/11")
PIPEQ = [sys.executable, "-m", "pipeq", "-q"]
MODELS = {"distilbert": "fp32", "minilm": "int8", "tiny": "fp32"}
BEGIN, END = "<!-- wholejob:begin -->", "<!-- wholejob:end -->"


# ----------------------------------------------------------------- inputs


def build_model(root: Path, name: str, max_length: int) -> str:
    """Save model ``name`` with the real MiniLM fast tokenizer (truncating at ``max_length``) under ``root``."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    folder = root / name
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.model_max_length = max_length
    labels = {"id2label": {0: "NEGATIVE", 1: "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}
    torch.manual_seed(0)
    model: Any
    if name == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=len(tok), **labels))
    elif name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), dtype=torch.float32, **labels)
    elif name == "tiny":
        small = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}
        model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), **small, **labels))
    else:
        raise SystemExit(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
    return path


def token_lengths(model: str, texts: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [len(ids) for ids in tok(texts, truncation=False, add_special_tokens=True)["input_ids"]]


def describe(lengths: list[int], max_length: int) -> str:
    s = sorted(lengths)

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(p * len(s)))]

    cut = sum(n > max_length for n in s) / len(s)
    return (
        f"{len(s):,} texts; tokens median {q(0.5)}, p90 {q(0.9)}, p99 {q(0.99)}, max {s[-1]}; "
        f"{cut:.0%} over {max_length} (truncated)"
    )


# --------------------------------------------------------- in-process loop


@dataclass
class Loop:
    """The model in this process, loaded as the worker loads it (same precision), and its tokenizer."""

    model: Any
    tokenizer: Any
    labels: dict[int, str]
    max_length: int

    @classmethod
    def load(cls, folder: str, precision: str, max_length: int) -> Loop:
        from pipeq.routing import ServeKey
        from pipeq.worker.config import WorkerConfig
        from pipeq.worker.loading import load_pipeline

        cfg = WorkerConfig(key=ServeKey(TASK, folder, precision), warmup=False)
        pipe = load_pipeline(cfg).pipe
        labels = {int(k): v for k, v in pipe.model.config.id2label.items()}
        return cls(pipe.model.eval(), pipe.tokenizer, labels, max_length)

    def run(self, texts: list[str], max_tokens: int, max_rows: int) -> list[dict[str, Any]]:
        """Top label and score of every text, in input order: tokenize once, sort the whole input by token
        length, cut by the token budget, pad and run."""
        tok = self.tokenizer
        ids: list[list[int]] = []
        for start in range(0, len(texts), 256):
            ids.extend(tok(texts[start : start + 256], truncation=True, max_length=self.max_length)["input_ids"])
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out: list[dict[str, Any]] = [{}] * len(texts)
        pad = tok.pad_token_id or 0
        with torch.inference_mode():
            for batch in cut(order, [len(x) for x in ids], max_tokens, max_rows):
                width = len(ids[batch[-1]])
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                scores, labels = self.model(input_ids=input_ids, attention_mask=mask).logits.softmax(-1).max(-1)
                for i, label, score in zip(batch, labels.tolist(), scores.tolist(), strict=True):
                    out[i] = {"label": self.labels[label], "score": score}
        return out

    def rate(self, texts: list[str], max_tokens: int, max_rows: int) -> float:
        t0 = time.perf_counter()
        self.run(texts, max_tokens, max_rows)
        return len(texts) / (time.perf_counter() - t0)


def cut(order: list[int], lengths: list[int], max_tokens: int, max_rows: int) -> Iterator[list[int]]:
    """Batches of ``order`` (shortest first) whose rows x longest row stays within ``max_tokens``."""
    batch: list[int] = []
    for i in order:
        if batch and ((len(batch) + 1) * lengths[i] > max_tokens or len(batch) >= max_rows):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


# ----------------------------------------------------------------- pipeq


@contextmanager
def store_url(name: str, work: Path) -> Iterator[str]:
    """A fresh, migrated store: an SQLite file in ``work`` or a new PostgreSQL database."""
    if name == "sqlite":
        url = f"sqlite:///{work / f'wholejob-{time.monotonic_ns()}.db'}"
        db.upgrade(url)
        yield url
        return
    with benchenv.fresh_pg_database("pipeq_wholejob") as url:
        db.upgrade(url)
        yield url


class Worker:
    """One ``pipeq worker`` process on a store (its own process group), its output in a log file."""

    def __init__(
        self, model: str, precision: str, url: str, layout: str | None, log: Path, *, task: str = TASK
    ) -> None:
        self.model, self.url, self.log = model, url, log
        args = ["--task", task, "--model", model, "--precision", precision, "--concurrency", "1"]
        if layout:
            streams, threads = layout.split("x")
            args += ["--streams", streams, "--threads", str(int(streams) * int(threads))]
        env = {**os.environ, "PIPEQ_BROKER_URL": REDIS, "PIPEQ_DATABASE_URL": url}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*PIPEQ, "worker", *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.peak_rss = 0

    def row(self) -> dict[str, Any] | None:
        with Store(self.url) as store:
            rows = [w for w in store.live_workers() if w["model"] == self.model and w["status"] == "ready"]
        return rows[0] if rows else None

    def wait_ready(self, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.row()
            if row is not None:
                return row
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the worker did not become ready:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(1.0)

    def sample_rss(self) -> None:
        """Note the worker's resident memory now (the main process and its pool children)."""
        import psutil

        try:
            main = psutil.Process(self.proc.pid)
            rss = main.memory_info().rss + sum(c.memory_info().rss for c in main.children(recursive=True))
        except psutil.Error:
            return
        self.peak_rss = max(self.peak_rss, rss)

    def stop(self) -> None:
        benchenv.stop_group(self.proc)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``cmd``; its wall seconds, its peak RSS in bytes (sampled every 20 ms: the kernel's own peak of a
    child counts the memory of the process that forked it), and its stdout. Exits on failure."""
    import psutil

    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{stderr[-3000:]}")
    return seconds, peak, stdout


def newest_job(url: str) -> dict[str, Any]:
    with Store(url) as store:
        (job,) = store.recent_jobs(1)
        row = store.job_row(job.id)
    assert row is not None
    return row


def padding(url: str, job_id: str) -> float:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        real, padded = conn.execute(
            sa.text("SELECT sum(real_tokens), sum(padded_tokens) FROM batches WHERE job_id = :j"), {"j": job_id}
        ).one()
    engine.dispose()
    return float(real) / float(padded) if padded else float("nan")


def as_utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass
class Whole:
    items_per_s: float
    submit_s: float
    padding: float


def whole_job(path: Path, worker: Worker, precision: str, n: int) -> Whole:
    """``pipeq submit FILE --wait`` against the ready worker: items/s from its start to its exit."""
    env = {**os.environ, "PIPEQ_BROKER_URL": REDIS, "PIPEQ_DATABASE_URL": worker.url}
    cmd = [*PIPEQ, "submit", str(path), "--task", TASK, "--model", worker.model, "--precision", precision, "--wait"]
    started = datetime.now(UTC)
    seconds, _, _ = timed(cmd, env)
    job = newest_job(worker.url)
    assert job["total"] == n and job["n_done"] == n, f"job {job['id']}: {job['n_done']}/{job['total']} done"
    submit_s = (as_utc(job["published_at"]) - started).total_seconds()
    return Whole(n / seconds, submit_s, padding(worker.url, job["id"]))


# ------------------------------------------------------------------ runs


@dataclass
class Result:
    model: str
    precision: str
    store: str
    layout: str
    loop: list[float] = field(default_factory=list)
    pipeq: list[Whole] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [w.items_per_s / ((a + b) / 2) for w, a, b in zip(self.pipeq, self.loop, self.loop[1:], strict=False)]


def compare(args: argparse.Namespace, work: Path) -> tuple[list[Result], dict[str, str]]:
    results: list[Result] = []
    described: dict[str, str] = {}
    texts = corpus.english(args.texts)
    for name in args.models:
        precision = MODELS[name]
        model = build_model(work, name, args.max_length)
        described[name] = describe(token_lengths(model, texts), args.max_length)
        path = write_jsonl(work / f"{name}.jsonl", texts)
        loop = Loop.load(model, precision, args.max_length)
        for store in args.stores:
            for layout in args.layouts or [None]:
                with store_url(store, work) as url:
                    worker = Worker(model, precision, url, layout, work / f"worker-{name}-{store}.log")
                    try:
                        row = worker.wait_ready()
                        settings = row.get("settings") or {}
                        budget = int(settings.get("max_batch_tokens") or C.DEFAULT_MAX_BATCH_TOKENS)
                        rows = int(settings.get("max_batch_size") or 64)
                        torch.set_num_threads(os.cpu_count() or 1)
                        loop.run(texts[:200], budget, rows)  # warm: the worker warmed up before it said ready
                        result = Result(name, precision, store, layout or "auto")
                        result.loop.append(loop.rate(texts, budget, rows))
                        for _ in range(args.rounds):
                            result.pipeq.append(whole_job(path, worker, precision, len(texts)))
                            result.loop.append(loop.rate(texts, budget, rows))
                    finally:
                        worker.stop()
                results.append(result)
                print(row_text(result), flush=True)
    return results, described


def row_text(r: Result) -> str:
    runs = ", ".join(f"{w.items_per_s:,.1f}" for w in r.pipeq)
    loops = ", ".join(f"{a:,.1f}" for a in r.loop)
    ratio = statistics.mean(r.ratios())
    sub = statistics.mean(w.submit_s for w in r.pipeq)
    pad = statistics.mean(w.padding for w in r.pipeq)
    return (
        f"| {r.model} | {r.precision} | {r.store} | {r.layout} | {runs} | {loops} | **{ratio:.2f}x** | "
        f"{sub:.1f} | {pad:.2f} |"
    )


@dataclass
class Step:
    seconds: float
    rss: int = 0


def million(args: argparse.Namespace, work: Path) -> list[tuple[str, int, dict[str, Step], int]]:
    """Each step of a large job on the near-free model, at each size and store."""
    model = build_model(work, "tiny", args.max_length)
    base = corpus.english(5000)
    out = []
    for store in args.stores:
        for n in args.sizes:
            texts = [base[(i * 7919) % len(base)] for i in range(n)]
            path = write_jsonl(work / f"m{n}.jsonl", texts)
            del texts
            with store_url(store, work) as url:
                worker = Worker(model, "fp32", url, None, work / f"worker-million-{store}-{n}.log")
                try:
                    worker.wait_ready()
                    env = {**os.environ, "PIPEQ_BROKER_URL": REDIS, "PIPEQ_DATABASE_URL": url}
                    steps: dict[str, Step] = {}
                    cmd = [*PIPEQ, "submit", str(path), "--task", TASK, "--model", model, "--precision", "fp32"]
                    seconds, rss, _ = timed(cmd, env)
                    steps["submit"] = Step(seconds, rss)
                    t0 = time.perf_counter()
                    while True:
                        worker.sample_rss()
                        job = newest_job(url)
                        if job["status"] == "done":
                            break
                        time.sleep(1.0)
                    steps["run"] = Step(time.perf_counter() - t0, worker.peak_rss)
                    parquet = work / f"m{n}.parquet"
                    cmd = [*PIPEQ, "results", job["id"], "--format", "parquet", "--output", str(parquet)]
                    steps["results"] = Step(*timed(cmd, env)[:2])
                    parquet.unlink()
                    steps["report"] = Step(*timed([*PIPEQ, "report", job["id"]], env)[:2])
                    size = store_size(url)
                finally:
                    worker.stop()
            path.unlink()
            out.append((store, n, steps, size))
            print(store, n, {k: (round(v.seconds, 1), v.rss >> 20) for k, v in steps.items()}, size >> 20, flush=True)
    return out


def store_size(url: str) -> int:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one()
    engine.dispose()
    return int(size)


# ----------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def render(args: argparse.Namespace, results: list[Result], described: dict[str, str], big: list[Any]) -> str:
    lines = [
        f"`{shlex.join(['python', 'benchmarks/wholejob.py', *sys.argv[1:]])}` on {datetime.now(UTC):%Y-%m-%d}, "
        f"{machine()}.",
        "",
    ]
    if results:
        lines += [
            f"Texts ({args.max_length}-token truncation): " + "; ".join(f"{k}: {v}" for k, v in described.items())
        ]
        lines += [
            "",
            "| model | precision | store | layout (streams x threads) | pipeq whole job, items/s | "
            "in-process loop, items/s (before, between, after) | ratio | submit s | padding efficiency |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *(row_text(r) for r in results),
            "",
        ]
    if big:
        lines += [
            "| store | items | submit s (items/s, RSS MB) | run s (items/s, worker RSS MB) | results parquet s | "
            "report s | store MB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for store, n, steps, size in big:
            s, r = steps["submit"], steps["run"]
            lines.append(
                f"| {store} | {n:,} | {s.seconds:.1f} ({n / s.seconds:,.0f}, {s.rss >> 20}) | "
                f"{r.seconds:.1f} ({n / r.seconds:,.0f}, {r.rss >> 20}) | {steps['results'].seconds:.1f} | "
                f"{steps['report'].seconds:.1f} | {size >> 20} |"
            )
        lines += ["", "Cost per item at the largest size over the smallest (1.00 = linear):", ""]
        for store in args.stores:
            rows = sorted((n, steps) for st, n, steps, _ in big if st == store)
            if len(rows) >= 2:
                (n0, s0), (n1, s1) = rows[0], rows[-1]
                growth = ", ".join(
                    f"{k} {(s1[k].seconds / n1) / (s0[k].seconds / n0):.2f}"
                    for k in ("submit", "run", "results", "report")
                )
                lines.append(f"- {store}, {n0:,} -> {n1:,}: {growth}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: s.split(","), default=["distilbert", "minilm", "tiny"])
    p.add_argument("--stores", type=lambda s: s.split(","), default=["sqlite", "postgresql"])
    p.add_argument("--texts", type=int, default=1500, help="Texts per whole job (the tiny model: use 20,000).")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="Whole jobs per model and store, each between two loops.")
    p.add_argument("--layouts", type=lambda s: s.split(","), default=None,
                   help="Worker layouts, STREAMSxTHREADS each (1x2,2x1); default: the worker's own.")  # fmt: skip
    p.add_argument("--million", action="store_true", help="The large-job steps instead of the comparison.")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100_000, 1_000_000])
    p.add_argument("--results", help="Replace the wholejob block of this file (RESULTS.md) with the output.")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    with tempfile.TemporaryDirectory(prefix="pipeq-wholejob-") as tmp:
        work = Path(tmp)
        if args.million:
            report = render(args, [], {}, million(args, work))
        else:
            results, described = compare(args, work)
            report = render(args, results, described, [])
    print(report)
    if args.results:
        benchenv.write_block(args.results, report, BEGIN, END)


if __name__ == "__main__":
    main()
