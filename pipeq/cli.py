"""The ``pipeq`` command line: logs go to stderr, data (job ids, results) to stdout.

Exit codes: 0 success; 1 a waited-for job finished with failed or cancelled items;
2 bad usage, bad input or configuration (nothing was queued); 3 store or broker unreachable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipeq import constants as C
from pipeq.errors import BrokerError, InputError, PipeqError, StoreError
from pipeq.precisions import DEFAULT_ALLOWED_PRECISIONS, INT8_BACKENDS, PRECISIONS, REFERENCE
from pipeq.producer.readers import INPUT_FORMATS
from pipeq.settings import Settings

if TYPE_CHECKING:
    from pipeq.store import Store

app = typer.Typer(
    name="pipeq",
    help="Queue-based batch worker for Hugging Face Transformers pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the SQL store's schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

BrokerOpt = Annotated[str | None, typer.Option("--broker-url", help="Broker URL [env: PIPEQ_BROKER_URL].")]
DatabaseOpt = Annotated[str | None, typer.Option("--database-url", help="Store URL [env: PIPEQ_DATABASE_URL].")]


def _either(names: list[str]) -> str:
    """``a, b or c``, for help texts."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


#: Help texts listing what the registries hold (``pipeq.precisions``, the input formats of ``readers``).
_PRECISION_NAMES = _either(list(PRECISIONS))
_PRECISIONS_DESCRIBED = ", ".join(f"{p.name} ({p.description})" for p in PRECISIONS.values())
_INPUT_FORMAT_NAMES = _either(list(INPUT_FORMATS))
_INPUT_SUFFIXES = _either([f.suffixes[0] for f in INPUT_FORMATS.values()])
_SHADOWED = _either([name for name in PRECISIONS if name != REFERENCE])


class _State:
    verbosity: int = 0


def _settings(broker_url: str | None = None, database_url: str | None = None, **more: Any) -> Settings:
    return Settings.from_env(broker_url=broker_url, database_url=database_url, **more)


def _fail(exc: PipeqError) -> typer.Exit:
    typer.echo(f"pipeq: error: {exc}", err=True)
    code = 3 if isinstance(exc, StoreError | BrokerError) else 2
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Report pipeq's errors on stderr and exit with their code (2 bad input, 3 store or broker)."""
    try:
        yield
    except PipeqError as exc:
        raise _fail(exc) from None


@contextmanager
def _open_store(database_url: str | None) -> Iterator[Store]:
    """The store of the settings, checked to be reachable and migrated, closed afterwards; errors as ``_errors``."""
    from pipeq.store import Store

    with _errors():
        store = Store(_settings(database_url=database_url).database_url)
        try:
            store.check_schema()
            yield store
        finally:
            store.close()


def _version(value: bool) -> None:
    if value:
        from pipeq import __version__

        typer.echo(f"pipeq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    from pipeq import logs

    _State.verbosity = -1 if quiet else verbose
    logs.configure(_State.verbosity)


# ----------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(
    database_url: DatabaseOpt = None, revision: Annotated[str, typer.Argument(help="Target revision.")] = "head"
) -> None:
    """Create or migrate the store's tables (SQLite ./pipeq.db unless PIPEQ_DATABASE_URL is set).

    Example: PIPEQ_DATABASE_URL=postgresql+psycopg://pipeq@db/pipeq pipeq db upgrade
    """
    from pipeq.settings import mask_url
    from pipeq.store import schema as db

    settings = _settings(database_url=database_url)
    try:
        db.upgrade(settings.database_url, revision)
    except PipeqError as exc:
        raise _fail(exc) from None
    except Exception as exc:  # SQLAlchemy connection errors
        typer.echo(f"pipeq: error: cannot migrate {mask_url(settings.database_url)}: {mask_url(str(exc))}", err=True)
        raise typer.Exit(3) from None
    typer.echo(f"store {mask_url(settings.database_url)} is at revision {revision}", err=True)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. base.")], database_url: DatabaseOpt = None
) -> None:
    """Migrate the store's schema down to REVISION.

    Example: pipeq db downgrade 0003
    """
    from pipeq.store import schema as db

    db.downgrade(_settings(database_url=database_url).database_url, revision)


