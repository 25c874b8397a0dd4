"""--precision auto's accuracy gate: per-task agreement metrics, the thresholds, a damaged precision refused,
and the default worker on real all-MiniLM-L6-v2 weights serving embeddings within the threshold of fp32."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeq import Client, Settings, routing
from pipeq import constants as C
from pipeq.agreement import Comparison, Thresholds, compare, merge, shortfalls
from pipeq.demo import EMBEDDING_PARAMS, sample_texts
from pipeq.errors import ConfigurationError
from pipeq.precisions import PRECISIONS, Precision
from pipeq.report.text import shadow_warning
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.worker import autotune
from pipeq.worker.autotune import choose_precision, summarize
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.gate import calibration_inputs, calibration_texts
from pipeq.worker.loading import load_pipeline

EMBED = "feature-extraction"


def figures(found: list[Comparison], thresholds: Thresholds | None = None) -> dict[str, Any]:
    return merge(None, "int8", found, thresholds or Thresholds())


# ------------------------------------------------------------ metrics per task


def test_classification_counts_top_labels_only_where_fp32_is_clear() -> None:
    # fp32 0.50 / 0.48: a tie, so the flip is not counted; 0.9 / 0.1 is clear and kept
    tie = compare(
        [{"label": "b", "score": 0.495}, {"label": "a", "score": 0.485}],
        [{"label": "a", "score": 0.50}, {"label": "b", "score": 0.48}],
    )
    kept = compare([{"label": "a", "score": 0.89}, {"label": "b", "score": 0.11}], [
        {"label": "a", "score": 0.90}, {"label": "b", "score": 0.10}])  # fmt: skip
    assert (tie.label_agree, tie.margin) == (False, pytest.approx(0.02))
    f = figures([tie, kept])
    assert (f["labelled"], f["label_agree"], f["clear"], f["clear_agree"]) == (2, 1, 1, 1)
    assert shortfalls(f, "text-classification") == []
    flipped = compare({"label": "b", "score": 0.6}, {"label": "a", "score": 0.8})  # top label only: margin >= 0.6
    assert flipped.margin == pytest.approx(0.6)
    assert shortfalls(figures([kept, flipped]), "text-classification") == [
        "top label identical on 50.0% < 99%",
        "probability difference max 0.200 > 0.02",
    ]


def test_zero_shot_and_score_difference() -> None:
    c = compare({"labels": ["x", "y"], "scores": [0.7, 0.3]}, {"labels": ["x", "y"], "scores": [0.67, 0.33]})
    assert c.label_agree and c.score_diff == pytest.approx(0.03)
    assert shortfalls(figures([c]), "zero-shot-classification") == ["probability difference max 0.030 > 0.02"]
    assert shortfalls(figures([c]), "zero-shot-classification", Thresholds(max_score_diff=0.05)) == []


def test_token_classification_by_entity_span_and_label() -> None:
    ann = {"entity_group": "PER", "score": 0.9, "word": "ann", "start": 0, "end": 3}
    moved = {**ann, "end": 4}
    f = figures([compare([ann], [ann])] * 99 + [compare([moved], [ann])])
    assert (f["clear"], f["clear_agree"]) == (100, 99) and shortfalls(f, "token-classification") == []
    f = figures([compare([ann], [ann])] * 9 + [compare([moved], [ann])])
    assert shortfalls(f, "token-classification") == ["entity spans and labels identical on 90.0% < 99%"]


def test_fill_mask_and_generation_by_token_identity() -> None:
    same = compare([{"token_str": "cat", "score": 0.6}, {"token_str": "dog", "score": 0.3}], [
        {"token_str": "cat", "score": 0.55}, {"token_str": "dog", "score": 0.35}])  # fmt: skip
    other = compare([{"token_str": "dog", "score": 0.5}, {"token_str": "cat", "score": 0.4}], [
        {"token_str": "cat", "score": 0.7}, {"token_str": "dog", "score": 0.2}])  # fmt: skip
    assert same.label_agree and other.label_agree is False
    # fill-mask is judged on the top token alone, not on its probability
    assert shortfalls(figures([same, other]), "fill-mask") == ["top token identical on 50.0% < 99%"]
    gen = [compare([{"generated_text": "a b c"}], [{"generated_text": t}]) for t in ("a b c", "a b d")]
    assert shortfalls(figures(gen), "text-generation") == ["generated tokens identical on 50.0% < 99%"]


def test_embeddings_by_cosine_on_every_text() -> None:
    good, bad = compare([1.0, 0.0], [1.0, 0.01]), compare([1.0, 0.2], [1.0, 0.0])
    f = figures([good, bad])
    assert f["min_cosine"] == pytest.approx(bad.cosine) and f["cosines"] == 2
    assert shortfalls(f, EMBED) == [f"embedding cosine min {bad.cosine:.3f} < 0.99"]
    assert shortfalls(figures([good]), EMBED) == []
    # The record keeps the thresholds it was judged by: a shadow warning uses the worker's own.
    strict = figures([good], Thresholds(min_cosine=0.99999))
    assert "embedding cosine min" in str(shadow_warning(strict, EMBED))
    assert shadow_warning(figures([good]), EMBED) is None


def test_thresholds_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="--min-cosine must be between 0 and 1"):
        Thresholds(min_cosine=1.5)
    assert Thresholds.from_record({"min_cosine": 0.9, "other": 1}) == Thresholds(min_cosine=0.9)


def test_summary_names_what_was_refused_and_why() -> None:
    line = summarize(
        "bf16",
        {"fp32": 40.0, "bf16": 76.0, "int8": 104.0},
        {"int8": ["embedding cosine min 0.944 < 0.99"]},
        {"bf16": figures([Comparison(cosine=0.99991)])},
        EMBED,
    )
    assert line == (
        "auto: int8 2.6x but embedding cosine min 0.944 < 0.99, serving bf16 1.9x "
        "(embedding cosine min 0.9999, mean 0.9999 on 1 texts)"
    )


# ------------------------------------------------------------ calibration texts


def test_shipped_calibration_texts_are_english_and_chinese_of_uneven_length(
    tmp_path: Path, model_dir: Callable[[str], str]
) -> None:
    texts = calibration_texts(None)
    chinese = [t for t in texts if any("\u4e00" <= ch <= "\u9fff" for ch in t)]
    assert len(texts) >= 50 and 10 <= len(chinese) < len(texts) - 10
    lengths = sorted(len(t) for t in texts)
    assert lengths[0] < 10 and lengths[-1] > 10 * lengths[len(lengths) // 2] // 3
    own = tmp_path / "mine.txt"
    own.write_text("one text\n\n  another text  \n", encoding="utf-8")
    assert calibration_texts(str(own)) == ["one text", "another text"]
    own.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="no texts in it"):
        calibration_texts(str(own))
    with pytest.raises(ConfigurationError, match="cannot read it"):
        calibration_texts(str(tmp_path / "missing.txt"))
    pipe = load_pipeline(WorkerConfig(key=ServeKey("fill-mask", model_dir("fill-mask"), "fp32"))).pipe
    masked = calibration_inputs(pipe, "fill-mask", ["a b c", "天气很好"])
    assert masked == [f"a {pipe.tokenizer.mask_token} c", f"天气{pipe.tokenizer.mask_token}好"]


# ------------------------------------------------------------ the gate


def _noisy_weights(pipe: Any, cfg: WorkerConfig) -> str:
    """A deliberately damaged 'precision': fp32 weights with noise a third of their own spread."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * p.std() / 3)
    return "noise"


