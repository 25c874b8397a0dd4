"""The int8 guard (``--shadow-fraction``): comparing outputs, sampling, and figures recorded on the job."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeq import constants as C
from pipeq.agreement import Comparison, Thresholds, compare
from pipeq.agreement import merge as merge_with
from pipeq.cli import app as cli_app
from pipeq.errors import ConfigurationError
from pipeq.primitives import ItemResult
from pipeq.report import build_report
from pipeq.report.text import format_text, shadow_line
from pipeq.routing import ServeKey
from pipeq.settings import Settings
from pipeq.store import NewItem, Store, new_job_row
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext
from pipeq.worker.shadow import ShadowCheck, in_sample


def merge(current: dict[str, Any] | None, precision: str, found: list[Comparison]) -> dict[str, Any]:
    return merge_with(current, precision, found, Thresholds())


TASK = "text-classification"
TEXTS = [f"some words {i} " * (i % 4 + 1) for i in range(16)]


def submit(store: Store, key: ServeKey, texts: list[str], job_id: str) -> list[list[Any]]:
    rows = [NewItem(i, None, t, len(t)) for i, t in enumerate(texts)]
    store.create_job(new_job_row(job_id, key), [rows])
    return [[i, t] for i, t in enumerate(texts)]


# ------------------------------------------------------------- comparing


def test_compare_text_classification() -> None:
    same = compare({"label": "POS", "score": 0.91}, {"label": "POS", "score": 0.95})
    assert same.label_agree is True and same.score_diff == pytest.approx(0.04) and same.cosine is None
    assert compare({"label": "NEG", "score": 0.51}, {"label": "POS", "score": 0.52}).label_agree is False


def test_compare_top_k_lists_by_their_best_label() -> None:
    served = [{"label": "a", "score": 0.5}, {"label": "b", "score": 0.3}, {"label": "c", "score": 0.2}]
    reference = [{"label": "b", "score": 0.45}, {"label": "a", "score": 0.44}, {"label": "c", "score": 0.11}]
    c = compare(served, reference)
    assert c.label_agree is False and c.score_diff == pytest.approx(0.15)


def test_compare_zero_shot_matches_scores_by_label() -> None:
    served = {"sequence": "s", "labels": ["x", "y"], "scores": [0.7, 0.3]}
    reference = {"sequence": "s", "labels": ["x", "y"], "scores": [0.6, 0.4]}
    c = compare(served, reference)
    assert c.label_agree is True and c.score_diff == pytest.approx(0.1)
    flipped = {"sequence": "s", "labels": ["y", "x"], "scores": [0.55, 0.45]}
    assert compare(served, flipped).label_agree is False


def test_compare_entities_by_span_and_label() -> None:
    served = [
        {"entity_group": "PER", "score": 0.9, "word": "ann", "start": 0, "end": 3},
        {"entity_group": "LOC", "score": 0.8, "word": "oslo", "start": 12, "end": 16},
    ]
    reference = [
        {"entity_group": "PER", "score": 0.85, "word": "ann", "start": 0, "end": 3},
        {"entity_group": "LOC", "score": 0.7, "word": "oslo", "start": 12, "end": 16},
    ]
    c = compare(served, reference)
    assert c.label_agree is True and c.score_diff == pytest.approx(0.1)
    assert compare(served, reference[:1]).label_agree is False
    assert compare([], []).label_agree is True


def test_compare_vectors_by_cosine_generated_text_by_identity_and_other_outputs_not_at_all() -> None:
    assert compare([[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 0.0], [0.0, 1.0]]]).cosine == pytest.approx(1.0)
    assert compare([1.0, 0.0], [0.0, 1.0]).cosine == pytest.approx(0.0)
    assert compare([1.0, 1.0], [1.0, 1.0, 1.0]) == Comparison()
    assert compare([{"generated_text": "a"}], [{"generated_text": "b"}]) == Comparison(label_agree=False)
    assert compare({"answer": "x", "score": 0.5}, {"answer": "x", "score": 0.4}) == Comparison()


def test_merge_accumulates_over_batches() -> None:
    first = merge(None, "int8", [Comparison(True, 0.01), Comparison(False, 0.2)])
    assert first == {
        "precision": "int8",
        "sampled": 2,
        "labelled": 2,
        "label_agree": 1,
        "clear": 2,
        "clear_agree": 1,
        "max_score_diff": 0.2,
        "min_cosine": None,
        "thresholds": Thresholds().as_record(),
    }
    second = merge(first, "int8", [Comparison(True, 0.05), Comparison()])
    assert (second["sampled"], second["labelled"], second["label_agree"], second["max_score_diff"]) == (4, 3, 2, 0.2)
    vectors = merge(None, "bf16", [Comparison(cosine=0.99), Comparison(cosine=0.97)])
    assert vectors["min_cosine"] == 0.97 and vectors["label_agree"] is None
    assert shadow_line(first) == "int8 vs fp32 on 2 sampled items: top label identical on 1 (50.0%), " + (
        "largest score difference 0.2000"
    )
    assert shadow_line(vectors) == "bf16 vs fp32 on 2 sampled items: lowest cosine similarity 0.9700 (mean 0.9800)"


def test_sample_is_deterministic_and_near_the_fraction() -> None:
    picks = [in_sample("job", i, 0.25) for i in range(4000)]
    assert picks == [in_sample("job", i, 0.25) for i in range(4000)]
    assert 0.2 < sum(picks) / len(picks) < 0.3
    assert all(in_sample("job", i, 1.0) for i in range(100)) and not any(in_sample("job", i, 0.0) for i in range(100))


# ----------------------------------------------------------- configuration


def test_fp32_worker_with_shadow_is_refused(model_dir: Callable[[str], str], sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError, match="nothing to compare"):
        WorkerConfig(key=ServeKey(TASK, model_dir(TASK), "fp32"), shadow_fraction=0.5).check_shadow()
    WorkerConfig(key=ServeKey(TASK, model_dir(TASK), "int8"), shadow_fraction=0.5).check_shadow()
    with pytest.raises(ConfigurationError, match="shadow-fraction"):
        WorkerConfig(key=ServeKey(TASK, model_dir(TASK), "int8"), shadow_fraction=1.5)
    env = {"PIPEQ_BROKER_URL": "memory://", "PIPEQ_DATABASE_URL": sqlite_url}
    args = ["worker", "--task", TASK, "--model", model_dir(TASK), "--precision", "fp32", "--shadow-fraction", "0.5"]
    out = CliRunner().invoke(cli_app, args, env=env)
    assert out.exit_code == 2 and "nothing to compare" in out.output


# ------------------------------------------------------------ worker runs


def start(sqlite_url: str, model: str, task: str, fraction: float, **options: Any) -> WorkerContext:
    cfg = WorkerConfig(
        key=ServeKey(task, model, "int8"), max_batch_size=4, warmup=False, shadow_fraction=fraction, **options
    )
    context = WorkerContext(Settings(broker_url="memory://", database_url=sqlite_url), cfg)
    context.start()
    return context


@pytest.fixture
def int8_ctx(sqlite_url: str, model_dir: Callable[[str], str]) -> Iterator[WorkerContext]:
    context = start(sqlite_url, model_dir(TASK), TASK, 1.0)
    yield context
    context.stop()


def test_every_done_item_is_compared_at_fraction_one(int8_ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    counts = int8_ctx.run_chunk("job", submit(store, int8_ctx.cfg.key, TEXTS, "job"), None)
    assert counts["done"] == len(TEXTS)
    assert int8_ctx.shadow is not None and int8_ctx.shadow.drain(timeout=60)
    shadow = store.job("job").shadow
    assert shadow is not None and shadow["precision"] == "int8"
    assert shadow["sampled"] == shadow["labelled"] == len(TEXTS)
    assert 0 <= shadow["label_agree"] <= shadow["sampled"]
    assert shadow["max_score_diff"] >= 0 and shadow["min_cosine"] is None
    # Shown by status and the report
    env = {"PIPEQ_DATABASE_URL": sqlite_url}
    status = json.loads(CliRunner().invoke(cli_app, ["status", "job", "--json"], env=env).stdout)
    assert status["shadow"] == shadow
    assert f"int8 vs fp32 on {len(TEXTS)} sampled items: top label identical on" in format_text(
        build_report(store, "job")
    )
    assert "shadow check: int8 vs fp32" in CliRunner().invoke(cli_app, ["status", "job"], env=env).stdout


def test_half_the_items_sampled_deterministically(sqlite_url: str, model_dir: Callable[[str], str]) -> None:
    context = start(sqlite_url, model_dir(TASK), TASK, 0.5)
    store = Store(sqlite_url)
    try:
        for job_id in ("job-a", "job-b"):
            context.run_chunk(job_id, submit(store, context.cfg.key, TEXTS, job_id), None)
    finally:
        context.stop()
    for job_id in ("job-a", "job-b"):
        expected = sum(in_sample(job_id, i, 0.5) for i in range(len(TEXTS)))
        assert 0 < expected < len(TEXTS)
        assert store.job(job_id).shadow["sampled"] == expected  # type: ignore[index]


def test_a_job_is_sampled_up_to_its_cap_over_its_chunks(sqlite_url: str, model_dir: Callable[[str], str]) -> None:
    context = start(sqlite_url, model_dir(TASK), TASK, 1.0, shadow_max_items=5)
    store = Store(sqlite_url)
    try:
        message = submit(store, context.cfg.key, TEXTS, "job")
        assert len(message) > 5
        context.run_chunk("job", message[:3], None)
        assert context.shadow is not None and context.shadow.drain(timeout=60)
        assert store.job("job").shadow["sampled"] == 3  # type: ignore[index]
        context.run_chunk("job", message[3:], None)  # the job has 3 compared: 2 more of this chunk
        assert context.shadow.drain(timeout=60)
    finally:
        context.stop()
    assert store.job("job").shadow["sampled"] == 5  # type: ignore[index]
    assert store.job("job").done == len(TEXTS), "the cap stops the check, never the results"


def test_the_cap_on_sampled_items_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="--shadow-max-items must be 0"):
        WorkerConfig(key=ServeKey(TASK, "/m", "int8"), shadow_max_items=-1)


def test_embeddings_record_cosine(sqlite_url: str, model_dir: Callable[[str], str]) -> None:
    task = "feature-extraction"
    context = start(sqlite_url, model_dir(task), task, 1.0)
    store = Store(sqlite_url)
    try:
        context.run_chunk("emb", submit(store, context.cfg.key, TEXTS[:6], "emb"), None)
    finally:
        context.stop()
    shadow = store.job("emb").shadow
    assert shadow is not None and shadow["sampled"] == 6 and shadow["label_agree"] is None
    assert 0.0 < shadow["min_cosine"] <= 1.0 + 1e-9


def test_a_failing_shadow_run_fails_no_item(
    int8_ctx: WorkerContext, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert int8_ctx.shadow is not None

    def broken(*args: Any, **kwargs: Any) -> Iterator[Any]:
        raise RuntimeError("fp32 copy exploded")

    monkeypatch.setattr(int8_ctx.shadow.runtime, "run", broken)
    store = Store(sqlite_url)
    with caplog.at_level(logging.WARNING, logger="pipeq.worker.shadow"):
        counts = int8_ctx.run_chunk("job", submit(store, int8_ctx.cfg.key, TEXTS, "job"), None)
        assert int8_ctx.shadow.drain(timeout=60)
    assert counts["done"] == len(TEXTS) and store.job("job").status == C.JOB_DONE
    assert store.job("job").shadow is None
    assert "shadow check of" in caplog.text and "fp32 copy exploded" in caplog.text


# ------------------------------------------------------- the shadow thread


def test_the_fp32_runs_wait_for_no_write_and_the_figures_follow(
    int8_ctx: WorkerContext, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose fp32 copy is stuck until released
    shadow = int8_ctx.shadow
    assert shadow is not None
    release, started = threading.Event(), threading.Event()
    real_run = shadow.runtime.run

    def stuck(*args: Any, **kwargs: Any) -> Iterator[Any]:
        started.set()
        release.wait(60)
        yield from real_run(*args, **kwargs)

    monkeypatch.setattr(shadow.runtime, "run", stuck)
    store = Store(sqlite_url)
    # When a chunk runs, every item sampled (fraction 1.0)
    counts = int8_ctx.run_chunk("job", submit(store, int8_ctx.cfg.key, TEXTS, "job"), None)
    # Then its results are committed and the job is done while the fp32 run is still held up
    assert counts["done"] == len(TEXTS) and store.job("job").status == C.JOB_DONE
    assert not release.is_set() and store.job("job").shadow is None
    # And once the fp32 copy runs, the figures follow: every sampled item compared
    release.set()
    assert shadow.drain(timeout=60) and started.is_set()
    assert store.job("job").shadow["sampled"] == len(TEXTS)  # type: ignore[index]


class FakeRuntime:
    """The fp32 copy: records each run's items (and the torch threads it ran on), blocks while ``gate`` is clear."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.threads: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.closed = False

    def run(self, items: list[tuple[int, Any]], params: dict[str, Any]) -> Iterator[Any]:
        import torch

        self.started.set()
        self.gate.wait(60)
        self.runs.append([idx for idx, _ in items])
        self.threads.append(torch.get_num_threads())
        yield [ItemResult(idx, C.ITEM_DONE, output={"label": "POS", "score": 0.5}) for idx, _ in items], None

    def close(self) -> None:
        self.closed = True


