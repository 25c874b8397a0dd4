"""Continuous batching of sequences on a causal language model: each request decodes in a row of its own
and leaves the batch the step it ends; waiting requests take the freed rows.

The batch is one left-padded tensor per layer in transformers' ``DynamicCache``, as ``model.generate``
keeps it. A step is one forward pass of every running row's last token. Rows that end are dropped
from the cache (a few at a time) and the columns of padding every remaining row has on its
left are cut off, so a finished sequence costs nothing from its last step on. New requests are
prefilled together (one left-padded forward pass) and their cache is joined to the running one,
padded on the left to the same length; each row's position ids come from its own mask, so a row's
logits are what it would get alone.

What is in flight is bounded by ``max_rows`` and by ``kv_tokens``: the rows times the longest row a
request may reach (its prompt plus its ``max_tokens``), which is what the padded cache holds.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeq.errors import ConfigurationError
from pipeq.generation import FINISH_LENGTH, FINISH_STOP, SamplingParams

#: Rows are compacted once this fraction (1/N) of them has ended (see ``Scheduler.run``).
COMPACT_SHARE = 8
#: Least share of real tokens in a prefill pass's padded prompts (see ``_prefill_groups``).
PREFILL_FILL = 0.9


@dataclass
class Request:
    """One item to generate: its prompt's token ids and how to sample."""

    key: int
    prompt: list[int]
    params: SamplingParams
    #: Most tokens it may generate here (its ``max_tokens``, cut to what the model's context leaves).
    budget: int
    #: When it entered the engine (``time.perf_counter()``).
    entered: float = 0.0


@dataclass
class Finished:
    """A request that ended: its new tokens, why it ended, and when."""

    request: Request
    tokens: list[int]
    finish_reason: str
    #: Milliseconds from entering the engine to its first new token, and from there to its last.
    first_token_ms: float
    decode_ms: float
    #: Where a stop string cut the text (characters of the decoded tokens), None where none did.
    stop_at: int | None = None


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    #: Characters of the decoded tail a stop string is looked for in (0 where it has none).
    stop_window: int = 0
    #: It ended (and was yielded); it stays in the batch until the next compaction.
    done: bool = False


def _kv_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when each is a plain dynamic layer of tensors this scheduler can join and cut."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return list(layers)


