"""Commands on jobs: submit, status, results, report, jobs, cancel, delete, resume."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from pipeq import constants as C
from pipeq.cli.base import (
    INPUT_FORMAT_NAMES,
    INPUT_SUFFIXES,
    PRECISION_NAMES,
    BrokerOpt,
    DatabaseOpt,
    app,
    cli_errors,
    open_store,
    settings_from,
)
from pipeq.errors import InputError

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
    input: Annotated[str, typer.Argument(help=f"{INPUT_SUFFIXES} file, or - for stdin.")],
    model: Annotated[str, typer.Option("--model", help="Model served by a worker (same string).")],
    task: Annotated[
        str | None,
        typer.Option("--task", help="Task, e.g. sentiment-analysis (an openai-batch file's url names its own)."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help=f"{PRECISION_NAMES} [default: what live workers serve for the model, else fp32].",
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Field holding your id (optional in records).")] = "id",
    pair_field: Annotated[str | None, typer.Option(help="Field with the second text of a pair.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Task parameter KEY=VALUE (JSON).")] = None,
    input_format: Annotated[str | None, typer.Option(help=f"{INPUT_FORMAT_NAMES}.")] = None,
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
    allow_duplicate_ids: Annotated[
        bool,
        typer.Option(
            "--allow-duplicate-ids", help="Accept two records with the same id (refused by default: both lines named)."
        ),
    ] = False,
    fail_long_prompts: Annotated[
        bool,
        typer.Option(
            "--fail-long-prompts",
            help="text-generation: store a prompt too long for the model's context (with its max_tokens) and "
            "fail its item alone, instead of refusing the input.",
        ),
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until done; exit 1 if any item failed.")] = False,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Store a job and queue it; prints the job id on the last line of stdout.

    Example: pipeq submit reviews.jsonl --task sentiment-analysis --model ./my-model --wait

    A text-generation job's --param max_tokens=N, temperature=T, top_p=P, seed=S, stop=... are its records' defaults.
    """
    from pipeq.producer.client import Client

    more = {"max_text_chars": max_text_chars, "chunk_size": chunk_size}
    with cli_errors(), Client(settings_from(broker_url, database_url, **more)) as client:
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
            allow_duplicate_ids=allow_duplicate_ids,
            fail_long_prompts=fail_long_prompts,
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

    with open_store(database_url) as store:
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
            from pipeq.report.text import shadow_line, shadow_warning

            typer.echo(f"shadow check: {shadow_line(state.shadow)}")
            warning = shadow_warning(state.shadow, state.task)
            if warning:
                typer.echo(f"warning: {warning}")
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
    fmt: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="jsonl, csv, parquet or openai-batch (a finished embeddings or text-generation job)."
        ),
    ] = "jsonl",
    output: Annotated[str | None, typer.Option("--output", "-o", help="File (default: stdout).")] = None,
    database_url: DatabaseOpt = None,
) -> None:
    """One row per input item in input order: index, id, status, output, error, timing.

    Example: pipeq results 3f2a9c... --format parquet -o results.parquet
    """
    from pipeq.producer.client import Job

    with open_store(database_url) as store:
        store.job(job_id)
        n = Job(store, job_id).export(fmt, out=sys.stdout, path=output)
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

    with open_store(database_url) as store:
        job_report = build_report(store, job_id)
    if html:
        from pipeq.report.html import write_html

        with cli_errors():
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
    status: Annotated[str | None, typer.Option("--status", help="storing, queued, running, done or cancelled.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    database_url: DatabaseOpt = None,
) -> None:
    """Recent jobs, newest first: id, created, status, task, precision, model, done/failed/total, rate.

    Example: pipeq jobs --status running --limit 5
    """
    states = (C.JOB_STORING, C.JOB_QUEUED, C.JOB_RUNNING, *C.JOB_FINAL_STATES)
    if status is not None and status not in states:
        raise typer.BadParameter(f"{status!r} is not one of {', '.join(states)}", param_hint="--status")
    with open_store(database_url) as store:
        rows = store.recent_jobs(limit, status)
    if as_json:
        keys = ("id", "status", "task", "model", "precision", "total", "done", "failed", "cancelled", "published")
        listed = [
            {**{k: getattr(j, k) for k in keys}, "created_at": j.created_at.isoformat(), "rate": round(j.rate, 3)}
            for j in rows
        ]
        typer.echo(json.dumps(listed))
        return
    for j in rows:
        unqueued = not j.published and not j.is_final and j.error is not None  # its publish failed
        typer.echo(
            f"{j.id}  {j.created_at:%Y-%m-%d %H:%M:%S}  {'unqueued' if unqueued else j.status:<9} {j.task} "
            f"{j.precision}  {j.done:,}/{j.failed:,}/{j.total:,}  {j.rate:,.1f}/s  {j.model}"
        )
        if unqueued:
            typer.echo(f"  error: {j.error}")
            typer.echo(
                f"  hint: a live worker on its queue publishes it once the queue is empty (PIPEQ_LOST_AFTER); "
                f"`pipeq resume {j.id}` does now"
            )
    if not rows:
        typer.echo("no jobs", err=True)
    if any(j.status == C.JOB_STORING for j in rows):
        typer.echo(
            "a job 'storing' is not submitted yet: its producer is still storing it, or was stopped while it did "
            "(no worker runs it; `pipeq delete JOB` removes it)",
            err=True,
        )


@app.command()
def delete(job_id: Annotated[str, typer.Argument(help="Job id.")], database_url: DatabaseOpt = None) -> None:
    """Delete a job with its items and results: one finished, cancelled, or left storing by an interrupted submit.

    A queued or running job is cancelled first (`pipeq cancel`). Example: pipeq delete 3f2a9c...
    """
    with open_store(database_url) as store:
        n = store.delete_finished_job(job_id)
    typer.echo(f"deleted job {job_id} and its {n:,} items")


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")], database_url: DatabaseOpt = None) -> None:
    """Stop a job's remaining items from running; finished results are kept.

    Example: pipeq cancel 3f2a9c...
    """
    with open_store(database_url) as store:
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

    with cli_errors(), Client(settings_from(broker_url, database_url)) as client:
        n = client.resume(job_id)
    typer.echo(f"re-queued {n:,} pending items of job {job_id}")