class FakeStore:
    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}

    def update_shadow(self, job_id: str, merge: Callable[[Any], Any]) -> None:
        self.figures[job_id] = merge(self.figures.get(job_id))


def shadow_check(runtime: FakeRuntime, store: FakeStore, **kwargs: Any) -> ShadowCheck:
    return ShadowCheck(store, runtime, fraction=1.0, precision="int8", **kwargs)  # type: ignore[arg-type]


def written(check: ShadowCheck, job_id: str, idxs: range) -> None:
    """What the writer thread does after committing a batch of ``idxs``."""
    check.begin(job_id, {}, [(i, f"text {i}") for i in idxs])
    check.after_write(job_id, [ItemResult(i, C.ITEM_DONE, output={"label": "POS", "score": 0.5}) for i in idxs])


def test_sampled_items_run_in_batches_of_the_check_not_of_the_writes() -> None:
    runtime, store = FakeRuntime(), FakeStore()
    check = shadow_check(runtime, store, batch=8, wait_seconds=3600, torch_threads=1)
    import torch

    before = torch.get_num_threads()
    try:
        # Five writes of three items: the thread runs them eight at a time as they come
        for first in range(0, 15, 3):
            written(check, "job", range(first, first + 3))
        deadline = time.monotonic() + 60
        while len(runtime.runs) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.runs == [list(range(8))]
        # And a drain runs the rest at once, then their figures are on the job
        assert check.drain(timeout=60)
        assert runtime.runs == [list(range(8)), list(range(8, 15))]
        assert store.figures["job"]["sampled"] == 15
        # On the torch threads it was given, without changing this thread's
        assert runtime.threads == [1, 1] and torch.get_num_threads() == before
    finally:
        check.close()
        torch.set_num_threads(before)
    assert runtime.closed


