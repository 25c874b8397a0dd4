"""The SQL store on SQLite and PostgreSQL: jobs, idempotent result writes, cancel, results in order."""

from __future__ import annotations

import logging
import threading
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeq import constants as C
from pipeq.errors import JobNotFoundError, StoreError
from pipeq.primitives import BatchTiming, ItemResult
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row


def make_job(store: Store, n: int, job_id: str = "job1") -> str:
    rows = [NewItem(i, f"id{i}", f"text {i}", len(f"text {i}")) for i in range(n)]
    store.create_job(
        new_job_row(job_id, ServeKey("text-classification", "/m"), params={"top_k": 1}),
        [rows],
    )
    return job_id


def timing(size: int) -> BatchTiming:
    now = datetime.now(UTC)
    return BatchTiming(
        size=size,
        rows=size,
        real_tokens=10 * size,
        padded_tokens=12 * size,
        queue_wait_ms=5.0,
        preprocess_ms=1.0,
        forward_ms=20.0,
        postprocess_ms=0.5,
        total_ms=21.5,
        started_at=now,
        finished_at=now,
    )


def record(store: Store, job: str, results: list[ItemResult]) -> Any:
    return store.record_batch(
        job, results, timing(len(results)), worker_id=None, model_revision="abc", precision="fp32", device="cpu"
    )


def done(i: int, label: str = "pos") -> ItemResult:
    return ItemResult(i, C.ITEM_DONE, output={"label": label, "score": 0.9}, n_tokens=10, truncated=False)


