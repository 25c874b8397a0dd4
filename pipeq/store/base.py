"""What every part of the store shares: the engine, the write connection and the row lock."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Table

from pipeq.models import Batch, Calibration, Item, Job, JobCount, ResultCache, Worker
from pipeq.store.engine import WRITE, make_engine

ITEMS: Table = Item.__table__  # type: ignore[assignment]
JOBS: Table = Job.__table__  # type: ignore[assignment]
JOB_COUNTS: Table = JobCount.__table__  # type: ignore[assignment]
BATCHES: Table = Batch.__table__  # type: ignore[assignment]
WORKERS: Table = Worker.__table__  # type: ignore[assignment]
CALIBRATIONS: Table = Calibration.__table__  # type: ignore[assignment]
RESULT_CACHE: Table = ResultCache.__table__  # type: ignore[assignment]

_Q = TypeVar("_Q")


class StoreBase:
    """An engine for one store URL; the query classes of ``pipeq.store`` build on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        #: The same engine and pool, for transactions that write (``with store.writer.begin()``).
        self.writer = self.engine.execution_options(**{WRITE: True})
        self._is_pg = self.engine.dialect.name == "postgresql"
        #: Locking forms of prebuilt statements, built once each: {id(query): (query, locked query)}.
        self._locked: dict[int, tuple[Any, Any]] = {}

    def close(self) -> None:
        self.engine.dispose()

    def locked(self, query: _Q) -> _Q:
        """``query`` locking its rows to the transaction's end (PostgreSQL; SQLite's BEGIN IMMEDIATE already does)."""
        if not self._is_pg:
            return query
        known = self._locked.get(id(query))
        if known is None or known[0] is not query:
            known = self._locked[id(query)] = (query, query.with_for_update())  # type: ignore[attr-defined]
        return known[1]

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
