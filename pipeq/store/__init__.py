"""pipeq's store: every query of the SQL tables (``pipeq.models``), behind the one ``Store`` facade.

The SQL database is pipeq's source of truth. Each module holds the queries of one concept:
``jobs`` (a job's row, its window, the reconciler's view), ``items`` (claims and exactly-once
result writes), ``workers`` (workers and calibrations), ``cache`` (the result cache), ``report``
(a job report's aggregates), ``schema`` (migrations); ``engine`` and ``base`` hold the dialect
helpers they share. Nothing outside this package writes SQL.
"""

from __future__ import annotations

from pipeq.store.cache import CacheQueries
from pipeq.store.engine import as_utc, is_transient, make_engine
from pipeq.store.items import ItemQueries
from pipeq.store.jobs import JobQueries, NewItem, WindowSpan, new_job_row
from pipeq.store.report import ReportQueries
from pipeq.store.schema import SchemaQueries
from pipeq.store.workers import WorkerQueries


class Store(JobQueries, ItemQueries, WorkerQueries, CacheQueries, ReportQueries, SchemaQueries):
    """All of pipeq's reads and writes of the SQL store, for one store URL."""


__all__ = ["NewItem", "Store", "WindowSpan", "as_utc", "is_transient", "make_engine", "new_job_row"]