def test_results_are_written_exactly_once(store: Store) -> None:
    job = make_job(store, 5)
    first = record(store, job, [done(0), done(1), ItemResult(2, C.ITEM_FAILED, error="forward: boom")])
    assert (first.done, first.failed, first.skipped) == (2, 1, 0)
    # A redelivered message computes again, maybe differently: nothing changes.
    again = record(store, job, [done(0, "neg"), done(1, "neg"), done(2, "neg")])
    assert (again.done, again.failed, again.skipped) == (0, 0, 3)
    state = store.job(job)
    assert (state.done, state.failed, state.pending, state.status) == (2, 1, 2, C.JOB_RUNNING)
    record(store, job, [done(3), done(4)])
    state = store.job(job)
    assert state.status == C.JOB_DONE and state.finished_at is not None and state.finished == 5
    rows = list(store.iter_results(job))
    assert [r["idx"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["output"] == {"label": "pos", "score": 0.9}
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "forward: boom" and rows[2]["output"] is None
    assert rows[0]["forward_ms"] == 20.0 and rows[0]["model_revision"] == "abc" and rows[0]["batch_size"] == 3


def test_concurrent_duplicate_deliveries_count_once(store: Store) -> None:
    job = make_job(store, 200)
    results = [done(i) for i in range(200)]
    barrier = threading.Barrier(4)

    def deliver() -> None:
        barrier.wait()
        for start in range(0, 200, 50):
            record(store, job, results[start : start + 50])

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = store.job(job)
    assert (state.done, state.failed, state.status) == (200, 0, C.JOB_DONE)
    assert len(list(store.iter_results(job))) == 200
    # Only the deliveries that wrote items left a timing row: every item points at one, every row has items.
    rows = list(store.iter_results(job))
    batch_ids = {r["batch_id"] for r in rows}
    assert None not in batch_ids
    assert sum(n for _, n in store.batch_rows_histogram(job)) == len(batch_ids)


def test_grouped_writes_are_one_transaction_with_an_outcome_each(store: Store) -> None:
    # Given three batches, one of them already written by another delivery
    job = make_job(store, 6)
    record(store, job, [done(2), done(3)])
    batches = [([done(0), done(1)], timing(2)), ([done(2, "neg"), done(3, "neg")], timing(2)), ([done(4)], None)]
    # When they are written together
    outcomes = store.record_batches(job, batches, worker_id=None, model_revision="abc", precision="fp32", device="cpu")
    # Then each gets its own outcome, the written one is unchanged, and the counters moved once for all
    assert [(o.done, o.skipped) for o in outcomes] == [(2, 0), (0, 2), (1, 0)]
    rows = {r["idx"]: r for r in store.iter_results(job)}
    assert rows[2]["output"] == {"label": "pos", "score": 0.9}
    assert rows[4]["batch_id"] is None and rows[0]["batch_id"] is not None
    assert sum(n for _, n in store.batch_rows_histogram(job)) == 2, "no timing row for the skipped batch"
    state = store.job(job)
    assert (state.done, state.pending, state.status) == (5, 1, C.JOB_RUNNING)
    store.record_batches(job, [([done(5)], None)], worker_id=None, model_revision=None, precision="fp32", device="cpu")
    assert store.job(job).status == C.JOB_DONE


def test_claim_counts_first_attempts_and_leaves_out_finished_items(store: Store) -> None:
    job = make_job(store, 3)
    assert store.claim(job, [0, 1, 2]) == {0: 0, 1: 0, 2: 0}, "what each item had before this delivery"
    assert store.job(job).status == C.JOB_RUNNING
    record(store, job, [done(1)])
    # A redelivery: tried items keep their count until each starts again on its own.
    assert store.claim(job, [0, 1, 2]) == {0: 1, 2: 1}
    assert store.start_attempt(job, 0) == 2
    assert store.attempts(job, [0, 1, 2]) == {0: 2, 2: 1}
    assert store.start_attempt(job, 1) is None, "a finished item never starts again"


def test_a_first_delivery_the_broker_would_mark_again_counts_its_attempt_with_the_result(store: Store) -> None:
    job = make_job(store, 4)
    assert store.claim(job, [0, 1, 2, 3], redelivered=False) == {0: 0, 1: 0, 2: 0, 3: 0}
    assert store.attempts(job, [0, 1, 2, 3]) == {0: 0, 1: 0, 2: 0, 3: 0}, "the claim wrote no item row"
    record(store, job, [done(0)])
    assert [r["attempts"] for r in store.iter_results(job)] == [1, 0, 0, 0], "the result counts its attempt"
    # The delivery died: the broker's redelivery counts its attempt on the items it left pending, and
    # reports them as tried (so they run one at a time).
    assert store.claim(job, [0, 1, 2, 3], redelivered=True) == {1: 1, 2: 1, 3: 1}
    assert store.start_attempt(job, 1) == 2
    assert store.claim(job, [1, 2, 3], redelivered=True) == {1: 2, 2: 1, 3: 1}, "counted once a delivery"
    record(store, job, [done(1)])
    assert [r["attempts"] for r in store.iter_results(job)][:2] == [1, 2]


def test_a_take_over_counts_the_dead_deliverys_attempt_once(store: Store) -> None:
    job = make_job(store, 3)
    store.claim(job, [0, 1, 2], redelivered=False)
    record(store, job, [done(0)])
    store.count_lost_delivery(job, [1, 2])
    store.count_lost_delivery(job, [1, 2])  # a second survivor, or a delivery that had counted already
    assert store.claim(job, [0, 1, 2], redelivered=False) == {1: 1, 2: 1}, "queued again as tried"


def test_cancel_keeps_finished_results(store: Store) -> None:
    job = make_job(store, 4)
    record(store, job, [done(0)])
    assert store.cancel_job(job) == 3
    assert store.cancel_job(job) == 0
    state = store.job(job)
    assert (state.status, state.done, state.cancelled) == (C.JOB_CANCELLED, 1, 3)
    # A worker that was already running the cancelled items cannot write them any more.
    late = record(store, job, [done(1), done(2)])
    assert late.skipped == 2
    assert [r["status"] for r in store.iter_results(job)] == ["done", "cancelled", "cancelled", "cancelled"]


def test_unknown_job(store: Store) -> None:
    with pytest.raises(JobNotFoundError):
        store.job("nope")
    with pytest.raises(JobNotFoundError):
        store.cancel_job("nope")


def test_failed_submission_leaves_nothing(store: Store) -> None:
    def rows() -> Any:
        yield [NewItem(0, None, "a", 1)]
        raise ValueError("bad line 2")

    with pytest.raises(ValueError):
        store.create_job(
            new_job_row("j2", ServeKey("t", "m")),
            rows(),
        )
    with pytest.raises(JobNotFoundError):
        store.job("j2")


def test_unmigrated_store_is_reported(tmp_path: Any) -> None:
    with pytest.raises(StoreError, match="run `pipeq db upgrade` first"):
        Store(f"sqlite:///{tmp_path / 'empty.db'}").check_schema()


def test_credentials_are_masked_in_store_errors() -> None:
    store = Store("postgresql+psycopg://pipeq:s3cret@127.0.0.1:1/nowhere")
    with pytest.raises(StoreError) as err:
        store.check_schema()
    assert "s3cret" not in str(err.value) and "pipeq:***@" in str(err.value)


def test_inputs_round_trip_through_the_bulk_insert(store: Store) -> None:
    # COPY (PostgreSQL) and executemany (SQLite) must store exactly what was submitted.
    inputs = [
        "我非常讨厌这个！",
        "tab\there\nnew line \\ backslash \\N",
        'quote " and \u2028',
        {"text": "a", "text_pair": "b"},
        {"table": {"c": ["1", "2"]}, "query": "q?"},
    ]
    rows = [NewItem(i, None, x, len(str(x))) for i, x in enumerate(inputs)]
    store.create_job(
        new_job_row("rt", ServeKey("t", "m")),
        [rows],
    )
    stored = dict(pair for page in store.iter_pending("rt") for pair in page)  # in run order: longest first
    assert [stored[i] for i in range(len(inputs))] == inputs
    assert store.job("rt").total == len(inputs)


def test_results_round_trip_through_the_batch_write(store: Store) -> None:
    # PostgreSQL sends a batch's results as one JSON document: every output, error and flag must come back
    # exactly as written, a JSON null output as no output, and the job's own row must still settle.
    outputs: list[Any] = [
        {"label": "我非常讨厌这个！", "score": 0.1 + 0.2},
        [{"entity": 'quote " \\ back\\slash \u2028', "start": 0, "end": 2**40}],
        [],
        {},
        [[1e-07, -0.0, 3.5e300], None, True, "tab\there\nnew line"],
        "a bare string",
        None,
    ]
    job = make_job(store, len(outputs) + 1)
    results = [
        ItemResult(i, C.ITEM_DONE, output=out, n_tokens=i or None, truncated=[None, True, False][i % 3], cached=None)
        for i, out in enumerate(outputs)
    ]
    results.append(ItemResult(len(outputs), C.ITEM_FAILED, error='forward: "boom"\n\tat line 2 \\ é'))
    outcome = record(store, job, results)
    assert (outcome.done, outcome.failed, outcome.skipped) == (len(outputs), 1, 0)
    rows = list(store.iter_results(job))
    assert [r["output"] for r in rows] == [*outputs, None]
    assert [r["n_tokens"] for r in rows] == [r.n_tokens for r in results]
    assert [r["truncated"] for r in rows] == [r.truncated for r in results]
    assert [r["cached"] for r in rows] == [None] * len(results)
    assert rows[-1]["status"] == C.ITEM_FAILED and rows[-1]["error"] == results[-1].error
    assert [r["error"] for r in rows[:-1]] == [None] * len(outputs)
    if store.engine.dialect.name == "postgresql":  # no output is SQL NULL there (SQLAlchemy's JSON writes 'null')
        with store.engine.connect() as conn:
            sql = f"SELECT idx FROM items WHERE job_id = '{job}' AND output IS NULL ORDER BY idx"
            empty = conn.exec_driver_sql(sql)
            assert [idx for (idx,) in empty] == [outputs.index(None), len(outputs)]
    assert store.job(job).status == C.JOB_DONE


def _output_texts(store: Store, job: str) -> list[str]:
    """Each item's output as the text the store holds, in input order."""
    cast = "output::text" if store.engine.dialect.name == "postgresql" else "output"
    with store.engine.connect() as conn:
        sql = f"SELECT {cast} FROM items WHERE job_id = '{job}' ORDER BY idx"
        return [row[0] for row in conn.exec_driver_sql(sql)]


def test_outputs_are_written_as_orjson_text_and_the_standard_library_writes_what_orjson_cannot(
    store: Store,
) -> None:
    import orjson

    # Given a batch that orjson writes, and one holding an integer beyond 64 bits, which it refuses
    plain: list[Any] = [{"label": "é 我", "score": 0.1 + 0.2}, [[1e-07, -0.0]]]
    big: list[Any] = [{"label": "big", "score": 2**70}]
    job = make_job(store, len(plain) + len(big))
    record(store, job, [ItemResult(i, C.ITEM_DONE, output=out) for i, out in enumerate(plain)])
    record(store, job, [ItemResult(len(plain) + i, C.ITEM_DONE, output=out) for i, out in enumerate(big)])
    # Then both read back as written, the first as orjson's own text
    assert [r["output"] for r in store.iter_results(job)] == plain + big
    assert _output_texts(store, job)[: len(plain)] == [orjson.dumps(out).decode() for out in plain]


def _page_size(path: Any) -> int:
    import sqlite3

    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])