class Scheduler:
    """Runs requests to their end on ``model``, a few rows at a time, yielding each as it ends."""

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_rows: int,
        kv_tokens: int,
        decode: Callable[[list[int]], str],
        prefill_tokens: int = 4096,
    ) -> None:
        self.model = model
        self.eos = set(eos_token_ids)
        self.pad = pad_token_id
        self.max_rows = max(1, max_rows)
        self.kv_tokens = kv_tokens
        self.prefill_tokens = prefill_tokens
        self.decode = decode
        #: Free rows that make a prefill worth its pass while others decode.
        self.min_admit = max(1, self.max_rows // 8)
        #: Whether the model's forward takes ``logits_to_keep`` (the prefill needs the last position only).
        accepts = inspect.signature(model.forward).parameters
        self._keep_last = "logits_to_keep" in accepts
        #: The forward's name for the KV cache (transformers 5 renames ``past_key_values`` to ``cache``).
        self._cache_arg = "cache" if "cache" in accepts else "past_key_values"
        self.device = next(iter(model.parameters())).device
        #: Decode steps and the rows they ran (rows / steps is the mean batch).
        self.steps = 0
        self.row_steps = 0

    # ---------------------------------------------------------------- public

    def run(self, requests: Sequence[Request]) -> Iterator[list[Finished]]:
        """Yield the requests that end at each step, until every one has.

        A row that ends is yielded at once and stays in the batch, computed for nothing, until an eighth of
        the rows have ended or new rows are admitted: dropping a row copies the whole cache, which costs more
        than a few dead rows' steps.

        Longest budgets are admitted first, so the last rows to run are short ones. A request the
        scheduler cannot fit alone still runs alone (``kv_tokens`` bounds batching, not an item).
        """
        waiting = sorted(requests, key=lambda r: (-r.budget, -len(r.prompt), r.key))
        rows: list[_Row] = []
        cache: Any = None
        mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            while waiting or rows:
                live = [row for row in rows if not row.done]
                admitted = self._admit(waiting, live)
                if admitted or len(rows) - len(live) >= max(1, len(rows) // COMPACT_SHARE):
                    cache, mask = self._compact(rows, cache, mask)  # before a join: it would copy the dead rows
                groups = _prefill_groups(admitted)
                if groups:
                    offset, parts, eos = len(rows), [], []
                    for group in groups:
                        new_rows, new_cache, new_mask, logits = self._prefill(group)
                        eos += [len(rows) + i for i in self._sample(new_rows, logits)]
                        rows.extend(new_rows)
                        parts.append((new_cache, new_mask))
                    cache, mask = self._join(cache, mask, parts)
                    ended = self._ended(rows, eos, start=offset)
                    if ended:
                        yield ended
                if not any(not row.done for row in rows):
                    cache, mask = self._compact(rows, cache, mask)
                    continue
                logits, mask = self._step(rows, cache, mask)
                ended = self._ended(rows, self._sample(rows, logits))
                if ended:
                    yield ended

    def check_cache(self) -> None:
        """Prefill one token: ConfigurationError unless the model's cache is one this scheduler can join and cut
        (plain dynamic layers; not sliding windows or recurrent states)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([[self.pad]], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{self._cache_arg: cache})
        if _kv_layers(cache) is None:
            kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
            raise ConfigurationError(
                f"{type(self.model).__name__}'s KV cache has layers the sequence engine cannot join and cut "
                f"({', '.join(kinds) or 'none'}); it serves models whose cache is plain DynamicLayer"
            )

    # ------------------------------------------------------------- admitting

    def _row_tokens(self, r: Request) -> int:
        return len(r.prompt) + r.budget

    def _admit(self, waiting: list[Request], rows: list[_Row]) -> list[Request]:
        """Requests to prefill now: while rows are free, the KV budget holds and the prefill budget lasts."""
        free = self.max_rows - len(rows)
        if not waiting or free <= 0 or (rows and free < min(self.min_admit, len(waiting))):
            return []  # a prefill pass for one or two rows at a time costs a step each: admit in groups
        longest = max((self._row_tokens(row.request) for row in rows), default=0)
        taken: list[Request] = []
        prefill = 0
        while waiting and len(rows) + len(taken) < self.max_rows:
            r = waiting[0]
            span = max(longest, self._row_tokens(r))
            n = len(rows) + len(taken) + 1
            if (rows or taken) and (n * span > self.kv_tokens or prefill + len(r.prompt) > self.prefill_tokens):
                break
            taken.append(waiting.pop(0))
            longest = span
            prefill += len(r.prompt)
        return taken

    def _prefill(self, requests: list[Request]) -> tuple[list[_Row], Any, torch.Tensor, torch.Tensor]:
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=self._positions(mask),
            use_cache=True,
            **{self._cache_arg: cache},
            **({"logits_to_keep": 1} if self._keep_last else {}),
        )
        rows = [_Row(r, _generator(r.params, self.device), stop_window=_stop_window(r.params)) for r in requests]
        return rows, cache, mask, out.logits[:, -1, :]

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        """Each row's position ids from its own mask (left padding counts nothing), as ``generate`` makes them."""
        positions = mask.long().cumsum(-1) - 1
        return positions.masked_fill(mask == 0, 1)

    # -------------------------------------------------------------- stepping

    def _step(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass of every row's last token: the next logits, and the mask that now covers it."""
        # A row that ended and waits to be dropped feeds anything (its output is never read): pad if it has no token.
        last = torch.tensor(
            [row.tokens[-1] if row.tokens else self.pad for row in rows], dtype=torch.long, device=self.device
        )
        step_mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=mask.device)], dim=1)
        positions = (step_mask.sum(-1, keepdim=True) - 1).long()
        out = self.model(
            input_ids=last[:, None],
            attention_mask=step_mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        self.steps += 1
        self.row_steps += len(rows)
        return out.logits[:, -1, :], step_mask

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Append each row's next token; the positions of the rows that drew an end-of-sequence token."""
        now = time.perf_counter()
        greedy = logits.argmax(-1).tolist()
        eos: list[int] = []
        for i, row in enumerate(rows):
            if row.done:
                continue
            params = row.request.params
            token = greedy[i] if params.greedy else _draw(logits[i], params, row.generator)
            if not row.tokens:
                row.first_token_at = now
            if token in self.eos:
                eos.append(i)
            else:
                row.tokens.append(token)
        return eos

    def _ended(self, rows: list[_Row], eos: list[int], start: int = 0) -> list[Finished]:
        """The rows from ``start`` on that end this step, marked done, and how they ended."""
        now = time.perf_counter()
        ended: list[Finished] = []
        eos_set = set(eos)
        for i in range(start, len(rows)):
            row = rows[i]
            if row.done:
                continue
            reason: str | None = None
            stop_at = None
            if i in eos_set:
                reason = FINISH_STOP
            elif row.stop_window and row.tokens:
                stop_at = self._stop_at(row)
                if stop_at is not None:
                    reason = FINISH_STOP
            if reason is None and len(row.tokens) >= row.request.budget:
                reason = FINISH_LENGTH
            if reason is None:
                continue
            first = row.first_token_at or now
            row.done = True
            ended.append(
                Finished(
                    row.request,
                    row.tokens,
                    reason,
                    first_token_ms=(first - row.request.entered) * 1000,
                    decode_ms=(now - first) * 1000,
                    stop_at=stop_at,
                )
            )
        return ended

    def _stop_at(self, row: _Row) -> int | None:
        """Where the first stop string begins in the decoded new tokens, once the latest token completed one."""
        tail = self.decode(row.tokens[-row.stop_window :])
        if not any(s in tail for s in row.request.params.stop):
            return None
        text = self.decode(row.tokens)
        found = [text.find(s) for s in row.request.params.stop if s in text]
        return min(found) if found else None

    # ---------------------------------------------------------- the KV cache

    def _join(self, cache: Any, mask: torch.Tensor, parts: list[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
        """The running cache and the newly prefilled ones as one batch, each padded on the left to the widest."""
        from transformers import DynamicCache

        batches = [(cache, mask)] if cache is not None and mask.shape[0] else []
        batches += parts
        if len(batches) == 1:
            return batches[0]
        width = max(m.shape[1] for _, m in batches)
        layers = [_kv_layers(c) for c, _ in batches]
        pairs = []
        for depth in range(len(layers[0] or [])):
            at = [ls[depth] for ls in layers if ls is not None]
            keys = torch.cat([_pad_left(layer.keys.to(at[0].keys.device), width) for layer in at], dim=0)
            values = torch.cat([_pad_left(layer.values.to(at[0].values.device), width) for layer in at], dim=0)
            pairs.append((keys, values))
        joined = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        return joined, torch.cat([_pad_left(m, width, dim=1) for _, m in batches], dim=0)

    def _compact(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Drop the rows that ended from the batch, then the padding columns every remaining row has."""
        keep = [i for i, row in enumerate(rows) if not row.done]
        if len(keep) == len(rows):
            return cache, mask
        rows[:] = [rows[i] for i in keep]
        if not keep:
            return None, mask[:0, :0]
        index = torch.tensor(keep, dtype=torch.long, device=mask.device)
        mask = mask.index_select(0, index)
        lead = int((mask.cumsum(1) == 0).sum(1).min())  # padding columns on every row's left
        mask = mask[:, lead:]
        layers = _kv_layers(cache)
        assert layers is not None
        for layer in layers:  # each on its own device where the model is split across devices
            rows_here = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, rows_here)[:, :, lead:, :]
            layer.values = layer.values.index_select(0, rows_here)[:, :, lead:, :]
        return cache, mask


def _prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Admitted requests in prefill passes of prompts of about one length (longest first): a pass pads every
    prompt to its longest, and a prompt of 8 tokens beside one of 500 would cost 500."""
    groups: list[list[Request]] = []
    real = 0
    for r in sorted(requests, key=lambda r: -len(r.prompt)):
        if groups and (real + len(r.prompt)) >= PREFILL_FILL * len(groups[-1][0].prompt) * (len(groups[-1]) + 1):
            groups[-1].append(r)
            real += len(r.prompt)
        else:
            groups.append([r])
            real = len(r.prompt)
    return groups


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def _stop_window(params: SamplingParams) -> int:
    """Tokens of decoded tail that hold any of the stop strings (a token is at least one character)."""
    return max((len(s) for s in params.stop), default=-1) + 1


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token sampled at ``temperature`` from the smallest set of tokens whose probability reaches ``top_p``."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        cut = cumulative - sorted_probs >= params.top_p  # tokens after the mass is reached
        sorted_probs = sorted_probs.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
