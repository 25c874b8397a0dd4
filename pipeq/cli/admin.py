"""Commands on the store and the fleet: db upgrade/downgrade, reconcile, workers, demo."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from pipeq import constants as C
from pipeq.cli.base import (
    BrokerOpt,
    DatabaseOpt,
    app,
    cli_errors,
    db_app,
    fail,
    open_store,
    settings_from,
)
from pipeq.errors import PipeqError

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

    settings = settings_from(database_url=database_url)
    try:
        db.upgrade(settings.database_url, revision)
    except PipeqError as exc:
        raise fail(exc) from None
    except Exception as exc:  # SQLAlchemy connection errors
        from pipeq.store.engine import store_error

        reason = store_error(exc) or exc  # one line, never a statement's bound values
        typer.echo(f"pipeq: error: cannot migrate {mask_url(settings.database_url)}: {mask_url(str(reason))}", err=True)
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

    with cli_errors():
        db.downgrade(settings_from(database_url=database_url).database_url, revision)


@app.command()
def reconcile(
    stalled_after: Annotated[
        float | None, typer.Option(help="Seconds without progress on an idle queue [env: PIPEQ_STALLED_AFTER].")
    ] = None,
    lost_after: Annotated[
        float | None,
        typer.Option(help="Seconds without progress with nothing of the job on the broker [env: PIPEQ_LOST_AFTER]."),
    ] = None,
    all_queues: Annotated[bool, typer.Option("--all", help="Also queues no live worker serves.")] = False,
    broker_url: BrokerOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Queue again the claimed items of dead workers, and the pending items of jobs that stopped moving.

    A worker without a heartbeat for PIPEQ_DEAD_AFTER seconds is marked lost and the items it had
    claimed and not finished are queued again (live workers do this for their queue every few seconds).
    A job idle for PIPEQ_LOST_AFTER seconds whose queue is empty on the broker and none of whose items
    a live worker holds (Redis restarted without persistence, a failed publish) has its pending items
    queued again (workers look for these a few times per PIPEQ_LOST_AFTER). Jobs that made no progress
    for PIPEQ_STALLED_AFTER seconds on an idle queue, or were stored but never queued (the producer
    died, or the broker refused them), are queued too; workers do this for their own queue every
    PIPEQ_RECONCILE_INTERVAL seconds. This runs one pass of all three now.
    Example: pipeq reconcile --stalled-after 60
    """
    from pipeq.broker.app import make_celery
    from pipeq.broker.reconcile import Requeued, republish_lost, take_over
    from pipeq.broker.reconcile import reconcile as reconcile_once

    with cli_errors():
        settings = settings_from(broker_url, database_url, stalled_after=stalled_after, lost_after=lost_after)
    with open_store(settings.database_url) as store, make_celery(settings) as celery:
        lost = take_over(store, celery, dead_after=settings.dead_after) if settings.dead_after > 0 else []
        done: list[Requeued] = []
        if settings.lost_after > 0:  # broker errors exit 3, through open_store
            done = republish_lost(store, celery, lost_after=settings.lost_after, live_only=not all_queues)
        done += reconcile_once(store, celery, stalled_after=settings.stalled_after, live_only=not all_queues)
    for t in lost:
        typer.echo(
            f"worker {t.worker_id[:8]} (pid {t.pid} on {t.host}) silent for {t.silent_seconds:.0f}s: marked lost, "
            f"re-queued {t.items:,} of its claimed items" + (f" of job {t.job_id}" if t.job_id else "")
        )
    for r in done:
        if r.unpublished:
            typer.echo(f"published {r.items:,} pending items of job {r.job_id} (stored but never queued)")
        elif r.lost:
            typer.echo(f"re-queued {r.items:,} pending items of job {r.job_id} (no message of it on the broker)")
        else:
            typer.echo(f"re-queued {r.items:,} pending items of job {r.job_id}")
    if not done and not lost:
        typer.echo("no dead workers and no stalled jobs", err=True)


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
    from pipeq.worker.placement import describe as describe_placement

    with open_store(database_url) as store:
        rows = store.live_workers()
        stale = store.stale_workers()
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for w in rows:
        mb = (w["footprint_bytes"] or 0) / 1e6
        how_precision, how_budget = describe({**(w["settings"] or {}), "precision_choice": w["precision_choice"]})
        placed = (w["settings"] or {}).get("placement") or {}
        where = f"{w['device']} ({describe_placement(placed)})" if len(placed) > 1 else w["device"]
        typer.echo(
            f"{w['id'][:8]} {w['host']}:{w['pid']} {w['status']} {w['task']} precision {w['precision']}{how_precision} "
            f"{where} {mb:.1f} MB load {w['load_seconds'] or 0:.1f}s{how_budget} {w['model']} "
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


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@app.command()
def demo(broker_url: BrokerOpt = None, database_url: DatabaseOpt = None) -> None:
    """Run the whole path here: migrate the store, start a worker, embed sample texts, print neighbours.

    Uses the Redis at PIPEQ_BROKER_URL (default redis://localhost:6379/0); with the default and no Redis
    there, it runs a private one (redis-server if installed, else an embedded one) and stops it at the end.
    Needs the minilm extra.
    Example: pipeq demo
    """
    import signal

    from pipeq.demo import run_demo
    from pipeq.store import schema as db

    # SIGTERM unwinds like Ctrl-C does, so the demo's worker and private broker are stopped too.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    settings = settings_from(broker_url, database_url)
    with cli_errors():
        db.upgrade(settings.database_url)
        failed = run_demo(settings)
    raise typer.Exit(1 if failed else 0)