# ------------------------------------------------------------------------- worker


@app.command()
def worker(
    task: Annotated[str, typer.Option("--task", help="Task served, e.g. sentiment-analysis.")],
    model: Annotated[str, typer.Option("--model", help="Local directory or hub id.")],
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help=f"{_PRECISIONS_DESCRIBED}; or auto: measure the allowed ones, serve the fastest.",
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
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Pool children (model copies).")] = 1,
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(help=f"Padded tokens per forward pass [default: calibrated, else {C.DEFAULT_MAX_BATCH_TOKENS}]."),
    ] = None,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Sweep --max-batch-tokens on this model and device; store the fastest.")
    ] = False,
    max_batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = C.DEFAULT_MAX_BATCH_SIZE,
    int8_backend: Annotated[
        str | None, typer.Option(help=f"{_either(list(INT8_BACKENDS))} [default: bnb on CUDA, else dynamic].")
    ] = None,
    pipeline_class: Annotated[str | None, typer.Option(help="Custom Pipeline subclass, module:Class.")] = None,
    model_class: Annotated[str | None, typer.Option(help="Model class for --pipeline-class, module:Class.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code to run.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads per child [default: cores/children].")] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork (default) or solo.")] = "prefork",
    warmup: Annotated[bool, typer.Option(help="Warm up over a few batch shapes after loading.")] = True,
    metrics_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port (metrics extra).")
    ] = None,
    shadow_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help=f"Also run this share of done items at {REFERENCE} and record label agreement and score difference "
            f"on the job ({_SHADOWED} workers; loads a second, {REFERENCE} copy of the model).",
        ),
    ] = 0.0,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Serve one (task, model, precision) configuration until stopped.

    Example: pipeq worker --task sentiment-analysis --model ./my-model --precision int8
    """
    import os

    for name, value in C.WORKER_ENVIRONMENT.items():  # before torch loads its OpenMP runtime
        os.environ.setdefault(name, value)
    from pipeq.errors import ConfigurationError
    from pipeq.routing import AUTO_PRECISION, ServeKey, check_precision, normalize_model
    from pipeq.tasks import normalize_task
    from pipeq.worker.config import WorkerConfig, parse_precisions
    from pipeq.worker.main import run_worker

    if device is None:
        from pipeq.worker.measure import cuda_device_count

        device = "cuda:0" if cuda_device_count() else "cpu"
    try:
        auto = precision == AUTO_PRECISION
        if allow_precision is not None and not auto:
            raise ConfigurationError("--allow-precision only applies to --precision auto")
        key = ServeKey(
            task=normalize_task(task),
            model=normalize_model(model),
            precision=precision if auto else check_precision(precision),
            revision=revision,
        )
        cfg = WorkerConfig(
            key=key,
            device=device,
            concurrency=concurrency,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            int8_backend=int8_backend,
            pipeline_class=pipeline_class,
            model_class=model_class,
            trust_remote_code=trust_remote_code,
            threads=threads,
            warmup=warmup,
            allowed_precisions=parse_precisions(allow_precision) if allow_precision else DEFAULT_ALLOWED_PRECISIONS,
            calibrate=calibrate,
            metrics_port=metrics_port,
            shadow_fraction=shadow_fraction,
        )
        level = "DEBUG" if _State.verbosity > 0 else "WARNING" if _State.verbosity < 0 else "INFO"
        run_worker(_settings(broker_url, database_url), cfg, loglevel=level, pool=pool)
    except PipeqError as exc:
        raise _fail(exc) from None


# ------------------------------------------------------------------------- submit


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise InputError(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            params[name] = json.loads(raw)
        except json.JSONDecodeError:
            params[name] = raw
    return params


@app.command()
def submit(
    input: Annotated[str, typer.Argument(help=f"{_INPUT_SUFFIXES} file, or - for stdin.")],
    task: Annotated[str, typer.Option("--task", help="Task, e.g. sentiment-analysis.")],
    model: Annotated[str, typer.Option("--model", help="Model served by a worker (same string).")],
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help=f"{_PRECISION_NAMES} [default: what live workers serve for the model, else fp32].",
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Field holding your id (optional in records).")] = "id",
    pair_field: Annotated[str | None, typer.Option(help="Field with the second text of a pair.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Task parameter KEY=VALUE (JSON).")] = None,
    input_format: Annotated[str | None, typer.Option(help=f"{_INPUT_FORMAT_NAMES}.")] = None,
    skip_empty: Annotated[bool, typer.Option(help="Drop empty texts instead of refusing the input.")] = False,
    max_text_chars: Annotated[int | None, typer.Option(help="Longest text accepted.")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Items per broker message.")] = None,
    priority: Annotated[int, typer.Option(help="Job priority 0-9, higher first; jobs share a queue fairly.")] = 0,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache",
            help="Reuse outputs stored for the same input, task, model revision, precision and parameters; "
            "store this job's outputs for later jobs.",
        ),
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until done; exit 1 if any item failed.")] = False,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Store a job and queue it; prints the job id on the last line of stdout.

    Example: pipeq submit reviews.jsonl --task sentiment-analysis --model ./my-model --wait
    """
    from pipeq.producer.client import Client

    more = {"max_text_chars": max_text_chars, "chunk_size": chunk_size}
    with _errors(), Client(_settings(broker_url, database_url, **more)) as client:
        job = client.submit(
            input,
            task=task,
            model=model,
            precision=precision,
            revision=revision,
            params=_parse_params(param or []),
            text_field=text_field,
            id_field=id_field,
            pair_field=pair_field,
            skip_empty=skip_empty,
            priority=priority,
            input_format=input_format,
            cache=cache,
        )
        total = job.status().total
        typer.echo(f"queued {total:,} items as job {job.id}", err=True)
        if wait:
            state = job.wait(progress=True)
            typer.echo(job.id)
            raise typer.Exit(0 if state.failed == 0 and state.cancelled == 0 else 1)
        typer.echo(job.id)


