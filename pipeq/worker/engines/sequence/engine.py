"""The sequence engine (being built)."""

from __future__ import annotations

from typing import Any


class SequenceEngine:
    @classmethod
    def for_worker(cls, pipe: Any, cfg: Any, threads: int) -> Any:
        raise NotImplementedError("the sequence engine is not built yet")
