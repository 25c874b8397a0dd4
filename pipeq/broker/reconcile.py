"""The reconciler: queue again the pending items of jobs that stopped moving.

The SQL store, not the broker, is the record of what is left to do. When Redis loses its data
(a restart without persistence), a producer dies between commit and publish, or a message is
dropped, a job's pending items would wait forever. The reconciler finds jobs that made no
progress for ``stalled_after`` seconds while their queue was idle, and publishes their pending
items again. A job that was stored but never published is published once its commit is
``stalled_after`` seconds old, busy queue or not (a producer still publishing it is left alone).
Sending an item twice is harmless: workers skip finished items.

Workers run it over their own queue every ``reconcile_interval`` seconds; ``pipeq reconcile``
runs one pass over every queue that has a live worker.

A dead worker is recovered much sooner, without waiting for its job to stall: every worker writes
its claim on its own row (a lease, with the claim), and a live worker that finds a worker on its
queue silent for ``dead_after`` seconds takes it over (``take_over``): it marks it lost, which
only one survivor can do, and queues its claimed items that are still pending. When Redis later
restores the dead worker's unacknowledged message, its items are done and are skipped. A store outage
or a long-held lock is nobody's death: a worker looks for dead ones only after ``dead_after`` seconds of
its own unbroken contact with the store (``pipeq.worker.contact``), and heartbeats are timed once the
store's lock is held, so every live worker has beaten again by then.

A broker that lost its messages is noticed within ``lost_after`` seconds, not ``stalled_after``
(``republish_lost``): a job with pending items that made no progress for that long, while its queue
holds no message on the broker and no live worker holds any of its pending items, has nothing left
that could move it, so its window is published again. Workers look for such jobs on their own queue a
few times per ``lost_after``; ``pipeq reconcile`` does it once for every queue with a live worker.
Messages of dead workers left unacknowledged in Redis do not count (Redis gives them back only after
its visibility timeout, an hour): those with a claim are a takeover's, and one taken before any claim
(its worker died in between) is found here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError

from pipeq import constants as C
from pipeq.broker.publish import longest_first, publish_chunks
from pipeq.broker.window import requeue, top_up
from pipeq.errors import BrokerError
from pipeq.primitives import utcnow
from pipeq.settings import mask_url
from pipeq.store import Store, as_utc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requeued:
    """One job whose pending items a reconciler pass queued again."""

    job_id: str
    queue: str
    items: int
    #: True when the job had never been published (its producer stopped between commit and publish).
    unpublished: bool = False
    #: True when its queue held no message on the broker and no live worker held its items (``republish_lost``).
    lost: bool = False


def reconcile(
    store: Store,
    celery: Celery,
    *,
    stalled_after: float,
    queues: Sequence[str] | None = None,
    live_only: bool = True,
) -> list[Requeued]:
    """One pass: queue again the pending items of every stalled job (on ``queues``, if given).

    With ``live_only`` (the default), only queues that a live worker serves are considered:
    queuing work nobody can take would only pile up copies.
    """
    if queues is None and live_only:
        queues = sorted({w["queue"] for w in store.live_workers()})
    done: list[Requeued] = []
    for job in store.stalled_jobs(stalled_after, queues):
        if not store.take_requeue(job["id"], stalled_after):
            continue  # another reconciler got there first, or the job moved meanwhile
        unpublished = job["published_at"] is None
        items = requeue(store, celery, job)
        if unpublished:
            log.warning(
                "job %s was stored but never published (no activity for %.0fs): published %d of its pending items",
                job["id"],
                stalled_after,
                items,
            )
        elif items:
            log.warning(
                "job %s made no progress for %.0fs: queued %d of its pending items again",
                job["id"],
                stalled_after,
                items,
            )
        done.append(Requeued(job["id"], job["queue"], items, unpublished))
    return done


def republish_lost(
    store: Store,
    celery: Celery,
    *,
    lost_after: float,
    queues: Sequence[str] | None = None,
    live_only: bool = True,
) -> list[Requeued]:
    """Publish again the window of every job whose messages are gone: pending items, no progress for
    ``lost_after`` seconds, its queue empty on the broker and none of its pending items claimed by a
    live worker (see the module's docstring). Raises BrokerError when the broker cannot be read.

    Nothing runs twice: the store's claims skip finished items, and a message that comes back later
    (Redis restoring an unacknowledged one) finds its items done.
    """
    if queues is None and live_only:
        queues = sorted({w["queue"] for w in store.live_workers()})
    stalled = store.stalled_jobs(lost_after, queues)
    done: list[Requeued] = []
    for queue in sorted({job["queue"] for job in stalled}):
        held = store.held_jobs(queue)
        jobs = [job for job in stalled if job["queue"] == queue and job["id"] not in held]
        if not jobs or queued_messages(celery, queue):
            continue  # a message waiting on the queue may be the job's: it moves once a worker takes it
        for job in jobs:
            if not store.take_requeue(job["id"], lost_after):
                continue  # another worker got there first, or the job moved meanwhile
            unpublished = job["published_at"] is None
            items = requeue(store, celery, job)
            log.warning(
                "job %s made no progress for %.0fs with no message on queue %s and none of its items held by a "
                "live worker (the broker lost them, or a publish failed): published %d of its pending items",
                job["id"],
                lost_after,
                queue,
                items,
            )
            done.append(Requeued(job["id"], queue, items, unpublished, lost=True))
    return done


def queued_messages(celery: Celery, queue: str) -> int:
    """Messages waiting on ``queue`` at the broker: on Redis, the lengths of its list and of its priority
    lists; messages delivered and not yet acknowledged are not counted. Raises BrokerError when the broker
    does not answer within ``QUEUE_DEPTH_TIMEOUT`` (one try: a worker's heartbeat thread asks)."""
    timeouts = {"socket_timeout": C.QUEUE_DEPTH_TIMEOUT, "socket_connect_timeout": C.QUEUE_DEPTH_TIMEOUT}
    try:
        with celery.connection_for_read(transport_options=timeouts) as conn:
            conn.connect()
            channel: Any = conn.channel()
            missing: tuple[type[BaseException], ...] = (ChannelError, *conn.channel_errors)
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except missing:
                return 0  # no such queue: Redis deletes a list once it is empty
            finally:
                channel.close()
    except Exception as exc:  # kombu raises many connection error types
        broker = mask_url(str(celery.conf.broker_url))
        raise BrokerError(
            f"could not read queue {queue} on {broker}: {type(exc).__name__}: {mask_url(str(exc))}"
        ) from None


@dataclass(frozen=True)
class TakenOver:
    """A worker declared lost, and what of its claim was queued again."""

    worker_id: str
    host: str
    pid: int
    silent_seconds: float
    job_id: str | None
    items: int


def take_over(
    store: Store, celery: Celery, *, dead_after: float, queues: Sequence[str] | None = None
) -> list[TakenOver]:
    """Declare lost the workers (on ``queues``) silent for ``dead_after`` seconds, and queue the items
    they had claimed and not finished; each dead worker is taken over by exactly one caller."""
    taken: list[TakenOver] = []
    for queue in queues if queues is not None else [None]:
        for worker in store.take_over(dead_after, queue):
            job_id, items = _requeue_claim(store, celery, worker.get("lease") or {})
            last_beat = as_utc(worker["heartbeat_at"])
            silent = (utcnow() - last_beat).total_seconds() if last_beat is not None else float("nan")
            log.warning(
                "worker %s (pid %s on %s) sent no heartbeat for %.0fs: marked lost; queued %d claimed items again",
                worker["id"][:8],
                worker["pid"],
                worker["host"],
                silent,
                items,
            )
            taken.append(TakenOver(worker["id"], worker["host"], int(worker["pid"]), silent, job_id, items))
    return taken


def _requeue_claim(store: Store, celery: Celery, lease: dict[str, Any]) -> tuple[str | None, int]:
    """Publish the items of a lost worker's claim that are still pending; returns (its job, items published)."""
    job = store.job_row(lease["job"]) if lease.get("job") else None
    if job is None or job["status"] in C.JOB_FINAL_STATES:
        return (job["id"] if job is not None else None), 0
    pending = store.pending_inputs(job["id"], lease.get("idxs") or [])
    if pending:
        # The dead delivery's attempt: an input that killed the worker runs out of attempts (Store.claim).
        store.count_lost_delivery(job["id"], [idx for idx, _ in pending])
        publish_chunks(
            celery,
            job["id"],
            job["queue"],
            longest_first(pending),
            chunk_size=int(job["chunk_size"]),
            priority=int(job["priority"]),
            slice_end=bool(lease.get("slice_end")),  # or the job's window would wait for a stall
        )
    elif lease.get("slice_end"):
        top_up(store, celery, job)  # it died after its last write, before it moved the job's window on
    return job["id"], len(pending)
