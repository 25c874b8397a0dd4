"""What a text-generation job takes at submit: prompts or chat messages with their own sampling parameters,
the job's defaults (``--param``), and the checks against the model's tokenizer (chat template, context).

Nothing here runs a worker: what is stored is read back from the store.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_openai_batch import run_cli

from pipeq import Client, Settings, generation
from pipeq import constants as C
from pipeq.errors import ConfigurationError, InputError
from pipeq.producer import prompts
from pipeq.producer.readers import Record, RecordSpec, read_objects, read_path
from pipeq.routing import check_params
from pipeq.store import Store
from tinymodels import CAUSAL_LM_CONTEXT

TASK = "text-generation"
SPEC = RecordSpec(task=TASK)
CHAT = "causal-lm"
PLAIN = "causal-lm-no-chat-template"
HELLO = [{"role": "user", "content": "Hello there"}]


def write_jsonl(path: Path, records: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def stored(store: Store, job_id: str) -> list[tuple[str | None, Any]]:
    """(id, stored input) of each item of a job, in input order, read back from the store."""
    inputs = {idx: value for page in store.iter_pending(job_id) for idx, value in page}
    return [(row["input_id"], inputs[row["idx"]]) for row in store.iter_results(job_id)]


def long_prompt(tokens: int) -> str:
    """A prompt of ``tokens`` tokens for the MiniLM tokenizer, its [CLS] and [SEP] included."""
    return " ".join(["word"] * (tokens - 2))


# ------------------------------------------------------------------ records


def test_a_record_is_a_prompt_or_chat_messages_with_its_own_parameters(tmp_path: Path) -> None:
    # Given: a prompt with parameters and another column, chat messages (one in content parts), a bare prompt
    path = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"id": "p1", "text": "Once upon a time", "max_tokens": 12, "temperature": 0.5, "stop": "\n", "lang": "en"},
            {"id": "c1", "messages": [{"role": "system", "content": "Be brief."}, *HELLO], "seed": 7, "top_p": 0.9},
            {"id": "c2", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                   {"type": "text", "text": "!"}]}]},
            {"text": "no id, no parameters", "max_tokens": None},
        ],
    )  # fmt: skip
    # When: it is read as a text-generation job's input
    got = list(read_path(path, SPEC))
    # Then: each record is stored as a prompt or its messages, with its own parameters; its size is its characters
    assert [(r.line, r.input_id, r.input, r.size) for r in got] == [
        (1, "p1", {"prompt": "Once upon a time", "params": {"max_tokens": 12, "temperature": 0.5, "stop": ["\n"]}}, 16),
        (2, "c1", {"messages": [{"role": "system", "content": "Be brief."}, *HELLO],
                   "params": {"top_p": 0.9, "seed": 7}}, 20),
        (3, "c2", {"messages": [{"role": "user", "content": "Hi!"}]}, 3),
        (4, None, {"prompt": "no id, no parameters"}, 20),
    ]  # fmt: skip


def test_prompts_come_from_the_text_field_or_from_lines_of_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Why is the sky blue?", "text": "not read"}])
    spec = RecordSpec(task=TASK, text_field="question")
    assert [r.input for r in read_path(path, spec)] == [{"prompt": "Why is the sky blue?"}]
    (tmp_path / "prompts.txt").write_text("first prompt\nsecond prompt\n", encoding="utf-8")
    got = [(r.line, r.input, r.size) for r in read_path(str(tmp_path / "prompts.txt"), SPEC)]
    assert got == [(1, {"prompt": "first prompt"}, 12), (2, {"prompt": "second prompt"}, 13)]


def test_csv_cells_hold_numbers_and_messages_as_json(tmp_path: Path) -> None:
    # Given: a CSV with a prompt row, a messages row (the list as JSON) and empty cells for parameters not set
    path = tmp_path / "gen.csv"
    path.write_text(
        "id,text,messages,max_tokens,temperature,seed,stop\n"
        "a,Tell me a joke,,16,0.8,,\n"
        'b,,"[{""role"": ""user"", ""content"": ""Hi""}]",,,42,END\n',
        encoding="utf-8",
    )
    # When/Then: the numbers are numbers, empty cells are left out, the JSON cell is the messages
    assert [r.input for r in read_path(str(path), SPEC)] == [
        {"prompt": "Tell me a joke", "params": {"max_tokens": 16, "temperature": 0.8}},
        {"messages": [{"role": "user", "content": "Hi"}], "params": {"seed": 42, "stop": ["END"]}},
    ]


def test_a_dataframe_holds_prompts_or_messages_and_parameter_columns_with_gaps() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "id": ["a", "b"],
            "text": ["Write a haiku", None],
            "messages": [None, HELLO],
            "max_tokens": [8, math.nan],  # a float column: 8.0 and a gap
            "colour": ["red", "blue"],
        }
    )
    spec = RecordSpec(task=TASK)
    from pipeq.producer.frames import read_frame

    assert [(r.input_id, r.input) for r in read_frame(frame, spec)] == [
        ("a", {"prompt": "Write a haiku", "params": {"max_tokens": 8}}),
        ("b", {"messages": HELLO}),
    ]
    with pytest.raises(InputError, match=r"missing column 'text' \(prompts\) or 'messages'"):
        list(read_frame(pd.DataFrame({"prompt": ["x"]}), spec))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "hi", "messages": HELLO}, r"a record holds a prompt \('text'\) or chat 'messages', not both"),
        ({"prompt": "hi"}, r"a text-generation record needs a prompt in 'text' \(--text-field\) or chat 'messages' "
                           r"\(fields present: prompt\)"),
        ({"text": ""}, r"field 'text' is empty"),
        ({"text": "hi", "max_tokens": -1}, r"max_tokens must be a positive integer, got -1"),
        ({"text": "hi", "max_tokens": 0}, r"max_tokens must be a positive integer, got 0"),
        ({"text": "hi", "temperature": 3}, r"temperature must be at least 0.0 and at most 2.0, got 3"),
        ({"text": "hi", "top_p": 0}, r"top_p must be above 0.0"),
        ({"text": "hi", "seed": "abc"}, r"seed must be an integer, got 'abc'"),
        ({"text": "hi", "stop": ["a", "b", "c", "d", "e"]}, r"stop takes at most 4 strings, got 5"),
        ({"messages": "hello"}, r"'messages' must be a non-empty list"),
        ({"messages": []}, r"'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"message 1 has role 'robot'"),
        ({"messages": [{"role": "user"}]}, r"message 1 must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         r"message 1: only text content parts are served"),
    ],
    ids=["both", "neither", "empty", "negative-max-tokens", "zero-max-tokens", "temperature", "top-p", "seed", "stop",
         "messages-string", "messages-empty", "role", "no-content", "image"],
)  # fmt: skip
def test_a_bad_record_names_its_file_and_line(tmp_path: Path, record: dict[str, Any], message: str) -> None:
    path = write_jsonl(tmp_path / "gen.jsonl", [{"text": "a good first record"}, record])
    with pytest.raises(InputError, match=rf"^{path}:2: {message}"):
        list(read_path(path, SPEC))


def test_long_messages_are_held_to_the_text_limit() -> None:
    spec = RecordSpec(task=TASK, max_text_chars=10)
    messages = [{"role": "user", "content": "123456"}, {"role": "assistant", "content": "78901"}]
    with pytest.raises(InputError, match=r"^<inputs>:1: the messages are 11 characters, over the limit of 10"):
        list(read_objects([{"messages": messages}], spec))


# ------------------------------------------------------------------ the job's parameters


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": 20}, r"unknown generation parameter 'max_new_tokens': use max_tokens"),
        ({"do_sample": False}, r"unknown generation parameter 'do_sample': use temperature \(0 is greedy"),
        (
            {"return_full_text": False},
            r"unknown generation parameter 'return_full_text': the output is the generated "
            r"text only",
        ),
        ({"top_k": 5}, r"unknown generation parameter 'top_k'; choose from max_tokens, temperature, top_p, seed, stop"),
        ({"max_tokens": -5}, r"max_tokens must be a positive integer, got -5"),
        ({"temperature": "hot"}, r"temperature must be a number, got 'hot'"),
    ],
    ids=["max-new-tokens", "do-sample", "full-text", "unknown", "negative", "temperature"],
)
def test_job_parameters_are_refused_before_anything_is_stored(
    client: Client, model_dir: Callable[[str], str], params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=rf"^text-generation job parameters: {message}"):
        client.submit(["a prompt"], task=TASK, model=model_dir(CHAT), params=params)
    assert client.store.recent_jobs() == []


def test_the_worker_checks_a_jobs_parameters_by_the_same_rule() -> None:
    # routing.check_params is what a worker runs on a job it claims (written by something other than pipeq's client)
    assert check_params({"max_tokens": 8, "temperature": 1, "stop": "x"}, TASK) == {
        "max_tokens": 8, "temperature": 1.0, "stop": ["x"],
    }  # fmt: skip
    with pytest.raises(ConfigurationError, match=r"'max_new_tokens': use max_tokens"):
        check_params({"max_new_tokens": 8}, TASK)
    with pytest.raises(ConfigurationError, match=r"may not set model"):
        check_params({"model": "other"}, TASK)
    assert check_params({"max_new_tokens": 8}, "summarization") == {"max_new_tokens": 8}  # other tasks: as before


def test_cli_params_are_the_jobs_defaults_and_records_keep_their_own(
    settings: Settings, model_dir: Callable[[str], str], tmp_path: Path
) -> None:
    # Given: a record with its own max_tokens and one without
    path = write_jsonl(
        tmp_path / "gen.jsonl", [{"id": "a", "text": "Hello", "max_tokens": 5}, {"id": "b", "text": "Hi"}]
    )
    # When: submitted with job-wide defaults
    result = run_cli(
        ["submit", path, "--task", TASK, "--model", model_dir(CHAT), "--param", "max_tokens=64",
         "--param", "temperature=0.7", "--param", 'stop=["###"]'],
        settings,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # Then: the job holds the defaults, each item its own parameters only
    store = Store(settings.database_url)
    (job,) = store.recent_jobs()
    assert job.params == {"max_tokens": 64, "temperature": 0.7, "stop": ["###"]}
    assert stored(store, job.id) == [("a", {"prompt": "Hello", "params": {"max_tokens": 5}}), ("b", {"prompt": "Hi"})]
    # And: an old pipeline parameter is refused with exit code 2 and a hint, nothing stored
    result = run_cli(
        ["submit", path, "--task", TASK, "--model", model_dir(CHAT), "--param", "max_new_tokens=5"], settings
    )
    assert result.exit_code == 2 and "use max_tokens" in result.output
    assert len(store.recent_jobs()) == 1
    store.close()


def test_fail_long_prompts_and_pairs_are_for_generation_jobs_only(
    client: Client, model_dir: Callable[[str], str]
) -> None:
    with pytest.raises(ConfigurationError, match=r"--fail-long-prompts\) is for text-generation jobs"):
        client.submit(["a"], task="text-classification", model=model_dir("text-classification"), fail_long_prompts=True)
    with pytest.raises(ConfigurationError, match=r"takes one prompt a record"):
        client.submit([{"text": "a", "b": "c"}], task=TASK, model=model_dir(CHAT), pair_field="b")
    assert client.store.recent_jobs() == []


# ------------------------------------------------------------------ checks against the model's tokenizer


def test_messages_need_a_chat_template(client: Client, model_dir: Callable[[str], str], tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gen.jsonl", [{"text": "a prompt"}, {"text": "another"}, {"messages": HELLO}])
    with pytest.raises(
        InputError, match=rf"^{path}:3: chat 'messages' need a model whose tokenizer has a chat template"
    ):
        client.submit(path, task=TASK, model=model_dir(PLAIN), params={"max_tokens": 16})
    assert client.store.recent_jobs() == []
    # The same file on a model with a chat template is stored, messages and all
    job = client.submit(path, task=TASK, model=model_dir(CHAT), params={"max_tokens": 16})
    assert [value for _, value in stored(client.store, job.id)][2] == {"messages": HELLO}


def test_a_chat_template_that_refuses_messages_names_their_line(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path
) -> None:
    # Given: a model whose template raises (as many do) unless the first message is the user's
    model = Path(shutil.copytree(model_dir(CHAT), tmp_path / "strict"))
    (model / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user\\'s') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
        encoding="utf-8",
    )
    records = [{"messages": HELLO}, {"text": "a prompt"}, {"messages": [{"role": "assistant", "content": "Hi"}]}]
    path = write_jsonl(tmp_path / "gen.jsonl", records)
    with pytest.raises(InputError, match=rf"^{path}:3: the model's chat template refuses these messages: .*user's"):
        client.submit(path, task=TASK, model=str(model))
    assert client.store.recent_jobs() == []


def test_a_prompt_over_the_context_with_its_max_tokens_is_refused_naming_its_line(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path
) -> None:
    # Given: the model's context of 256 tokens; a 200-token prompt fits with max_tokens 56, not 57
    prompt = long_prompt(200)
    fits = {"text": prompt, "max_tokens": CAUSAL_LM_CONTEXT - 200}
    path = write_jsonl(tmp_path / "gen.jsonl", [fits, {"text": "short", "max_tokens": 16}, {**fits, "max_tokens": 57}])
    # When/Then: the third line is refused, nothing stored
    with pytest.raises(
        InputError,
        match=rf"^{path}:3: the prompt is 200 tokens and max_tokens 57: 257 is over the model's context of 256 tokens "
        r"\(shorten it, lower max_tokens, or submit with --fail-long-prompts",
    ):
        client.submit(path, task=TASK, model=model_dir(CHAT))
    assert client.store.recent_jobs() == []
    # And: a record without max_tokens has the job's (then the default of 256, over the context with any prompt)
    path = write_jsonl(tmp_path / "defaults.jsonl", [{"text": "short"}])
    assert client.submit(path, task=TASK, model=model_dir(CHAT), params={"max_tokens": 100}).status().total == 1
    with pytest.raises(InputError, match=rf"^{path}:1: the prompt is 3 tokens and max_tokens 256: 259 is over"):
        client.submit(path, task=TASK, model=model_dir(CHAT))


def test_a_chat_is_measured_as_its_template_renders_it(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path
) -> None:
    # "user: word word ...\nassistant:" is the words and 5 tokens (user : \n is not a token, assistant :)
    words = 100
    messages = [{"role": "user", "content": " ".join(["word"] * words)}]
    checker = prompts.load_checker(model_dir(CHAT))
    assert checker is not None and checker.context == CAUSAL_LM_CONTEXT
    record = Record(1, {"messages": messages}, None, 0)
    (tokens,) = checker.prompt_tokens([record], "<test>")
    assert tokens == words + 4  # user, :, assistant, : (no [CLS]/[SEP]: the template writes the special tokens)
    path = write_jsonl(tmp_path / "gen.jsonl", [{"messages": messages, "max_tokens": CAUSAL_LM_CONTEXT - tokens + 1}])
    with pytest.raises(InputError, match=rf"^{path}:1: the prompt is {tokens} tokens"):
        client.submit(path, task=TASK, model=model_dir(CHAT))


def test_fail_long_prompts_stores_them_to_fail_alone(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [{"id": "ok", "text": "short"}, {"id": "long", "text": long_prompt(300)}, {"id": "ok2", "text": "fine"}]
    path = write_jsonl(tmp_path / "gen.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="pipeq.producer.prompts"):
        job = client.submit(path, task=TASK, model=model_dir(CHAT), params={"max_tokens": 16}, fail_long_prompts=True)
    assert [input_id for input_id, _ in stored(client.store, job.id)] == ["ok", "long", "ok2"]
    assert "1 prompts with their max_tokens are over the model's context of 256 tokens (the first on line 2)" in (
        caplog.text
    )


def test_the_context_is_the_smaller_of_the_configs_and_the_tokenizers(
    model_dir: Callable[[str], str], tmp_path: Path
) -> None:
    model = Path(shutil.copytree(model_dir(CHAT), tmp_path / "short"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    checker = prompts.load_checker(str(model))
    assert checker is not None and checker.context == 64
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": int(1e30)}))  # unset
    checker = prompts.load_checker(str(model))
    assert checker is not None and checker.context == CAUSAL_LM_CONTEXT


def test_a_model_whose_tokenizer_cannot_be_loaded_is_left_to_the_worker(
    client: Client, model_dir: Callable[[str], str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given: a model folder with its config and weights but no tokenizer files
    model = tmp_path / "weights-only"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(model_dir(CHAT)) / name, model / name)
    path = write_jsonl(tmp_path / "gen.jsonl", [{"messages": HELLO}, {"text": long_prompt(400)}])
    # When: submitted
    with caplog.at_level(logging.INFO, logger="pipeq.producer.prompts"):
        job = client.submit(path, task=TASK, model=str(model))
    # Then: the items are stored unchecked, and the log says the worker checks them
    assert job.status().total == 2
    assert "could not be loaded at submit" in caplog.text and "the worker checks each item" in caplog.text


def test_prompts_are_tokenized_a_page_at_a_time(
    client: Client, model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: 2,500 records, prompts and chats interleaved, and a count of the tokenizer's calls
    calls: list[int] = []
    ids = generation.prompt_ids

    def counted(tokenizer: Any, texts: list[str], *, chat: bool) -> list[list[int]]:
        calls.append(len(texts))
        return ids(tokenizer, texts, chat=chat)

    monkeypatch.setattr(generation, "prompt_ids", counted)
    records = [{"text": f"prompt {i}"} if i % 2 else {"messages": [{"role": "user", "content": f"chat {i}"}]}
               for i in range(2500)]  # fmt: skip
    # When: submitted
    job = client.submit(records, task=TASK, model=model_dir(CHAT), params={"max_tokens": 8})
    # Then: one call a page for its prompts and one for its chats (pages of 1,000), not one a record
    assert job.status().total == 2500
    assert calls == [500, 500, 500, 500, 250, 250]


def test_the_check_reads_one_page_ahead_at_most(model_dir: Callable[[str], str]) -> None:
    pulled = 0

    def source() -> Iterator[Record]:
        nonlocal pulled
        for i in range(5 * C.PROMPT_CHECK_RECORDS):
            pulled += 1
            yield Record(i + 1, {"prompt": f"prompt {i}"}, None, 8)

    checker = prompts.load_checker(model_dir(CHAT))
    assert checker is not None
    records = prompts.checked(source(), checker, {"max_tokens": 8}, source="<test>")
    next(records)
    assert pulled == C.PROMPT_CHECK_RECORDS
    assert sum(1 for _ in records) == 5 * C.PROMPT_CHECK_RECORDS - 1
