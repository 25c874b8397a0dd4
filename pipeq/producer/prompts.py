"""A text-generation job's prompts checked against its model's tokenizer at submit.

When the producer can load the model's tokenizer without a download (a local folder, or the Hugging
Face cache), every record is checked before it is stored: chat ``messages`` need a tokenizer with a
chat template, and a prompt's tokens (a chat's as its template renders it, with the generation prompt)
plus its ``max_tokens`` must fit the model's context. A record that does not is refused, naming its
line, unless the job lets such items fail alone (``fail_long``): then it is stored, and the worker,
which checks every item itself, fails it with the reason. When the tokenizer cannot be loaded the
records are stored unchecked and the worker judges them.

The records are tokenized a page at a time (``PROMPT_CHECK_RECORDS``), one tokenizer call a page.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from pipeq import constants as C
from pipeq import generation
from pipeq.errors import InputError
from pipeq.producer.records import Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptChecker:
    """A model's tokenizer and the tokens its context holds (None when neither its config nor its tokenizer says)."""

    tokenizer: Any = field(repr=False)
    context: int | None = None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_tokens(self, page: list[Record], source: str) -> list[int]:
        """The prompt tokens of each record of ``page``: one tokenizer call for its prompts, one for its chats."""
        prompts = [(i, r.input["prompt"]) for i, r in enumerate(page) if "prompt" in r.input]
        chats = [(i, r) for i, r in enumerate(page) if "messages" in r.input]
        counts = [0] * len(page)
        if prompts:
            for (i, _), ids in zip(
                prompts, generation.prompt_ids(self.tokenizer, [p for _, p in prompts], chat=False), strict=True
            ):
                counts[i] = len(ids)
        if chats:
            rendered = self._rendered([r for _, r in chats], source)
            for (i, _), ids in zip(chats, generation.prompt_ids(self.tokenizer, rendered, chat=True), strict=True):
                counts[i] = len(ids)
        return counts

    def _rendered(self, chats: list[Record], source: str) -> list[str]:
        """The chats' prompts as the model's chat template writes them; InputError naming the first record
        it cannot render (no template, or one that refuses its messages)."""
        if not self.has_chat_template:
            raise InputError(
                "chat 'messages' need a model whose tokenizer has a chat template, and this one has none: give "
                "the record a prompt ('text') instead",
                source=source,
                line=chats[0].line,
            )
        conversations = [r.input["messages"] for r in chats]
        try:
            return list(self._render(conversations))
        except Exception:  # noqa: BLE001 - a template's own error: found and named below, record by record
            for record in chats:
                try:
                    self._render([record.input["messages"]])
                except Exception as exc:  # noqa: BLE001 - the template's error is the user's to read
                    raise InputError(
                        f"the model's chat template refuses these messages: {type(exc).__name__}: {exc}",
                        source=source,
                        line=record.line,
                    ) from None
            raise

    def _render(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        return generation.rendered_chats(self.tokenizer, conversations)


def _first_line(exc: BaseException) -> str:
    """An exception's message up to its first line break (transformers' loading errors run to several)."""
    return str(exc).strip().split("\n", 1)[0]


def _context(model: str, tokenizer: Any, revision: str | None) -> int | None:
    """Tokens the model takes, prompt and completion together (``generation.context_tokens``, as the worker
    judges them), its config read from the folder or the cache."""
    from transformers import AutoConfig

    config = None
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot read: the tokenizer's limit alone
        log.info(
            "the config of %s was not read at submit (%s): prompts are checked by its tokenizer's limit",
            model,
            _first_line(exc),
        )
    return generation.context_tokens(config, getattr(tokenizer, "model_max_length", None))


def load_checker(model: str, revision: str | None = None) -> PromptChecker | None:
    """The checker of ``model``'s prompts, or None (logged) when its tokenizer cannot be loaded without a download.

    ``model`` is a local folder or a hub id, read from the Hugging Face cache only.
    """
    from transformers import AutoTokenizer

    local = os.path.isdir(model)
    hub_revision = None if local else revision  # a local folder has no hub revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=hub_revision, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the same: the worker checks instead
        log.info(
            "the tokenizer of %s could not be loaded at submit (%s: %s): prompts are not checked against its chat "
            "template and context now, the worker checks each item",
            model,
            type(exc).__name__,
            _first_line(exc),
        )
        return None
    return PromptChecker(tokenizer, _context(model, tokenizer, hub_revision))


def _pages(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while page := list(islice(it, size)):
        yield page


def checked(
    records: Iterable[Record],
    checker: PromptChecker,
    job_params: Mapping[str, Any],
    *,
    source: str,
    fail_long: bool = False,
) -> Iterator[Record]:
    """``records`` once each is checked (see the module); a page is read ahead at a time.

    ``job_params`` are the job's checked parameters, the defaults of a record's own ``max_tokens``.
    """
    over = 0
    first_over: int | None = None
    for page in _pages(records, C.PROMPT_CHECK_RECORDS):
        counts = checker.prompt_tokens(page, source)
        if checker.context is not None:
            for record, tokens in zip(page, counts, strict=True):
                max_tokens = generation.sampling(job_params, record.input.get("params")).max_tokens
                if tokens + max_tokens <= checker.context:
                    continue
                if not fail_long:
                    raise InputError(
                        f"the prompt is {tokens:,} tokens and max_tokens {max_tokens:,}: {tokens + max_tokens:,} "
                        f"is over the model's context of {checker.context:,} tokens (shorten it, lower max_tokens, "
                        f"or submit with --fail-long-prompts to store it and fail it alone)",
                        source=source,
                        line=record.line,
                    )
                over += 1
                first_over = first_over or record.line
        yield from page
    if over:
        log.warning(
            "%s: %d prompts with their max_tokens are over the model's context of %d tokens (the first on line %d): "
            "they are stored and fail with the reason (--fail-long-prompts)",
            source,
            over,
            checker.context,
            first_over,
        )
