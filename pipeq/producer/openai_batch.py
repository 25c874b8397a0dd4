"""OpenAI Batch API files: request lines in (``--input-format openai-batch``), response lines out
(``pipeq results --format openai-batch``).

A request file's lines are the Batch API's request input objects, ``{"custom_id": ..., "method":
"POST", "url": ..., "body": {...}}``, all with the same ``url``, which says the job's task:

- ``/v1/embeddings``: a feature-extraction job with pooling (a sentence-transformers model's own, read
  from its folder at submit, unless ``--param`` sets it); each string of ``body.input`` is one item
  whose id is the line's ``custom_id`` (an ``input`` of k strings is k consecutive items sharing it).
- ``/v1/chat/completions``: a text-generation job; each request is one item, its ``messages`` with its
  sampling parameters (``max_tokens`` or ``max_completion_tokens``, ``temperature``, ``top_p``,
  ``seed``, ``stop``; ``n`` 1 only). Fields pipeq cannot honour (tools, response formats, log
  probabilities, streaming, penalties) are refused naming the line; ``user``, ``metadata`` and OpenAI's
  own service fields are ignored (``_IGNORED_FIELDS``).
- ``/v1/completions``: a text-generation job; ``prompt`` is a string (one item) or a list of k strings
  (k consecutive items sharing the ``custom_id``, as for embeddings), with the same parameters.

A request's ``body.model`` must name the job's model, and its ``custom_id`` is unique in the file.

The response file has one line per request, in input order, in the Batch API's output shape
(``id``, ``custom_id``, ``response: {status_code, request_id, body}``, ``error``), the body being
what ``/v1/embeddings`` returns: ``{"object": "list", "data": [{"object": "embedding", "index": i,
"embedding": [...]}], "model": ..., "usage": {...}}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from pipeq import constants as C
from pipeq import embedding, generation, recipe
from pipeq.errors import ConfigurationError, InputError
from pipeq.primitives import JobProgress
from pipeq.producer.records import RawRecords, Record, RecordSpec

#: The endpoints pipeq serves from a batch file.
EMBEDDINGS_URL = "/v1/embeddings"
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
#: The fields of a request line (the Batch API's request input object).
_REQUEST_FIELDS = ("custom_id", "method", "url", "body")
#: The fields of an embeddings request body (the API refuses others).
_EMBEDDING_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
#: The fields of a chat or completions body pipeq reads (``model`` and the input are required).
_CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n")
_COMPLETIONS_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n")
#: Body fields that change nothing about the text generated, read and ignored: who sent the request
#: (``user``, ``safety_identifier``), tags (``metadata``), and OpenAI's own storage, tier and caching.
_IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key")
#: Body fields pipeq cannot honour, each with why; such a field is accepted only when null or at the
#: value that asks for nothing (``_NEUTRAL``).
_TOOLS = "tool and function calls are not served"
_UNSUPPORTED = {
    "tools": _TOOLS,
    "tool_choice": _TOOLS,
    "parallel_tool_calls": _TOOLS,
    "functions": _TOOLS,
    "function_call": _TOOLS,
    "response_format": "structured outputs (JSON mode, JSON schema) are not served",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "logit_bias": "logit_bias is not served",
    "stream": "a batch's responses are not streamed",
    "stream_options": "a batch's responses are not streamed",
    "presence_penalty": "penalties are not served (0 only)",
    "frequency_penalty": "penalties are not served (0 only)",
    "modalities": "text is the only output",
    "audio": "text is the only output",
    "prediction": "predicted outputs are not served",
    "reasoning_effort": "reasoning options are not served",
    "web_search_options": "web search is not served",
    "echo": "the output is the completion only (echo false)",
    "suffix": "insertion after a suffix is not served",
    "best_of": "one completion is generated per prompt (best_of 1)",
}
#: The value of a ``_UNSUPPORTED`` field that asks for nothing.
_NEUTRAL: dict[str, Any] = {
    "stream": False,
    "logprobs": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "echo": False,
    "best_of": 1,
    "parallel_tool_calls": True,
}
#: ``error.code`` of a request whose item failed, and of one cancelled before it ran.
FAILED_CODE = "item_failed"
CANCELLED_CODE = "batch_cancelled"

#: Raises an InputError naming the request's line.
Fail = Callable[[str], InputError]


# ------------------------------------------------------------------------ reading


def records(raw: RawRecords, spec: RecordSpec, source: str) -> Iterator[Record]:
    """Validated items of a request file's parsed lines: one per embeddings input string, chat request or
    completions prompt.

    Every problem raises InputError naming the line; ``custom_id`` must be unique, as the Batch API
    requires, and a repeat names both lines; every request has the first one's url.
    """
    seen: dict[str, int] = {}
    first: tuple[str, int] | None = None
    for line, request in raw:

        def fail(message: str, line: int = line) -> InputError:
            return InputError(message, source=source, line=line)

        custom_id, url = _header(request, fail)
        if first is None:
            first = (url, line)
        elif url != first[0]:
            raise fail(
                f"url {url!r} differs from line {first[1]}'s {first[0]!r}: a batch file is one job, of one task, "
                "so all its requests go to one endpoint (split the file)"
            )
        if custom_id in seen:
            raise fail(
                f"custom_id {custom_id!r} repeats line {seen[custom_id]}'s (custom_ids must be unique in a batch)"
            )
        seen[custom_id] = line
        endpoint = _ENDPOINTS[url]
        if spec.task != endpoint.task:
            raise fail(f"{url} requests need --task {endpoint.task}, not {spec.task}")
        for value, size in endpoint.items(request["body"], spec, fail):
            yield Record(line, value, custom_id, size)


def request_task(request: Any, source: str, line: int) -> str:
    """The task of the job a request file makes, from one of its requests (its first): its url says it."""

    def fail(message: str) -> InputError:
        return InputError(message, source=source, line=line)

    return _ENDPOINTS[_header(request, fail)[1]].task


def _header(request: Any, fail: Fail) -> tuple[str, str]:
    """The ``custom_id`` and ``url`` of one request line, checked, or InputError naming what is wrong."""
    if not isinstance(request, dict):
        raise fail(f"a request must be a JSON object, got {type(request).__name__}")
    _check_fields(request, _REQUEST_FIELDS, "a request", fail)
    custom_id = request["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise fail(f"custom_id must be a non-empty string, got {custom_id!r}")
    if len(custom_id) > C.MAX_INPUT_ID_CHARS:
        raise fail(f"custom_id is {len(custom_id):,} characters, over the store's limit of {C.MAX_INPUT_ID_CHARS}")
    if request["method"] != "POST":
        raise fail(f'method must be "POST" (the only method of the Batch API), not {request["method"]!r}')
    url = request["url"]
    if url not in _ENDPOINTS:
        raise fail(f"url {url!r} is not an endpoint pipeq serves; it serves {', '.join(_ENDPOINTS)}")
    if not isinstance(request["body"], dict):
        raise fail(f"body must be a JSON object, got {type(request['body']).__name__}")
    return custom_id, url


def _check_model(body: dict[str, Any], spec: RecordSpec, fail: Fail) -> None:
    model = body["model"]
    if model not in spec.models:
        raise fail(f"body.model {model!r} is not the job's model {spec.models[0]!r} (--model)")


def _embeddings_items(body: dict[str, Any], spec: RecordSpec, fail: Fail) -> list[tuple[Any, int]]:
    """The input texts of an embeddings request's body, checked as the endpoint checks it."""
    if spec.params.get("pooling") is None:
        why = recipe.unfollowed(spec.models[-1]) if spec.models else None
        raise fail(
            f"{EMBEDDINGS_URL} returns one vector per input: submit with --param pooling="
            f"{'|'.join(embedding.POOLINGS)} (and --param normalize=true for unit vectors, as OpenAI's are)"
            + (f"; the model's sentence-transformers recipe is not followed: {why}" if why else "")
        )
    _check_fields(body, _EMBEDDING_FIELDS, "an embeddings body", fail, required=("input", "model"))
    _check_model(body, spec, fail)
    encoding = body.get("encoding_format")
    if encoding == "base64":
        raise fail(
            'encoding_format "base64" is not supported: pipeq writes embeddings as lists of floats; '
            'leave encoding_format out or set it to "float"'
        )
    if encoding not in (None, "float"):
        raise fail(f'encoding_format must be "float" or "base64", not {encoding!r}')
    if body.get("dimensions") is not None:
        raise fail("dimensions is not supported: pipeq returns the model's own vectors, at their full width")
    if not isinstance(body.get("user", ""), str):
        raise fail("body.user must be a string")
    return [(text, len(text)) for text in _texts(body["input"], "body.input", spec, fail)]


