"""What every ``pipeq`` command shares: the Typer apps, common options, settings and the store scaffold."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipeq.errors import BrokerError, PipeqError, StoreError
from pipeq.precisions import PRECISIONS, REFERENCE
from pipeq.producer.readers import INPUT_FORMATS
from pipeq.settings import Settings

if TYPE_CHECKING:
    from pipeq.store import Store

app = typer.Typer(
    name="pipeq",
    help="Queue-based batch worker for Hugging Face Transformers pipelines.",
    epilog="Exit codes: 0 success; 1 a waited-for job had failed or cancelled items; 2 bad usage, input or "
    "configuration; 3 the store or broker is unreachable, or the store is full (nothing was stored).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the SQL store's schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

BrokerOpt = Annotated[str | None, typer.Option("--broker-url", help="Broker URL [env: PIPEQ_BROKER_URL].")]
DatabaseOpt = Annotated[str | None, typer.Option("--database-url", help="Store URL [env: PIPEQ_DATABASE_URL].")]


def either(names: list[str]) -> str:
    """``a, b or c``, for help texts."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


#: Help texts listing what the registries hold (``pipeq.precisions``, the input formats of ``readers``).
PRECISION_NAMES = either(list(PRECISIONS))
PRECISIONS_DESCRIBED = ", ".join(f"{p.name} ({p.description})" for p in PRECISIONS.values())
INPUT_FORMAT_NAMES = either(list(INPUT_FORMATS))
INPUT_SUFFIXES = either([f.suffixes[0] for f in INPUT_FORMATS.values() if f.suffixes])
SHADOWED = either([name for name in PRECISIONS if name != REFERENCE])


class State:
    verbosity: int = 0


def settings_from(broker_url: str | None = None, database_url: str | None = None, **more: Any) -> Settings:
    return Settings.from_env(broker_url=broker_url, database_url=database_url, **more)


def fail(exc: PipeqError) -> typer.Exit:
    typer.echo(f"pipeq: error: {exc}", err=True)
    code = 3 if isinstance(exc, StoreError | BrokerError) else 2
    return typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Report pipeq's errors on stderr and exit with their code (2 bad input, 3 store or broker).

    A store's own error (a full disk, a lost connection) is one line too, exit 3: never a traceback, and
    never the statement's bound values, which hold the users' texts.
    """
    try:
        yield
    except PipeqError as exc:
        raise fail(exc) from None
    except Exception as exc:
        from pipeq.store.engine import store_error

        translated = store_error(exc)
        if translated is None:
            raise
        raise fail(translated) from None


@contextmanager
def open_store(database_url: str | None) -> Iterator[Store]:
    """The store of the settings, checked to be reachable and migrated, closed afterwards; errors as ``_errors``."""
    from pipeq.store import Store

    with cli_errors():
        store = Store(settings_from(database_url=database_url).database_url)
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

    State.verbosity = -1 if quiet else verbose
    logs.configure(State.verbosity)
