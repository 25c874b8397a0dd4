"""OpenAI Batch API files in and out: request files (``--input-format openai-batch``) become embedding
or text-generation jobs, and ``--format openai-batch`` writes the batch output file.

The files are written here by hand in the shapes the Batch API reference documents (the request
input object, the request output object, the embeddings response), not with a client library.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer, pipeline
from typer.testing import CliRunner

from pipeq import Client, Settings
from pipeq.cli import app as cli_app
from pipeq.errors import ConfigurationError, InputError
from pipeq.producer.readers import RecordSpec, read_path
from pipeq.producer.writers import write_results
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.worker.embedding import EmbeddingPipeline

TASK = "feature-extraction"
POOLED = {"pooling": "mean", "normalize": True}
LONG = "word " * 400  # over the tiny model's 128 positions: fails in forward when truncation is off

#: A request file as the Batch API documents it: a string input, a list input, a float request
#: (``encoding_format`` and ``user`` as the embeddings reference allows), MODEL standing for the model.
REQUESTS = """\
{"custom_id": "request-1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "MODEL", "input": "The food was delicious and the waiter was kind."}}
{"custom_id": "request-2", "method": "POST", "url": "/v1/embeddings", "body": {"model": "MODEL", "input": ["first of three", "the second text is a little longer than the first", "third"]}}
{"custom_id": "request-3", "method": "POST", "url": "/v1/embeddings", "body": {"model": "MODEL", "input": "plain float request", "encoding_format": "float", "user": "user-1234"}}
"""  # noqa: E501


def write(path: Path, text: str, model: str) -> str:
    path.write_text(text.replace("MODEL", model), encoding="utf-8")
    return str(path)


def request(custom_id: str, body: dict[str, Any], url: str = "/v1/embeddings", **more: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **more})


# ------------------------------------------------------------------ the documented output shape


def check_output_line(line: dict[str, Any]) -> None:
    """One line of a batch output file, as the Batch API reference documents the request output object."""
    assert list(line) == ["id", "custom_id", "response", "error"]
    assert isinstance(line["id"], str) and line["id"].startswith("batch_req_")
    assert isinstance(line["custom_id"], str)
    if line["error"] is not None:
        assert line["response"] is None
        assert set(line["error"]) == {"code", "message"}
        assert all(isinstance(v, str) and v for v in line["error"].values())
        return
    response = line["response"]
    assert set(response) == {"status_code", "request_id", "body"} and response["status_code"] == 200
    assert isinstance(response["request_id"], str) and response["request_id"]
    body = response["body"]  # the embeddings endpoint's response
    assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list"
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    for i, item in enumerate(body["data"]):
        assert set(item) == {"object", "index", "embedding"}
        assert item["object"] == "embedding" and item["index"] == i
        assert all(isinstance(x, float) for x in item["embedding"])


def reference(model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """Mean-pooled unit vectors straight from the pipeline class, and each text's token count."""
    pipe = pipeline(TASK, model=model, pipeline_class=EmbeddingPipeline)
    vectors = np.asarray(pipe(texts, truncation=True, **POOLED))
    tokenizer = AutoTokenizer.from_pretrained(model)
    return vectors, [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]


# ------------------------------------------------------------------ reading


def test_each_string_of_a_request_is_an_item_with_its_custom_id(tmp_path: Path) -> None:
    path = write(tmp_path / "batch.jsonl", REQUESTS, "acme/embedder")
    spec = RecordSpec(task=TASK, models=("acme/embedder",), params=POOLED)
    got = [(r.line, r.input_id, r.input) for r in read_path(path, spec, input_format="openai-batch")]
    assert got == [
        (1, "request-1", "The food was delicious and the waiter was kind."),
        (2, "request-2", "first of three"),
        (2, "request-2", "the second text is a little longer than the first"),
        (2, "request-2", "third"),
        (3, "request-3", "plain float request"),
    ]


def test_the_format_is_only_chosen_by_name(tmp_path: Path) -> None:
    # A request file is JSON lines: by its suffix it reads as plain records, which have no 'text'.
    path = write(tmp_path / "batch.jsonl", REQUESTS, "acme/embedder")
    with pytest.raises(InputError, match=r"batch.jsonl:1: missing field 'text'"):
        list(read_path(path, RecordSpec(task=TASK)))


GOOD = {"model": "MODEL", "input": "hello"}


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"model": "MODEL", "input": "x"}',
         r"malformed JSON"),
        (request("b", GOOD, url="/v1/moderations"), r"url '/v1/moderations' is not an endpoint pipeq serves"),
        (request("b", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}]}, url="/v1/chat/completions"),
         r"url '/v1/chat/completions' differs from line 1's '/v1/embeddings': a batch file is one job, of one task"),
        (request("b", {"model": "text-embedding-3-small", "input": "x"}),
         r"body.model 'text-embedding-3-small' is not the job's model"),
        (request("a", GOOD), r"custom_id 'a' repeats line 1's \(custom_ids must be unique in a batch\)"),
        (request("b", {**GOOD, "encoding_format": "base64"}), r'encoding_format "base64" is not supported'),
        (request("b", {**GOOD, "dimensions": 8}), r"dimensions is not supported"),
        (request("b", {"model": "MODEL", "input": [15339, 1917]}), r"body.input\[0\] holds token ids"),
        (request("b", {"model": "MODEL", "input": [[15339, 1917]]}), r"body.input\[0\] holds token ids"),
        (request("b", {"model": "MODEL", "input": ["ok", ""]}), r"body.input\[1\] is an empty string"),
        (request("b", {"model": "MODEL", "input": []}), r"body.input must be a string or a non-empty list"),
        (request("b", {"model": "MODEL"}), r"an embeddings body needs 'input'"),
        (request("b", {**GOOD, "temperature": 0}), r"an embeddings body has no field 'temperature'"),
        (json.dumps({"custom_id": "b", "method": "GET", "url": "/v1/embeddings", "body": GOOD}),
         r'method must be "POST"'),
        (json.dumps({"custom_id": 7, "method": "POST", "url": "/v1/embeddings", "body": GOOD}),
         r"custom_id must be a non-empty string, got 7"),
        (json.dumps({"method": "POST", "url": "/v1/embeddings", "body": GOOD}), r"a request needs 'custom_id'"),
    ],
    ids=[
        "malformed", "bad-url", "mixed", "model", "duplicate", "base64", "dimensions",
        "token-ids", "token-arrays", "empty-string", "empty-list", "no-input", "unknown-field", "method",
        "custom-id-type", "no-custom-id",
    ],
)  # fmt: skip
def test_bad_request_names_its_line_and_stores_nothing(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path, second_line: str, message: str
) -> None:
    # Given: a good first line and a bad second one
    model = model_dir(TASK)
    text = request("a", GOOD) + "\n" + second_line + "\n" + request("c", GOOD) + "\n"
    path = write(tmp_path / "batch.jsonl", text, model)
    # When/Then: the submit is refused, naming the file and line 2, and no job is stored
    with pytest.raises(InputError, match=rf"^{path}:2: {message}"):
        client.submit(path, task=TASK, model=model, params=POOLED, input_format="openai-batch")
    assert client.store.recent_jobs() == []


