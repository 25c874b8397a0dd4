"""``pipeq worker``: serve one configuration until stopped."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from pipeq import constants as C
from pipeq.cli.base import (
    PRECISIONS_DESCRIBED,
    SHADOWED,
    BrokerOpt,
    DatabaseOpt,
    State,
    app,
    cli_errors,
    either,
    settings_from,
)
from pipeq.errors import ConfigurationError
from pipeq.precisions import DEFAULT_ALLOWED_PRECISIONS, INT8_BACKENDS, REFERENCE

# ------------------------------------------------------------------------- worker

log = logging.getLogger(__name__)


@app.command()
def worker(
    task: Annotated[str, typer.Option("--task", help="Task served, e.g. sentiment-analysis.")],
    model: Annotated[str, typer.Option("--model", help="Local directory or hub id.")],
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help=f"{PRECISIONS_DESCRIBED}; or auto: measure the allowed ones, serve the fastest whose outputs "
            f"agree with {REFERENCE}'s on the calibration texts.",
        ),
    ] = "auto",
    allow_precision: Annotated[
        str | None,
        typer.Option(
            "--allow-precision",
            help=f"What auto may pick, comma-separated [default: {','.join(DEFAULT_ALLOWED_PRECISIONS)}].",
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Model revision (hub).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda:N [default: cuda:0 if any].")] = None,
    device_map: Annotated[
        str | None,
        typer.Option(
            "--device-map",
            metavar="STRATEGY|FILE",
            help="Spread a model too large for one device over the GPUs, the CPU and the disk: auto, balanced, "
            "balanced_low_0 or sequential (accelerate places the modules), or a JSON file of module names to "
            "devices. It fits the model; its layers run one device after another.",
        ),
    ] = None,
    max_memory: Annotated[
        list[str] | None,
        typer.Option(
            "--max-memory",
            metavar="DEVICE=SIZE",
            help="Most memory --device-map may use on a device, repeatable: 0=20GiB (or cuda:0=20GiB), cpu=64GiB "
            "[default: what each device has free].",
        ),
    ] = None,
    offload_folder: Annotated[
        str | None,
        typer.Option(
            "--offload-folder",
            metavar="DIR",
            help="Where --device-map writes weights it puts on the disk when they are not read from a "
            "safetensors checkpoint in place.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            help=f"Pool children (model copies) [default: 1; on CUDA, for weights up to "
            f"{C.SMALL_MODEL_BYTES // 2**30} GiB, one per {C.CORES_PER_GPU_CHILD} cores, "
            f"at most {C.MAX_GPU_CHILDREN}].",
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(help=f"Padded tokens per forward pass [default: calibrated, else {C.DEFAULT_MAX_BATCH_TOKENS}]."),
    ] = None,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Sweep --max-batch-tokens on this model and device; store the fastest.")
    ] = False,
    max_batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = C.DEFAULT_MAX_BATCH_SIZE,
    int8_backend: Annotated[
        str | None, typer.Option(help=f"{either(list(INT8_BACKENDS))} [default: bnb on CUDA, else dynamic].")
    ] = None,
    pipeline_class: Annotated[str | None, typer.Option(help="Custom Pipeline subclass, module:Class.")] = None,
    model_class: Annotated[str | None, typer.Option(help="Model class for --pipeline-class, module:Class.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code to run.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads per child [default: cores/children].")] = None,
    streams: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"Forward passes a child runs at once, sharing its torch threads [default: on the CPU one per "
            f"thread, at most {C.MAX_CPU_STREAMS}; on CUDA 1].",
        ),
    ] = None,
    tokenizer_threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"Fast-tokenizer threads per child [default: 1 on the CPU; on CUDA cores/children - 1, "
            f"at most {C.MAX_TOKENIZER_THREADS}].",
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork (default) or solo.")] = "prefork",
    warmup: Annotated[bool, typer.Option(help="Warm up over a few batch shapes after loading.")] = True,
    metrics_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port (metrics extra).")
    ] = None,
    shadow_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help=f"Also run this share of done items at {REFERENCE} and record their agreement on the job "
            f"({SHADOWED} workers; loads a second, {REFERENCE} copy of the model; 0 turns it off) "
            f"[default: {C.DEFAULT_SHADOW_FRACTION:g} below {REFERENCE}, off at {REFERENCE}].",
        ),
    ] = None,
    shadow_max_items: Annotated[
        int,
        typer.Option(
            min=0,
            help="Stop sampling a job once this many of its items were compared, over all workers (0: no cap).",
        ),
    ] = C.SHADOW_MAX_ITEMS,
    calibration_texts: Annotated[
        str | None,
        typer.Option(
            "--calibration-texts",
            metavar="FILE",
            help="Texts (one a line) auto runs through each precision and fp32 to compare [default: a shipped "
            "English and Chinese set].",
        ),
    ] = None,
    min_agreement: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Least share of items whose top label (entities, tokens) stays fp32's."),
    ] = C.DEFAULT_MIN_AGREEMENT,
    label_margin: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="A top label counts only where fp32's top two are further apart."),
    ] = C.DEFAULT_LABEL_MARGIN,
    max_score_diff: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Largest difference of a probability from fp32's.")
    ] = C.DEFAULT_MAX_SCORE_DIFF,
    min_cosine: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Least cosine of an embedding to fp32's, on every text.")
    ] = C.DEFAULT_MIN_COSINE,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Serve one (task, model, precision) configuration until stopped.

    Example: pipeq worker --task sentiment-analysis --model ./my-model --precision int8
    """
    import os

    for name, value in C.WORKER_ENVIRONMENT.items():  # before torch loads its OpenMP runtime
        os.environ.setdefault(name, value)
    from dataclasses import replace

    from pipeq.agreement import Thresholds
    from pipeq.broker.probe import check_broker
    from pipeq.routing import AUTO_PRECISION, ServeKey, check_precision, normalize_model
    from pipeq.tasks import normalize_task
    from pipeq.worker.children import choose_children
    from pipeq.worker.config import WorkerConfig, parse_precisions
    from pipeq.worker.devices import cuda_device_count, worker_cores
    from pipeq.worker.main import run_worker, validate
    from pipeq.worker.placement import parse_device_map, parse_max_memory

    with cli_errors():
        # Every flag, the task and the model are checked before torch or transformers is imported (seconds):
        # a mistyped flag fails at once.
        settings = settings_from(broker_url, database_url)
        auto = precision == AUTO_PRECISION
        if allow_precision is not None and not auto:
            raise ConfigurationError("--allow-precision only applies to --precision auto")
        if calibration_texts is not None and not auto:
            raise ConfigurationError("--calibration-texts only applies to --precision auto")
        if device_map is not None and device is not None:
            raise ConfigurationError(
                f"--device-map places the model over the devices itself, so --device {device} contradicts it: "
                "leave --device out (--max-memory limits what each device takes)"
            )
        key = ServeKey(
            task=normalize_task(task),
            model=normalize_model(model),
            precision=precision if auto else check_precision(precision),
            revision=revision,
        )
        cfg = WorkerConfig(
            key=key,
            device=device or "cpu",  # no --device: CUDA if torch sees any, asked below
            concurrency=1 if concurrency is None else concurrency,  # None: chosen below, once the device is known
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            int8_backend=int8_backend,
            pipeline_class=pipeline_class,
            model_class=model_class,
            trust_remote_code=trust_remote_code,
            threads=threads,
            streams=streams,
            tokenizer_threads=tokenizer_threads,
            warmup=warmup,
            allowed_precisions=parse_precisions(allow_precision) if allow_precision else DEFAULT_ALLOWED_PRECISIONS,
            calibrate=calibrate,
            metrics_port=metrics_port,
            shadow_fraction=shadow_fraction,
            shadow_max_items=shadow_max_items,
            calibration_texts=calibration_texts,
            device_map=None if device_map is None else parse_device_map(device_map),
            max_memory=parse_max_memory(max_memory) if max_memory else None,
            offload_folder=offload_folder,
            thresholds=Thresholds(
                min_agreement=min_agreement,
                label_margin=label_margin,
                max_score_diff=max_score_diff,
                min_cosine=min_cosine,
            ),
        )
        check_broker(settings)  # in seconds, before torch loads: not Celery's minute of connection retries
        validate(cfg)  # the task (transformers' task list, cached on disk after the first run) and the model
        if device is None and cuda_device_count():
            cfg = replace(cfg, device="cuda:0")
        # A device map may span every GPU: it sizes itself by all the cores, not one GPU's share.
        cfg = replace(cfg, cores=None if cfg.device_map is not None else worker_cores(cfg.device))
        # A solo pool is one process whatever --concurrency says; a device map is one copy of the model.
        if concurrency is None and pool != "solo" and cfg.device_map is None:
            choice = choose_children(cfg)
            if cfg.device != "cpu":
                log.info(
                    "%d pool children on %s: %s (--concurrency to choose)", choice.children, cfg.device, choice.reason
                )
            cfg = replace(cfg, concurrency=choice.children)
        level = "DEBUG" if State.verbosity > 0 else "WARNING" if State.verbosity < 0 else "INFO"
        run_worker(settings, cfg, loglevel=level, pool=pool)
