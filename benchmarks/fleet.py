"""Where one PostgreSQL store stops scaling with the fleet: N writers on one large job, no model.

    python benchmarks/fleet.py                          # 1, 2, 4, 8, 16 writers, 64,000 items each
    python benchmarks/fleet.py --writers 1,8 --items 16000
    python benchmarks/fleet.py --results benchmarks/RESULTS.md   # replace the fleet block there

Each writer is a process that does what a worker's store path does, through pipeq's own ``Store``:
it registers a worker row, takes the next 256 items of the job (a shared counter stands in for the
broker), claims them (``Store.claim`` with its lease, as ``run_chunk`` does) and writes them as four
micro-batches of 64 synthetic results, each its own transaction by default (``Store.record_batches``;
``--batches-per-write 4`` writes a chunk's four in one, as a worker's writer thread groups what finished
within a quarter second). Nothing else runs: no model, no broker, so what saturates is the store. The
clock starts once every writer has imported pipeq, connected, registered and warmed up: it first claims
and writes ``WARMUP_CHUNKS`` chunks of a job of its own, so that its connection and its server backend
have their caches and prepared statements, as a worker's have after its first minute. (Without it, a
run of 16 writers on 64,000 items lasts under two seconds, and sixteen cold backends' first statements
are a fifth of it.) Each N runs in a new database, so no N finds the tables an earlier one grew (or
autovacuum still working on them).

Per N: items/s over the run (the start until the last writer's last commit); items/s while every
writer had work (until the first one found none left: the rate of a fleet that keeps busy, without the
tail of the last writers finishing their last chunks, which grows with N); the 99th percentile of a
batch write's latency; and how often a writer waited on a lock: a sampler reads ``pg_stat_activity``
every 10 ms and counts, among the writers' backends that are running a statement, those whose
``wait_event_type`` is ``Lock`` (a row lock such as the job row's shows as ``transactionid`` or ``tuple``).

``--server-cpus 1 --writer-cpus 0`` splits the machine: the PostgreSQL server's processes (the postmaster,
so every backend it forks later, and its children now) run on the first set of CPUs and the writers on the
second, as on a fleet whose workers do not run on the database's cores. By default everything shares every
core, and past the cores the writers' own processes take CPU from the server. The server's affinity is put
back as it was at the end. Needs a local server and the right to set its processes' affinity (root, or
its user).

Needs a PostgreSQL server where a fresh database can be created and dropped (PIPEQ_BENCH_PG_URL, the
tests' form, default postgresql+psycopg://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchenv  # noqa: E402

from pipeq import constants as C  # noqa: E402
from pipeq.primitives import BatchTiming, ItemResult, Lease  # noqa: E402
from pipeq.routing import ServeKey  # noqa: E402
from pipeq.store import NewItem, Store, new_job_row  # noqa: E402
from pipeq.store import schema as db  # noqa: E402

KEY = ServeKey("text-classification", "/fleet/model")
CHUNK, BATCH = 256, 64
BEGIN, END = "<!-- benchmarks/fleet.py: begin -->", "<!-- benchmarks/fleet.py: end -->"


def make_job(store: Store, job_id: str, items: int) -> float:
    """Store a job of ``items`` one-word items with ids, as ``pipeq submit`` does; returns the seconds it took."""
    pages = (
        [NewItem(i, f"id-{i}", "x", 1) for i in range(start, min(start + C.INSERT_BATCH_ROWS, items))]
        for start in range(0, items, C.INSERT_BATCH_ROWS)
    )
    t0 = time.perf_counter()
    store.create_job(new_job_row(job_id, KEY, chunk_size=CHUNK), pages, unique_ids=True)
    return time.perf_counter() - t0


def timing(rows: int) -> BatchTiming:
    now = datetime.now(UTC)
    return BatchTiming(rows, rows, 20 * rows, 24 * rows, 1.0, 1.0, 5.0, 0.5, 6.5, now, now)


def result(idx: int) -> ItemResult:
    return ItemResult(idx, C.ITEM_DONE, {"label": "POSITIVE", "score": 0.75}, n_tokens=20)


#: Chunks each writer claims and writes of a job of its own before the clock starts: more than the five
#: executions after which psycopg prepares a statement, so every writer runs warm, as a long-lived worker does.
WARMUP_CHUNKS = 6


def writer(
    url: str,
    job_id: str,
    warmup_job: str,
    items: int,
    group: int,
    cursors: tuple[Any, Any],
    ready: Any,
    start: Any,
    out: Any,
    cpus: set[int] | None,
) -> None:
    """One writer process: warm up on its own part of ``warmup_job``, then claim chunks of ``job_id`` off the
    shared cursor and write them a micro-batch at a time."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    store = Store(url)
    worker_id = secrets.token_hex(16)
    store.register_worker(
        {
            "id": worker_id,
            "host": platform.node(),
            "pid": os.getpid(),
            "queue": KEY.queue,
            "task": KEY.task,
            "model": KEY.model,
            "precision": KEY.precision,
            "device": "cpu",
            "status": "ready",
        }
    )
    cursor, warm_cursor = cursors
    with warm_cursor.get_lock():  # this writer's own part of the warm-up job
        first = warm_cursor.value
        warm_cursor.value = first + WARMUP_CHUNKS * CHUNK
    for chunk in range(first, first + WARMUP_CHUNKS * CHUNK, CHUNK):
        write_chunk(store, warmup_job, worker_id, list(range(chunk, chunk + CHUNK)), group)
    ready.wait()  # imported, connected, registered and warm: the clock starts when every writer is
    start.wait()
    latencies: list[float] = []
    commits: list[tuple[float, int]] = []  # (time.monotonic() after a write, items it wrote)
    written = 0
    while True:
        with cursor.get_lock():
            first = cursor.value
            cursor.value = min(items, first + CHUNK)
        if first >= items:
            break
        done, took = write_chunk(store, job_id, worker_id, list(range(first, min(items, first + CHUNK))), group)
        written += done
        latencies += took
        commits.append((time.monotonic(), done))
    out_of_work = time.monotonic()
    store.close()
    out.put({"written": written, "latencies": latencies, "commits": commits, "out_of_work": out_of_work})


