"""A sentence-transformers model's own recipe (pooling, normalization, input length, prompts) is a job's
default, and its vectors are ``SentenceTransformer(model).encode(texts)``'s."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentence_transformers

from conftest import in_thread_worker
from pipeq import Client, Settings
from pipeq.errors import ConfigurationError, InputError
from pipeq.recipe import read_recipe, resolve
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import load_pipeline

TASK = "feature-extraction"
TEXTS = [
    "A man is playing a guitar.",
    "How do I reset my password?",
    "The restaurant's food was delicious.",
    "short",
    # Over all-MiniLM-L6-v2's max_seq_length of 256 tokens (its tokenizer alone would keep 512).
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),
]


def runtime_vectors(model: str, params: dict[str, Any], texts: list[str] = TEXTS) -> np.ndarray:
    """What a worker stores for ``texts`` under ``params``, as float arrays."""
    loaded = load_pipeline(WorkerConfig(key=ServeKey(TASK, model)))
    rt = PipelineRuntime(loaded.pipe, TASK, max_batch_size=4)
    out = {r.idx: r for results, _ in rt.run(list(enumerate(texts)), params) for r in results}
    assert all(out[i].status == "done" for i in range(len(texts))), [out[i].error for i in range(len(texts))]
    return np.asarray([np.asarray(out[i].output.tolist()) for i in range(len(texts))])


def encode(model: str, texts: list[str] = TEXTS, **kwargs: Any) -> np.ndarray:
    st = sentence_transformers.SentenceTransformer(model, device="cpu")
    return np.asarray(st.encode(texts, **kwargs))


@pytest.fixture(scope="module")
def st_model(model_dir: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny feature-extraction model saved as sentence-transformers saves one (the older file layout):
    CLS pooling, no Normalize, inputs cut at 16 tokens, a default prompt and a second named one."""
    path = Path(shutil.copytree(model_dir(TASK), tmp_path_factory.mktemp("st") / "model"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    prompts = {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"}
    (path / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    return str(path)


def test_minilm_jobs_get_its_recipe_and_sentence_transformers_vectors(minilm_dir: str) -> None:
    # Given: all-MiniLM-L6-v2 as the minilm extra installs it (modules.json: Transformer, mean Pooling, Normalize)
    params = resolve(minilm_dir, {})
    # Then: a job that names nothing gets its recipe, and the vectors SentenceTransformer gives, long text included
    assert params == {"pooling": "mean", "normalize": True, "tokenize_kwargs": {"max_length": 256}}
    np.testing.assert_allclose(runtime_vectors(minilm_dir, params), encode(minilm_dir), atol=1e-5)


def test_a_jobs_own_params_win_over_the_recipe(minilm_dir: str) -> None:
    assert resolve(minilm_dir, {"pooling": "cls"})["pooling"] == "cls"
    assert resolve(minilm_dir, {"normalize": False})["normalize"] is False
    # pooling: null keeps transformers' vector per token (and so no normalization)
    assert resolve(minilm_dir, {"pooling": None}) == {"pooling": None, "tokenize_kwargs": {"max_length": 256}}
    assert resolve(minilm_dir, {"tokenize_kwargs": {"max_length": 8}})["tokenize_kwargs"] == {"max_length": 8}


def test_prompts_cls_pooling_and_length_follow_the_models_files(st_model: str) -> None:
    # Given: a model whose default prompt is "query: " and which has a "passage: " one too
    default = resolve(st_model, {})
    passage = resolve(st_model, {"prompt_name": "passage"})
    # Then: its recipe is read, and its vectors are SentenceTransformer's with the same prompt
    assert default == {"pooling": "cls", "prompt": "query: ", "tokenize_kwargs": {"max_length": 16}}
    assert passage["prompt"] == "passage: "
    np.testing.assert_allclose(runtime_vectors(st_model, default), encode(st_model), atol=1e-5)
    np.testing.assert_allclose(runtime_vectors(st_model, passage), encode(st_model, prompt_name="passage"), atol=1e-5)
    # And: a prompt name the model does not have is refused
    with pytest.raises(ConfigurationError, match="'title' is not one of the model's prompts"):
        resolve(st_model, {"prompt_name": "title"})


def test_a_model_without_the_configuration_keeps_its_params(model_dir: Callable[[str], str]) -> None:
    model = model_dir(TASK)
    assert read_recipe(model) is None
    assert resolve(model, {}) == {}
    with pytest.raises(ConfigurationError, match="has none"):
        resolve(model, {"prompt_name": "query"})


def test_a_recipe_pipeq_cannot_run_is_not_followed_and_says_why(
    st_model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, client: Client
) -> None:
    # Given: a model with a Dense module after its pooling
    model = Path(shutil.copytree(st_model, tmp_path / "dense"))
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    # Then: its jobs keep their own params, with a warning naming why
    with caplog.at_level(logging.WARNING, logger="pipeq.recipe"):
        assert resolve(str(model), {}) == {}
    assert "Transformer, Pooling, Dense" in caplog.text
    # And: an OpenAI batch file on it still needs --param pooling, and is told why
    batch = tmp_path / "batch.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": str(model), "input": "x"}}
    batch.write_text(json.dumps(line) + "\n")
    with pytest.raises(InputError, match="recipe is not followed: its modules are Transformer, Pooling, Dense"):
        client.submit(str(batch), task=TASK, model=str(model), input_format="openai-batch")


@pytest.fixture
def st_worker(settings: Settings, st_model: str) -> Iterator[str]:
    """A real Celery worker (solo pool, in a thread) on the memory broker serving ``st_model``."""
    from pipeq.worker.app import create_worker_app

    cfg = WorkerConfig(key=ServeKey(TASK, st_model), max_batch_size=4, warmup=False)
    app, ctx = create_worker_app(settings, cfg)
    ctx.start()
    with in_thread_worker(app, cfg.key.queue):
        yield st_model
    ctx.stop()


def test_an_openai_batch_file_needs_no_param_and_the_job_records_the_recipe(
    st_worker: str, client: Client, tmp_path: Path
) -> None:
    # Given: a Batch API request file for a sentence-transformers model, submitted without --param
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": st_worker, "input": text}}
        for i, text in enumerate(TEXTS)
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    job = client.submit(str(batch), task=TASK, model=st_worker, input_format="openai-batch")
    assert job.wait(timeout=120).done == len(TEXTS)
    # Then: the job's stored params are the recipe, and its vectors are SentenceTransformer's
    row = client.store.job_row(job.id)
    assert row is not None and row["params"] == resolve(st_worker, {})
    np.testing.assert_allclose(job.to_numpy(), encode(st_worker), atol=1e-5)
