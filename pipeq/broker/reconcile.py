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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from celery import Celery

from pipeq.broker.window import requeue
from pipeq.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requeued:
    """One job whose pending items a reconciler pass queued again."""

    job_id: str
    queue: str
    items: int
    #: True when the job had never been published (its producer stopped between commit and publish).
    unpublished: bool = False


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