def test_a_sample_waits_at_most_the_check_s_seconds_for_company() -> None:
    runtime, store = FakeRuntime(), FakeStore()
    check = shadow_check(runtime, store, batch=32, wait_seconds=0.2)
    try:
        written(check, "job", range(2))
        deadline = time.monotonic() + 60
        while "job" not in store.figures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.runs == [[0, 1]] and store.figures["job"]["sampled"] == 2
    finally:
        check.close()


def test_the_writer_waits_for_the_check_only_when_its_backlog_is_full() -> None:
    runtime, store = FakeRuntime(), FakeStore()
    runtime.gate.clear()  # the fp32 copy is stuck
    check = shadow_check(runtime, store, batch=4, backlog=8, wait_seconds=0.0)
    try:
        written(check, "job", range(0, 4))  # taken by the thread, which is now stuck in its run
        assert runtime.started.wait(60)
        written(check, "job", range(4, 12))  # eight wait: the backlog is full, the writer went on
        blocked = threading.Thread(target=written, args=(check, "job", range(12, 14)))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive()  # the next write waits for room
        runtime.gate.set()
        blocked.join(60)
        assert not blocked.is_alive()
        assert check.drain(timeout=60)
        # Nothing was dropped
        assert sorted(i for run in runtime.runs for i in run) == list(range(14))
        assert store.figures["job"]["sampled"] == 14
    finally:
        runtime.gate.set()
        check.close()