# ---------------------------------------------------------------- status & results


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    watch: Annotated[bool, typer.Option("--watch", help="Live progress bar until the job is final.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    database_url: DatabaseOpt = None,
) -> None:
    """Counts, progress, rate and ETA of a job, and the workers on its queue.

    Example: pipeq status 3f2a9c... --watch
    """
    from pipeq.progress import describe
    from pipeq.progress import watch as watch_job

    with _open_store(database_url) as store:
        state = watch_job(store, job_id) if watch else store.job(job_id)
        queue = (store.job_row(job_id) or {}).get("queue")
        live = store.live_workers(queue) if queue else []
        stale = store.stale_workers(queue) if queue else []
    workers_info = {
        "live": [{"id": w["id"], "host": w["host"], "pid": w["pid"], "current_job": w["current_job"]} for w in live],
        "stale": [{"id": w["id"], "host": w["host"], "pid": w["pid"], "heartbeat_at": str(w["heartbeat_at"])}
                  for w in stale],
    }  # fmt: skip
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "id": state.id,
                    "status": state.status,
                    "task": state.task,
                    "model": state.model,
                    "precision": state.precision,
                    "total": state.total,
                    "done": state.done,
                    "failed": state.failed,
                    "cancelled": state.cancelled,
                    "pending": state.pending,
                    "rate": round(state.rate, 3),
                    "eta_seconds": state.eta_seconds,
                    "error": state.error,
                    "cache_hits": state.cache_hits,
                    "shadow": state.shadow,
                    "workers": workers_info,
                }
            )
        )
    else:
        typer.echo(f"job {state.id} [{state.task} {state.precision}] {describe(state)}")
        if state.error:
            typer.echo(f"error: {state.error}")
        if state.cache_hits:
            typer.echo(f"result cache: {state.cache_hits:,} items reused")
        if state.shadow:
            from pipeq.report.text import shadow_line

            typer.echo(f"shadow check: {shadow_line(state.shadow)}")
        busy = sum(w["current_job"] == job_id for w in live)
        typer.echo(f"workers: {len(live)} live on its queue ({busy} on this job), {len(stale)} stale")
        if not state.is_final and not live:
            typer.echo(
                f"warning: no live worker serves this job ({state.task}, {state.model}, {state.precision}); "
                f"start one with: pipeq worker --task {state.task} --model {state.model} --precision {state.precision}"
            )


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="jsonl, csv or parquet.")] = "jsonl",
    output: Annotated[str | None, typer.Option("--output", "-o", help="File (default: stdout).")] = None,
    database_url: DatabaseOpt = None,
) -> None:
    """One row per input item in input order: index, id, status, output, error, timing.

    Example: pipeq results 3f2a9c... --format parquet -o results.parquet
    """
    from pipeq.producer.client import Job
    from pipeq.producer.writers import write_results

    with _open_store(database_url) as store:
        store.job(job_id)
        rows = Job(store, job_id).results()
        n = write_results(rows, fmt, out=sys.stdout, path=output)
    if output:
        typer.echo(f"wrote {n:,} rows to {output}", err=True)


