"""Alembic environment for pipeq: the URL comes from pipeq's settings, never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, event, pool

from pipeq.models import Base
from pipeq.settings import Settings
from pipeq.store.engine import sqlite_page_size

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or Settings.from_env().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config({"sqlalchemy.url": _url()}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    if connectable.dialect.name == "sqlite":
        event.listen(connectable, "connect", sqlite_page_size)  # a new store's first write is its schema
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
