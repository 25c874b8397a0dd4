"""Start a worker: validate the configuration, then hand over to Celery's prefork pool."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace

from pipeq.errors import ConfigurationError
from pipeq.precisions import REFERENCE
from pipeq.routing import check_model
from pipeq.settings import Settings
from pipeq.store import Store
from pipeq.tasks import check_task
from pipeq.worker.config import WorkerConfig
from pipeq.worker.devices import device_name
from pipeq.worker.placement import named_cuda_devices

log = logging.getLogger(__name__)


def validate(cfg: WorkerConfig) -> None:
    """Fail fast in the parent, before any child loads the model: the task, the model, the shadow check and the
    CUDA devices named (``--device``, ``--device-map``'s file, ``--max-memory``).

    Cheap for a built-in task: transformers is imported only after it passes (a custom pipeline class
    is imported here, to register its task; a named CUDA device imports torch, to ask whether it is seen).
    """
    if cfg.pipeline_class:
        from pipeq.worker.loading import register_custom_pipeline

        register_custom_pipeline(cfg)
    custom = frozenset({cfg.key.task}) if cfg.pipeline_class else frozenset()
    check_task(cfg.key.task, custom_tasks=custom)
    check_model(cfg.key.model)
    cfg.check_shadow()
    for device in dict.fromkeys([cfg.device, *named_cuda_devices(cfg.device_map, cfg.max_memory)]):
        if device.startswith("cuda"):
            device_name(device)  # asked in a spawned process (the pool forks from this one); raises if unseen


def run_worker(settings: Settings, cfg: WorkerConfig, *, loglevel: str = "INFO", pool: str = "prefork") -> None:
    """Run the worker until it is stopped (SIGTERM finishes running batches first); ``cfg`` passed ``validate``."""
    from pipeq.worker.app import create_worker_app  # the model stack: seconds of imports
    from pipeq.worker.autotune import tune

    store = Store(settings.database_url)
    try:
        store.check_schema()
        cfg = tune(store, cfg)  # --precision auto and the token budget, measured in a spawned process
        if cfg.key.precision == REFERENCE and cfg.shadow_fraction:  # auto chose fp32: nothing to compare
            log.info("no shadow check: this worker serves %s itself", REFERENCE)
            cfg = replace(cfg, shadow_fraction=0.0)
    finally:
        store.close()
    if cfg.metrics_port is not None:  # before any child forks: they inherit its multiprocess directory
        from pipeq.worker.metrics import start_metrics_server

        start_metrics_server(cfg.metrics_port, cfg, settings.broker_url)
    app, ctx = create_worker_app(settings, cfg)
    if pool == "solo":  # no fork: the single process serves, so it loads the model now
        ctx.start()
    log.info("serving %s on queue %s (%s)", cfg.key.model, cfg.key.queue, settings.masked())
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        log.warning("running as root: Celery advises running a worker as a user of its own (-v shows its warning)")
    argv = ["worker", "--queues", cfg.key.queue, "--concurrency", str(cfg.concurrency), "--pool", pool,
            "--loglevel", loglevel, "--hostname", f"pipeq-{cfg.key.task}-{cfg.key.precision}@{socket.gethostname()}",
            "-O", "fair"]  # fmt: skip
    try:
        app.worker_main(argv)
    except SystemExit:
        if not ctx.load_failed.value:
            raise
    if ctx.load_failed.value:
        raise ConfigurationError("the worker could not load its pipeline (see the log above)")
