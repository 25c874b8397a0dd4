"""The worker's Celery app: one task that runs a chunk, and signals that load the model per child."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import Celery, bootsteps
from celery.concurrency.prefork import TaskPool
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
        # A broker that is away for long is waited for, however long: Celery's default gives up after 100
        # tries (about 47 minutes) and leaves a worker that consumes nothing. Tries come every 2 to 30 s.
        broker_connection_max_retries=None,
    )
    ctx = WorkerContext(settings, cfg)
    app.steps["consumer"].add(_consume_when_ready(ctx, cfg.key.queue))
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
            with ctx.ready_children.get_lock():
                ctx.ready_children.value += 1
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


def _consume_when_ready(ctx: WorkerContext, queue: str) -> type[bootsteps.StartStopStep]:
    """A consumer step: a prefork worker takes messages from ``queue`` only once every pool child is ready.

    Celery starts consuming while the children load their model; the parent would hold the messages it
    took meanwhile, with no claim written anywhere, so a worker killed during its start-up left them in
    Redis's unacknowledged set until the visibility timeout (an hour). Here the parent takes none until
    each child has registered, loaded its model and measured its speed (``WorkerContext.start``); from
    then on each message it holds is one a child runs and claims at once (``-O fair``, one per child).
    """

    class ConsumeWhenReady(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.timer: Any = None

        def _ready(self, c: Any) -> bool:
            if not isinstance(c.pool, TaskPool):  # solo: the model loads in this process, before consuming
                return True
            return bool(ctx.ready_children.value >= c.pool.num_processes)

        def start(self, c: Any) -> None:
            if self._ready(c):
                return
            c.task_consumer.cancel_by_queue(queue)
            log.info("taking no message from %s until the pool's children are ready", queue)
            self.timer = c.timer.call_repeatedly(C.READY_POLL_INTERVAL, self._open, (c,))

        def _open(self, c: Any) -> None:
            if not self._ready(c) or c.task_consumer is None:
                return
            if not c.task_consumer.consuming_from(queue):
                c.task_consumer.add_queue(c.app.amqp.queues[queue])
                c.task_consumer.consume()
                log.info("all %d pool children ready: taking messages from %s", c.pool.num_processes, queue)
            self.stop(c)

        def stop(self, c: Any) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    return ConsumeWhenReady
