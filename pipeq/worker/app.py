"""The worker's Celery app: one task that runs a chunk, and signals that load the model per child."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutting_down

from pipeq import constants as C
from pipeq.broker.app import make_celery, marks_redeliveries
from pipeq.errors import StoreError
from pipeq.settings import Settings
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext

log = logging.getLogger(__name__)


def create_worker_app(settings: Settings, cfg: WorkerConfig) -> tuple[Celery, WorkerContext]:
    """A Celery app serving ``cfg``'s queue; the model loads in each pool child, not here."""
    app = make_celery(settings, name=f"pipeq-{cfg.key.task}")
    app.conf.update(
        task_default_queue=cfg.key.queue,
        worker_proc_alive_timeout=C.PROCESS_START_TIMEOUT,
    )
    ctx = WorkerContext(settings, cfg)
    ctx.celery = app
    marked = marks_redeliveries(settings.broker_url)

    @app.task(
        name=C.CHUNK_TASK_NAME,
        shared=False,  # never leak this app's task (and its context) into other Celery apps
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def run_chunk(
        self: Any, job_id: str, items: list[list[Any]], sent_at: float | None = None, slice_end: bool = False
    ) -> dict[str, int]:
        if ctx.runtime is None:  # solo pool or eager use: no child process was started
            ctx.start()
        try:
            redelivered = bool((self.request.delivery_info or {}).get("redelivered")) if marked else None
            return ctx.run_chunk(job_id, items, sent_at, slice_end=slice_end, redelivered=redelivered)
        except StoreError as exc:
            # The store stayed unreachable through the retry budget: hand the message back, never ack it.
            log.error("%s; handing job %s's chunk back to the queue", exc, job_id[:8])
            raise Reject(str(exc), requeue=True) from None

    def _child_init(**_: Any) -> None:
        if ctx.load_failed.value:  # a sibling already failed to load: the pool is shutting down
            os._exit(1)
        try:
            ctx.start()
        except Exception:
            log.critical("worker could not load its pipeline; shutting the worker down", exc_info=True)
            ctx.load_failed.value = 1  # shared with the parent, which then exits non-zero
            ctx.mark_failed()
            os.kill(os.getppid(), signal.SIGTERM)
            os._exit(1)

    def _child_shutdown(**_: Any) -> None:
        ctx.stop()

    def _shutting_down(**_: Any) -> None:
        # In the parent, on SIGTERM/SIGINT (warm shutdown): children finish their running batch,
        # commit it and hand the rest of their chunk back to the queue.
        ctx.shutting_down.value = 1

    worker_process_init.connect(_child_init, weak=False)
    worker_process_shutdown.connect(_child_shutdown, weak=False)
    worker_shutting_down.connect(_shutting_down, weak=False)

    def _detach() -> None:
        worker_process_init.disconnect(_child_init)
        worker_process_shutdown.disconnect(_child_shutdown)
        worker_shutting_down.disconnect(_shutting_down)

    ctx.on_stop = _detach
    return app, ctx