def test_a_new_sqlite_store_has_large_pages_and_an_old_one_keeps_its_own(tmp_path: Any) -> None:
    import sqlite3

    from pipeq.store import schema as db
    from pipeq.store.engine import SQLITE_PAGE_SIZE

    new = tmp_path / "new.db"
    db.upgrade(f"sqlite:///{new}")
    assert _page_size(new) == SQLITE_PAGE_SIZE == 16384

    # A store created before (SQLite's default 4 KB pages) is upgraded and used as it is.
    old = tmp_path / "old.db"
    with closing(sqlite3.connect(old)) as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("CREATE TABLE made_before (x INTEGER)")
        conn.commit()
    db.upgrade(f"sqlite:///{old}")
    with Store(f"sqlite:///{old}") as store:
        job_id = make_job(store, 3)
        assert [r["input_id"] for r in store.iter_results(job_id)] == ["id0", "id1", "id2"]
    assert _page_size(old) == 4096


def test_postgres_claims_read_only_their_rows_of_a_large_new_job(pg_url: str) -> None:
    """Without statistics of a job just stored, the planner takes it for a few rows and reads all of it for
    every claim and result write (a bitmap scan of the job). A large job has its statistics refreshed
    when it is stored, and the store runs its statements' generic plan: a claim reads its rows by key."""
    import re

    from pipeq.store import items

    with Store(pg_url) as store:
        job_id = make_job(store, 20_000)
        names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        for n, redelivered in enumerate((None, False, True)):  # each claim statement (see Store.claim)
            names.clear()
            claim = re.sub(r"%\((\w+)\)[sb]", positional, items._PG_CLAIMS[False, redelivered])
            types = {"b_now": "timestamptz", "b_job": "text", "k_slot": "text", "b_idxs": "int[]"}
            values = {"b_now": "now()", "b_job": f"'{job_id}'", "k_slot": "''", "b_idxs": "'{100,101,102,103}'"}
            for name, constant in items._PG_START_JOB_CONSTANTS.items():  # the job-start CTE's bound statuses
                types[name], values[name] = "text", f"'{constant}'"
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "force_generic_plan"
                conn.exec_driver_sql(f"PREPARE claim{n} ({', '.join(types[n] for n in names)}) AS {claim}")
                plan = "\n".join(
                    conn.exec_driver_sql(f"EXPLAIN EXECUTE claim{n} ({', '.join(values[n] for n in names)})").scalars()
                )
                conn.rollback()
            assert "Bitmap" not in plan and "Seq Scan" not in plan, plan
            assert re.search(r"Index Cond: \(\(\(job_id\)::text = \$\d+\) AND \(idx = ANY", plan), plan
        # And the claim itself still counts the first attempts of exactly those items.
        assert store.claim(job_id, [100, 101, 102, 103]) == {100: 0, 101: 0, 102: 0, 103: 0}
        assert store.claim(job_id, [100, 104]) == {100: 1, 104: 0}