def write_chunk(store: Store, job_id: str, worker_id: str, idxs: list[int], group: int) -> tuple[int, list[float]]:
    """Claim ``idxs`` and write them as micro-batches, ``group`` a transaction; (items written, write latencies)."""
    store.claim(job_id, idxs, lease=Lease(worker_id), redelivered=False)  # a first delivery from Redis
    batches = [idxs[b : b + BATCH] for b in range(0, len(idxs), BATCH)]
    written, latencies = 0, []
    for g in range(0, len(batches), group):  # ``group`` micro-batches a transaction, as the writer thread groups
        todo = [([result(i) for i in b], timing(len(b))) for b in batches[g : g + group]]
        t0 = time.perf_counter()
        outcomes = store.record_batches(
            job_id, todo, worker_id=worker_id, model_revision=None, precision="fp32", device="cpu"
        )
        latencies.append(time.perf_counter() - t0)
        written += sum(o.done for o in outcomes)
    return written, latencies


@dataclass
class Point:
    writers: int
    items_per_s: float
    #: Items/s while every writer had work (start to the first writer out of work).
    busy_items_per_s: float
    p99_ms: float
    lock_wait_share: float
    samples: int
    #: Share of the writers' active samples by wait event type ("CPU": running, no wait).
    waits: dict[str, float]
    #: Items/s of storing the job (ids checked), and of the whole: storing, then every writer's claims and writes.
    stored_per_s: float = 0.0
    whole_items_per_s: float = 0.0


def sample_locks(admin_url: str, db_name: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Every 10 ms: the bench database's backends running a statement, and those waiting on a lock."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                "AND pid <> pg_backend_pid()",
                (db_name,),
            ).fetchall()
            counts["active"] += len(rows)
            for kind, event in rows:
                name = "CPU" if kind is None else kind if kind in ("Lock", "Client", "IO") else f"{kind}:{event}"
                counts[name] = counts.get(name, 0) + 1
            time.sleep(0.01)