@pytest.mark.parametrize(
    ("task", "params", "message"),
    [
        ("text-classification", POOLED, r"/v1/embeddings requests need --task feature-extraction"),
        (TASK, {}, r"/v1/embeddings returns one vector per input: submit with --param pooling=mean\|cls\|max"),
    ],
)
def test_the_job_must_be_one_that_answers_embeddings_requests(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path, task: str, params: dict[str, Any], message: str
) -> None:
    model = model_dir(task)
    path = write(tmp_path / "batch.jsonl", REQUESTS, model)
    with pytest.raises(InputError, match=rf"^{path}:1: {message}"):
        client.submit(path, task=task, model=model, params=params, input_format="openai-batch")
    assert client.store.recent_jobs() == []


def test_a_local_model_is_named_as_given_or_as_stored(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: the model as a relative directory on the command line, and a file naming it that way or absolutely
    shutil.copytree(model_dir(TASK), tmp_path / "embedder")
    monkeypatch.chdir(tmp_path)
    text = request("a", {"model": "./embedder", "input": "x"}) + "\n"
    text += request("b", {"model": str(tmp_path / "embedder"), "input": "y"}) + "\n"
    path = tmp_path / "batch.jsonl"
    path.write_text(text, encoding="utf-8")
    # When: it is submitted
    job = client.submit(str(path), task=TASK, model="./embedder", params=POOLED, input_format="openai-batch")
    # Then: both lines are accepted, and the job runs on the stored (absolute) model
    assert job.status().total == 2 and job.status().model == str((tmp_path / "embedder").resolve())


# ------------------------------------------------------------------ chat and completions requests

GENERATION = "text-generation"
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
#: Chat requests as the Batch API documents them: the guide's first example, and one with every sampling
#: parameter pipeq reads, fields it ignores (user, metadata) and unsupported ones at the value that asks nothing.
CHAT_REQUESTS = """\
{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "MODEL", "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello world!"}], "max_tokens": 100}}
{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "MODEL", "messages": [{"role": "user", "content": "Name a colour."}], "max_completion_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 42, "stop": ["\\n"], "n": 1, "user": "user-1234", "metadata": {"batch": "a"}, "store": false, "stream": false, "logprobs": false, "presence_penalty": 0, "tools": null}}
"""  # noqa: E501
COMPLETIONS_REQUESTS = """\
{"custom_id": "request-1", "method": "POST", "url": "/v1/completions", "body": {"model": "MODEL", "prompt": "Say this is a test", "max_tokens": 7, "temperature": 0}}
{"custom_id": "request-2", "method": "POST", "url": "/v1/completions", "body": {"model": "MODEL", "prompt": ["first prompt", "second prompt"], "max_tokens": 5, "stop": ".", "echo": false, "best_of": 1}}
"""  # noqa: E501
CHAT = {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
COMPLETION = {"model": "MODEL", "prompt": "hi", "max_tokens": 16}


def test_each_chat_request_is_one_item_with_its_parameters(tmp_path: Path) -> None:
    path = write(tmp_path / "chat.jsonl", CHAT_REQUESTS, "acme/llm")
    spec = RecordSpec(task=GENERATION, models=("acme/llm",))
    got = [(r.line, r.input_id, r.input, r.size) for r in read_path(path, spec, input_format="openai-batch")]
    system = {"role": "system", "content": "You are a helpful assistant."}
    assert got == [
        (1, "request-1", {"messages": [system, {"role": "user", "content": "Hello world!"}],
                          "params": {"max_tokens": 100}}, 40),
        (2, "request-2", {"messages": [{"role": "user", "content": "Name a colour."}],
                          "params": {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 42,
                                     "stop": ["\n"]}}, 14),
    ]  # fmt: skip


def test_each_prompt_of_a_completions_request_is_an_item(tmp_path: Path) -> None:
    path = write(tmp_path / "completions.jsonl", COMPLETIONS_REQUESTS, "acme/llm")
    spec = RecordSpec(task=GENERATION, models=("acme/llm",))
    got = [(r.line, r.input_id, r.input) for r in read_path(path, spec, input_format="openai-batch")]
    assert got == [
        (1, "request-1", {"prompt": "Say this is a test", "params": {"max_tokens": 7, "temperature": 0.0}}),
        (2, "request-2", {"prompt": "first prompt", "params": {"max_tokens": 5, "stop": ["."]}}),
        (2, "request-2", {"prompt": "second prompt", "params": {"max_tokens": 5, "stop": ["."]}}),
    ]


@pytest.mark.parametrize(
    ("url", "body", "message"),
    [
        (CHAT_URL, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
         r"body.tools is not supported: tool and function calls are not served"),
        (CHAT_URL, {**CHAT, "tool_choice": "auto"}, r"body.tool_choice is not supported"),
        (CHAT_URL, {**CHAT, "response_format": {"type": "json_object"}},
         r"body.response_format is not supported: structured outputs"),
        (CHAT_URL, {**CHAT, "logprobs": True}, r"body.logprobs is not supported: log probabilities are not returned"),
        (CHAT_URL, {**CHAT, "top_logprobs": 2}, r"body.top_logprobs is not supported"),
        (CHAT_URL, {**CHAT, "stream": True}, r"body.stream is not supported"),
        (CHAT_URL, {**CHAT, "frequency_penalty": 0.5}, r"body.frequency_penalty is not supported: penalties"),
        (CHAT_URL, {**CHAT, "n": 2}, r"body.n must be 1, got 2"),
        (CHAT_URL, {**CHAT, "function": 1},
         r"a chat completions body has no field 'function' pipeq reads \(it reads model, messages"),
        (CHAT_URL, {**CHAT, "model": "gpt-4o-mini"}, r"body.model 'gpt-4o-mini' is not the job's model"),
        (CHAT_URL, {**CHAT, "max_tokens": -1}, r"body.max_tokens must be a positive integer, got -1"),
        (CHAT_URL, {**CHAT, "temperature": 2.5}, r"body.temperature must be at least 0.0 and at most 2.0"),
        (CHAT_URL, {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, r"body.stop takes at most 4 strings"),
        (CHAT_URL, {**CHAT, "max_completion_tokens": 8}, r"body sets max_tokens and max_completion_tokens apart"),
        (CHAT_URL, {**CHAT, "messages": []}, r"body.messages: 'messages' must be a non-empty list"),
        (CHAT_URL, {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
         r"body.messages: message 1 has role 'robot'"),
        (CHAT_URL, {"model": "MODEL"}, r"a chat completions body needs 'messages'"),
        (COMPLETIONS_URL, COMPLETION, r"url '/v1/completions' differs from line 1's '/v1/chat/completions'"),
        ("/v1/embeddings", GOOD, r"url '/v1/embeddings' differs from line 1's '/v1/chat/completions'"),
    ],
    ids=["tools", "tool-choice", "response-format", "logprobs", "top-logprobs", "stream", "penalty", "n", "unknown",
         "model", "max-tokens", "temperature", "stop", "both-max-tokens", "no-messages", "role", "messages-missing",
         "mixed-completions", "mixed-embeddings"],
)  # fmt: skip
def test_a_bad_chat_request_names_its_line_and_stores_nothing(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path, url: str, body: dict[str, Any], message: str
) -> None:
    model = model_dir("causal-lm")
    text = request("a", CHAT, url=CHAT_URL) + "\n" + request("b", body, url=url) + "\n"
    path = write(tmp_path / "chat.jsonl", text, model)
    with pytest.raises(InputError, match=rf"^{path}:2: {message}"):
        client.submit(path, model=model, input_format="openai-batch")
    assert client.store.recent_jobs() == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**COMPLETION, "prompt": [15339, 1917]}, r"body.prompt\[0\] holds token ids"),
        ({**COMPLETION, "prompt": ""}, r"body.prompt is an empty string"),
        ({**COMPLETION, "prompt": []}, r"body.prompt must be a string or a non-empty list of strings"),
        ({**COMPLETION, "echo": True}, r"body.echo is not supported: the output is the completion only"),
        ({**COMPLETION, "suffix": "end"}, r"body.suffix is not supported"),
        ({**COMPLETION, "best_of": 3}, r"body.best_of is not supported"),
        ({**COMPLETION, "logprobs": 2}, r"body.logprobs is not supported"),
        ({**COMPLETION, "messages": []}, r"a completions body has no field 'messages' pipeq reads"),
        ({"model": "MODEL"}, r"a completions body needs 'prompt'"),
    ],
    ids=["token-ids", "empty", "empty-list", "echo", "suffix", "best-of", "logprobs", "messages", "no-prompt"],
)
def test_a_bad_completions_request_names_its_line_and_stores_nothing(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path, body: dict[str, Any], message: str
) -> None:
    model = model_dir("causal-lm")
    text = request("a", COMPLETION, url=COMPLETIONS_URL) + "\n" + request("b", body, url=COMPLETIONS_URL) + "\n"
    path = write(tmp_path / "completions.jsonl", text, model)
    with pytest.raises(InputError, match=rf"^{path}:2: {message}"):
        client.submit(path, model=model, input_format="openai-batch")
    assert client.store.recent_jobs() == []


