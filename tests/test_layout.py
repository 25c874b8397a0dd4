"""The stage layouts a worker chooses between, and how it chooses: serial on every core until real batches
show that preprocessing outweighs what one torch thread fewer can cost the forward pass."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from pipeq import Settings
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext
from pipeq.worker.layout import Layout, candidates, forward_slowdown, from_stages
from pipeq.worker.runtime import PREFETCH


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_candidates_put_serial_on_every_core_first() -> None:
    assert candidates("cpu", 4, fixed_threads=False) == [Layout(4, 0), Layout(4, PREFETCH), Layout(3, PREFETCH)]
    # Threads the user fixed are kept; one thread has no fewer to try.
    assert candidates("cpu", 4, fixed_threads=True) == [Layout(4, 0), Layout(4, PREFETCH)]
    assert candidates("cpu", 1, fixed_threads=False) == [Layout(1, 0), Layout(1, PREFETCH)]
    # A GPU's host threads are free while it computes: overlapped, nothing to choose.
    assert candidates("cuda:0", 8, fixed_threads=False) == [Layout(8, PREFETCH)]


def test_overlapped_only_where_it_is_predicted_clearly_faster() -> None:
    two = candidates("cpu", 2, fixed_threads=False)
    # Not measured: one thread fewer may double the forward pass, so preprocessing must outweigh it.
    assert from_stages(two, preprocess_seconds=1.5, forward_seconds=1.0) == Layout(1, PREFETCH)
    assert from_stages(two, preprocess_seconds=0.9, forward_seconds=1.0) == Layout(2, 0)
    # Measured: a near-free model's forward pass barely slows on one thread, MiniLM's nearly doubles.
    assert from_stages(two, preprocess_seconds=0.5, forward_seconds=1.0, slowdown=1.05) == Layout(1, PREFETCH)
    assert from_stages(two, preprocess_seconds=0.1, forward_seconds=1.0, slowdown=1.8) == Layout(2, 0)
    # Sixteen cores: one fewer costs the forward pass at most 1/15.
    sixteen = candidates("cpu", 16, fixed_threads=False)
    assert from_stages(sixteen, preprocess_seconds=0.3, forward_seconds=1.0) == Layout(15, PREFETCH)
    assert from_stages(sixteen, preprocess_seconds=0.05, forward_seconds=1.0) == Layout(16, 0)
    # Fixed threads: the prepare thread would take a core from the forward pass, so only when P > F.
    fixed = candidates("cpu", 4, fixed_threads=True)
    assert from_stages(fixed, preprocess_seconds=0.9, forward_seconds=1.0) == Layout(4, 0)
    assert from_stages(fixed, preprocess_seconds=1.1, forward_seconds=1.0) == Layout(4, PREFETCH)
    assert from_stages(candidates("cuda:0", 8, fixed_threads=False), 5.0, 1.0) == Layout(8, PREFETCH)


def test_forward_slowdown_is_timed_on_both_thread_counts_and_restores_them(model_dir: Callable[[str], str]) -> None:
    from transformers import pipeline

    from pipeq.worker.runtime import PipelineRuntime

    task = "text-classification"
    runtime = PipelineRuntime(pipeline(task, model=model_dir(task)), task, max_batch_size=8, prepare_ahead=0)
    layouts = [Layout(2, 0), Layout(2, PREFETCH), Layout(1, PREFETCH)]
    slowdown = forward_slowdown(runtime, ["a short text", "a somewhat longer text " * 8] * 8, layouts)
    assert 0 < slowdown < 10
    assert torch.get_num_threads() == 2
    assert forward_slowdown(runtime, ["text"], [Layout(2, 0), Layout(2, PREFETCH)]) == 1.0, "same threads: 1"


@pytest.mark.parametrize(("preprocess", "forward", "stages"), [(3.0, 1.0, "overlapped"), (0.5, 3.0, "serial")])
def test_a_cpu_worker_settles_its_layout_once_on_real_batches(
    sqlite_url: str, model_dir: Callable[[str], str], preprocess: float, forward: float, stages: str
) -> None:
    task = "text-classification"
    cfg = WorkerConfig(key=ServeKey(task, model_dir(task)), max_batch_size=8, max_batch_tokens=512, warmup=False)
    context = WorkerContext(Settings(broker_url="memory://", database_url=sqlite_url), cfg)
    context.start()
    try:
        assert context.runtime is not None and context.recorder is not None
        cores = os.cpu_count() or 1
        (row,) = Store(sqlite_url).live_workers(cfg.key.queue)
        assert (row["settings"]["stages"], row["settings"]["torch_threads"]) == ("serial", cores)
        assert context.runtime.prepare_ahead == 0, "a CPU worker starts serial on every core"
        # Not enough real batches yet: nothing changes.
        context.recorder.preprocess_seconds, context.recorder.forward_seconds = preprocess / 10, forward / 10
        context._settle_layout()
        assert context.runtime.prepare_ahead == 0 and not context._layout_settled
        context.recorder.preprocess_seconds, context.recorder.forward_seconds = preprocess, forward
        context._settle_layout()
        (row,) = Store(sqlite_url).live_workers(cfg.key.queue)
        want = stages if cores > 1 else "serial" if forward > preprocess else "overlapped"
        assert row["settings"]["stages"] == want
        assert row["settings"]["stage_seconds"] == {"preprocess": preprocess, "forward": forward}
        assert (context.runtime.prepare_ahead > 0) == (want == "overlapped")
        assert torch.get_num_threads() == row["settings"]["torch_threads"]
        # Once: later figures do not move it back and forth.
        context.recorder.preprocess_seconds, context.recorder.forward_seconds = forward, preprocess
        context._settle_layout()
        assert (context.runtime.prepare_ahead > 0) == (want == "overlapped")
    finally:
        context.stop()