def _generation_params(body: dict[str, Any], fields: tuple[str, ...], what: str, fail: Fail) -> dict[str, Any]:
    """The sampling parameters of a chat or completions body, after its fields are checked: each is one
    pipeq reads, one it ignores, or one it cannot honour given null or the value that asks for nothing."""
    for name, value in body.items():
        if name in fields or name in _IGNORED_FIELDS:
            continue
        if name in _UNSUPPORTED:
            neutral = _NEUTRAL.get(name, None)
            if value is None or (value == neutral and isinstance(value, bool) == isinstance(neutral, bool)):
                continue
            raise fail(f"body.{name} is not supported: {_UNSUPPORTED[name]}")
        raise fail(
            f"{what} has no field {name!r} pipeq reads (it reads {', '.join(fields)}; it ignores "
            f"{', '.join(_IGNORED_FIELDS)})"
        )
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise fail(f"body.n must be 1, got {n!r}: one completion per request (repeat it with another custom_id)")
    given = {name: body[name] for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None}
    if len(given) == 2 and given["max_tokens"] != given["max_completion_tokens"]:
        raise fail("body sets max_tokens and max_completion_tokens apart: give one")
    params = {name: body[name] for name in ("temperature", "top_p", "seed", "stop") if body.get(name) is not None}
    if given:
        params["max_tokens"] = next(iter(given.values()))
    try:
        return generation.check_params(params)
    except InputError as exc:
        raise fail(f"body.{exc}") from None