def test_a_chunk_samples_only_what_its_job_has_left_under_the_cap() -> None:
    runtime, store = FakeRuntime(), FakeStore()
    check = shadow_check(runtime, store, max_items=10, wait_seconds=3600)
    try:
        for sampled, idxs, picked in ((0, range(8), 8), (8, range(8, 16), 2), (10, range(16, 24), 0)):
            check.begin("job", {}, [(i, f"text {i}") for i in idxs], sampled=sampled)
            assert len(check._inputs) == picked
        uncapped = shadow_check(runtime, store, max_items=0)
        uncapped.begin("job", {}, [(i, "x") for i in range(24)], sampled=10_000)
        assert len(uncapped._inputs) == 24, "0: no cap"
        uncapped.close()
    finally:
        check.close()


def test_samples_of_two_jobs_are_compared_and_counted_apart() -> None:
    runtime, store = FakeRuntime(), FakeStore()
    check = shadow_check(runtime, store, batch=32, wait_seconds=3600)
    try:
        written(check, "a", range(3))
        written(check, "b", range(5))
        assert check.drain(timeout=60)
        assert sorted(runtime.runs) == [[0, 1, 2], [0, 1, 2, 3, 4]]
        assert (store.figures["a"]["sampled"], store.figures["b"]["sampled"]) == (3, 5)
    finally:
        check.close()


def test_close_compares_what_waits_and_gives_up_on_a_stuck_run(caplog: pytest.LogCaptureFixture) -> None:
    runtime, store = FakeRuntime(), FakeStore()
    check = shadow_check(runtime, store, batch=32, wait_seconds=3600)
    written(check, "job", range(3))
    check.close()
    assert store.figures["job"]["sampled"] == 3 and runtime.closed
    # A stopping worker whose fp32 copy hangs stops anyway, and says what it left
    runtime, store = FakeRuntime(), FakeStore()
    runtime.gate.clear()
    check = shadow_check(runtime, store, batch=32, wait_seconds=3600)
    written(check, "job", range(3))
    with caplog.at_level(logging.WARNING, logger="pipeq.worker.shadow"):
        check.close(timeout=0.3)
    assert "3 sampled items not compared" in caplog.text and "job" not in store.figures
    runtime.gate.set()
