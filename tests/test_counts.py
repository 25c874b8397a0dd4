"""A job's progress from its writers' own counter rows: exact on SQLite and PostgreSQL, the job's row left
alone by every write but the first and the last, and done exactly when its last item is."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_store import done, make_job

from pipeq import constants as C
from pipeq.primitives import ItemResult, Lease
from pipeq.store import Store
from pipeq.store import schema as db


def write(store: Store, job: str, results: list[ItemResult], worker: str | None) -> Any:
    return store.record_batch(job, results, None, worker_id=worker, model_revision=None, precision="fp32", device="cpu")


def failed(i: int) -> ItemResult:
    return ItemResult(i, C.ITEM_FAILED, error="forward: ValueError: bad")


def raw(store: Store, sql: str, **params: Any) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


def test_writers_count_in_their_own_rows_and_the_job_sums_them(store: Store) -> None:
    job = make_job(store, 10)
    store.claim(job, [0, 1, 2, 3, 4], lease=Lease("a" * 32))
    store.claim(job, [5, 6, 7, 8, 9], lease=Lease("b" * 32))
    write(store, job, [done(0), done(1), failed(2)], "a" * 32)
    write(store, job, [done(5), failed(6)], "b" * 32)
    write(store, job, [done(3)], None)  # a writer without a worker id counts too
    state = store.job(job)
    assert (state.done, state.failed, state.pending, state.status) == (4, 2, 4, C.JOB_RUNNING)
    assert state.finished_at is None
    # The job's row kept its own counts at zero: no write took its lock.
    (row,) = raw(store, "SELECT n_done, n_failed FROM jobs WHERE id = :j", j=job)
    assert (row["n_done"], row["n_failed"]) == (0, 0)
    slots = {
        r["slot"]: (r["n_done"], r["n_failed"]) for r in raw(store, "SELECT * FROM job_counts WHERE job_id = :j", j=job)
    }
    assert slots == {"a" * 32: (2, 1), "b" * 32: (1, 1), "": (1, 0)}
    # A duplicate delivery's write moves nothing.
    assert write(store, job, [done(0), done(5)], "b" * 32).skipped == 2
    assert store.job(job).done == 4
    # The last items finish the job, once, with its finish time.
    write(store, job, [done(4), done(7), done(8)], "a" * 32)
    assert store.job(job).status == C.JOB_RUNNING
    write(store, job, [done(9)], "b" * 32)
    state = store.job(job)
    assert (state.done, state.failed, state.status) == (8, 2, C.JOB_DONE)
    assert state.finished_at is not None and state.started_at is not None
    assert store.job_row(job)["n_done"] == 8  # type: ignore[index]
    assert [j.done for j in store.recent_jobs()] == [8]


def test_a_write_without_a_claim_starts_the_job_and_cancel_keeps_the_counts_exact(store: Store) -> None:
    job = make_job(store, 6)
    write(store, job, [done(0), done(1)], "w")
    assert store.job(job).status == C.JOB_RUNNING
    assert store.cancel_job(job) == 4
    late = write(store, job, [done(2)], "w")  # a worker still running a cancelled item
    state = store.job(job)
    assert late.skipped == 1
    assert (state.done, state.cancelled, state.pending, state.status) == (2, 4, 0, C.JOB_CANCELLED)


def test_writers_finishing_the_last_items_at_once_mark_the_job_done(pg_url: str) -> None:
    """Each writer's own transaction cannot see the other's uncommitted count; the check after commit can."""
    stores = [Store(pg_url) for _ in range(4)]
    for round_no in range(5):
        job = make_job(stores[0], 8, job_id=f"race{round_no}")
        start = threading.Barrier(len(stores))

        def finish(k: int, store: Store, job: str = job, start: threading.Barrier = start) -> None:
            start.wait()
            write(store, job, [done(2 * k), done(2 * k + 1)], f"w{k}")

        threads = [threading.Thread(target=finish, args=(k, s)) for k, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        state = stores[0].job(job)
        assert (state.done, state.status) == (8, C.JOB_DONE), f"round {round_no}"
    for s in stores:
        s.close()


def test_downgrade_folds_the_writers_counts_into_the_job_row(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    store = Store(url)
    job = make_job(store, 4)
    write(store, job, [done(0), failed(1)], "w")
    store.close()
    db.downgrade(url, "0005")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT n_done, n_failed FROM jobs WHERE id = :j"), {"j": job}).one()
    engine.dispose()
    assert tuple(row) == (1, 1)
    db.upgrade(url)
    assert Store(url).job(job).done == 1, "upgraded again: the counts are the job row's, nothing counted twice"


@pytest.mark.parametrize("idle", [False, True])
def test_a_writers_claim_is_the_jobs_sign_of_life(store: Store, idle: bool) -> None:
    from datetime import timedelta

    from pipeq.primitives import utcnow

    job = make_job(store, 4)
    old = utcnow() - timedelta(seconds=600)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET activity_at = :t, published_at = :t"), {"t": old})
    store.claim(job, [0], lease=Lease("w"))
    if idle:
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE job_counts SET updated_at = :t"), {"t": old})
    assert [j["id"] for j in store.stalled_jobs(300)] == ([job] if idle else [])
