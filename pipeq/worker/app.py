"""The worker's Celery app: one task that runs a chunk, and signals that load the model per child."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.exc import DBAPIError

from pipeq import constants as C
from pipeq.celery_app import make_celery
from pipeq.settings import Settings
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext

log = logging.getLogger(__name__)

#: Backoff (seconds) when the store is unreachable: the message is retried, never acknowledged as done.
DB_RETRY_BACKOFF_MAX = 60


def create_worker_app(settings: Settings, cfg: WorkerConfig) -> tuple[Celery, WorkerContext]:
    """A Celery app serving ``cfg``'s queue; the model loads in each pool child, not here."""
    app = make_celery(settings, name=f"pipeq-{cfg.key.task}")
    app.conf.update(
        task_default_queue=cfg.key.queue,
        worker_proc_alive_timeout=C.PROCESS_START_TIMEOUT,
    )
    ctx = WorkerContext(settings, cfg)

    @app.task(
        name=C.CHUNK_TASK_NAME,
        shared=False,  # never leak this app's task (and its context) into other Celery apps
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(DBAPIError,),
        retry_backoff=True,
        retry_backoff_max=DB_RETRY_BACKOFF_MAX,
        max_retries=None,
    )
    def run_chunk(self: Any, job_id: str, items: list[list[Any]], sent_at: float | None = None) -> dict[str, int]:
        if ctx.runtime is None:  # solo pool or eager use: no child process was started
            ctx.start()
        return ctx.run_chunk(job_id, items, sent_at)

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

    worker_process_init.connect(_child_init, weak=False)
    worker_process_shutdown.connect(_child_shutdown, weak=False)

    def _detach() -> None:
        worker_process_init.disconnect(_child_init)
        worker_process_shutdown.disconnect(_child_shutdown)

    ctx.on_stop = _detach
    return app, ctx
