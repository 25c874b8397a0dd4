"""What a job's inputs become once read: ``Record``s, made by the rules of a ``RecordSpec``.

Value types only, shared by the readers (``readers``) and the formats they register
(``openai_batch``), so neither imports the other to name them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: (line or row number, raw record) pairs, as a format's reader yields them.
RawRecords = Iterator[tuple[int, Any]]


@dataclass(frozen=True)
class Record:
    """One validated input: where it came from, its own id if any, and the pipeline input."""

    line: int
    input: Any
    input_id: str | None
    size: int


@dataclass(frozen=True)
class RecordSpec:
    """How to turn a raw record (a dict or a string) into a pipeline input."""

    task: str
    text_field: str = "text"
    id_field: str | None = "id"
    pair_field: str | None = None
    max_text_chars: int = 100_000
    skip_empty: bool = False
    #: The names the job's model goes by (as given, as stored): formats whose records name a model
    #: (openai-batch) must name one of them.
    models: tuple[str, ...] = ()
    #: The job's task parameters, for formats whose records need some (openai-batch embeddings: pooling).
    params: Mapping[str, Any] = field(default_factory=dict)
