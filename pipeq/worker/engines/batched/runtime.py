"""Run a loaded transformers Pipeline over micro-batches in overlapping stages, with timing.

Everything task-specific is the pipeline's own code: ``_sanitize_parameters``, ``preprocess``,
its padding collation, ``forward`` and ``postprocess``; unbatching reuses transformers'
``PipelineIterator``. pipeq decides which inputs share a forward pass (sorted by token length,
cut by a token budget), keeps one failing input from failing its batch-mates, and overlaps the
stages, as the fast serving peers do:

- **prepare**, on a thread of its own, one slice of the chunk ahead: tokenize the slice (one call
  of the fast tokenizer where the pipeline's ``preprocess`` is one, see ``tokenizing``; else
  ``preprocess`` per input), cut it into batches and collate each one (on CUDA, copy it to the
  device from pinned memory without blocking);
- **forward**, on the calling thread: one forward pass per batch; or, with ``streams`` > 1 (the
  CPU's default, see ``WorkerConfig.resolved_streams``), that many forward passes at once, each on a
  thread of its own running torch on its share of the cores. On a CPU one stream on every core loses
  to the work around it: torch splits each operator evenly over its threads, so the prepare or writer
  thread taking a core for a moment stalls the whole operator; streams of one thread each lose only
  that stream's moment. Their steps still come out in order;
- **finish**, on whichever thread calls ``Step.finish`` (the worker's writer thread): unbatch,
  ``postprocess``, JSON values (a pooled embedding stays the bytes it is stored as, ``pipeq.vectors``).

The tokenizer (Rust) and torch release the GIL, so the stages run at once on real cores. At most
``PREFETCH`` prepared batches wait for the model, so memory stays flat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeq import constants as C
from pipeq.embedding import PROMPT, PROMPT_NAME, prompted
from pipeq.embedding import TASK as EMBEDDING_TASK
from pipeq.errors import ConfigurationError
from pipeq.primitives import BatchTiming, ItemResult, describe_error, input_size
from pipeq.tasks import traits
from pipeq.vectors import DEFAULT_DTYPE, Vector
from pipeq.worker.engines.base import Step, finished_in_turn
from pipeq.worker.engines.batched.batching import Unit, cut_batches, padded_tokens, token_length
from pipeq.worker.engines.batched.postprocessing import BatchPostprocessor
from pipeq.worker.engines.batched.stages import (
    BatchFinish,
    Item,
    Prepared,
    Ready,
    Segment,
    Timing,
    failed_result,
    prefetch,
)
from pipeq.worker.engines.batched.tokenizing import BatchTokenizer, Encoded
from pipeq.worker.serialize import to_jsonable

if TYPE_CHECKING:
    from pipeq.worker.config import WorkerConfig

log = logging.getLogger(__name__)

#: A batch's forward outputs (or one per unit, where it had to be split), when that pass began, and its milliseconds.
Forwarded = tuple[list[Segment], datetime, float]

#: Tokenizer limits above this are "no limit" placeholders (transformers uses 1e30).
_NO_LIMIT = 1_000_000
#: Prepared (tokenized, collated) batches that may wait for the model.
PREFETCH = 2
#: Forward passes per stream that may wait, finished, behind an older one still running (see ``_forwarded``).
STREAM_BACKLOG = 4
#: Inputs tokenized at a time, in batch sizes: a chunk's first forward waits for one slice, not all of it.
SLICE_BATCHES = 2


def offline_defaults(task: str, params: dict[str, Any]) -> dict[str, Any]:
    """Parameters pipeq adds for offline jobs: truncate to the model's maximum instead of raising.

    A job's own ``truncation`` (or ``tokenizer_kwargs``) always wins; truncated items are flagged.
    """
    params = dict(params)
    if task == "text-classification":
        params.setdefault("truncation", True)
    elif task == "feature-extraction":
        if "truncation" not in (params.get("tokenize_kwargs") or {}):
            params.setdefault("truncation", True)
    elif task == "fill-mask":
        tokenizer_kwargs = dict(params.get("tokenizer_kwargs") or {})
        tokenizer_kwargs.setdefault("truncation", True)
        params["tokenizer_kwargs"] = tokenizer_kwargs
    return params


def _keys(inputs: Any) -> tuple[str, ...]:
    if isinstance(inputs, Encoded):
        return inputs.keys
    return tuple(sorted(inputs.keys()))


def _passthrough(outputs: Any, **_: Any) -> Any:
    return outputs


def _stored(output: Any) -> Any:
    """An output as the store keeps it: a pooled vector's bytes as they are, anything else as JSON values."""
    return output if isinstance(output, Vector) else to_jsonable(output)