def _chat_items(body: dict[str, Any], spec: RecordSpec, fail: Fail) -> list[tuple[Any, int]]:
    """The one item of a chat completions request: its messages and sampling parameters."""
    params = _generation_params(body, _CHAT_FIELDS, "a chat completions body", fail)
    _check_fields(body, _CHAT_FIELDS, "a chat completions body", fail, required=("model", "messages"), known=False)
    _check_model(body, spec, fail)
    try:
        messages = generation.check_messages(body["messages"])
    except InputError as exc:
        raise fail(f"body.messages: {exc}") from None
    size = sum(len(m["content"]) for m in messages)
    if size > spec.max_text_chars:
        raise fail(
            f"body.messages are {size:,} characters, over the limit of {spec.max_text_chars:,} (--max-text-chars)"
        )
    return [(generation.stored_input(messages=messages, params=params), size)]


def _completions_items(body: dict[str, Any], spec: RecordSpec, fail: Fail) -> list[tuple[Any, int]]:
    """The items of a completions request: one per prompt string, each with the request's sampling parameters."""
    params = _generation_params(body, _COMPLETIONS_FIELDS, "a completions body", fail)
    _check_fields(body, _COMPLETIONS_FIELDS, "a completions body", fail, required=("model", "prompt"), known=False)
    _check_model(body, spec, fail)
    prompts = _texts(body["prompt"], "body.prompt", spec, fail)
    return [(generation.stored_input(prompt=prompt, params=params), len(prompt)) for prompt in prompts]


@dataclass(frozen=True)
class _Endpoint:
    """An endpoint pipeq serves from a batch file: the task of its job, and its request body's items."""

    task: str
    #: (stored input, size) of each item of a request's body, or InputError through ``fail``.
    items: Callable[[dict[str, Any], RecordSpec, Fail], list[tuple[Any, int]]]