def run_point(url: str, writers: int, items: int, group: int, cpus: set[int] | None = None) -> Point:
    store = Store(url)
    job_id, warmup_job = secrets.token_hex(16), secrets.token_hex(16)
    make_job(store, warmup_job, writers * WARMUP_CHUNKS * CHUNK)
    stored = make_job(store, job_id, items)
    ctx = mp.get_context("spawn")
    cursors = (ctx.Value("q", 0), ctx.Value("q", 0))
    ready, start, out = ctx.Barrier(writers + 1), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=writer, args=(url, job_id, warmup_job, items, group, cursors, ready, start, out, cpus))
        for _ in range(writers)
    ]
    for p in procs:
        p.start()
    ready.wait(timeout=300)
    counts = {"active": 0}
    stop = threading.Event()
    admin = benchenv.PG_ADMIN.replace("+psycopg", "", 1)
    sampler = threading.Thread(target=sample_locks, args=(admin, url.rsplit("/", 1)[1], stop, counts))
    sampler.start()
    t0 = time.monotonic()
    start.set()
    reports = [out.get(timeout=600) for _ in procs]
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()
    for p in procs:
        p.join()
    state = store.job(job_id)
    if (state.done, state.status) != (items, C.JOB_DONE) or sum(r["written"] for r in reports) != items:
        raise SystemExit(f"{writers} writers: job ended {state.status} with {state.done} of {items} done")
    store.close()
    latencies = sorted(x for r in reports for x in r["latencies"])
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
    active = counts.pop("active")
    waits = {kind: n / active for kind, n in sorted(counts.items())} if active else {}
    # While every writer has work: from the start to the moment the first one finds none left (its last
    # chunk written), so the tail of the others finishing theirs does not weigh on the rate.
    busy_until = min(r["out_of_work"] for r in reports)
    busy_items = sum(n for r in reports for at, n in r["commits"] if at <= busy_until)
    return Point(
        writers,
        items / elapsed,
        busy_items / (busy_until - t0),
        p99,
        waits.get("Lock", 0.0),
        active,
        waits,
        items / stored,
        items / (stored + elapsed),
    )


def parse_cpus(text: str | None) -> set[int] | None:
    """A CPU list such as "0", "0,2" or "0-3" as a set of CPU numbers (None for None)."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def server_pids(admin_url: str) -> list[int]:
    """The local PostgreSQL server's postmaster and its children now (found from a backend's parent)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


@contextmanager
def server_on(cpus: set[int] | None) -> Iterator[None]:
    """Run the PostgreSQL server's processes on ``cpus`` meanwhile (backends forked later inherit the
    postmaster's), then put each one's affinity back."""
    if not cpus:
        yield
        return
    admin = benchenv.PG_ADMIN.replace("+psycopg", "", 1)
    before: dict[int, set[int]] = {}
    try:
        for pid in server_pids(admin):
            try:
                mask = os.sched_getaffinity(pid)
                os.sched_setaffinity(pid, cpus)
            except ProcessLookupError:  # a child that exited meanwhile
                continue
            before[pid] = mask
        yield
    finally:  # also when a process could not be moved (no right to): the ones moved go back
        for pid, mask in before.items():
            try:
                os.sched_setaffinity(pid, mask)
            except ProcessLookupError:
                pass


