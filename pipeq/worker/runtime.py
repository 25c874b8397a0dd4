"""Run a loaded transformers Pipeline over micro-batches, stage by stage, with timing.

Everything task-specific is the pipeline's own code: ``_sanitize_parameters``, ``preprocess``,
its padding collation, ``forward`` and ``postprocess``; unbatching reuses transformers'
``PipelineIterator``. pipeq only decides which inputs share a forward pass (sorted by token
length, cut by a token budget) and keeps one failing input from failing its batch-mates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeq import constants as C
from pipeq.embedding import TASK as EMBEDDING_TASK
from pipeq.errors import ConfigurationError
from pipeq.primitives import BatchTiming, ItemResult, describe_error
from pipeq.tasks import traits
from pipeq.worker.batching import Unit, cut_batches, padded_tokens, token_length
from pipeq.worker.serialize import to_jsonable

log = logging.getLogger(__name__)

#: Tokenizer limits above this are "no limit" placeholders (transformers uses 1e30).
_NO_LIMIT = 1_000_000


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


@dataclass
class _Item:
    idx: int
    input: Any
    preprocess_ms: float = 0.0
    units_left: int = 0
    outputs: dict[int, Any] = field(default_factory=dict)
    n_tokens: int = 0
    truncated: bool | None = None
    error: str | None = None


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

    def __init__(
        self,
        pipe: Any,
        task: str,
        *,
        max_batch_tokens: int = C.DEFAULT_MAX_BATCH_TOKENS,
        max_batch_size: int = C.DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        from transformers.pipelines.base import ChunkPipeline, pad_collate_fn

        self.pipe = pipe
        self.task = task
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.is_chunk = isinstance(pipe, ChunkPipeline)
        feature_extractor = pipe.feature_extractor if pipe.feature_extractor is not None else pipe.image_processor
        try:
            self._collate: Any = pad_collate_fn(pipe.tokenizer, feature_extractor)
        except ValueError as exc:  # e.g. a tokenizer without a pad token: one row per forward
            log.warning("batching disabled for this model: %s", exc)
            self._collate = None
        if not traits(task).batchable:
            self._collate = None
        self._padding_side = getattr(pipe.tokenizer, "padding_side", "right")
        tokenizer = pipe.tokenizer
        limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
        #: The tokenizer's maximum length, None when it sets no real limit.
        self.max_length = int(limit) if limit and limit < _NO_LIMIT else None

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
    ) -> Iterator[tuple[list[ItemResult], BatchTiming | None]]:
        """Yield each micro-batch's results (and timing) as soon as it is done.

        Inputs that fail in preprocess come first, with no timing; a forward failure is narrowed
        down by splitting the batch until the failing input is alone.
        """
        pre, fwd, post = self.stage_params(params)
        state = [_Item(idx, value) for idx, value in items]
        units, failed = self._preprocess(state, pre)
        if failed:
            yield [self._result(it) for it in failed], None
        empty = [it for it in state if it.error is None and it.units_left == 0]
        if empty:  # a chunk task that made no forward rows for an input: its postprocess([]) decides
            yield [self._finish(it, post) for it in empty], None
        size = max_batch_size or self.max_batch_size
        for batch in cut_batches(units, max_tokens=self.max_batch_tokens, max_size=size):
            yield self._run_batch(state, batch, fwd, post, queue_wait_ms)

    def _preprocess(self, state: list[_Item], pre: dict[str, Any]) -> tuple[list[Unit], list[_Item]]:
        units: list[Unit] = []
        failed: list[_Item] = []
        for pos, it in enumerate(state):
            t0 = time.perf_counter()
            try:
                value = self.adapt_input(it.input)
                produced = (
                    list(self.pipe.preprocess(value, **pre)) if self.is_chunk else [self.pipe.preprocess(value, **pre)]
                )
            except Exception as exc:
                log.debug("preprocess failed for item %d", it.idx, exc_info=True)
                it.error = describe_error("preprocess", exc)
                failed.append(it)
                continue
            finally:
                it.preprocess_ms = (time.perf_counter() - t0) * 1000
            lengths = [token_length(p) for p in produced]
            it.n_tokens = sum(lengths)
            it.units_left = len(produced)
            it.truncated = self._was_truncated(it.input, lengths, pre)
            for chunk_pos, (inputs, n) in enumerate(zip(produced, lengths, strict=True)):
                units.append(Unit(pos, chunk_pos, inputs, n, tuple(sorted(inputs.keys()))))
        return units, failed

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

    def _run_batch(
        self, state: list[_Item], batch: list[Unit], fwd: dict[str, Any], post: dict[str, Any], queue_wait_ms: float
    ) -> tuple[list[ItemResult], BatchTiming]:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        outputs = self._forward(batch, fwd)
        forward_ms = (time.perf_counter() - t0) * 1000
        completed: list[_Item] = []
        for unit, out in zip(batch, outputs, strict=True):
            it = state[unit.item]
            if isinstance(out, BaseException):
                it.error = it.error or describe_error("forward", out)
            else:
                it.outputs[unit.pos] = out
            it.units_left -= 1
            if it.units_left == 0:
                completed.append(it)
        t1 = time.perf_counter()
        results = [self._finish(it, post) for it in completed]
        postprocess_ms = (time.perf_counter() - t1) * 1000
        preprocess_ms = sum(it.preprocess_ms for it in completed)
        timing = BatchTiming(
            size=len(completed),
            rows=len(batch),
            real_tokens=sum(u.n_tokens for u in batch),
            padded_tokens=padded_tokens(batch),
            queue_wait_ms=queue_wait_ms,
            preprocess_ms=preprocess_ms,
            forward_ms=forward_ms,
            postprocess_ms=postprocess_ms,
            total_ms=preprocess_ms + forward_ms + postprocess_ms,
            started_at=started,
            finished_at=datetime.now(UTC),
        )
        log.debug(
            "batch of %d rows x %d tokens: forward %.1f ms", len(batch), timing.padded_tokens // len(batch), forward_ms
        )
        return results, timing

    def _finish(self, it: _Item, post: dict[str, Any]) -> ItemResult:
        if it.error is None:
            try:
                if self.is_chunk:
                    raw = self.pipe.postprocess([it.outputs[k] for k in sorted(it.outputs)], **post)
                else:
                    raw = self.pipe.postprocess(it.outputs[0], **post)
                output = to_jsonable(raw)
            except Exception as exc:
                log.debug("postprocess failed for item %d", it.idx, exc_info=True)
                it.error = describe_error("postprocess", exc)
            else:
                return ItemResult(it.idx, C.ITEM_DONE, output=output, truncated=it.truncated, n_tokens=it.n_tokens)
        return self._result(it)

    @staticmethod
    def _result(it: _Item) -> ItemResult:
        return ItemResult(it.idx, C.ITEM_FAILED, error=it.error, truncated=it.truncated, n_tokens=it.n_tokens or None)

    def _forward(self, batch: list[Unit], fwd: dict[str, Any]) -> list[Any]:
        """Forward outputs per unit; an exception in place of the output of a unit that fails alone."""
        try:
            return self._forward_once(batch, fwd)
        except Exception as exc:
            if len(batch) == 1:
                log.warning("forward failed for one input: %s: %s", type(exc).__name__, exc)
                return [exc]
            if _is_oom(exc):
                self._lower_budget(batch)
            else:
                log.warning(
                    "forward failed on %d rows (%s); splitting to isolate the input", len(batch), type(exc).__name__
                )
            mid = len(batch) // 2
            return self._forward(batch[:mid], fwd) + self._forward(batch[mid:], fwd)

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

    def _forward_once(self, batch: list[Unit], fwd: dict[str, Any]) -> list[Any]:
        from transformers.pipelines.pt_utils import PipelineIterator

        if len(batch) == 1 or self._collate is None:
            outs = [self.pipe.forward(u.inputs, **fwd) for u in batch]
        else:
            collated = self._collate([u.inputs for u in batch])
            # transformers' own unbatching: each output looks as if it ran with batch size 1.
            unbatch = iter(PipelineIterator([collated], self.pipe.forward, fwd, loader_batch_size=len(batch)))
            outs = [next(unbatch) for _ in batch]
            if traits(self.task).per_token_output:
                outs = [self._unpad(out, unit.n_tokens) for out, unit in zip(outs, batch, strict=True)]
        if self.is_chunk:
            for out in outs:
                out.pop("is_last", None)
        return outs