#: Every endpoint a batch file may name, by url; a new endpoint is one entry.
_ENDPOINTS = {
    EMBEDDINGS_URL: _Endpoint(embedding.TASK, _embeddings_items),
    CHAT_URL: _Endpoint(generation.TASK, _chat_items),
    COMPLETIONS_URL: _Endpoint(generation.TASK, _completions_items),
}


def _check_fields(
    obj: dict[str, Any],
    fields: tuple[str, ...],
    what: str,
    fail: Fail,
    *,
    required: tuple[str, ...] | None = None,
    known: bool = True,
) -> None:
    """Refuse fields of ``obj`` outside ``fields`` (unless ``known`` is False: checked already), and missing ones
    (``required``, else all of ``fields``)."""
    unknown = sorted(set(obj) - set(fields)) if known else []
    if unknown:
        raise fail(f"{what} has no field {', '.join(map(repr, unknown))} (its fields: {', '.join(fields)})")
    missing = [name for name in (fields if required is None else required) if name not in obj]
    if missing:
        raise fail(f"{what} needs {', '.join(map(repr, missing))}")


def _texts(value: Any, where: str, spec: RecordSpec, fail: Fail) -> list[str]:
    """``body.input`` (or ``body.prompt``) as a list of texts: a string, or a non-empty list of strings."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise fail(f"{where} must be a string or a non-empty list of strings, got {json.dumps(value)[:60]}")
    for i, text in enumerate(texts):
        at = where if isinstance(value, str) else f"{where}[{i}]"
        if isinstance(text, int | list) and not isinstance(text, bool):
            raise fail(f"{at} holds token ids: pipeq reads text (the model's own tokenizer reads it); give strings")
        if not isinstance(text, str):
            raise fail(f"{at} must be a string, got {type(text).__name__}")
        if not text:
            raise fail(f"{at} is an empty string (the API refuses those too)")
        if len(text) > spec.max_text_chars:
            raise fail(
                f"{at} is {len(text):,} characters, over the limit of {spec.max_text_chars:,} (--max-text-chars)"
            )
    return texts


# ------------------------------------------------------------------------ writing

#: The response body's ``object`` of a generated item: a chat completion (``/v1/chat/completions``) for an item
#: stored with ``messages``, a text completion (``/v1/completions``) for one stored with a ``prompt``
#: (``pipeq.generation.stored_input``). Each item says which, so a job submitted from any input format answers
#: in the form its requests were made in.
CHAT_OBJECT = "chat.completion"
COMPLETION_OBJECT = "text_completion"
#: The ``id`` prefix of each body, as the API's own ids have.
_ID_PREFIXES = {CHAT_OBJECT: "chatcmpl", COMPLETION_OBJECT: "cmpl"}


def writer_for(job: JobProgress | None) -> Callable[[Iterable[dict[str, Any]], IO[str]], int]:
    """A writer of ``job``'s result rows as response lines, once the job is known to fit the format.

    A generation job's rows must hold their items' inputs (``Job.results(inputs=True)``): each is answered
    as a chat completion or a text completion, as its input holds ``messages`` or a ``prompt``.
    """
    if job is None:
        raise ConfigurationError("openai-batch results are written for a job: pass its JobProgress")
    generates = job.task == generation.TASK
    if not generates and (job.task != embedding.TASK or job.params.get("pooling") is None):
        raise ConfigurationError(
            f"job {job.id} is a {job.task} job{'' if job.task != embedding.TASK else ' without pooling'}: "
            f"--format openai-batch writes {EMBEDDINGS_URL} responses, for {embedding.TASK} jobs with pooling, "
            f"and chat completion or completion responses, for {generation.TASK} jobs"
        )
    if not job.is_final:
        raise ConfigurationError(
            f"job {job.id} is {job.status} with {job.pending:,} items pending: its OpenAI batch output is written "
            f"once it is done (pipeq status {job.id} --watch)"
        )

    def write(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
        n = 0
        if generates:
            for n, row in enumerate(rows, start=1):
                out.write(json.dumps(generation_line(job, n - 1, row), ensure_ascii=False) + "\n")
            return n
        for n, group in enumerate(_requests(rows), start=1):
            out.write(json.dumps(response_line(job, n - 1, group), ensure_ascii=False) + "\n")
        return n

    return write


def _requests(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Result rows grouped into requests: a run of consecutive rows with the same id (an item without one alone)."""
    group: list[dict[str, Any]] = []
    for row in rows:
        if group and (row["id"] is None or row["id"] != group[0]["id"]):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _line(job: JobProgress, ordinal: int, first: dict[str, Any]) -> dict[str, Any]:
    """The output line of the ``ordinal``-th request of ``job`` (whose first item's result row is ``first``),
    with neither its response nor its error yet."""
    return {
        "id": f"batch_req_{job.id}_{ordinal}",
        "custom_id": first["id"] if first["id"] is not None else str(first["index"]),
        "response": None,
        "error": None,
    }