def test_a_request_file_names_its_jobs_task_by_its_url(
    settings: Settings, client: Client, model_dir: Callable[[str], str], tmp_path: Path
) -> None:
    # Given: a chat file, submitted on the command line with no --task
    model = model_dir("causal-lm")
    path = write(tmp_path / "chat.jsonl", CHAT_REQUESTS, model)
    result = run_cli(["submit", path, "--input-format", "openai-batch", "--model", model], settings)
    # Then: it is a text-generation job of one item per request
    assert result.exit_code == 0, result.output
    (job,) = client.store.recent_jobs()
    assert (job.task, job.total) == (GENERATION, 2)
    # And: an embeddings file is a feature-extraction job; a job's own task must match its file's
    embeddings = write(tmp_path / "batch.jsonl", REQUESTS, model_dir(TASK))
    job_state = client.submit(embeddings, model=model_dir(TASK), params=POOLED, input_format="openai-batch").status()
    assert (job_state.task, job_state.total) == (TASK, 5)
    with pytest.raises(InputError, match=rf"^{path}:1: /v1/chat/completions requests need --task text-generation, not "
                                         rf"feature-extraction"):  # fmt: skip
        client.submit(path, task=TASK, model=model, params=POOLED, input_format="openai-batch")
    # And: any other input names its task
    with pytest.raises(ConfigurationError, match=r"name the job's task \(only an openai-batch request file says"):
        client.submit(path, model=model)
    with pytest.raises(ConfigurationError, match=r"name the job's task: an openai-batch file read from standard input"):
        client.submit("-", model=model, input_format="openai-batch")
    assert len(client.store.recent_jobs()) == 2


