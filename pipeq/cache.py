"""The opt-in result cache: outputs stored under a hash of everything that produced them, reused by later jobs.

A key covers the task, the model, the worker's resolved revision, the precision, the job's parameters
and the input, so an output is only reused where running the model again would compute the same thing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


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