def _error(group: list[dict[str, Any]]) -> dict[str, str] | None:
    """The API's error object of a request whose items did not all finish: its first such item's; None when all did."""
    unfinished = [(i, row) for i, row in enumerate(group) if row["status"] != C.ITEM_DONE]
    if not unfinished:
        return None
    i, row = unfinished[0]
    which = f"input {i}: " if len(group) > 1 else ""
    if row["status"] == C.ITEM_FAILED:
        return {"code": FAILED_CODE, "message": f"{which}{row['error']}"}
    return {"code": CANCELLED_CODE, "message": f"{which}cancelled before it ran (pipeq cancel)"}


def _response(job: JobProgress, ordinal: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": 200, "request_id": f"req_{job.id}_{ordinal}", "body": body}


def response_line(job: JobProgress, ordinal: int, group: list[dict[str, Any]]) -> dict[str, Any]:
    """The output line of the ``ordinal``-th request of ``job``, whose items' result rows are ``group``."""
    line = _line(job, ordinal, group[0])
    line["error"] = _error(group)
    if line["error"] is not None:
        return line
    data = []
    for i, row in enumerate(group):
        vector = row["output"]
        if not isinstance(vector, list) or (vector and not isinstance(vector[0], int | float)):
            raise ConfigurationError(f"item {row['index']} of job {job.id} holds no single vector")
        data.append({"object": "embedding", "index": i, "embedding": vector})
    # Tokens the model read: a cached output (--cache) read none.
    tokens = sum(row["timing"]["n_tokens"] or 0 for row in group)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    body = {"object": "list", "data": data, "model": job.model, "usage": usage}
    line["response"] = _response(job, ordinal, body)
    return line


def generation_line(job: JobProgress, ordinal: int, row: dict[str, Any]) -> dict[str, Any]:
    """The output line of a generation job's ``ordinal``-th item (its result row with its ``input``): a chat
    completion body for an item stored with ``messages``, a text completion body for one with a ``prompt``."""
    line = _line(job, ordinal, row)
    line["error"] = _error([row])
    if line["error"] is not None:
        return line
    if "input" not in row:
        raise ConfigurationError(
            "a generation job's OpenAI batch output needs each item's stored input (Job.results(inputs=True))"
        )
    out = row["output"]
    if not isinstance(out, dict) or not {"generated_text", "finish_reason"} <= out.keys():
        raise ConfigurationError(f"item {row['index']} of job {job.id} holds no generated text")
    text, finish_reason = out["generated_text"], out["finish_reason"]
    chat = isinstance(row["input"], dict) and "messages" in row["input"]
    kind = CHAT_OBJECT if chat else COMPLETION_OBJECT
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    prompt, completion = int(out.get("prompt_tokens") or 0), int(out.get("completion_tokens") or 0)
    body = {
        "id": f"{_ID_PREFIXES[kind]}-{job.id}-{ordinal}",
        "object": kind,
        "created": int((job.finished_at or job.created_at).timestamp()),
        "model": job.model,
        "choices": [{**choice, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }
    line["response"] = _response(job, ordinal, body)
    return line