def test_auto_refuses_a_precision_that_fails_the_gate(
    model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a damaged precision in the registry, measured in this process (a spawned one would not see it)
    monkeypatch.setitem(PRECISIONS, "noisy", Precision("noisy", "float32", "damaged", after_load=_noisy_weights))
    monkeypatch.setattr(routing, "PRECISIONS", (*routing.PRECISIONS, "noisy"))
    monkeypatch.setattr(autotune, "in_subprocess", lambda fn, *args: fn(*args))
    key = ServeKey(EMBED, model_dir(EMBED), "auto")
    # When auto may pick it or fp32
    cfg = choose_precision(WorkerConfig(key=key, allowed_precisions=("noisy", "fp32"), warmup=False), min_seconds=0)
    # Then it serves fp32, and says why not the other, whatever their speeds
    choice = cfg.precision_choice
    assert choice is not None and cfg.key.precision == choice["chosen"] == "fp32"
    assert set(choice["measured"]) == {"fp32", "noisy"}
    assert choice["agreement"]["noisy"]["min_cosine"] < 0.99
    # (and, as both load float32 weights, maybe for a speed that measured a little below fp32's)
    assert (
        choice["refused"]["noisy"][0] == f"embedding cosine min {choice['agreement']['noisy']['min_cosine']:.3f} < 0.99"
    )
    assert all("fp32's speed here" in why for why in choice["refused"]["noisy"][1:])
    assert choice["summary"].endswith("serving fp32 1.0x") and choice["calibration_texts"]["source"] == "built-in"
    # With looser thresholds it is eligible again; with no fp32 to fall back on, auto refuses to start
    loose = WorkerConfig(key=key, allowed_precisions=("noisy",), warmup=False, thresholds=Thresholds(min_cosine=0.0))
    assert choose_precision(loose, min_seconds=0).key.precision == "noisy"
    with pytest.raises(ConfigurationError, match="no allowed precision is both faster than fp32 and within"):
        choose_precision(WorkerConfig(key=key, allowed_precisions=("noisy",), warmup=False), min_seconds=0)


# ------------------------------------------------------------ real weights, default path

#: Real Chinese sentences besides the demo's English ones (none of them among the calibration texts).
CHINESE = [
    "我昨天在书店买了两本小说，晚上一口气读完了一本。",
    "这个周末我们打算去郊外爬山，如果天气好的话还会在山上露营。",
    "地铁又晚点了。",
    "新开的咖啡馆环境很安静，很适合一个人坐下来看书或者工作。",
    "医生建议他少吃油腻的食物，多喝水，并且每天坚持锻炼身体。",
]


@pytest.mark.integration
def test_default_worker_on_minilm_serves_embeddings_within_the_threshold_of_fp32(
    minilm_dir: str, sqlite_url: str, redis_url: str, start_worker: Any
) -> None:
    # Given a worker with the defaults (--precision auto) and a job that names no precision
    worker = start_worker("--task", EMBED, "--model", minilm_dir, "--no-warmup",
                          broker_url=redis_url, database_url=sqlite_url)  # fmt: skip
    store = Store(sqlite_url)
    deadline = time.monotonic() + 240
    while not any(w["status"] == "ready" for w in store.live_workers()):
        assert worker.proc.poll() is None and time.monotonic() < deadline, worker.log()[-4000:]
        time.sleep(0.5)
    texts = sample_texts() + CHINESE
    with Client(Settings(broker_url=redis_url, database_url=sqlite_url)) as client:
        job = client.submit(texts, task=EMBED, model=minilm_dir, params=dict(EMBEDDING_PARAMS))
        assert job.wait(timeout=120).done == len(texts)
        served = np.asarray([r["output"] for r in job.results()])
    # Then every stored embedding is within cosine 0.99 of fp32's
    pipe = load_pipeline(WorkerConfig(key=ServeKey(EMBED, minilm_dir, "fp32"))).pipe
    out = {
        r.idx: r.output
        for b, _ in PipelineRuntime(pipe, EMBED).run(list(enumerate(texts)), EMBEDDING_PARAMS)
        for r in b
    }
    reference = np.asarray([out[i] for i in range(len(texts))])
    cosines = (served * reference).sum(axis=1)  # both normalised
    assert cosines.min() >= 0.99, cosines
    # And the worker row and `pipeq workers` say what auto chose, how fast, and how close each candidate came
    (row,) = store.live_workers()
    choice = row["precision_choice"]
    assert row["precision"] == choice["chosen"] and set(choice["measured"]) >= {"fp32", choice["chosen"]}
    assert all(choice["agreement"][p]["min_cosine"] >= 0.99 for p in choice["agreement"] if p not in choice["refused"])
    assert all(
        re.search(r"embedding cosine min|fp32's speed here", " ".join(why)) for why in choice["refused"].values()
    )
    env = {**os.environ, "PIPEQ_DATABASE_URL": sqlite_url}
    listed = subprocess.run([sys.executable, "-m", "pipeq", "workers"], env=env, capture_output=True, text=True,
                            timeout=60, check=True).stdout  # fmt: skip
    assert choice["summary"] in listed
    # A lower precision checks a sample of each job against fp32 by default; fp32 has nothing to compare with
    assert row["settings"]["shadow_fraction"] == (0.0 if choice["chosen"] == "fp32" else C.DEFAULT_SHADOW_FRACTION)
    store.close()
