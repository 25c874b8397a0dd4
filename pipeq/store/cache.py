"""The result cache's rows: lookups, inserts, and counting hits (keys come from ``pipeq.cache``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pipeq import constants as C
from pipeq.cache import CacheScope
from pipeq.primitives import ItemResult, utcnow
from pipeq.store.base import JOBS, RESULT_CACHE, StoreBase
from pipeq.vectors import Vector


def lookup(conn: Any, keys: Sequence[str]) -> dict[str, Any]:
    """{key: output} of the cached outputs among ``keys`` (a pooled embedding as its ``Vector``)."""
    if not keys:
        return {}
    cols = (RESULT_CACHE.c.key, RESULT_CACHE.c.output, RESULT_CACHE.c.vector)
    rows = conn.execute(select(*cols).where(RESULT_CACHE.c.key.in_(keys)))
    return {key: output if vector is None else Vector(bytes(vector)) for key, output, vector in rows}


def put(conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``result_cache`` rows, leaving a row already stored under the same key as it is.

    Rows go in key order, so two transactions storing the same keys lock them in the same order.
    """
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    now = utcnow()
    ordered = sorted(({"created_at": now, "hits": 0, "vector": None, **row} for row in rows), key=lambda r: r["key"])
    conn.execute(dialect.insert(RESULT_CACHE).on_conflict_do_nothing(index_elements=[RESULT_CACHE.c.key]), ordered)


def record_cached(conn: Any, job_id: str, scope: CacheScope, written: Sequence[ItemResult]) -> None:
    """In a batch's write: store the outputs the model computed, count the ones served from the cache."""
    done = [r for r in written if r.status == C.ITEM_DONE and r.idx in scope.keys]
    computed = {scope.keys[r.idx]: r.output for r in done if not r.cached}
    put(
        conn,
        [
            {
                "key": key,
                "task": scope.task,
                "model": scope.model,
                "revision": scope.revision,
                "precision": scope.precision,
                "output": None if isinstance(output, Vector) else output,
                "vector": output.blob if isinstance(output, Vector) else None,
            }
            for key, output in computed.items()
        ],
    )
    hits = Counter(scope.keys[r.idx] for r in done if r.cached)
    if not hits:
        return
    conn.execute(
        update(RESULT_CACHE)
        .where(RESULT_CACHE.c.key == bindparam("b_key"))
        .values(hits=RESULT_CACHE.c.hits + bindparam("b_n")),
        [{"b_key": key, "b_n": n} for key, n in sorted(hits.items())],
    )
    conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(cache_hits=JOBS.c.cache_hits + hits.total()))


class CacheQueries(StoreBase):
    """The ``result_cache`` table."""

    def cache_get(self, keys: Sequence[str]) -> dict[str, Any]:
        """{key: output} of the result cache's entries among ``keys`` (one query)."""
        with self.engine.connect() as conn:
            return lookup(conn, keys)

    def cache_put(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``result_cache`` rows; a key already stored keeps its row."""
        with self.writer.begin() as conn:
            put(conn, rows)