def test_ten_thousand_chat_requests_are_stored_with_their_ids_inputs_and_parameters(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path
) -> None:
    from test_generation_inputs import stored

    # Given: a chat batch file of 10,000 requests, each with its own max_tokens and seed
    n = 10_000
    model = model_dir("causal-lm")

    def messages(i: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"What is {i} + {i}?"},
        ]

    path = tmp_path / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            body = {"model": model, "messages": messages(i), "max_tokens": 1 + i % 64, "seed": i}
            fh.write(request(f"request-{i}", body, url=CHAT_URL) + "\n")
    # When: it is submitted, every chat rendered and measured against the model's context
    start = time.perf_counter()
    job = client.submit(str(path), model=model, input_format="openai-batch")
    elapsed = time.perf_counter() - start
    # Then: 10,000 items in file order with the request's messages and parameters, in seconds
    assert job.status().total == n
    assert stored(client.store, job.id) == [
        (f"request-{i}", {"messages": messages(i), "params": {"max_tokens": 1 + i % 64, "seed": i}}) for i in range(n)
    ]
    assert elapsed < 60, f"10,000 chat requests took {elapsed:.1f} s to submit"


# ------------------------------------------------------------------ a real job, written back


def run_cli(args: list[str], settings: Settings) -> Any:
    """``pipeq`` in-process on ``settings``' URLs; the logging set-up is put back afterwards (a worker
    thread logging later must not write to the runner's closed stream)."""
    env = {"PIPEQ_BROKER_URL": settings.broker_url, "PIPEQ_DATABASE_URL": settings.database_url}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(cli_app, args, env=env)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_request_file_runs_and_comes_back_as_the_batch_output_file(
    settings: Settings, thread_embedding_worker: str, tmp_path: Path
) -> None:
    # Given: the documented request file, and one more request whose second text fails (truncation off)
    model = thread_embedding_worker
    extra = request("request-4", {"model": "MODEL", "input": ["short one", LONG]}) + "\n"
    path = write(tmp_path / "batch.jsonl", REQUESTS + extra, model)

    # When: it is submitted and its results written, through the CLI
    submit = [str(path), "--input-format", "openai-batch", "--task", TASK, "--model", model]
    params = ["--param", "pooling=mean", "--param", "normalize=true", "--param", "truncation=false"]
    out = run_cli(["submit", *submit, *params, "--wait"], settings)
    assert out.exit_code == 1, out.output  # one item failed
    job_id = out.stdout.strip().splitlines()[-1]
    written = run_cli(["results", job_id, "--format", "openai-batch", "-o", str(tmp_path / "out.jsonl")], settings)
    assert written.exit_code == 0, written.output
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]

    # Then: one line per request, in input order, each in the documented shape
    for line in lines:
        check_output_line(line)
    assert [x["custom_id"] for x in lines] == ["request-1", "request-2", "request-3", "request-4"]
    assert len({x["id"] for x in lines}) == 4 and len({x["response"]["request_id"] for x in lines[:3]}) == 3
    # And: each input string's embedding, in its request's order, as the model computes it
    requests = [json.loads(x)["body"] for x in Path(path).read_text(encoding="utf-8").splitlines()]
    for line, body in zip(lines[:3], requests, strict=False):
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        want, tokens = reference(model, texts)
        got = line["response"]["body"]
        assert got["model"] == model and [d["index"] for d in got["data"]] == list(range(len(texts)))
        np.testing.assert_allclose(np.asarray([d["embedding"] for d in got["data"]]), want, atol=1e-5)
        assert got["usage"] == {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
    # And: the request with a failed input is an error line naming that input and why
    failed = lines[3]
    assert failed["response"] is None and failed["error"]["code"] == "item_failed"
    assert failed["error"]["message"].startswith("input 1: forward: ")


def test_cancelled_requests_are_error_lines(client: Client, model_dir: Callable[[str], str], tmp_path: Path) -> None:
    # Given: a request file submitted with no worker serving it, then cancelled
    path = write(tmp_path / "batch.jsonl", REQUESTS, model_dir(TASK))
    job = client.submit(path, task=TASK, model=model_dir(TASK), params=POOLED, input_format="openai-batch")
    with pytest.raises(ConfigurationError, match=r"is queued with 5 items pending: .* once it is done"):
        write_results(job.results(), "openai-batch", path=str(tmp_path / "early.jsonl"), job=job.status())
    assert not (tmp_path / "early.jsonl").exists(), "a refused write leaves no file"
    assert job.cancel() == 5
    # When: its output file is written
    out = tmp_path / "out.jsonl"
    assert write_results(job.results(), "openai-batch", path=str(out), job=job.status()) == 3
    # Then: every request is an error line of the Batch API's cancelled code
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    for line in lines:
        check_output_line(line)
    assert [(x["custom_id"], x["error"]["code"]) for x in lines] == [
        ("request-1", "batch_cancelled"), ("request-2", "batch_cancelled"), ("request-3", "batch_cancelled"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("task", "params", "message"),
    [
        ("text-classification", {}, r"is a text-classification job: --format openai-batch writes /v1/embeddings"),
        (TASK, {}, r"is a feature-extraction job without pooling"),
    ],
)
def test_only_embedding_jobs_with_pooling_are_written_as_batch_output(
    client: Client, model_dir: Callable[[str], str], task: str, params: dict[str, Any], message: str
) -> None:
    job = client.submit(["a", "b"], task=task, model=model_dir(task), params=params)
    job.cancel()
    with pytest.raises(ConfigurationError, match=message):
        write_results(job.results(), "openai-batch", out=None, job=job.status())


# ------------------------------------------------------------------ the manual's example

DOC_SECTION = "OpenAI Batch files"
DOC_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.integration
def test_documented_openai_batch_example(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    from test_readme import DOCS, code_blocks, run_block

    doc = DOCS / "inputs-outputs.md"
    # Given: the block of docs/inputs-outputs.md, its hub model replaced by a copy of the tiny embedder (same tokenizer)
    (block,) = code_blocks(DOC_SECTION, doc=doc)
    model = str(shutil.copytree(model_dir(TASK), tmp_path / "minilm"))
    url = f"sqlite:///{tmp_path / 'pipeq.db'}"
    env = {"PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "pipeq", "-q", "db", "upgrade"], env={**os.environ, **env}, check=True)

    # When: it runs as written: a worker, the submit, the results
    run_block(block.replace(DOC_MODEL, model), cwd=tmp_path, env=env, start_worker=start_worker, store=Store(url))

    # Then: the output file answers both requests in the documented shape, as the page shows it
    lines = [json.loads(x) for x in (tmp_path / "batch_output.jsonl").read_text(encoding="utf-8").splitlines()]
    for line in lines:
        check_output_line(line)
    assert [x["custom_id"] for x in lines] == ["request-1", "request-2"]
    assert [len(x["response"]["body"]["data"]) for x in lines] == [1, 2]
    shown = doc.read_text().split(f"### {DOC_SECTION}", 1)[1].split("```json\n", 1)[1].split("\n", 1)[0]
    usage = json.loads(shown.replace(", ...", ""))["response"]["body"]["usage"]
    assert lines[1]["response"]["body"]["usage"] == usage


@pytest.mark.integration
def test_a_chat_batch_file_of_10000_requests_round_trips(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    """``pipeq submit --input-format openai-batch`` of 10,000 chat requests, a worker, and ``pipeq results
    --format openai-batch``: one response line a request, in order, each the chat completion its request asked for."""
    model = str(shutil.copytree(model_dir("causal-lm-endless"), tmp_path / "lm"))
    url = f"sqlite:///{tmp_path / 'pipeq.db'}"
    env = {**os.environ, "PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "pipeq", "-q", "db", "upgrade"], env=env, check=True)
    requests = tmp_path / "batch.jsonl"
    with requests.open("w", encoding="utf-8") as fh:
        for i in range(10_000):
            body = {"model": model, "messages": [{"role": "user", "content": f"say {i}"}], "max_tokens": 1 + i % 3}
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            fh.write(json.dumps(line) + "\n")
    worker = start_worker(
        "--task", "text-generation", "--model", model, "--concurrency", "1", "--no-warmup",
        broker_url=redis_url, database_url=url,
    )  # fmt: skip
    worker.wait_ready(Store(url), ServeKey("text-generation", model).queue)
    pipeq = [sys.executable, "-m", "pipeq", "-q"]
    submitted = subprocess.run(
        [*pipeq, "submit", str(requests), "--input-format", "openai-batch", "--model", model, "--wait"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:] + worker.log()[-3000:]
    job_id = submitted.stdout.strip().splitlines()[-1]
    out = tmp_path / "out.jsonl"
    subprocess.run([*pipeq, "results", job_id, "--format", "openai-batch", "-o", str(out)], env=env, check=True)
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["custom_id"] for x in lines] == [f"req-{i}" for i in range(10_000)]
    for i, line in enumerate(lines):
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        (choice,) = body["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 1 + i % 3
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
