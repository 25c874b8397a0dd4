"""The ``pipeq`` command line: logs go to stderr, data (job ids, results) to stdout.

Exit codes: 0 success; 1 a waited-for job finished with failed or cancelled items;
2 bad usage, bad input or configuration (nothing was queued); 3 store or broker unreachable.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from pipeq import constants as C
from pipeq.errors import BrokerError, InputError, PipeqError, StoreError
from pipeq.settings import Settings

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
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, fp16, bf16 or int8.")]


class _State:
    verbosity: int = 0


def _settings(broker_url: str | None = None, database_url: str | None = None, **more: Any) -> Settings:
    return Settings.from_env(broker_url=broker_url, database_url=database_url, **more)


def _fail(exc: PipeqError) -> typer.Exit:
    typer.echo(f"pipeq: error: {exc}", err=True)
    code = 3 if isinstance(exc, StoreError | BrokerError) else 2
    return typer.Exit(code)


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
    """Create or migrate the store's tables (SQLite ./pipeq.db unless PIPEQ_DATABASE_URL is set)."""
    from pipeq import db
    from pipeq.settings import mask_url

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
    """Migrate the store's schema down to REVISION."""
    from pipeq import db

    db.downgrade(_settings(database_url=database_url).database_url, revision)


# ------------------------------------------------------------------------- worker


@app.command()
def worker(
    task: Annotated[str, typer.Option("--task", help="Task served, e.g. sentiment-analysis.")],
    model: Annotated[str, typer.Option("--model", help="Local directory or hub id.")],
    precision: PrecisionOpt = "fp32",
    revision: Annotated[str | None, typer.Option("--revision", help="Model revision (hub).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda:N [default: cuda:0 if any].")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Pool children (model copies).")] = 1,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward pass.")] = (
        C.DEFAULT_MAX_BATCH_TOKENS
    ),
    max_batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = C.DEFAULT_MAX_BATCH_SIZE,
    int8_backend: Annotated[str | None, typer.Option(help="bnb or dynamic [default: bnb on CUDA].")] = None,
    pipeline_class: Annotated[str | None, typer.Option(help="Custom Pipeline subclass, module:Class.")] = None,
    model_class: Annotated[str | None, typer.Option(help="Model class for --pipeline-class, module:Class.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code to run.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads per child [default: cores/children].")] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork (default) or solo.")] = "prefork",
    warmup: Annotated[bool, typer.Option(help="Warm up over a few batch shapes after loading.")] = True,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Serve one (task, model, precision) configuration until stopped.

    Example: pipeq worker --task sentiment-analysis --model ./my-model --precision int8
    """
    from pipeq.routing import ServeKey, check_precision, normalize_model
    from pipeq.tasks import normalize_task
    from pipeq.worker.config import WorkerConfig
    from pipeq.worker.main import run_worker

    if device is None:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        key = ServeKey(
            task=normalize_task(task),
            model=normalize_model(model),
            precision=check_precision(precision),
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
    input: Annotated[str, typer.Argument(help=".jsonl, .csv, .parquet or .txt file, or - for stdin.")],
    task: Annotated[str, typer.Option("--task", help="Task, e.g. sentiment-analysis.")],
    model: Annotated[str, typer.Option("--model", help="Model served by a worker (same string).")],
    precision: PrecisionOpt = "fp32",
    revision: Annotated[str | None, typer.Option("--revision")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Field holding your id (optional in records).")] = "id",
    pair_field: Annotated[str | None, typer.Option(help="Field with the second text of a pair.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Task parameter KEY=VALUE (JSON).")] = None,
    input_format: Annotated[str | None, typer.Option(help="jsonl, csv, parquet or txt.")] = None,
    skip_empty: Annotated[bool, typer.Option(help="Drop empty texts instead of refusing the input.")] = False,
    max_text_chars: Annotated[int | None, typer.Option(help="Longest text accepted.")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Items per broker message.")] = None,
    priority: Annotated[int, typer.Option(help="Job priority (higher first).")] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until done; exit 1 if any item failed.")] = False,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Store a job and queue it; prints the job id on the last line of stdout.

    Example: pipeq submit reviews.jsonl --task sentiment-analysis --model ./my-model --wait
    """
    from pipeq.producer.client import Client

    try:
        settings = _settings(broker_url, database_url, max_text_chars=max_text_chars, chunk_size=chunk_size)
        with Client(settings) as client:
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
            )
            total = job.status().total
            typer.echo(f"queued {total:,} items as job {job.id}", err=True)
            if wait:
                state = job.wait(progress=True)
                typer.echo(job.id)
                raise typer.Exit(0 if state.failed == 0 and state.cancelled == 0 else 1)
            typer.echo(job.id)
    except PipeqError as exc:
        raise _fail(exc) from None