@app.command()
def report(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as JSON on stdout.")] = False,
    html: Annotated[
        str | None, typer.Option("--html", metavar="FILE", help="Write a self-contained HTML page with charts.")
    ] = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Throughput over time, time per phase (p50/p95/p99), batch sizes, padding, failures and workers of a job.

    Prints a text summary unless --json or --html is given; --html needs the report extra (matplotlib).

    Example: pipeq report JOB --html report.html
    """
    from pipeq.report import build_report
    from pipeq.report.text import format_text

    with _open_store(database_url) as store:
        job_report = build_report(store, job_id)
    if html:
        from pipeq.report.html import write_html

        with _errors():
            write_html(job_report, html)
    if html:
        typer.echo(f"wrote the report of job {job_id} to {html}", err=True)
    if as_json:
        typer.echo(json.dumps(job_report.as_dict()))
    elif not html:
        typer.echo(format_text(job_report))


@app.command()
def jobs(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most jobs listed.")] = 20,
    status: Annotated[str | None, typer.Option("--status", help="queued, running, done or cancelled.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    database_url: DatabaseOpt = None,
) -> None:
    """Recent jobs, newest first: id, created, status, task, precision, model, done/failed/total, rate.

    Example: pipeq jobs --status running --limit 5
    """
    states = (C.JOB_QUEUED, C.JOB_RUNNING, *C.JOB_FINAL_STATES)
    if status is not None and status not in states:
        raise typer.BadParameter(f"{status!r} is not one of {', '.join(states)}", param_hint="--status")
    with _open_store(database_url) as store:
        rows = store.recent_jobs(limit, status)
    if as_json:
        keys = ("id", "status", "task", "model", "precision", "total", "done", "failed", "cancelled")
        listed = [
            {**{k: getattr(j, k) for k in keys}, "created_at": j.created_at.isoformat(), "rate": round(j.rate, 3)}
            for j in rows
        ]
        typer.echo(json.dumps(listed))
        return
    for j in rows:
        typer.echo(
            f"{j.id}  {j.created_at:%Y-%m-%d %H:%M:%S}  {j.status:<9} {j.task} {j.precision}  "
            f"{j.done:,}/{j.failed:,}/{j.total:,}  {j.rate:,.1f}/s  {j.model}"
        )
    if not rows:
        typer.echo("no jobs", err=True)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")], database_url: DatabaseOpt = None) -> None:
    """Stop a job's remaining items from running; finished results are kept.

    Example: pipeq cancel 3f2a9c...
    """
    with _open_store(database_url) as store:
        n = store.cancel_job(job_id)
    typer.echo(f"cancelled {n:,} pending items of job {job_id}")


@app.command()
def resume(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Queue a job's pending items again (after the broker lost them, or a failed publish).

    Example: pipeq resume 3f2a9c...
    """
    from pipeq.producer.client import Client

    with _errors(), Client(_settings(broker_url, database_url)) as client:
        n = client.resume(job_id)
    typer.echo(f"re-queued {n:,} pending items of job {job_id}")


@app.command()
def reconcile(
    stalled_after: Annotated[
        float | None, typer.Option(help="Seconds without progress on an idle queue [env: PIPEQ_STALLED_AFTER].")
    ] = None,
    all_queues: Annotated[bool, typer.Option("--all", help="Also queues no live worker serves.")] = False,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Queue again the pending items of jobs that stopped moving (e.g. Redis lost its data).

    Jobs stored but never queued (the producer died, or the broker refused them) are queued too.
    Workers do this for their own queue every PIPEQ_RECONCILE_INTERVAL seconds; this runs one pass now.
    Example: pipeq reconcile --stalled-after 60
    """
    from pipeq.broker.app import make_celery
    from pipeq.broker.reconcile import reconcile as reconcile_once

    with _errors():
        settings = _settings(broker_url, database_url, stalled_after=stalled_after)
    with _open_store(settings.database_url) as store, make_celery(settings) as celery:
        done = reconcile_once(store, celery, stalled_after=settings.stalled_after, live_only=not all_queues)
    for r in done:
        if r.unpublished:
            typer.echo(f"published {r.items:,} pending items of job {r.job_id} (stored but never queued)")
        else:
            typer.echo(f"re-queued {r.items:,} pending items of job {r.job_id}")
    if not done:
        typer.echo("no stalled jobs", err=True)


def _sql_share(worker: dict[str, Any]) -> str:
    busy = worker.get("busy_seconds") or 0.0
    return f", SQL writes {100 * (worker.get('write_seconds') or 0.0) / busy:.1f}% of busy time" if busy > 0 else ""


@app.command()
def workers(
    database_url: DatabaseOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Live workers (fresh heartbeat): configuration, footprint, load time, how auto precision chose.

    Example: pipeq workers --json
    """
    from pipeq.worker.autotune import describe

    with _open_store(database_url) as store:
        rows = store.live_workers()
        stale = store.stale_workers()
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for w in rows:
        mb = (w["footprint_bytes"] or 0) / 1e6
        how_precision, how_budget = describe(w["settings"] or {})
        typer.echo(
            f"{w['id'][:8]} {w['host']}:{w['pid']} {w['status']} {w['task']} precision {w['precision']}{how_precision} "
            f"{w['device']} {mb:.1f} MB load {w['load_seconds'] or 0:.1f}s{how_budget} {w['model']} "
            f"| {w['items_done']:,} items, {'running job ' + w['current_job'] if w['current_job'] else 'idle'}"
            f"{_sql_share(w)}"
        )
    if not rows:
        typer.echo("no live workers", err=True)
    if stale:
        typer.echo(
            f"{len(stale)} stale workers (no heartbeat for {C.HEARTBEAT_STALE_AFTER:.0f}s, never stopped):", err=True
        )
        for w in stale[:10]:
            typer.echo(f"  {w['id'][:8]} {w['host']}:{w['pid']} last heartbeat {w['heartbeat_at']}", err=True)


@app.command()
def demo(broker_url: BrokerOpt = None, database_url: DatabaseOpt = None) -> None:
    """Run the whole path here: migrate the store, start a worker, embed sample texts, print neighbours.

    Needs a Redis server (PIPEQ_BROKER_URL, default redis://localhost:6379/0) and the minilm extra.
    Example: pipeq demo
    """
    from pipeq.demo import run_demo
    from pipeq.store import schema as db

    settings = _settings(broker_url, database_url)
    with _errors():
        db.upgrade(settings.database_url)
        failed = run_demo(settings)
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    """Console-script entry point."""
    app()
