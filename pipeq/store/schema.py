"""The store's schema: Alembic migrations run from pipeq's own settings, and the check that they ran."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from pipeq.errors import ConfigurationError, StoreError
from pipeq.settings import mask_url
from pipeq.store.base import StoreBase

log = logging.getLogger(__name__)

#: Tables a migrated store has (``check_schema``).
REQUIRED_TABLES = frozenset({"jobs", "job_counts", "items", "batches", "workers", "calibrations"})
#: Columns added to a table after it was created, which a migrated store has too: {table: columns}.
REQUIRED_COLUMNS = {
    "items": frozenset({"vector", "order_key", "first_token_ms", "decode_ms", "output_tokens"}),
    "workers": frozenset({"precision_choice"}),
    "jobs": frozenset({"resolved_revision", "publish_key"}),
}


def migrations_dir() -> Path:
    """The Alembic scripts: inside an installed wheel, or at the root of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("pipeq's migrations are missing from this installation")


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the store's schema to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def current(database_url: str) -> None:
    command.current(alembic_config(database_url))


class SchemaQueries(StoreBase):
    """Whether the store is reachable and migrated."""

    def check_schema(self) -> None:
        """Raise StoreError unless the store is reachable and migrated."""
        try:
            with self.engine.connect() as conn:
                inspector = inspect(conn)
                tables = set(inspector.get_table_names())
                columns = {
                    f"{table}.{column['name']}"
                    for table in REQUIRED_COLUMNS.keys() & tables
                    for column in inspector.get_columns(table)
                }
        except OperationalError as exc:
            raise StoreError(f"cannot reach the store {mask_url(self.url)}: {exc.orig}") from None
        wanted = {f"{table}.{column}" for table, names in REQUIRED_COLUMNS.items() for column in names}
        missing = (REQUIRED_TABLES - tables) | {c for c in wanted - columns if c.split(".")[0] in tables}
        if missing:
            raise StoreError(
                f"the store {mask_url(self.url)} has no pipeq schema or an older one (missing "
                f"{', '.join(sorted(missing))}); run `pipeq db upgrade` first"
            )