# ---------------------------------------------------------------- status & results


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    watch: Annotated[bool, typer.Option("--watch", help="Live progress bar until the job is final.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    database_url: DatabaseOpt = None,
) -> None:
    """Counts, progress, rate and ETA of a job."""
    from pipeq.models.store import Store
    from pipeq.progress import describe
    from pipeq.progress import watch as watch_job

    try:
        store = Store(_settings(database_url=database_url).database_url)
        store.check_schema()
        state = watch_job(store, job_id) if watch else store.job(job_id)
    except PipeqError as exc:
        raise _fail(exc) from None
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
                }
            )
        )
    else:
        typer.echo(f"job {state.id} [{state.task} {state.precision}] {describe(state)}")
        if state.error:
            typer.echo(f"error: {state.error}")


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="jsonl, csv or parquet.")] = "jsonl",
    output: Annotated[str | None, typer.Option("--output", "-o", help="File (default: stdout).")] = None,
    database_url: DatabaseOpt = None,
) -> None:
    """One row per input item in input order: index, id, status, output, error, timing."""
    from pipeq.models.store import Store
    from pipeq.producer.client import Job
    from pipeq.producer.writers import write_results

    try:
        store = Store(_settings(database_url=database_url).database_url)
        store.check_schema()
        store.job(job_id)
        rows = Job(store, job_id).results()
        n = write_results(rows, fmt, out=sys.stdout, path=output)
    except PipeqError as exc:
        raise _fail(exc) from None
    if output:
        typer.echo(f"wrote {n:,} rows to {output}", err=True)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")], database_url: DatabaseOpt = None) -> None:
    """Stop a job's remaining items from running; finished results are kept."""
    from pipeq.models.store import Store

    try:
        store = Store(_settings(database_url=database_url).database_url)
        store.check_schema()
        n = store.cancel_job(job_id)
    except PipeqError as exc:
        raise _fail(exc) from None
    typer.echo(f"cancelled {n:,} pending items of job {job_id}")


@app.command()
def resume(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Queue a job's pending items again (after the broker lost them, or a failed publish)."""
    from pipeq.producer.client import Client

    try:
        with Client(_settings(broker_url, database_url)) as client:
            n = client.resume(job_id)
    except PipeqError as exc:
        raise _fail(exc) from None
    typer.echo(f"re-queued {n:,} pending items of job {job_id}")


@app.command()
def workers(
    database_url: DatabaseOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Live workers (fresh heartbeat): configuration, footprint, load time."""
    from pipeq.models.store import Store

    store = Store(_settings(database_url=database_url).database_url)
    try:
        store.check_schema()
    except PipeqError as exc:
        raise _fail(exc) from None
    rows = store.live_workers()
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for w in rows:
        mb = (w["footprint_bytes"] or 0) / 1e6
        typer.echo(
            f"{w['id'][:8]} {w['host']}:{w['pid']} {w['status']} {w['task']} {w['precision']} "
            f"{w['device']} {mb:.1f} MB load {w['load_seconds'] or 0:.1f}s {w['model']}"
        )
    if not rows:
        typer.echo("no live workers", err=True)


@app.command()
def demo(broker_url: BrokerOpt = None, database_url: DatabaseOpt = None) -> None:
    """Run the whole path here: migrate the store, start a worker, embed sample texts, print neighbours.

    Needs a Redis server (PIPEQ_BROKER_URL, default redis://localhost:6379/0) and the minilm extra.
    """
    from pipeq import db
    from pipeq.demo import run_demo

    settings = _settings(broker_url, database_url)
    try:
        db.upgrade(settings.database_url)
        failed = run_demo(settings)
    except PipeqError as exc:
        raise _fail(exc) from None
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    """Console-script entry point."""
    app()
