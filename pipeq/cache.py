"""The opt-in result cache: outputs stored under a hash of everything that produced them, reused by later jobs.

A key covers the task, the model, the worker's resolved revision, the precision, the job's parameters
and the input, so an output is only reused where running the model again would compute the same thing.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pipeq import constants as C
from pipeq.models import Job, ResultCache, utcnow

if TYPE_CHECKING:
    from pipeq.models.store import ItemResult

_cache: Table = ResultCache.__table__  # type: ignore[assignment]
_jobs: Table = Job.__table__  # type: ignore[assignment]


def cache_key(task: str, model: str, revision: str | None, precision: str, params: Any, value: Any) -> str:
    """The hex sha256 of the canonical JSON of what an output depends on."""
    text = json.dumps([task, model, revision, precision, params, value], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CacheScope:
    """Where a use_cache job's outputs are stored: its serving configuration and one chunk's keys by item."""

    task: str
    model: str
    revision: str | None
    precision: str
    keys: Mapping[int, str]

    @classmethod
    def of(cls, job: Mapping[str, Any], revision: str | None, items: Sequence[tuple[int, Any]]) -> CacheScope:
        """The scope of a chunk's ``(idx, input)`` items of ``job`` (a jobs row), served at ``revision``."""
        task, model, precision, params = job["task"], job["model"], job["precision"], job["params"] or {}
        keys = {idx: cache_key(task, model, revision, precision, params, value) for idx, value in items}
        return cls(task, model, revision, precision, keys)


def lookup(conn: Any, keys: Sequence[str]) -> dict[str, Any]:
    """{key: output} of the cached outputs among ``keys``."""
    if not keys:
        return {}
    rows = conn.execute(select(_cache.c.key, _cache.c.output).where(_cache.c.key.in_(keys)))
    return {key: output for key, output in rows}


def put(conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``result_cache`` rows, leaving a row already stored under the same key as it is.

    Rows go in key order, so two transactions storing the same keys lock them in the same order.
    """
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    now = utcnow()
    ordered = sorted(({"created_at": now, "hits": 0, **row} for row in rows), key=lambda r: r["key"])
    conn.execute(dialect.insert(_cache).on_conflict_do_nothing(index_elements=[_cache.c.key]), ordered)


def record(conn: Any, job_id: str, scope: CacheScope, written: Sequence[ItemResult]) -> None:
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
                "output": output,
            }
            for key, output in computed.items()
        ],
    )
    hits = Counter(scope.keys[r.idx] for r in done if r.cached)
    if not hits:
        return
    conn.execute(
        update(_cache).where(_cache.c.key == bindparam("b_key")).values(hits=_cache.c.hits + bindparam("b_n")),
        [{"b_key": key, "b_n": n} for key, n in sorted(hits.items())],
    )
    conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(cache_hits=_jobs.c.cache_hits + hits.total()))
