"""Publishing a job's items as chunk messages: used by submit, resume, the reconciler and a stopping worker."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from celery import Celery

from pipeq import constants as C
from pipeq.errors import BrokerError
from pipeq.settings import mask_url


def publish_chunks(
    celery: Celery,
    job_id: str,
    queue: str,
    items: Iterable[tuple[int, Any]],
    *,
    chunk_size: int,
    priority: int = 0,
) -> int:
    """Send ``(idx, input)`` pairs as messages of ``chunk_size`` items, in the order given; returns messages sent.

    Raises BrokerError (credentials masked) when the broker cannot take them. Sending a chunk twice
    is harmless: a worker skips items that are already finished.
    """
    sent = 0
    try:
        with celery.producer_or_acquire() as producer:
            chunk: list[list[Any]] = []
            for idx, value in items:
                chunk.append([idx, value])
                if len(chunk) >= chunk_size:
                    _send(celery, producer, job_id, queue, chunk, priority)
                    sent += 1
                    chunk = []
            if chunk:
                _send(celery, producer, job_id, queue, chunk, priority)
                sent += 1
    except Exception as exc:  # kombu raises many connection error types
        broker = mask_url(str(celery.conf.broker_url))
        raise BrokerError(
            f"could not queue job {job_id} on {broker}: {type(exc).__name__}: {mask_url(str(exc))}"
        ) from None
    return sent


def _send(celery: Celery, producer: Any, job_id: str, queue: str, chunk: list[list[Any]], priority: int) -> None:
    celery.send_task(
        C.CHUNK_TASK_NAME,
        kwargs={"job_id": job_id, "items": chunk, "sent_at": time.time()},
        queue=queue,
        routing_key=queue,
        priority=priority,
        producer=producer,
    )


def longest_first(items: Iterable[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Order items by input length, longest first, so each chunk is homogeneous in length."""
    return sorted(items, key=lambda pair: -input_size(pair[1]))


def input_size(value: Any) -> int:
    """A cheap length of an input, for sorting (characters of its text, or of its JSON form)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(v) for v in value.values() if isinstance(v, str))
    return len(str(value))
