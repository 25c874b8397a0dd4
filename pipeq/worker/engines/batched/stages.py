"""The stages of a worker's micro-batch between its threads: what crosses them, and the prepare thread.

A micro-batch leaves the model's thread as a ``Step`` (its forward pass has run); whoever calls
``Step.finish`` (the writer thread) unbatches and postprocesses it. ``prefetch`` runs the
preparation of the next batches on a thread of its own, a bounded number ahead. No I/O here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pipeq import constants as C
from pipeq.primitives import BatchTiming, ItemResult, describe_error
from pipeq.worker.engines.batched.batching import Unit, padded_tokens

if TYPE_CHECKING:
    from pipeq.worker.engines.batched.runtime import PipelineRuntime

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class Item:
    idx: int
    input: Any
    preprocess_ms: float = 0.0
    #: Forward rows the item's preprocess made (one, or one per chunk for ChunkPipeline tasks).
    n_units: int = 0
    outputs: dict[int, Any] = field(default_factory=dict)
    #: The output as stored (JSON values or a Vector), when the whole batch was postprocessed at once (``has_final``).
    final: Any = None
    has_final: bool = False
    n_tokens: int = 0
    truncated: bool | None = None
    error: str | None = None


def failed_result(it: Item) -> ItemResult:
    return ItemResult(it.idx, C.ITEM_FAILED, error=it.error, truncated=it.truncated, n_tokens=it.n_tokens or None)


@dataclass
class Prepared:
    """A batch cut and collated, waiting for the model."""

    batch: list[Unit]
    #: Padded model inputs, or None where the rows run one by one.
    inputs: Any
    prepare_ms: float


@dataclass
class Ready:
    """Items (positions in the chunk) that failed in preprocess, or made no forward rows at all."""

    items: list[int]
    failed: bool

    def finish(
        self, runtime: PipelineRuntime, state: list[Item], post: dict[str, Any]
    ) -> Callable[[], tuple[list[ItemResult], BatchTiming | None]]:
        def results() -> tuple[list[ItemResult], BatchTiming | None]:
            if self.failed:
                return [failed_result(state[p]) for p in self.items], None
            return [runtime.finish_item(state[p], post) for p in self.items], None

        return results


@dataclass
class Segment:
    """Forward outputs of some of a batch's units: one batched output, or one output (or exception) per unit."""

    units: list[Unit]
    outputs: Any
    batched: bool


@dataclass
class Timing:
    started: datetime
    prepare_ms: float
    forward_ms: float
    queue_wait_ms: float


@dataclass
class BatchFinish:
    """Unbatch a forward pass's outputs, postprocess the items it completes, and time it."""

    runtime: PipelineRuntime
    state: list[Item]
    batch: list[Unit]
    segments: list[Segment]
    post: dict[str, Any]
    timing: Timing
    #: Positions of the items whose last forward row is in this batch (steps are finished in order).
    done: list[int]

    def __call__(self) -> tuple[list[ItemResult], BatchTiming]:
        t0 = time.perf_counter()
        for segment in self.segments:
            finals = self.runtime.postprocess_batch(segment, self.post)
            if finals is not None:
                for unit, final in zip(segment.units, finals, strict=True):
                    self.state[unit.item].final, self.state[unit.item].has_final = final, True
                continue
            for unit, out in zip(segment.units, self.runtime.unbatch(segment), strict=True):
                it = self.state[unit.item]
                if isinstance(out, BaseException):
                    it.error = it.error or describe_error("forward", out)
                else:
                    it.outputs[unit.pos] = out
        completed = [self.state[p] for p in self.done]
        results = []
        for it in completed:
            results.append(self.runtime.finish_item(it, self.post))
            it.outputs = {}  # the model's outputs are not needed any more
        postprocess_ms = (time.perf_counter() - t0) * 1000
        preprocess_ms = sum(it.preprocess_ms for it in completed) + self.timing.prepare_ms
        timing = BatchTiming(
            size=len(completed),
            rows=len(self.batch),
            real_tokens=sum(u.n_tokens for u in self.batch),
            padded_tokens=padded_tokens(self.batch),
            queue_wait_ms=self.timing.queue_wait_ms,
            preprocess_ms=preprocess_ms,
            forward_ms=self.timing.forward_ms,
            postprocess_ms=postprocess_ms,
            total_ms=preprocess_ms + self.timing.forward_ms + postprocess_ms,
            started_at=self.timing.started,
            finished_at=datetime.now(UTC),
        )
        log.debug(
            "batch of %d rows x %d tokens: forward %.1f ms",
            len(self.batch),
            timing.padded_tokens // len(self.batch),
            self.timing.forward_ms,
        )
        return results, timing


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def prefetch(source: Iterator[_T], depth: int) -> Generator[_T, None, None]:
    """Run ``source`` on a thread of its own, at most ``depth`` items ahead of the consumer; closing stops it."""
    ahead: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Raised(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=fill, name="pipeq-prepare", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
