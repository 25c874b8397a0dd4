"""OpenAI Batch API files: request lines in (``--input-format openai-batch``), response lines out
(``pipeq results --format openai-batch``).

A request file's lines are the Batch API's request input objects, ``{"custom_id": ..., "method":
"POST", "url": "/v1/embeddings", "body": {"model": ..., "input": ...}}``. pipeq serves
``/v1/embeddings`` as a feature-extraction job with pooling (a sentence-transformers model's own, read
from its folder at submit, unless ``--param`` sets it): each string of ``body.input`` is one
item whose id is the line's ``custom_id`` (an ``input`` of k strings is k consecutive items sharing
it). The response file has one line per request, in input order, in the Batch API's output shape
(``id``, ``custom_id``, ``response: {status_code, request_id, body}``, ``error``), the body being
what ``/v1/embeddings`` returns: ``{"object": "list", "data": [{"object": "embedding", "index": i,
"embedding": [...]}], "model": ..., "usage": {...}}``.

``/v1/chat/completions`` and ``/v1/completions`` are refused: their responses need what pipeq
cannot give faithfully (see ``_NOT_SERVED``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from pipeq import constants as C
from pipeq import embedding, generation, recipe
from pipeq.errors import ConfigurationError, InputError
from pipeq.primitives import JobProgress
from pipeq.producer.records import RawRecords, Record, RecordSpec

#: The one endpoint pipeq serves from a batch file.
EMBEDDINGS_URL = "/v1/embeddings"
#: Endpoints of the Batch API that pipeq refuses, and why.
_NOT_SERVED = {
    url: (
        f"{url} is not served: transformers' text-generation pipeline returns the generated text only, "
        "not the finish_reason and completion token count its response carries, and a pipeq job runs every "
        "item with the same generation parameters, where each request sets its own max_tokens and temperature"
    )
    for url in ("/v1/chat/completions", "/v1/completions")
}
#: The fields of a request line (the Batch API's request input object).
_REQUEST_FIELDS = ("custom_id", "method", "url", "body")
#: The fields of an embeddings request body (the API refuses others).
_EMBEDDING_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
#: ``error.code`` of a request whose item failed, and of one cancelled before it ran.
FAILED_CODE = "item_failed"
CANCELLED_CODE = "batch_cancelled"


# ------------------------------------------------------------------------ reading


def records(raw: RawRecords, spec: RecordSpec, source: str) -> Iterator[Record]:
    """Validated items of a request file's parsed lines: one per string of each request's ``input``.

    Every problem raises InputError naming the line; ``custom_id`` must be unique, as the Batch API
    requires, and a repeat names both lines.
    """
    seen: dict[str, int] = {}
    for line, request in raw:
        custom_id, texts = _request(request, spec, source, line)
        if custom_id in seen:
            raise InputError(
                f"custom_id {custom_id!r} repeats line {seen[custom_id]}'s (custom_ids must be unique in a batch)",
                source=source,
                line=line,
            )
        seen[custom_id] = line
        for text in texts:
            yield Record(line, text, custom_id, len(text))


def _request(request: Any, spec: RecordSpec, source: str, line: int) -> tuple[str, list[str]]:
    """The ``custom_id`` and input texts of one request line, or InputError naming what is wrong."""

    def fail(message: str) -> InputError:
        return InputError(message, source=source, line=line)

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
    if url in _NOT_SERVED:
        raise fail(_NOT_SERVED[url])
    if url != EMBEDDINGS_URL:
        raise fail(f"url {url!r} is not an endpoint pipeq serves; it serves {EMBEDDINGS_URL}")
    if spec.task != embedding.TASK:
        raise fail(f"{EMBEDDINGS_URL} requests need --task {embedding.TASK}, not {spec.task}")
    if spec.params.get("pooling") is None:
        why = recipe.unfollowed(spec.models[-1]) if spec.models else None
        raise fail(
            f"{EMBEDDINGS_URL} returns one vector per input: submit with --param pooling="
            f"{'|'.join(embedding.POOLINGS)} (and --param normalize=true for unit vectors, as OpenAI's are)"
            + (f"; the model's sentence-transformers recipe is not followed: {why}" if why else "")
        )
    return custom_id, _embeddings_body(request["body"], spec, fail)


def _embeddings_body(body: Any, spec: RecordSpec, fail: Callable[[str], InputError]) -> list[str]:
    """The input texts of an embeddings request's body, checked as the endpoint checks it."""
    if not isinstance(body, dict):
        raise fail(f"body must be a JSON object, got {type(body).__name__}")
    _check_fields(body, _EMBEDDING_FIELDS, "an embeddings body", fail, required=("input", "model"))
    model = body["model"]
    if model not in spec.models:
        raise fail(f"body.model {model!r} is not the job's model {spec.models[0]!r} (--model)")
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
    return _texts(body["input"], spec, fail)


def _check_fields(
    obj: dict[str, Any],
    fields: tuple[str, ...],
    what: str,
    fail: Callable[[str], InputError],
    *,
    required: tuple[str, ...] | None = None,
) -> None:
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise fail(f"{what} has no field {', '.join(map(repr, unknown))} (its fields: {', '.join(fields)})")
    missing = [name for name in (fields if required is None else required) if name not in obj]
    if missing:
        raise fail(f"{what} needs {', '.join(map(repr, missing))}")


def _texts(value: Any, spec: RecordSpec, fail: Callable[[str], InputError]) -> list[str]:
    """``body.input`` as a list of texts: a string, or a non-empty list of strings."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise fail(f"body.input must be a string or a non-empty list of strings, got {json.dumps(value)[:60]}")
    for i, text in enumerate(texts):
        where = "body.input" if isinstance(value, str) else f"body.input[{i}]"
        if isinstance(text, int | list) and not isinstance(text, bool):
            raise fail(f"{where} holds token ids: pipeq embeds text (the model's own tokenizer reads it); give strings")
        if not isinstance(text, str):
            raise fail(f"{where} must be a string, got {type(text).__name__}")
        if not text:
            raise fail(f"{where} is an empty string (the embeddings API refuses those too)")
        if len(text) > spec.max_text_chars:
            raise fail(
                f"{where} is {len(text):,} characters, over the limit of {spec.max_text_chars:,} (--max-text-chars)"
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
