"""What every engine gives the worker: steps of finished items, and the protocol the worker drives.

The Celery task, the claim, the writer and the lease are engine-blind: they hand an engine a
chunk's ``(idx, input)`` pairs and commit each ``Step`` it yields, in order, on the writer thread.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, Protocol

from pipeq.primitives import BatchTiming, ItemResult

#: A step's results and its timing (None for items that needed no model).
Finished = tuple[list[ItemResult], BatchTiming | None]


class Step:
    """Items whose model work is done (a micro-batch's forward pass, or sequences that ended):
    ``finish`` gives their results."""

    def __init__(self, idxs: list[int], finish: Callable[[], Finished]) -> None:
        #: The items whose result this step gives (known before it is finished).
        self.idxs = idxs
        self.finish = finish


def finished_in_turn(steps: Generator[Step, None, None]) -> Generator[Finished, None, None]:
    """Each step's results, finished on the calling thread as it comes (an engine's ``run``)."""
    try:
        for step in steps:
            yield step.finish()
    finally:
        steps.close()


class Engine(Protocol):
    """How a worker runs a loaded pipeline over a chunk's items."""

    #: Forward passes run at once (CPU streams) and torch threads each; 1 and None where not split.
    streams: int
    stream_threads: int | None
    #: The longest input in tokens the model takes (None: no limit).
    max_length: int | None
    #: Fewest items a message should bring it (0: no floor): a sequence engine's rows stay full only when
    #: a message holds several times as many items as it runs at once.
    min_chunk_items: int

    def stream(
        self, items: Sequence[tuple[int, Any]], params: dict[str, Any], *, queue_wait_ms: float = 0.0
    ) -> Generator[Step, None, None]:
        """Yield steps as items finish; each step's ``finish`` is called in order, on one thread."""
        ...

    def run(
        self, items: Sequence[tuple[int, Any]], params: dict[str, Any], *, queue_wait_ms: float = 0.0
    ) -> Iterator[Finished]:
        """The same, finished on the calling thread (warm-up, one-by-one runs)."""
        ...

    def stage_params(self, params: dict[str, Any]) -> Any:
        """Check a job's parameters before any input runs (raises on bad ones)."""
        ...

    def close(self) -> None: ...
