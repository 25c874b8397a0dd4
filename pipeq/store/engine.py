"""The store's engine and dialect helpers: SQLite and PostgreSQL, tuned for pipeq's write pattern."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, InvalidatePoolError, OperationalError

from pipeq.errors import StoreError, StoreFullError

#: Execution option marking a connection that writes (SQLite: BEGIN IMMEDIATE).
WRITE = "pipeq_write"
#: Seconds a pooled server connection may sit unused before it is pinged at checkout (``_ping_when_idle``).
PING_AFTER_IDLE_SECONDS = 1.0
_CHECKED_IN = "pipeq_checked_in"
#: Page size of a new SQLite store. SQLite's default 4 KB pages hold two result rows with a pooled
#: float32 embedding (1.5 KB) beside its input, or one where the text is long: about a quarter of each
#: page stays empty. 16 KB pages pack eight; texts of several thousand characters pack a little worse
#: in them (benchmarks/vectors.py, benchmarks/RESULTS.md). SQLite applies it only to a file that has
#: no tables yet; an existing store keeps the page size it was created with.
SQLITE_PAGE_SIZE = 16384
#: Page cache of each SQLite connection, in KiB (SQLite's default is 2 MB). Storing a job inserts into
#: three indexes of ``items`` at once; with the default cache their pages kept falling out and a page of
#: items took twice as long to insert (about 16 against 7 us a row).
SQLITE_CACHE_KIB = 65536
#: SQLite's result code for a full disk or database (``SQLITE_FULL``; extended codes keep it in the low byte).
_SQLITE_FULL = 13
#: PostgreSQL's SQLSTATEs for a full disk, and for running out of memory or a configured limit (class 53).
_PG_FULL_STATES = frozenset({"53100", "53200", "53400"})


def sqlite_page_size(dbapi_conn: Any, _record: Any = None) -> None:
    """Connect hook: give a new SQLite file ``SQLITE_PAGE_SIZE`` pages (a no-op on an existing store)."""
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
    cur.close()


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; pipeq writes UTC, so read them as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def is_transient(exc: BaseException) -> bool:
    """Whether a store error means "unreachable or busy, try again" rather than "this write is wrong"."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def is_store_full(exc: BaseException) -> bool:
    """Whether a store error means its disk (or its size limit) is full: SQLite's SQLITE_FULL, PostgreSQL's class 53."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == _SQLITE_FULL)
    return getattr(orig, "sqlstate", None) in _PG_FULL_STATES


def store_error(exc: BaseException) -> StoreError | None:
    """A driver's error as one line for the user, never the statement or its bound values; None for other errors."""
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig if exc.orig is not None else exc
    lines = str(orig).strip().splitlines()
    reason = f"{type(orig).__module__.split('.')[0]}: {lines[0] if lines else type(orig).__name__}"
    if is_store_full(exc):
        return StoreFullError(f"the store is full ({reason}): nothing of this write was stored; free space, then retry")
    return StoreError(f"store error ({reason})")


def make_engine(url: str) -> Engine:
    """Create an engine tuned for pipeq's write pattern on SQLite or PostgreSQL.

    ``hide_parameters``: an error's message names the statement, never the values bound to it (users' texts).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, say when transactions begin (so BEGIN IMMEDIATE works);
            # WAL lets readers (status, results) run while a worker writes.
            dbapi_conn.isolation_level = None
            sqlite_page_size(dbapi_conn)  # before WAL: a file's first write fixes its page size
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writes take the write lock up front: two workers' read-then-write transactions
            # serialize instead of failing with "database is locked" on upgrade. Reads (status,
            # results, reports) take no lock, so they never hold up a worker's writes.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")

        return engine
    engine = create_engine(url, hide_parameters=True)
    _ping_when_idle(engine)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgres_connect)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled server connection before handing it out, if it sat unused for ``PING_AFTER_IDLE_SECONDS``.

    A connection can go stale while it waits in the pool (the server restarted, a proxy or firewall
    dropped it), so one that waited is pinged, and replaced if the ping fails, as SQLAlchemy's
    ``pool_pre_ping`` does. That option pings at every checkout, though: a round trip before each claim
    and each result write, one of a write's three round trips on PostgreSQL (``benchmarks/fleet.py``, one
    writer, in turns: 10,574 and 8,263 results/s without it against 8,440 and 6,334 with it). A
    connection checked in moments ago was alive then; if the server went away since, its statement
    fails as any statement can in an outage, and the caller's retry takes a new connection.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info[_CHECKED_IN] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_CHECKED_IN)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return  # new (just connected), or in use moments ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # SQLAlchemy replaces this connection (and those older than it) and checks out a new one.
            raise InvalidatePoolError(f"pooled connection failed its ping: {type(exc).__name__}") from exc


def _postgres_connect(dbapi_conn: Any, _record: Any) -> None:
    """Run pipeq's prepared statements on their generic plan, made once, not from the values of the moment.

    Every statement pipeq runs often finds rows by key (a job's items by ``(job_id, idx)``), and its best
    plan does not depend on the values bound. A custom plan does, through the statistics of the job it
    names: a job newer than the last ANALYZE is taken for a few rows, and each claim and result write
    reads all of its items instead of the ones it names (10-16 ms a statement instead of 0.5 on a
    64,000-item job). The generic plan estimates a job by the table's average (so a small job newer
    than the statistics is not taken for nothing either) and is not planned again on every execution.
    On a table never analyzed it too reads the whole job: ``Store.create_job`` runs ANALYZE after a
    large job. psycopg prepares a statement on its fifth execution on a connection.
    """
    cur = dbapi_conn.cursor()
    cur.execute("SET plan_cache_mode = force_generic_plan")
    cur.close()
    dbapi_conn.commit()  # a SET in a transaction rolled back later would be undone
