"""Storing a job: a page a transaction beside live workers, nothing runnable until the last page, an
interrupted submit that leaves a clear state, and the first duplicate id named whichever page holds it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import WorkerProcess, count_rows
from pipeq import Client, Settings
from pipeq import constants as C
from pipeq.errors import ConfigurationError, DuplicateIdError, JobNotFoundError
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row

TASK = "text-classification"


def write_jsonl(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i}", "text": f"record {i}: " + "a fair review of a fine phone " * (i % 9)}))
            fh.write("\n")
    return path


def submit_cmd(path: Path, model: str, broker_url: str, database_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeq", "submit", str(path), "--task", TASK, "--model", model,
            "--broker-url", broker_url, "--database-url", database_url, *extra]  # fmt: skip


def test_the_first_duplicate_in_input_order_is_named_whichever_page_holds_it(store: Store) -> None:
    pages = [
        [NewItem(0, "a", "x", 1), NewItem(1, "b", "x", 1)],
        [NewItem(2, "c", "x", 1), NewItem(3, "a", "x", 1), NewItem(4, "c", "x", 1)],
    ]
    with pytest.raises(DuplicateIdError) as err:
        store.create_job(new_job_row("dups", ServeKey(TASK, "/m")), pages, unique_ids=True)
    assert (err.value.input_id, err.value.first, err.value.second) == ("a", 0, 3)
    assert store.job_row("dups") is None, "a refused job leaves nothing behind"
    pages[1][0] = NewItem(2, "b", "x", 1)  # now a page-1 duplicate of page 0 comes first
    with pytest.raises(DuplicateIdError) as err:
        store.create_job(new_job_row("dups", ServeKey(TASK, "/m")), pages, unique_ids=True)
    assert (err.value.input_id, err.value.first, err.value.second) == ("b", 1, 2)


def test_a_job_is_storing_until_its_last_page_and_only_then_runnable(store: Store) -> None:
    seen: list[tuple[str, int]] = []

    def pages() -> Any:
        for start in (0, 3):
            row = store.job_row("big")
            if row is not None:
                seen.append((row["status"], row["total"]))
                assert store.stalled_jobs(0) == [], "a reconciler leaves a job being stored alone"
            yield [NewItem(i, None, f"t{i}", 2) for i in range(start, start + 3)]

    assert store.create_job(new_job_row("big", ServeKey(TASK, "/m")), pages()) == 6
    assert seen == [(C.JOB_STORING, 0), (C.JOB_STORING, 3)]
    assert store.job("big").status == C.JOB_QUEUED
    with pytest.raises(ConfigurationError, match="cancel it first"):
        store.delete_finished_job("big")
    store.cancel_job("big")
    assert store.delete_finished_job("big") == 6
    assert store.job_row("big") is None and count_rows(store.url, "items") == 0


def test_a_job_deleted_while_it_is_stored_leaves_no_items_behind(store: Store) -> None:
    def pages() -> Any:
        yield [NewItem(i, None, f"t{i}", 2) for i in range(3)]
        assert store.delete_finished_job("gone") == 3  # `pipeq delete` on a job still "storing"
        yield [NewItem(i, None, f"t{i}", 2) for i in range(3, 6)]  # the producer stores one more page

    with pytest.raises(JobNotFoundError, match="deleted while it was stored"):
        store.create_job(new_job_row("gone", ServeKey(TASK, "/m")), pages())
    assert store.job_row("gone") is None and count_rows(store.url, "items") == 0


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_an_interrupted_submit_leaves_no_job_a_worker_can_run(
    sig: signal.Signals, tmp_path: Path, pg_url: str, redis_url: str, model_dir: Callable[[str], str]
) -> None:
    model = model_dir(TASK)
    path = write_jsonl(tmp_path / "big.jsonl", 400_000)
    proc = subprocess.Popen(submit_cmd(path, model, redis_url, pg_url), stderr=subprocess.PIPE)
    store = Store(pg_url)
    try:
        deadline = time.monotonic() + 60
        while not (jobs := store.recent_jobs(5)) or jobs[0].total == 0:
            assert proc.poll() is None, "the submit ended before it was interrupted"
            assert time.monotonic() < deadline, "no page stored within 60 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        queue = ServeKey(TASK, model).queue
        assert redis.Redis.from_url(redis_url).llen(queue) == 0, "nothing was queued"
        left = store.recent_jobs(5)
        if sig == signal.SIGINT:  # the submit deletes what it stored on its way out
            assert left == [] and count_rows(pg_url, "items") == 0
            return
        # Killed: the job stays "storing", which no worker or reconciler runs, and can be deleted.
        assert [j.status for j in left] == [C.JOB_STORING] and 0 < left[0].total < 400_000
        assert store.stalled_jobs(0) == []
        env = {**os.environ, "PIPEQ_DATABASE_URL": pg_url}
        listed = subprocess.run([sys.executable, "-m", "pipeq", "jobs"], env=env, capture_output=True, text=True)
        assert C.JOB_STORING in listed.stdout and "pipeq delete" in listed.stderr
        deleted = subprocess.run(
            [sys.executable, "-m", "pipeq", "delete", left[0].id], env=env, capture_output=True, text=True
        )
        assert deleted.returncode == 0, deleted.stderr
        assert store.recent_jobs(5) == [] and count_rows(pg_url, "items") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()


@pytest.mark.integration
def test_a_large_submit_never_stalls_a_live_worker_on_the_same_sqlite_file(
    tmp_path: Path,
    sqlite_url: str,
    redis_url: str,
    model_dir: Callable[[str], str],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Workers keep beating and writing while a job of 200,000 items with ids is stored into their SQLite file."""
    import faultpipe

    model = model_dir(TASK)
    dead_after = 3.0
    worker = start_worker(
        "--task", faultpipe.TASK, "--model", model, "--precision", "fp32",
        "--pipeline-class", "faultpipe:FaultyClassificationPipeline",
        "--model-class", "transformers:AutoModelForSequenceClassification",
        "--max-batch-size", "4", "--no-warmup",
        broker_url=redis_url, database_url=sqlite_url,
        extra_env={"PIPEQ_TEST_FORWARD_DELAY": "0.04", "PIPEQ_DEAD_AFTER": str(dead_after)},
    )  # fmt: skip
    store = Store(sqlite_url)
    worker.wait_ready(store, ServeKey(faultpipe.TASK, model).queue)
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, chunk_size=16, dead_after=dead_after)
    with Client(settings) as client:
        running = client.submit([f"review {i}" for i in range(1_200)], task=faultpipe.TASK, model=model)
    path = write_jsonl(tmp_path / "big.jsonl", 200_000)
    submit = subprocess.Popen(submit_cmd(path, model, redis_url, sqlite_url), stderr=subprocess.PIPE)
    oldest_beat, done_at_start = 0.0, store.job(running.id).done
    progress_during_submit = 0
    while submit.poll() is None:
        (row,) = [w for w in store.live_workers() if w["status"] != "stopped"]
        oldest_beat = max(oldest_beat, time.time() - row["heartbeat_at"].timestamp())
        progress_during_submit = store.job(running.id).done - done_at_start
        time.sleep(0.1)
    assert submit.returncode == 0, submit.stderr.read() if submit.stderr else ""
    assert oldest_beat < dead_after, f"a heartbeat waited {oldest_beat:.1f} s behind the submit"
    assert progress_during_submit > 0, "the worker wrote no result while the job was stored"
    assert "lost" not in worker.log()
    store.close()


