"""`pipeq status JOB --watch`: a progress bar read from the store, for a job another client submitted."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pipeq import Client, Settings
from pipeq.primitives import JobProgress
from pipeq.progress import watch
from pipeq.store import Store
from pipeq.worker.context import WorkerContext

TASK = "text-classification"
#: Six short texts and two over the tiny model's 128 positions: with truncation off those two fail in forward.
TEXTS = ["good", "bad", "word " * 400, "fine", "cold soup", "word " * 300, "great food", "meh"]
#: The bar's detail column once the job is finished: done and failed counts, then the rate in items/s.
FINAL_DETAIL = re.compile(r"done 6 failed 2 \| \d[\d,]*\.\d/s \| ETA 0s")


def test_watch_follows_a_job_of_another_client_until_it_ends(
    client: Client, ctx: WorkerContext, sqlite_url: str
) -> None:
    # Given: a job submitted by one Client, and nothing has run it yet
    job = client.submit(TEXTS, task=TASK, model=ctx.cfg.key.model, params={"truncation": False})
    items = [[i, text] for i, text in enumerate(TEXTS)]

    # When: the bar watches it through a Store of its own, on a fixed-width console that is no terminal
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    watcher_store = Store(sqlite_url)
    result: dict[str, JobProgress] = {}
    watcher = threading.Thread(
        target=lambda: result.update(state=watch(watcher_store, job.id, timeout=60, poll=0.05, console=console))
    )
    watcher.start()

    # Then: it keeps watching while the job runs, half of it done ...
    ctx.run_chunk(job.id, items[:4], None)
    time.sleep(0.3)  # several polls of the store
    assert watcher.is_alive() and not watcher_store.job(job.id).is_final

    # ... and returns once a worker has finished the rest, with the final counts and rate drawn
    ctx.run_chunk(job.id, items[4:], None)
    watcher.join(timeout=10)
    assert not watcher.is_alive()
    watcher_store.close()
    state = result["state"]
    assert state.is_final and (state.done, state.failed, state.total) == (6, 2, 8) and state.rate > 0
    rendered = out.getvalue()
    assert job.id[:8] in rendered and "8/8" in rendered, rendered
    assert FINAL_DETAIL.search(rendered), rendered


@pytest.mark.integration
def test_status_watch_in_another_process_ends_with_the_job(
    tmp_path: Path, redis_url: str, sqlite_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    # Given: a job submitted by a Client in this process, with no worker for it yet
    model = str(shutil.copytree(model_dir(TASK), tmp_path / "model"))
    with Client(Settings(broker_url=redis_url, database_url=sqlite_url)) as client:
        job = client.submit(TEXTS, task=TASK, model=model, params={"truncation": False})

    # When: `pipeq status JOB --watch` runs as a separate process (stderr a file: no terminal, 120 columns)
    env = {**os.environ, "PIPEQ_DATABASE_URL": sqlite_url, "COLUMNS": "120"}
    with open(tmp_path / "watch.err", "w+") as err:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "pipeq", "status", job.id, "--watch"],
            env=env, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
        try:
            time.sleep(3)
            store = Store(sqlite_url)
            assert watcher.poll() is None, "the watch returned while the job was pending"
            assert store.job(job.id).pending == len(TEXTS)

            # ... and a worker process then runs the job
            start_worker(
                "--task", TASK, "--model", model, "--precision", "fp32", broker_url=redis_url, database_url=sqlite_url
            )  # fmt: skip
            deadline = time.monotonic() + 120
            while not store.job(job.id).is_final:
                assert time.monotonic() < deadline, "the worker did not finish the job"
                time.sleep(0.1)
            final_at = time.monotonic()
            stdout, _ = watcher.communicate(timeout=30)
            exited_after = time.monotonic() - final_at
        finally:
            if watcher.poll() is None:
                watcher.kill()
        err.seek(0)
        bar = err.read()

    # Then: it returned once the job was finished (not before, not long after), having drawn the
    # final counts and rate, and printed the job's status line on stdout
    assert watcher.returncode == 0, bar
    final = store.job(job.id)
    assert final.is_final and (final.done, final.failed) == (6, 2)
    assert final.finished_at is not None
    assert job.id[:8] in bar and "8/8" in bar and FINAL_DETAIL.search(bar), bar
    assert re.search(r"done: 6 done, 2 failed, 0 cancelled, 0 pending of 8 \| [\d.]+ items/s", stdout), stdout
    assert exited_after < 10  # a poll of the store (0.5 s) and the process's exit
    store.close()


def test_a_waiting_client_reads_sooner_as_the_job_nears_its_end() -> None:
    from datetime import UTC, datetime, timedelta

    from pipeq.progress import next_poll

    def job(done: int, running_for: float | None) -> JobProgress:
        now = datetime.now(UTC)
        started = None if running_for is None else now - timedelta(seconds=running_for)
        return JobProgress("j", TASK, "m", "fp32", "running", 1_000, done, 0, 0, now, started, None)

    assert next_poll(job(0, None), 0.5) == 0.5, "no rate yet: the usual poll"
    assert next_poll(job(100, 10.0), 0.5) == 0.5, "90 s left at 10 items/s: the usual poll"
    assert next_poll(job(960, 10.0), 0.5) == pytest.approx(40 / 96 / 2, rel=0.05), "0.42 s left: half of it"
    assert next_poll(job(999, 1.0), 0.5) == 0.05, "never below WAIT_POLL_MIN"
