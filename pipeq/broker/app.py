"""The Celery application, built from settings (never a module-level global)."""

from __future__ import annotations

from celery import Celery
from kombu import Connection

from pipeq.settings import Settings


def make_celery(settings: Settings, *, name: str = "pipeq") -> Celery:
    """A Celery app that speaks JSON only and acknowledges a message only after its work is done.

    Results never go through Celery: the SQL store holds them, so there is no result backend.
    """
    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    transport_options = {
        "visibility_timeout": settings.visibility_timeout,
        # One Redis list per priority 0-9, so every job priority is its own lane.
        "priority_steps": list(range(10)),
        **dict(settings.broker_options),
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: ack after the results are committed; a killed child's message goes back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app


def marks_redeliveries(broker_url: str) -> bool:
    """Whether the broker marks a message it delivers again as ``redelivered`` in its delivery info.

    kombu's Redis transport sets the mark on every restore (a message requeued after its pool child
    died, one back after the visibility timeout, a stopping worker's unacknowledged ones), and AMQP
    brokers set it themselves. Where a broker cannot tell (``memory://``, SQS), a worker counts an
    item's first attempt when it claims it (``Store.claim``).
    """
    from kombu.transport import pyamqp, redis

    try:
        with Connection(broker_url) as connection:  # connects to nothing: only its transport class is read
            return isinstance(connection.transport, (redis.Transport, pyamqp.Transport))
    except ImportError:  # a transport whose client library is not installed: it marks nothing we know of
        return False
