"""The sequence engine: a chunk's generation items as requests to the scheduler, their ends as steps.

Each item's prompt is its text, or its chat messages rendered with the tokenizer's chat template;
its sampling parameters are its own over its job's (``pipeq.generation``). Items that cannot run
(bad parameters, a template-less tokenizer given messages, a prompt that fills the model's context)
fail alone, with the reason, before any forward pass. The rest run in ``Scheduler`` and each is
handed to the writer the step it ends, so a long item never holds a short one's result back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeq import constants as C
from pipeq import generation
from pipeq.errors import ConfigurationError, InputError
from pipeq.primitives import BatchTiming, ItemResult, describe_error
from pipeq.worker.engines.base import Finished as StepResults
from pipeq.worker.engines.base import Step, finished_in_turn
from pipeq.worker.engines.sequence.scheduler import Finished, Request, Scheduler

if TYPE_CHECKING:
    from pipeq.worker.config import WorkerConfig

log = logging.getLogger(__name__)

#: Items a message brings per row the engine runs: while one message's last rows finish, nothing refills them.
ROWS_PER_MESSAGE = 4
#: Share of an accelerator's free memory (after the model loaded) the KV cache may take.
KV_MEMORY_SHARE = 0.8
#: Bytes of KV cache a CPU worker allows itself.
CPU_KV_BYTES = 4 << 30


def kv_bytes_per_token(model: Any) -> int:
    """Bytes the KV cache holds per token of one sequence (keys and values, every layer)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    def field(*names: str, default: int) -> int:
        found = [getattr(config, name, None) for name in names]
        return next((int(v) for v in found if isinstance(v, int) and v > 0), default)

    layers = field("num_hidden_layers", "n_layer", default=1)
    heads = field("num_attention_heads", "n_head", default=1)
    kv_heads = field("num_key_value_heads", default=heads)
    head_dim = field("head_dim", default=field("hidden_size", "n_embd", default=64) // heads)
    dtype = next(iter(model.parameters())).dtype
    return int(2 * layers * kv_heads * head_dim * dtype.itemsize)


def kv_token_budget(model: Any, device: str) -> int:
    """Tokens of KV cache the scheduler may hold at once, from the memory left on ``device``."""
    import torch

    per_token = kv_bytes_per_token(model)
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return max(1, int(free * KV_MEMORY_SHARE) // per_token)
    return max(1, CPU_KV_BYTES // per_token)


class SequenceEngine:
    """A loaded causal language model's pipeline, fed by the sequence scheduler."""

    streams = 1
    stream_threads: int | None = None

    def __init__(self, pipe: Any, *, max_rows: int, kv_tokens: int) -> None:
        self.min_chunk_items = max_rows * ROWS_PER_MESSAGE
        self.pipe = pipe
        self.model = pipe.model
        self.tokenizer = pipe.tokenizer
        if self.tokenizer is None:
            raise ConfigurationError("text-generation needs the model's tokenizer")
        self.max_length = generation.context_tokens(
            self.model.config, getattr(self.tokenizer, "model_max_length", None)
        )
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        self.scheduler = Scheduler(
            self.model,
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            max_rows=max_rows,
            kv_tokens=kv_tokens,
            decode=self._decode,
        )
        self.scheduler.check_cache()

    @classmethod
    def for_worker(cls, pipe: Any, cfg: WorkerConfig, threads: int) -> SequenceEngine:
        max_rows = cfg.max_batch_size  # rows decoding at once: --max-batch-size
        kv_tokens = kv_token_budget(pipe.model, cfg.device)
        log.info("sequence engine: up to %d rows, %d tokens of KV cache", max_rows, kv_tokens)
        if cfg.multi_device:  # accelerate's hooks move each step between the devices, one after another
            log.info("sequence engine: the model spans %s; each step runs its layers device by device", cfg.placement)
        return cls(pipe, max_rows=max_rows, kv_tokens=kv_tokens)

    # ------------------------------------------------------------ the seam

    def stage_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """A job's generation parameters, checked (InputError for an unknown key or a bad value)."""
        try:
            return generation.check_params(params)
        except InputError as exc:
            raise ConfigurationError(str(exc)) from None

    def close(self) -> None:
        pass

    def run(
        self, items: Sequence[tuple[int, Any]], params: dict[str, Any], *, queue_wait_ms: float = 0.0
    ) -> Iterator[StepResults]:
        return finished_in_turn(self.stream(items, params, queue_wait_ms=queue_wait_ms))

    def stream(
        self, items: Sequence[tuple[int, Any]], params: dict[str, Any], *, queue_wait_ms: float = 0.0
    ) -> Generator[Step, None, None]:
        """A step for the items that cannot run, then one per scheduler step in which some items ended."""
        entered = time.perf_counter()
        job_params = self.stage_params(params)
        requests, failed = self._requests(items, job_params, entered)
        if failed:
            yield Step([r.idx for r in failed], lambda: (failed, None))
        prepared_ms = (time.perf_counter() - entered) * 1000
        last = entered
        for ended in self.scheduler.run(requests):
            now = time.perf_counter()
            yield Step(
                [f.request.key for f in ended],
                _Finish(self, ended, last, now, queue_wait_ms, prepared_ms),
            )
            prepared_ms = 0.0  # the chunk's preparation is counted once, on its first step
            last = now

    # ------------------------------------------------------------- helpers

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _requests(
        self, items: Sequence[tuple[int, Any]], job_params: dict[str, Any], entered: float
    ) -> tuple[list[Request], list[ItemResult]]:
        """The items as scheduler requests (prompts tokenized in one call per kind), and those that fail."""
        failed: list[ItemResult] = []
        prompts: list[tuple[int, str, bool, generation.SamplingParams]] = []
        for idx, value in items:
            try:
                text, chat, own = self._prompt(value)
                sampling = generation.sampling(job_params, generation.check_params(own))
            except (InputError, ValueError, TypeError) as exc:
                failed.append(ItemResult(idx, C.ITEM_FAILED, error=describe_error("preprocess", exc)))
                continue
            except Exception as exc:  # the chat template's own errors (jinja) fail the item alone
                failed.append(ItemResult(idx, C.ITEM_FAILED, error=describe_error("preprocess", exc)))
                continue
            prompts.append((idx, text, chat, sampling))
        requests: list[Request] = []
        for chat in (False, True):
            group = [p for p in prompts if p[2] is chat]
            if not group:
                continue
            # A rendered chat prompt holds its special tokens already, as the template wrote them.
            ids = generation.prompt_ids(self.tokenizer, [p[1] for p in group], chat=chat)
            for (idx, _text, _chat, sampling), prompt in zip(group, ids, strict=True):
                room = (self.max_length - len(prompt)) if self.max_length else sampling.max_tokens
                if not prompt or room < 1:
                    why = (
                        "is empty" if not prompt else f"is {len(prompt)} tokens, the model's context {self.max_length}"
                    )
                    error = f"preprocess: PromptTooLong: the prompt {why}; nothing is left to generate"
                    failed.append(ItemResult(idx, C.ITEM_FAILED, error=error, n_tokens=len(prompt)))
                    continue
                requests.append(Request(idx, list(prompt), sampling, min(sampling.max_tokens, room), entered))
        return requests, failed

    def _prompt(self, value: Any) -> tuple[str, bool, dict[str, Any]]:
        """(prompt text, whether it is a rendered chat, the item's own parameters) of a stored input."""
        if isinstance(value, str):
            return value, False, {}
        if not isinstance(value, dict):
            raise InputError(f"a generation input is a prompt or chat messages, got {type(value).__name__}")
        own = value.get("params") or {}
        if "messages" in value:
            if not getattr(self.tokenizer, "chat_template", None):
                raise InputError("the model's tokenizer has no chat template, so it cannot take chat messages")
            messages = generation.check_messages(value["messages"])
            (text,) = generation.rendered_chats(self.tokenizer, [messages])
            return str(text), True, own
        prompt = value.get("prompt", value.get("text"))
        if not isinstance(prompt, str):
            raise InputError("a generation input needs 'prompt' (a string) or 'messages'")
        return prompt, False, own


class _Finish:
    """The results of the items that ended at one step, and the step's timing."""

    def __init__(
        self,
        engine: SequenceEngine,
        ended: list[Finished],
        since: float,
        now: float,
        queue_wait_ms: float,
        prepared_ms: float,
    ) -> None:
        self.engine, self.ended = engine, ended
        self.since, self.now = since, now
        self.queue_wait_ms, self.prepared_ms = queue_wait_ms, prepared_ms

    def __call__(self) -> StepResults:
        t0 = time.perf_counter()
        results = []
        tokens = 0
        for f in self.ended:
            text = self.engine._decode(f.tokens)
            if f.stop_at is not None:
                text = text[: f.stop_at]
            prompt_tokens = len(f.request.prompt)
            tokens += prompt_tokens + len(f.tokens)
            results.append(
                ItemResult(
                    f.request.key,
                    C.ITEM_DONE,
                    output=generation.output(text, f.finish_reason, prompt_tokens, len(f.tokens)),
                    n_tokens=prompt_tokens,
                    first_token_ms=round(f.first_token_ms, 3),
                    decode_ms=round(f.decode_ms, 3),
                    output_tokens=len(f.tokens),
                )
            )
        post_ms = (time.perf_counter() - t0) * 1000
        forward_ms = (self.now - self.since) * 1000
        finished_at = datetime.now(UTC)
        total_ms = self.prepared_ms + forward_ms + post_ms
        timing = BatchTiming(
            size=len(results),
            rows=len(results),
            real_tokens=tokens,
            padded_tokens=tokens,
            queue_wait_ms=self.queue_wait_ms,
            preprocess_ms=self.prepared_ms,
            forward_ms=forward_ms,
            postprocess_ms=post_ms,
            total_ms=total_ms,
            started_at=datetime.fromtimestamp(finished_at.timestamp() - total_ms / 1000, UTC),
            finished_at=finished_at,
        )
        return results, timing
