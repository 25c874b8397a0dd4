"""A live progress bar for a job, read from the SQL store (works for jobs of other processes)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeq import constants as C
from pipeq.primitives import JobProgress
from pipeq.store import Store


def describe(state: JobProgress) -> str:
    """One line: counts, rate and ETA."""
    eta = state.eta_seconds
    eta_text = "?" if eta is None else f"{eta:,.0f}s"
    return (
        f"{state.status}: {state.done:,} done, {state.failed:,} failed, {state.cancelled:,} cancelled, "
        f"{state.pending:,} pending of {state.total:,} | {state.rate:,.1f} items/s | ETA {eta_text}"
    )


def follow(
    store: Store,
    job_id: str,
    *,
    timeout: float | None = None,
    poll: float = C.WAIT_POLL_INTERVAL,
    on_update: Callable[[JobProgress], None] | None = None,
) -> JobProgress:
    """Read the job's progress every ``poll`` seconds until it is final; raises TimeoutError after ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = store.job(job_id)
        if on_update is not None:
            on_update(state)
        if state.is_final:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout}s: {state.finished}/{state.total}")
        time.sleep(next_poll(state, poll))


def next_poll(state: JobProgress, poll: float) -> float:
    """Seconds until the next read: ``poll``, or half the job's time left at its rate once that is shorter
    (at least ``WAIT_POLL_MIN``), so the job's end is seen soon after its last result."""
    eta = state.eta_seconds
    if eta is None:
        return poll
    return max(min(C.WAIT_POLL_MIN, poll), min(poll, eta / 2))


def watch(
    store: Store,
    job_id: str,
    *,
    timeout: float | None = None,
    poll: float = C.WAIT_POLL_INTERVAL,
    console: Console | None = None,
) -> JobProgress:
    """Show a progress bar on stderr until the job is final; returns its last state."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as bar:
        handle = bar.add_task(job_id[:8], total=None, detail="")

        def show(state: JobProgress) -> None:
            eta = state.eta_seconds
            detail = (
                f"done {state.done:,} failed {state.failed:,} | {state.rate:,.1f}/s"
                f" | ETA {'?' if eta is None else f'{eta:,.0f}s'}"
            )
            bar.update(handle, completed=state.finished, total=state.total, detail=detail)

        return follow(store, job_id, timeout=timeout, poll=poll, on_update=show)