def test_jobs_stored_before_the_run_order_keep_their_input_order_and_window(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    from pipeq.broker import window
    from pipeq.store import schema as db

    db.downgrade(store_url, "0011")
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:  # a job of six items, stored and half published by the code before
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, task, model, precision, queue, params, status, priority, total, n_done, "
                "n_failed, n_cancelled, created_at, requeues, publish_cursor, chunk_size, use_cache, cache_hits) "
                "VALUES ('old', :t, '/m', 'fp32', 'q', '{}', 'queued', 0, 6, 0, 0, 0, :now, 0, 3, 1, false, 0)"
            ),
            {"t": TASK, "now": "2026-01-01 00:00:00"},
        )
        for i, text in enumerate(["a", "bbbbbb", "cc", "dddd", "e", "ffffffff"]):
            conn.execute(
                sa.text(
                    "INSERT INTO items (job_id, idx, input, status, attempts) VALUES ('old', :i, :x, 'pending', 0)"
                ),
                {"i": i, "x": json.dumps(text)},
            )
    engine.dispose()
    db.upgrade(store_url)
    store = Store(store_url)
    job = store.job_row("old")
    assert job is not None and (job["publish_key"], job["publish_cursor"]) == (3, 3)
    assert [i for page in store.iter_pending("old", stop=job["publish_key"]) for i, _ in page] == [0, 1, 2]
    sent: list[list[int]] = []
    monkeypatch.setattr(window, "publish_chunks", lambda _c, _j, _q, items, **kw: sent.append([i for i, _ in items]))
    assert window.top_up(store, None, job) == 3  # type: ignore[arg-type]
    assert sent == [[3, 4, 5]]
    store.close()