def _backend_pid(store: Store) -> int:
    """The server process behind the store's pooled connection."""
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def _terminate_pooled_backend(store: Store) -> int:
    """End the server process behind the store's pooled connection, as a server restart would; its pid."""
    import sqlalchemy as sa

    from conftest import PG_ADMIN_URL

    pid = _backend_pid(store)
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
    admin.dispose()
    return pid


def test_a_pooled_connection_is_pinged_only_after_sitting_idle_and_replaced_when_dead(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeq.store import engine as engine_module

    store = Store(pg_url)
    pings: list[object] = []
    real_ping = store.engine.dialect.do_ping
    monkeypatch.setattr(store.engine.dialect, "do_ping", lambda conn: pings.append(conn) or real_ping(conn))
    make_job(store, 4, "job")
    # Given a connection the store used a moment ago: handed out again without a ping
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 60.0)
    assert store.claim("job", [0]) == {0: 0}
    assert pings == []
    # When it has sat idle longer than the limit (here: any time at all): pinged before it is used
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 0.0)
    assert store.claim("job", [1]) == {1: 0}
    assert len(pings) == 1
    # And when the server dropped it meanwhile: the ping fails, a new connection serves the call
    pid = _terminate_pooled_backend(store)
    assert store.claim("job", [2]) == {2: 0}
    assert _backend_pid(store) != pid
    store.close()


def test_a_hot_statement_that_loses_its_connection_fails_as_sqlalchemys_and_the_next_gets_a_new_one(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A claim's or a result write's error must read as SQLAlchemy's, which the worker's retry tells apart
    # (``is_transient``), and the pool must not hand the dead connection out again.
    import sqlalchemy as sa

    from pipeq.store import engine as engine_module

    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 3600.0)  # no ping to catch it first
    store = Store(pg_url)
    make_job(store, 4, "job")
    assert store.claim("job", [0]) == {0: 0}
    pid = _terminate_pooled_backend(store)
    # Given the pooled connection's server gone: the write fails as SQLAlchemy's, transient, and writes nothing
    with pytest.raises(sa.exc.DBAPIError) as err:
        record(store, "job", [done(0)])
    assert engine_module.is_transient(err.value) and err.value.connection_invalidated
    # (invalidated at once: the pool does not find it broken when it takes it back, and log an error)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    # When the writer tries again: a new connection writes it, once
    assert record(store, "job", [done(0)]).done == 1
    assert _backend_pid(store) != pid
    assert store.job("job").done == 1
    # And a statement the server refuses is SQLAlchemy's error too, not a transient one
    with pytest.raises(sa.exc.DBAPIError) as err:
        store.claim("job", [2**40])  # out of the int range of the statement's array
    assert not engine_module.is_transient(err.value)
    assert store.claim("job", [1]) == {1: 0}
    store.close()
