"""Which of a job's items are on the broker: a window that moves as workers finish.

A job is cut into slices of ``SLICE_CHUNKS`` messages. Submitting publishes the first
``WINDOW_SLICES`` slices; the last message of each slice is marked, and the worker that finishes
it publishes the job's next slice (the publish cursor moves in the store, atomically). So a job
keeps a few slices on the broker however large it is:

- a million-item job does not put a million texts in Redis;
- a small job submitted later waits behind a few slices of a large one, not behind all of it:
  jobs on a queue take turns slice by slice (fair sharing);
- a job runs longest first across all its items (``pipeq.ordering``): the window walks the job by
  its items' order key, so each message, and each batch cut from it, holds texts of one length.

The store stays the record: ``requeue`` (the reconciler, ``pipeq resume``) publishes whatever of
the window is still pending, restarts the window when its chain was broken, and opens it when the
producer never did (it died between commit and publish). A slice whose publish fails is handed back
to the window (the cursor moves back), so the window never passes items that are on no broker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from pipeq import constants as C
from pipeq.broker.publish import publish_chunks
from pipeq.errors import BrokerError
from pipeq.store import Store

log = logging.getLogger(__name__)

#: Messages per slice: the unit a job's window moves by.
SLICE_CHUNKS = 4
#: Slices of a job on the broker at once.
WINDOW_SLICES = 4


def slice_items(job: dict[str, Any]) -> int:
    return int(job["chunk_size"]) * SLICE_CHUNKS


def publish_range(store: Store, celery: Celery, job: dict[str, Any], start: int, stop: int) -> int:
    """Publish the pending items with order keys in ``[start, stop)``, in run order, a slice at a time; returns
    items."""
    sent = 0
    for page in store.iter_pending(job["id"], page=slice_items(job), start=start, stop=stop):
        publish_chunks(
            celery,
            job["id"],
            job["queue"],
            page,
            chunk_size=int(job["chunk_size"]),
            priority=int(job["priority"]),
            slice_end=True,
        )
        sent += len(page)
    log.debug(
        "job %s: published %d pending items of keys [%d, %d) to %s", job["id"][:8], sent, start, stop, job["queue"]
    )
    return sent


def chunk_size_for(store: Store, queue: str, total: int, limit: int | None) -> int:
    """Items per message: ``limit``, or (None) about ``CHUNK_SECONDS`` of the queue's live workers' measured
    speed; smaller so that a small job spreads over those workers, but not below what a live worker asks for
    (``min_chunk_items`` in its settings: a sequence engine keeps its rows full only with enough items in hand)."""
    live = store.live_workers(queue)
    floor = C.MIN_CHUNK_SIZE
    if limit is None:
        speed = worker_speed(live)
        limit = C.DEFAULT_CHUNK_SIZE
        if speed is not None:
            limit = max(C.DEFAULT_CHUNK_SIZE, min(C.MAX_CHUNK_SIZE, round(speed * C.CHUNK_SECONDS)))
        floor = max([floor, *(int((w.get("settings") or {}).get("min_chunk_items") or 0) for w in live)])
        limit = max(limit, floor)
    spread = -(-total // (max(1, len(live)) * C.CHUNKS_PER_WORKER))
    return max(1, min(limit, max(floor, spread)))


def worker_speed(workers: list[dict[str, Any]]) -> float | None:
    """Items/s of the median worker process: what it ran so far, or what its warm-up measured; None if unknown."""
    speeds = []
    for w in workers:
        busy, done = w.get("busy_seconds") or 0.0, w.get("items_done") or 0
        if busy >= C.SPEED_MIN_BUSY_SECONDS and done:
            speeds.append(done / busy)
        elif (w.get("settings") or {}).get("warmup_items_per_second"):
            speeds.append(float(w["settings"]["warmup_items_per_second"]))
    return sorted(speeds)[len(speeds) // 2] if speeds else None


def open_job(store: Store, celery: Celery, job: dict[str, Any], *, chunk_size: int) -> int:
    """Publish a newly stored job's first window; returns the items published."""
    job = {**job, "chunk_size": chunk_size}
    span = store.open_window(job["id"], chunk_size=chunk_size, items=slice_items(job) * WINDOW_SLICES)
    return publish_range(store, celery, job, span.start, span.stop)  # the window is open before any worker moves it


def top_up(store: Store, celery: Celery, job: dict[str, Any]) -> int:
    """A slice of ``job`` is finished: publish its next one, if any; returns the items published.

    Raises BrokerError when the broker refuses it, with the slice handed back to the window: whoever
    requeues the job next (the reconciler, ``pipeq resume``) publishes it.
    """
    span = store.advance_window(job["id"], slice_items(job))
    if span is None:
        return 0
    try:
        return publish_range(store, celery, job, span.start, span.stop)
    except BrokerError:
        store.retreat_window(job["id"], span)
        raise


def requeue(store: Store, celery: Celery, job: dict[str, Any]) -> int:
    """Publish again what the job's window still has pending; move the window if nothing is. Returns items.

    A job whose window was never opened (stored, then its producer stopped) gets its first window,
    its messages at most as large as the producer asked; a job never marked published is marked now.
    """
    if int(job["publish_cursor"]) == 0:
        size = chunk_size_for(store, job["queue"], int(job["total"]), int(job["chunk_size"]))
        sent = open_job(store, celery, job, chunk_size=size)
    else:
        sent = publish_range(store, celery, job, 0, int(job["publish_key"])) or top_up(store, celery, job)
    if job["published_at"] is None:
        store.mark_published(job["id"])
    return sent
