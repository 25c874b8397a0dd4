"""What a generation item is: a prompt or chat messages, its sampling parameters, and its output.

Value types and checks only (no torch, no I/O): the producer validates records with them at
submit, the worker's sequence engine (``pipeq.worker.engines.sequence``) reads them back.

A generation item is stored as ``{"prompt": str}`` or ``{"messages": [{"role", "content"}, ...]}``,
with ``"params"`` holding the record's own sampling parameters where it has any. The job's
parameters (``--param``) are the defaults a record's own override, key by key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeq.errors import InputError

#: The task generation items belong to.
TASK = "text-generation"
#: New tokens an item may generate when neither it nor its job says (``max_tokens``).
DEFAULT_MAX_TOKENS = 256
#: Most stop strings an item may have (the OpenAI API's limit).
MAX_STOP = 4
#: The finish reasons of a generated item: it met a stop string or the end-of-sequence token, or ran out of tokens.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
#: A tokenizer's ``model_max_length`` at or above this is transformers' placeholder for "not set"
#: (``VERY_LARGE_INTEGER``), not a limit.
NO_TOKENIZER_LIMIT = 10**12
#: Roles a chat message may have.
ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})


@dataclass(frozen=True)
class SamplingParams:
    """How one item is generated. ``temperature`` 0 is greedy (the default: offline jobs want the same
    output each run); above 0 samples, from ``seed`` where one is given."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


#: The parameters a record or a job may set, each with its check (value -> normalized value, or ValueError).
def _max_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {value!r}")
    return value


def _number(name: str, low: float, high: float, *, low_open: bool = False) -> Any:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if value > high or value < low or (low_open and value == low):
            bound = f"above {low}" if low_open else f"at least {low}"
            raise ValueError(f"{name} must be {bound} and at most {high}, got {value!r}")
        return float(value)

    return check


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {value!r}")
    if len(stops) > MAX_STOP:
        raise ValueError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}")
    return tuple(stops)


PARAM_CHECKS = {
    "max_tokens": _max_tokens,
    "temperature": _number("temperature", 0.0, 2.0),
    "top_p": _number("top_p", 0.0, 1.0, low_open=True),
    "seed": _seed,
    "stop": _stop,
}
PARAM_KEYS = tuple(PARAM_CHECKS)
#: Parameters of transformers' text-generation pipeline (and of the OpenAI API) that a job or record
#: may write by habit, and what to write instead.
REPLACED_PARAMS = {
    "max_new_tokens": "use max_tokens",
    "max_completion_tokens": "use max_tokens",
    "max_length": "use max_tokens (new tokens, the prompt not counted)",
    "do_sample": "use temperature (0 is greedy, above 0 samples)",
    "return_full_text": "the output is the generated text only, never the prompt",
    "num_return_sequences": "one output per item: repeat the item with another seed",
    "stop_strings": "use stop",
    "stop_sequence": "use stop",
}


def check_params(params: Mapping[str, Any], *, source: str | None = None, line: int | None = None) -> dict[str, Any]:
    """``params`` with each value checked and normalized (JSON values: a stop tuple becomes a list);
    InputError naming the key, and ``source``/``line`` where given, for an unknown key or a bad value."""
    checked: dict[str, Any] = {}
    for key, value in params.items():
        check = PARAM_CHECKS.get(key)
        if check is None:
            hint = f": {REPLACED_PARAMS[key]}" if key in REPLACED_PARAMS else ""
            raise InputError(
                f"unknown generation parameter {key!r}{hint}; choose from {', '.join(PARAM_KEYS)}",
                source=source,
                line=line,
            )
        try:
            normalized = check(value)
        except ValueError as exc:
            raise InputError(str(exc), source=source, line=line) from None
        checked[key] = list(normalized) if isinstance(normalized, tuple) else normalized
    return checked


def sampling(job_params: Mapping[str, Any], item_params: Mapping[str, Any] | None) -> SamplingParams:
    """One item's parameters: its own over its job's, over the defaults (both already checked)."""
    merged = {**job_params, **(item_params or {})}
    stop = merged.get("stop") or ()
    return SamplingParams(
        max_tokens=int(merged.get("max_tokens", DEFAULT_MAX_TOKENS)),
        temperature=float(merged.get("temperature", 0.0)),
        top_p=float(merged.get("top_p", 1.0)),
        seed=merged.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def check_messages(messages: Any, *, source: str | None = None, line: int | None = None) -> list[dict[str, str]]:
    """Chat messages as a list of ``{"role", "content"}`` with text content; InputError otherwise.

    Content given as the API's list of parts is joined when every part is text."""
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list of {role, content} objects", source=source, line=line)
    out: list[dict[str, str]] = []
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {n} must be an object with 'role' and 'content'", source=source, line=line)
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise InputError(
                f"message {n} has role {role!r}; choose from {', '.join(sorted(ROLES))}", source=source, line=line
            )
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise InputError(f"message {n}: only text content parts are served", source=source, line=line)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"message {n}: 'content' must be a string", source=source, line=line)
        out.append({"role": role, "content": content})
    return out


def context_tokens(config: Any, tokenizer_limit: Any) -> int | None:
    """Tokens a sequence may hold, prompt and completion together: the smallest of the model config's
    positions (``max_position_embeddings``, GPT-2's ``n_positions``, MPT's ``max_seq_len``; of its text
    config where it has one) and the tokenizer's ``model_max_length``, of those that are set. None when
    neither says. The producer's check at submit and the worker's engine both judge by this."""
    limits = []
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limits += [getattr(text, name, None) for name in ("max_position_embeddings", "n_positions", "max_seq_len")]
    if isinstance(tokenizer_limit, int) and tokenizer_limit < NO_TOKENIZER_LIMIT:
        limits.append(tokenizer_limit)
    real = [x for x in limits if isinstance(x, int) and not isinstance(x, bool) and x > 0]
    return min(real) if real else None


def rendered_chats(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Chats as the model's prompts: its tokenizer's chat template with the generation prompt added."""
    return list(tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False))


def prompt_ids(tokenizer: Any, texts: list[str], *, chat: bool) -> list[list[int]]:
    """The token ids of prompts, one tokenizer call: a plain prompt gets the tokenizer's special tokens, a
    rendered chat none (its template wrote them). The submit check and the worker count tokens by this."""
    encoded = tokenizer(
        texts,
        add_special_tokens=not chat,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # a prompt over the model's length is reported by whoever calls, not warned of
    )
    return list(encoded["input_ids"])


def stored_input(
    *, prompt: str | None = None, messages: list[dict[str, str]] | None = None, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A generation item as the store keeps it (exactly one of ``prompt`` and ``messages``)."""
    if (prompt is None) == (messages is None):
        raise ValueError("a generation item has a prompt or messages, not both")
    value: dict[str, Any] = {"prompt": prompt} if prompt is not None else {"messages": messages}
    if params:
        value["params"] = dict(params)
    return value


def output(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A generated item's output as results give it."""
    return {
        "generated_text": text,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
