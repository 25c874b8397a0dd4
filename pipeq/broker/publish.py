"""Publishing items as chunk messages: used by submit, resume, the reconciler and the workers' window."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from celery import Celery

from pipeq import constants as C
from pipeq.errors import BrokerError
from pipeq.primitives import input_size
from pipeq.settings import mask_url


def publish_chunks(
    celery: Celery,
    job_id: str,
    queue: str,
    items: Iterable[tuple[int, Any]],
    *,
    chunk_size: int,
    priority: int = 0,
    slice_end: bool = False,
) -> int:
    """Send ``(idx, input)`` pairs as messages of ``chunk_size`` items, in the order given; returns messages sent.

    With ``slice_end`` the last message is marked: the worker that finishes it publishes the job's
    next slice. Raises BrokerError (credentials masked) when the broker cannot take them. Sending
    a chunk twice is harmless: a worker skips items that are already finished.
    """
    chunks: list[list[list[Any]]] = [[]]
    for idx, value in items:
        if len(chunks[-1]) >= chunk_size:
            chunks.append([])
        chunks[-1].append([idx, value])
    if not chunks[-1]:
        return 0
    try:
        with celery.producer_or_acquire() as producer:
            for n, chunk in enumerate(chunks, start=1):
                kwargs: dict[str, Any] = {"job_id": job_id, "items": chunk, "sent_at": time.time()}
                if slice_end and n == len(chunks):
                    kwargs["slice_end"] = True
                celery.send_task(
                    C.CHUNK_TASK_NAME,
                    kwargs=kwargs,
                    queue=queue,
                    routing_key=queue,
                    priority=broker_priority(celery, priority),
                    producer=producer,
                )
    except Exception as exc:  # kombu raises many connection error types
        broker = mask_url(str(celery.conf.broker_url))
        raise BrokerError(
            f"could not queue job {job_id} on {broker}: {type(exc).__name__}: {mask_url(str(exc))}"
        ) from None
    return len(chunks)


def broker_priority(celery: Celery, priority: int) -> int:
    """pipeq's priority (0-9, higher first) as the broker's: Redis serves its priority 0 first, so it is reversed."""
    priority = max(C.MIN_PRIORITY, min(C.MAX_PRIORITY, priority))
    scheme = str(celery.conf.broker_url or "").split("://", 1)[0]
    return C.MAX_PRIORITY - priority if scheme in ("redis", "rediss", "sentinel") else priority


def longest_first(items: Iterable[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Order items by input length, longest first, so each chunk is homogeneous in length."""
    return sorted(items, key=lambda pair: -input_size(pair[1]))