def set_torch_threads(threads: int | None) -> None:
    """A stream's (or the shadow check's) thread: torch's intra-op threads for the operators this thread runs."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError from an allocator that ran out (CUDA, MPS or CPU)."""
    text = str(exc).lower()
    return (
        type(exc).__name__ == "OutOfMemoryError"
        or isinstance(exc, MemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PipelineRuntime:
    """One loaded pipeline, and how pipeq feeds it micro-batches."""

    min_chunk_items = 0

    def __init__(
        self,
        pipe: Any,
        task: str,
        *,
        max_batch_tokens: int = C.DEFAULT_MAX_BATCH_TOKENS,
        max_batch_size: int = C.DEFAULT_MAX_BATCH_SIZE,
        prepare_ahead: int = PREFETCH,
        streams: int = 1,
        stream_threads: int | None = None,
    ) -> None:
        from transformers.pipelines.base import ChunkPipeline, pad_collate_fn

        self.pipe = pipe
        self.task = task
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        #: Prepared batches the prepare thread may hold ahead of the model; 0 prepares on the calling thread.
        self.prepare_ahead = prepare_ahead
        if streams < 1:
            raise ConfigurationError("streams must be at least 1")
        #: Forward passes that run at once, each on a thread of its own (1: on the calling thread).
        self.streams = streams
        #: torch threads each stream's thread runs with (None: as the process is set).
        self.stream_threads = stream_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.is_chunk = isinstance(pipe, ChunkPipeline)
        feature_extractor = pipe.feature_extractor if pipe.feature_extractor is not None else pipe.image_processor
        try:
            self._collate: Any = pad_collate_fn(pipe.tokenizer, feature_extractor)
        except ValueError as exc:  # e.g. a tokenizer without a pad token: one row per forward
            log.warning("batching disabled for this model: %s", exc)
            self._collate = None
        if not traits(task).batchable:
            self._collate = None
        #: One tokenizer call per slice of inputs, where the pipeline's preprocess is one tokenizer call.
        self._batch_tokenizer = BatchTokenizer.for_pipeline(pipe, task)
        #: One postprocess per batch, where the pipeline's postprocess is a per-row formula.
        self._batch_postprocessor = BatchPostprocessor.for_pipeline(pipe, unpadded=traits(task).per_token_output)
        device = getattr(pipe, "device", None)
        #: Where prepared batches are copied ahead of the forward pass (CUDA only; None keeps them where they are).
        self._device = device if getattr(device, "type", None) == "cuda" else None
        self._padding_side = getattr(pipe.tokenizer, "padding_side", "right")
        tokenizer = pipe.tokenizer
        limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
        #: The tokenizer's maximum length, None when it sets no real limit.
        self.max_length = int(limit) if limit and limit < _NO_LIMIT else None

    @classmethod
    def for_worker(cls, pipe: Any, cfg: WorkerConfig, threads: int) -> PipelineRuntime:
        """The runtime a worker child with ``threads`` torch threads runs ``cfg``'s pipeline in: its budget,
        batch size and forward streams (warm-up, calibration and precision measurements use the same)."""
        streams = cfg.resolved_streams(threads)
        return cls(
            pipe,
            cfg.key.task,
            max_batch_tokens=cfg.batch_tokens,
            max_batch_size=cfg.max_batch_size,
            streams=streams,
            stream_threads=max(1, threads // streams) if streams > 1 else None,
        )

    # ------------------------------------------------------------ parameters

    def stage_params(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The pipeline's own split of job parameters into preprocess/forward/postprocess ones."""
        pipe = self.pipe
        extra: dict[str, Any] = {}
        pooling = {name for name in ("pooling", "normalize") if params.get(name) is not None}
        if self.task == EMBEDDING_TASK and pooling and not getattr(pipe, "accepts_pooling", False):
            # A custom feature-extraction class would silently drop them (transformers' own
            # _sanitize_parameters swallows unknown keywords) and store a vector per token.
            raise ConfigurationError(
                f"{' and '.join(sorted(pooling))} need pipeq's embedding pipeline; this worker serves "
                f"{type(pipe).__module__}.{type(pipe).__qualname__}"
            )
        if self.task == "token-classification":
            # TokenClassificationPipeline.__call__ fills these in before _sanitize_parameters.
            extra = {"is_split_into_words": False, "delimiter": None}
        if self.task == EMBEDDING_TASK and params.get("pooling") is not None:
            extra = {"dtype": DEFAULT_DTYPE}  # pooled vectors are stored as binary; a job's own dtype wins
        if self.task == EMBEDDING_TASK:  # the prompt is put before each input (``stream``), not passed on
            params = {name: value for name, value in params.items() if name not in (PROMPT, PROMPT_NAME)}
        pre, fwd, post = pipe._sanitize_parameters(**{**extra, **offline_defaults(self.task, params)})
        return (
            {**pipe._preprocess_params, **pre},
            {**pipe._forward_params, **fwd},
            {**pipe._postprocess_params, **post},
        )

    def adapt_input(self, value: Any) -> Any:
        """Turn a stored input into what the pipeline's preprocess takes, as its ``__call__`` would."""
        if self.task == "table-question-answering":
            return self.pipe._args_parser(value)[0]
        return value

    # --------------------------------------------------------------- running

    def run(
        self,
        items: Sequence[tuple[int, Any]],
        params: dict[str, Any],
        *,
        queue_wait_ms: float = 0.0,
        max_batch_size: int | None = None,
    ) -> Generator[tuple[list[ItemResult], BatchTiming | None], None, None]:
        """Yield each micro-batch's results (and timing) as soon as it is done (``stream``, finished in turn)."""
        return finished_in_turn(self.stream(items, params, queue_wait_ms=queue_wait_ms, max_batch_size=max_batch_size))

    def stream(
        self,
        items: Sequence[tuple[int, Any]],
        params: dict[str, Any],
        *,
        queue_wait_ms: float = 0.0,
        max_batch_size: int | None = None,
    ) -> Generator[Step, None, None]:
        """Yield a Step per micro-batch once its forward pass has run; ``Step.finish`` gives its results.

        Steps must be finished in the order they come, on one thread. Inputs that fail in
        preprocess come in steps without timing; a forward failure is narrowed down by splitting
        the batch until the failing input is alone. The next batches are prepared meanwhile on
        another thread; closing the iterator stops it.
        """
        pre, fwd, post = self.stage_params(params)
        prompt = prompted(params) if self.task == EMBEDDING_TASK else ""
        state = [Item(idx, prompt + value if prompt and isinstance(value, str) else value) for idx, value in items]
        size = max_batch_size or self.max_batch_size
        source = self._prepare(state, pre, size)
        prepared = prefetch(source, self.prepare_ahead + self.streams - 1) if self.prepare_ahead > 0 else source
        dispatched = [0] * len(state)

        def step(ready: Ready | Prepared, forwarded: Forwarded | None) -> Step:
            if isinstance(ready, Ready):
                return Step([state[p].idx for p in ready.items], ready.finish(self, state, post))
            assert forwarded is not None
            segments, started, forward_ms = forwarded
            done = []
            for unit in ready.batch:
                dispatched[unit.item] += 1
                if dispatched[unit.item] == state[unit.item].n_units:
                    done.append(unit.item)
            timing = Timing(started, ready.prepare_ms, forward_ms, queue_wait_ms)
            finish = BatchFinish(self, state, ready.batch, segments, post, timing, done)
            return Step([state[p].idx for p in done], finish)

        forwarded = self._forwarded(prepared, fwd)
        try:
            for ready, outputs in forwarded:
                yield step(ready, outputs)
        finally:
            forwarded.close()  # first: it waits for forward passes still running
            prepared.close()

    def _forwarded(
        self, prepared: Iterator[Ready | Prepared], fwd: dict[str, Any]
    ) -> Generator[tuple[Ready | Prepared, Forwarded | None], None, None]:
        """Each prepared batch with its forward pass's outputs (None for a ``Ready``), in the order they came.

        With several streams, that many forward passes run at once on the pool's threads, and a stream
        that finishes takes the next batch at once, whichever stream's batch is the oldest: batches of a
        slice differ in length, so waiting for the oldest would leave a stream idle until it ends (the
        streams then run in lockstep pairs, each pair as long as its longer batch). Outputs still come out
        in order; at most ``STREAM_BACKLOG`` batches a stream wait finished behind an older one that runs.
        Closed early, it lets no forward pass outlive it.
        """
        if self.streams == 1:
            for ready in prepared:
                yield ready, None if isinstance(ready, Ready) else self._timed_forward(ready, fwd)
        else:
            yield from self._forwarded_on_streams(prepared, fwd)

    def _forwarded_on_streams(
        self, prepared: Iterator[Ready | Prepared], fwd: dict[str, Any]
    ) -> Generator[tuple[Ready | Prepared, Forwarded | None], None, None]:
        """``_forwarded`` with several streams."""
        pool = self._forward_pool()
        pending: deque[tuple[Ready | Prepared, Future[Forwarded] | None]] = deque()
        backlog = self.streams * STREAM_BACKLOG

        def head_done() -> bool:
            return bool(pending) and (pending[0][1] is None or pending[0][1].done())

        def running() -> list[Future[Forwarded]]:
            return [future for _, future in pending if future is not None and not future.done()]

        try:
            for ready in prepared:
                future = None if isinstance(ready, Ready) else pool.submit(self._timed_forward, ready, fwd)
                pending.append((ready, future))
                while True:
                    while head_done():
                        ready, future = pending.popleft()
                        yield ready, None if future is None else future.result()
                    busy = running()
                    if len(busy) < self.streams and len(pending) < backlog:
                        break  # a stream is free: it takes the next prepared batch
                    wait(busy, return_when=FIRST_COMPLETED)
            while pending:
                ready, future = pending.popleft()
                yield ready, None if future is None else future.result()
        finally:
            for _, future in pending:
                if future is not None and not future.cancel():
                    try:
                        future.result()
                    except BaseException:  # its batch is handed on by no one either way
                        log.debug("a forward pass of a closed stream failed", exc_info=True)

    def _timed_forward(self, ready: Prepared, fwd: dict[str, Any]) -> Forwarded:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        segments = self._forward(ready.batch, ready.inputs, fwd)
        return segments, started, (time.perf_counter() - t0) * 1000

    def _forward_pool(self) -> ThreadPoolExecutor:
        """The streams' threads, started at first use, each running torch on ``stream_threads`` threads."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.streams,
                    thread_name_prefix="pipeq-forward",
                    initializer=set_torch_threads,
                    initargs=(self.stream_threads,),
                )
            return self._pool

    def close(self) -> None:
        """Stop the streams' threads (a runtime that runs again starts them anew)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> PipelineRuntime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _prepare(self, state: list[Item], pre: dict[str, Any], size: int) -> Generator[Ready | Prepared, None, None]:
        """Slice by slice: inputs that failed or need no forward, then collated batches."""
        # Slices of similar length (shortest first: the model starts on a quick batch). A producer's
        # chunk is sorted already; a redelivered or in-process one may not be.
        order = sorted(range(len(state)), key=[input_size(it.input) for it in state].__getitem__)
        start, step = 0, max(1, size)  # the first slice is one batch: the model starts as soon as it can
        while start < len(order):
            positions = order[start : start + step]
            start, step = start + len(positions), max(1, size * SLICE_BATCHES)
            units, failed = self._preprocess(state, positions, pre)
            if failed:
                yield Ready(failed, failed=True)
            empty = [p for p in positions if state[p].error is None and state[p].n_units == 0]
            if empty:  # a chunk task that made no forward rows for an input: its postprocess([]) decides
                yield Ready(empty, failed=False)
            for batch in cut_batches(units, max_tokens=self.max_batch_tokens, max_size=size):
                t0 = time.perf_counter()
                inputs = self._collated(batch)
                yield Prepared(batch, inputs, (time.perf_counter() - t0) * 1000)

    def _preprocess(
        self, state: list[Item], positions: Sequence[int], pre: dict[str, Any]
    ) -> tuple[list[Unit], list[int]]:
        """Preprocess the items at ``positions``: their forward units, and the positions that failed."""
        if self._batch_tokenizer is not None and self._batch_tokenizer.accepts(pre):
            return self._preprocess_batched(state, positions, pre, self._batch_tokenizer)
        units: list[Unit] = []
        failed: list[int] = []
        for pos in positions:
            it = state[pos]
            t0 = time.perf_counter()
            try:
                value = self.adapt_input(it.input)
                produced = (
                    list(self.pipe.preprocess(value, **pre)) if self.is_chunk else [self.pipe.preprocess(value, **pre)]
                )
            except Exception as exc:
                log.debug("preprocess failed for item %d", it.idx, exc_info=True)
                it.error = describe_error("preprocess", exc)
                failed.append(pos)
                continue
            finally:
                it.preprocess_ms = (time.perf_counter() - t0) * 1000
            lengths = [token_length(p) for p in produced]
            self._units(it, pos, produced, lengths, pre, units)
        return units, failed

    def _preprocess_batched(
        self, state: list[Item], positions: Sequence[int], pre: dict[str, Any], tokenizer: BatchTokenizer
    ) -> tuple[list[Unit], list[int]]:
        """Tokenize the items at ``positions`` in one call; each gets an equal share of its time."""
        t0 = time.perf_counter()
        encoded = tokenizer.encode([self.adapt_input(state[p].input) for p in positions], pre)
        share = (time.perf_counter() - t0) * 1000 / max(1, len(positions))
        units: list[Unit] = []
        failed: list[int] = []
        flagged = traits(self.task).truncation_flag
        for pos, enc in zip(positions, encoded, strict=True):
            it = state[pos]
            it.preprocess_ms = share
            if isinstance(enc, Exception):
                it.error = describe_error("preprocess", enc)
                failed.append(pos)
                continue
            n = enc.n_tokens
            it.n_tokens, it.n_units = n, 1
            # As ``_units``: the encoding's own flag where the task keeps one, else counted (or None).
            it.truncated = (
                enc.truncated if flagged and enc.truncated is not None else self._was_truncated(it.input, [n], pre)
            )
            units.append(Unit(pos, 0, enc, n, enc.keys))
        return units, failed

    def _units(
        self,
        it: Item,
        pos: int,
        produced: list[Any],
        lengths: list[int],
        pre: dict[str, Any],
        units: list[Unit],
        *,
        truncated: bool | None = None,
    ) -> None:
        it.n_tokens = sum(lengths)
        it.n_units = len(produced)
        if truncated is None or not traits(self.task).truncation_flag:
            truncated = self._was_truncated(it.input, lengths, pre)
        it.truncated = truncated
        for chunk_pos, (inputs, n) in enumerate(zip(produced, lengths, strict=True)):
            units.append(Unit(pos, chunk_pos, inputs, n, _keys(inputs)))

    def _was_truncated(self, value: Any, lengths: list[int], pre: dict[str, Any]) -> bool | None:
        if not traits(self.task).truncation_flag or len(lengths) != 1:
            return None
        tokenizer_kwargs = pre.get("tokenizer_kwargs") or pre.get("tokenize_kwargs") or pre
        cap = tokenizer_kwargs.get("max_length") or self.max_length
        if not tokenizer_kwargs.get("truncation") or cap is None or lengths[0] < cap:
            return False
        # At the cap: count the full text once to know whether anything was cut.
        if isinstance(value, dict):
            full = self.pipe.tokenizer(value.get("text"), text_pair=value.get("text_pair"), verbose=False)
        else:
            full = self.pipe.tokenizer(value, verbose=False)
        return len(full["input_ids"]) > lengths[0]

    def _forward(self, batch: list[Unit], inputs: Any, fwd: dict[str, Any]) -> list[Segment]:
        """Forward outputs of the batch; where it fails, of its halves, down to the one input that fails alone."""
        try:
            return [self._forward_once(batch, inputs, fwd)]
        except Exception as exc:
            if len(batch) == 1:
                log.warning("forward failed for one input: %s: %s", type(exc).__name__, exc)
                return [Segment(batch, [exc], batched=False)]
            if _is_oom(exc):
                self._lower_budget(batch)
            else:
                log.warning(
                    "forward failed on %d rows (%s); splitting to isolate the input", len(batch), type(exc).__name__
                )
            halves = batch[: len(batch) // 2], batch[len(batch) // 2 :]
            return [seg for half in halves for seg in self._forward(half, self._collated(half), fwd)]

    def _forward_once(self, batch: list[Unit], inputs: Any, fwd: dict[str, Any]) -> Segment:
        if inputs is None:  # one row, or a task whose inputs cannot be collated
            return Segment(batch, [self.pipe.forward(self._inputs(u), **fwd) for u in batch], batched=False)
        return Segment(batch, self.pipe.forward(inputs, **fwd), batched=True)

    def _inputs(self, unit: Unit) -> Any:
        """The unit's model inputs as ``preprocess`` returns them (for a forward pass of its own)."""
        if isinstance(unit.inputs, Encoded):
            assert self._batch_tokenizer is not None
            return self._batch_tokenizer.model_inputs(unit.inputs)
        return unit.inputs

    def _collated(self, batch: list[Unit]) -> Any:
        """The batch's padded model inputs (on the model's device), or None where its rows run one by one."""
        if len(batch) == 1 or self._collate is None:
            return None
        try:
            if self._batch_tokenizer is not None and all(isinstance(u.inputs, Encoded) for u in batch):
                collated = self._batch_tokenizer.collate([u.inputs for u in batch])
            else:
                collated = self._collate([self._inputs(u) for u in batch])
        except Exception as exc:  # the forward pass isolates the input that cannot be collated
            log.debug("collating %d rows failed (%s); running them one by one", len(batch), exc)
            return None
        return self._to_device(collated)

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """On CUDA: copy a prepared batch from pinned memory without blocking, so it lands while the model runs."""
        if self._device is None:
            return inputs
        return {
            k: v.pin_memory().to(self._device, non_blocking=True) if hasattr(v, "pin_memory") else v
            for k, v in inputs.items()
        }

    def unbatch(self, segment: Segment) -> list[Any]:
        """One output per unit, each as if it had run alone (transformers' own unbatching)."""
        from transformers.pipelines.pt_utils import PipelineIterator

        batch = segment.units
        if not segment.batched:
            outs = list(segment.outputs)
        else:
            # The forward pass already ran: the iterator's "infer" just hands its output over.
            loader = PipelineIterator([segment.outputs], _passthrough, {}, loader_batch_size=len(batch))
            unbatch = iter(loader)
            outs = [next(unbatch) for _ in batch]
            if traits(self.task).per_token_output:
                outs = [self._unpad(out, unit.n_tokens) for out, unit in zip(outs, batch, strict=True)]
        if self.is_chunk:
            for out in outs:
                if not isinstance(out, BaseException):
                    out.pop("is_last", None)
        return outs

    def postprocess_batch(self, segment: Segment, post: dict[str, Any]) -> list[Any] | None:
        """Each unit's postprocessed output from one batched forward output, where the pipeline allows it.

        None where it does not (then each input is unbatched and postprocessed alone, as is any
        batch this raises on, so a failure stays with its own input).
        """
        if self._batch_postprocessor is None or not segment.batched or self.is_chunk:
            return None
        try:
            lengths = [unit.n_tokens for unit in segment.units]
            return self._batch_postprocessor.postprocess_batch(segment.outputs, lengths, post)
        except Exception as exc:
            log.debug("batch postprocess failed (%s: %s); postprocessing inputs one by one", type(exc).__name__, exc)
            return None

    def finish_item(self, it: Item, post: dict[str, Any]) -> ItemResult:
        """An item whose forward rows are all done: its postprocessed result, or its failure."""
        if it.error is None and it.has_final:  # a batch postprocessor's output is in its stored form already
            return ItemResult(it.idx, C.ITEM_DONE, output=it.final, truncated=it.truncated, n_tokens=it.n_tokens)
        if it.error is None:
            try:
                if self.is_chunk:
                    raw = self.pipe.postprocess([it.outputs[k] for k in sorted(it.outputs)], **post)
                else:
                    raw = self.pipe.postprocess(it.outputs[0], **post)
                output = _stored(raw)
            except Exception as exc:
                log.debug("postprocess failed for item %d", it.idx, exc_info=True)
                it.error = describe_error("postprocess", exc)
            else:
                return ItemResult(it.idx, C.ITEM_DONE, output=output, truncated=it.truncated, n_tokens=it.n_tokens)
        return failed_result(it)

    def _lower_budget(self, batch: list[Unit]) -> None:
        """Out of memory: later batches get half the padded tokens of the one that failed (never below one full row)."""
        _free_accelerator_memory()
        floor = max(self.max_length or 0, max(u.n_tokens for u in batch))
        lowered = max(floor, min(self.max_batch_tokens, padded_tokens(batch)) // 2)
        if lowered < self.max_batch_tokens:
            log.warning(
                "out of memory on %d rows x %d tokens; splitting the batch and lowering the token budget %d -> %d",
                len(batch),
                max(u.n_tokens for u in batch),
                self.max_batch_tokens,
                lowered,
            )
            self.max_batch_tokens = lowered
        else:
            log.warning("out of memory on %d rows; splitting the batch", len(batch))

    def _unpad(self, out: Any, n_tokens: int) -> Any:
        """Drop padded positions so a per-token output is what an unbatched call returns."""
        if not hasattr(out, "get"):
            return out
        for name in ("last_hidden_state", "attention_mask"):
            tensor = out.get(name)
            if tensor is not None and tensor.ndim >= 2 and tensor.shape[1] > n_tokens:
                out[name] = tensor[:, -n_tokens:] if self._padding_side == "left" else tensor[:, :n_tokens]
        return out
