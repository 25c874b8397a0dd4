"""The stage layouts a worker chooses between, and how it chooses (timed in turns, default unless clearly beaten)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from pipeq import Settings
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext
from pipeq.worker.layout import Layout, candidates, choose
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
    # A GPU's host threads are free while it computes: overlapped, nothing to time.
    assert candidates("cuda:0", 8, fixed_threads=False) == [Layout(8, PREFETCH)]


class _Runtime:
    prepare_ahead = -1


def _timer(runtime: _Runtime, speeds: dict[Layout, list[float]]) -> Callable[[], float]:
    """items/s of the layout now applied: the next of its scripted passes."""

    def timed() -> float:
        return speeds[Layout(torch.get_num_threads(), runtime.prepare_ahead)].pop(0)

    return timed


def test_a_clearly_faster_layout_is_chosen_and_applied() -> None:
    serial, overlapped, fewer = Layout(2, 0), Layout(2, PREFETCH), Layout(1, PREFETCH)
    runtime = _Runtime()
    # A noisy pass (a burst of other work) does not decide: each layout keeps its best pass.
    speeds = {serial: [100.0, 40.0, 100.0], overlapped: [90.0, 95.0, 20.0], fewer: [30.0, 130.0, 125.0]}
    chosen, measured = choose(runtime, [serial, overlapped, fewer], _timer(runtime, speeds), gain=1.05)  # type: ignore[arg-type]
    assert chosen == fewer
    assert (runtime.prepare_ahead, torch.get_num_threads()) == (PREFETCH, 1)
    assert measured == {serial.name: 100.0, overlapped.name: 95.0, fewer.name: 130.0}
    assert all(not passes for passes in speeds.values()), "three turns of each"


def test_the_default_stays_unless_beaten_by_the_margin() -> None:
    serial, overlapped = Layout(2, 0), Layout(2, PREFETCH)
    runtime = _Runtime()
    speeds = {serial: [100.0, 100.0, 100.0], overlapped: [104.0, 104.0, 104.0]}
    chosen, _ = choose(runtime, [serial, overlapped], _timer(runtime, speeds), gain=1.05)  # type: ignore[arg-type]
    assert chosen == serial and runtime.prepare_ahead == 0


def test_a_single_layout_is_applied_without_timing() -> None:
    runtime = _Runtime()

    def timed() -> float:
        raise AssertionError("nothing to compare")

    chosen, measured = choose(runtime, [Layout(3, PREFETCH)], timed)  # type: ignore[arg-type]
    assert (chosen, measured, runtime.prepare_ahead, torch.get_num_threads()) == (Layout(3, PREFETCH), {}, PREFETCH, 3)


def test_a_quick_cpu_worker_times_its_layouts_and_records_the_choice(
    sqlite_url: str, model_dir: Callable[[str], str]
) -> None:
    task = "text-classification"
    cfg = WorkerConfig(key=ServeKey(task, model_dir(task)), max_batch_size=8, max_batch_tokens=512)
    context = WorkerContext(Settings(broker_url="memory://", database_url=sqlite_url), cfg)
    context.start()
    try:
        assert context.runtime is not None
        (row,) = Store(sqlite_url).live_workers(cfg.key.queue)
        settings: dict[str, Any] = row["settings"]
        layouts = candidates("cpu", os.cpu_count() or 1, fixed_threads=False)  # the worker's share: all cores
        chosen = Layout(settings["torch_threads"], context.runtime.prepare_ahead)
        assert chosen in layouts and torch.get_num_threads() == chosen.threads
        assert settings["stages"] == ("overlapped" if chosen.prepare_ahead else "serial")
        assert set(settings["layouts_measured"]) == {layout.name for layout in layouts}
        assert settings["warmup_items_per_second"] == settings["layouts_measured"][chosen.name]
    finally:
        context.stop()
