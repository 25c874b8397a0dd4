"""Sentence embeddings: feature-extraction jobs with ``pooling`` and ``normalize``, checked against the model itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, pipeline

from pipeq import Client
from pipeq.errors import ConfigurationError
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.embedding import EmbeddingPipeline
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import load_pipeline

TASK = "feature-extraction"
#: Uneven lengths, so every micro-batch pads most of its rows.
TEXTS = [" ".join(["word"] * (1 + (i * 7) % 23)) + f" number {i}" for i in range(14)]


@pytest.fixture(scope="module")
def runtime(model_dir: Callable[[str], str]) -> PipelineRuntime:
    loaded = load_pipeline(WorkerConfig(key=ServeKey(TASK, model_dir(TASK))))
    assert isinstance(loaded.pipe, EmbeddingPipeline), "workers serve feature-extraction with pooling"
    return PipelineRuntime(loaded.pipe, TASK, max_batch_size=4)


def run(rt: PipelineRuntime, params: dict[str, Any], texts: list[str] = TEXTS) -> list[Any]:
    out = {r.idx: r for results, _ in rt.run(list(enumerate(texts)), params) for r in results}
    assert all(out[i].status == "done" for i in range(len(texts))), [out[i].error for i in out]
    return [out[i].output for i in range(len(texts))]


def model_vectors(path: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The model run directly on one padded batch: (hidden states, attention mask)."""
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    return hidden.numpy(), enc["attention_mask"].numpy().astype(bool)


def test_without_pooling_output_is_transformers_own(runtime: PipelineRuntime, model_dir: Callable[[str], str]) -> None:
    reference = pipeline(TASK, model=model_dir(TASK))(TEXTS, truncation=True)
    got = run(runtime, {})
    for want, have in zip(reference, got, strict=True):
        assert np.asarray(have).shape == np.asarray(want).shape  # [1, tokens, width]: no padding left in
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_pooling_over_real_tokens_only(runtime: PipelineRuntime, model_dir: Callable[[str], str], pooling: str) -> None:
    hidden, mask = model_vectors(model_dir(TASK), TEXTS)
    assert not mask.all(), "the reference batch pads, so padded positions would show if pooled"
    pick = {"mean": lambda h: h.mean(0), "cls": lambda h: h[0], "max": lambda h: h.max(0)}[pooling]
    want = np.stack([pick(h[m]) for h, m in zip(hidden, mask, strict=True)])
    got = np.asarray(run(runtime, {"pooling": pooling}))
    assert got.shape == (len(TEXTS), hidden.shape[-1]), "one vector per text"
    np.testing.assert_allclose(got, want, atol=1e-5)
    normalized = np.asarray(run(runtime, {"pooling": pooling, "normalize": True}))
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(normalized, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_plain_transformers_batches_pool_the_same(runtime: PipelineRuntime, model_dir: Callable[[str], str]) -> None:
    # The pipeline class also works outside pipeq: transformers' own batching leaves padding in, the mask skips it.
    pipe = pipeline(TASK, model=model_dir(TASK), pipeline_class=EmbeddingPipeline)
    theirs = np.asarray(pipe(TEXTS, batch_size=8, truncation=True, pooling="mean"))
    np.testing.assert_allclose(theirs, np.asarray(run(runtime, {"pooling": "mean"})), atol=1e-5)


def test_a_custom_class_without_pooling_refuses_it_instead_of_storing_token_vectors(
    model_dir: Callable[[str], str],
) -> None:
    # transformers' FeatureExtractionPipeline swallows unknown keywords, so pooling would vanish silently.
    rt = PipelineRuntime(pipeline(TASK, model=model_dir(TASK)), TASK)
    with pytest.raises(ConfigurationError, match="pooling need pipeq's embedding pipeline.*FeatureExtractionPipeline"):
        rt.stage_params({"pooling": "mean"})
    assert rt.stage_params({})  # without pooling, the custom class serves the job as it is


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"pooling": "sum"}, "pooling must be one of mean, cls, max"),
        ({"pooling": "mean", "normalize": "yes"}, "normalize must be true or false"),
        ({"normalize": True}, "normalize needs pooling"),
    ],
)
def test_bad_pooling_is_refused_at_submit_and_nothing_is_stored(
    client: Client, model_dir: Callable[[str], str], params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        client.submit(TEXTS, task=TASK, model=model_dir(TASK), params=params)
    assert client.store.recent_jobs() == []


def test_pooled_job_end_to_end(thread_embedding_worker: Any, client: Client) -> None:
    """A real worker stores one unit vector per text, and the timing rows with it."""
    job = client.submit(TEXTS, task=TASK, model=thread_embedding_worker, params={"pooling": "mean", "normalize": True})
    state = job.wait(timeout=120)
    assert state.done == len(TEXTS) and state.failed == 0
    rows = list(job.results())
    vectors = np.asarray([r["output"] for r in rows])
    assert vectors.ndim == 2 and vectors.shape[0] == len(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert all(r["timing"]["forward_ms"] > 0 for r in rows)


def test_a_jobs_own_tokenize_kwargs_win_over_the_truncation_default(runtime: PipelineRuntime) -> None:
    params = {"tokenize_kwargs": {"truncation": True, "max_length": 8}, "pooling": "mean"}
    out = {r.idx: r for results, _ in runtime.run(list(enumerate(TEXTS)), params) for r in results}
    assert all(r.status == "done" for r in out.values()), [r.error for r in out.values()]
    assert max(r.n_tokens for r in out.values()) == 8
    assert {r.truncated for r in out.values()} == {True, False}, "long texts flagged, short ones not"