def combined(runs: list[Point]) -> Point:
    """One writer count's runs as one point: mean rates, lock share and waits; the median p99."""
    n = len(runs)
    kinds = {kind for p in runs for kind in p.waits}
    return Point(
        runs[0].writers,
        sum(p.items_per_s for p in runs) / n,
        sum(p.busy_items_per_s for p in runs) / n,
        sorted(p.p99_ms for p in runs)[n // 2],
        sum(p.lock_wait_share for p in runs) / n,
        sum(p.samples for p in runs),
        {kind: sum(p.waits.get(kind, 0.0) for p in runs) / n for kind in kinds},
        sum(p.stored_per_s for p in runs) / n,
        sum(p.whole_items_per_s for p in runs) / n,
    )


def layout_flags(args: argparse.Namespace) -> str:
    server = f" --server-cpus {args.server_cpus}" if args.server_cpus else ""
    return server + (f" --writer-cpus {args.writer_cpus}" if args.writer_cpus else "")


def layout_text(args: argparse.Namespace) -> str:
    if not (args.server_cpus or args.writer_cpus):
        return " (server and writers sharing every core)"
    return f" (the server on CPU {args.server_cpus or 'any'}, the writers on CPU {args.writer_cpus or 'any'})"


def render(args: argparse.Namespace, rounds: dict[int, list[Point]]) -> str:
    cpu = platform.processor() or platform.machine()
    many = args.rounds > 1
    in_turns = f" in each of {args.rounds} rounds (every count once a round, in turns; rates are the means)"
    lines = [
        f"`python benchmarks/fleet.py --writers {args.writers} --items {args.items} --batches-per-write "
        f"{args.batches_per_write}{f' --rounds {args.rounds}' if many else ''}{layout_flags(args)}` on {cpu}, "
        f"{os.cpu_count()} cores, PostgreSQL on the same machine{layout_text(args)}, "
        "a new database for each writer count"
        f"{in_turns if many else ''}"
        f"; each writer warms up on {WARMUP_CHUNKS} chunks of its own, then claims {CHUNK} items at a time and "
        f"writes them as micro-batches of {BATCH}, {args.batches_per_write} a transaction. Waits: share of the "
        "writers' backends' active samples by wait event ('CPU': none). Items/s count the claims and writes; "
        "'stored' is the job's submit into the store (an id on every item, checked), 'whole job' storing and "
        "writing together.",
        "",
        "| writers | items/s | runs | vs 2 writers | items/s, all writers busy | p99 write "
        "| writers' active samples waiting on a lock | other waits | stored, items/s | whole job, items/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    two = combined(rounds[2]).items_per_s if 2 in rounds else None
    for runs in rounds.values():
        p = combined(runs)
        top = sorted(((share, kind) for kind, share in p.waits.items() if kind != "Lock"), reverse=True)[:4]
        other = ", ".join(f"{kind} {100 * share:.0f}%" for share, kind in top)
        each = ", ".join(f"{r.items_per_s:,.0f}" for r in runs)
        versus = f"{p.items_per_s / two:.2f}x" if two else ""
        lines.append(
            f"| {p.writers} | {p.items_per_s:,.0f} | {each} | {versus} | {p.busy_items_per_s:,.0f} | "
            f"{p.p99_ms:.0f} ms | {100 * p.lock_wait_share:.1f}% | {other} | {p.stored_per_s:,.0f} | "
            f"{p.whole_items_per_s:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="1,2,4,8,16", help="writer counts, comma-separated [1,2,4,8,16]")
    parser.add_argument("--items", type=int, default=64_000, help="items of the job each count writes [64000]")
    parser.add_argument(
        "--batches-per-write", type=int, default=1, help="micro-batches per transaction [1: the hottest case]"
    )
    parser.add_argument("--results", default=None, help=f"Markdown file whose {BEGIN} block is replaced")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every writer count, in turns; the table has their means [1]"
    )
    parser.add_argument(
        "--server-cpus", default=None, help="CPUs for the local PostgreSQL server's processes, e.g. 1 [every core]"
    )
    parser.add_argument("--writer-cpus", default=None, help="CPUs for the writers, e.g. 0 [every core]")
    args = parser.parse_args()
    writer_cpus = parse_cpus(args.writer_cpus)
    if writer_cpus:
        os.sched_setaffinity(0, writer_cpus)  # this process and its sampler thread, too
    counts = [int(x) for x in args.writers.split(",")]
    rounds: dict[int, list[Point]] = {n: [] for n in counts}
    with server_on(parse_cpus(args.server_cpus)):
        run_rounds(args, counts, rounds, writer_cpus)
    report = render(args, rounds)
    print("\n" + report)
    if args.results:
        benchenv.write_block(args.results, report, BEGIN, END)


def run_rounds(
    args: argparse.Namespace, counts: list[int], rounds: dict[int, list[Point]], writer_cpus: set[int] | None
) -> None:
    # In turns (1, 2, ..., 16, then again): this machine's speed drifts 10-30% within minutes, so one
    # run per count compares moments as much as writer counts.
    for _ in range(args.rounds):
        for n in counts:
            # A database of its own for each point: on a shared one each point would find the tables the
            # earlier points grew, and autovacuum still at work on them, and the later (larger) N would pay.
            with benchenv.fresh_pg_database("pipeq_fleet") as url:
                db.upgrade(url)
                point = run_point(url, n, args.items, args.batches_per_write, writer_cpus)
                row = {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(point).items()}
                print(json.dumps(row), flush=True)
                rounds[n].append(point)


if __name__ == "__main__":
    main()
