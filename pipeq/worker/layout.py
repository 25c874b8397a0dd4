"""How a worker's stages share its cores: the layouts a CPU worker chooses from, and the choice.

A worker runs three stages: prepare (tokenize, collate), forward, finish (postprocess, write). Where
they run is a trade that only a measurement settles:

- **serial**: the forward thread tokenizes each slice itself, and torch's threads have every core
  to themselves. On a CPU whose cores all run the forward pass, this is the fastest for any model
  whose forward pass dominates: a second busy thread takes a core from one of torch's OpenMP
  threads, and every parallel region of the forward pass then waits for that thread (MiniLM int8
  on two cores: 292 texts/s serial, 241 with the prepare thread beside it).
- **overlapped**: a prepare thread tokenizes the next slice while the model runs the current one
  (see ``runtime``). Where the forward pass is cheap next to tokenizing, this is the faster, and
  faster still with one torch thread fewer, which leaves the prepare thread a core of its own (a
  1-layer, 64-wide model on two cores: 0.67x the raw loop serial, 0.89x overlapped on one thread).
- On CUDA the forward pass runs on the device and the host's threads are free: always overlapped,
  so the next batch is tokenized and copied while the device computes.

A CPU worker starts serial on all its cores. At start it measures how much slower its forward pass
runs on one torch thread fewer (forward time only, on its warm-up batches: a near-free model barely
slows, MiniLM nearly doubles); once it has run a few seconds of real batches it predicts both layouts
from their preprocess and forward time (``from_stages``) and switches to overlapped, once, only where
that is clearly faster. Timing whole layouts against each other at start was tried first: on
synthetic warm-up texts, and with this machine's 10-30% drift, it picked serial for the near-free
model, whose real texts then ran at 0.67x the raw loop instead of 0.98x. ``pipeq workers --json``
shows the choice and what it was made on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeq import constants as C
from pipeq.worker.runtime import PREFETCH, PipelineRuntime


@dataclass(frozen=True)
class Layout:
    """Torch threads for the forward pass, and how many prepared batches a prepare thread may hold
    ahead of it (0: no prepare thread, the forward thread tokenizes)."""

    threads: int
    prepare_ahead: int

    @property
    def name(self) -> str:
        stages = "overlapped" if self.prepare_ahead else "serial"
        return f"{stages}, {self.threads} torch thread{'s' if self.threads != 1 else ''}"

    def apply(self, runtime: PipelineRuntime) -> None:
        torch_threads(self.threads)
        runtime.prepare_ahead = self.prepare_ahead


def candidates(device: str, threads: int, *, fixed_threads: bool) -> list[Layout]:
    """The layouts worth timing, the default first: on CUDA only overlapped; on the CPU serial on all
    ``threads``, overlapped on all of them, and (unless the user fixed the threads) overlapped on one fewer."""
    if device != "cpu":
        return [Layout(threads, PREFETCH)]
    layouts = [Layout(threads, 0), Layout(threads, PREFETCH)]
    if not fixed_threads and threads > 1:
        layouts.append(Layout(threads - 1, PREFETCH))
    return layouts


def forward_slowdown(
    runtime: PipelineRuntime, inputs: Sequence[Any], layouts: Sequence[Layout], rounds: int = 2
) -> float:
    """How much longer the forward pass takes on the overlapped layout's threads than on all of them
    (forward time only, so tokenizing and this machine's other work weigh little; in turns, best of each)."""
    serial, overlapped = layouts[0], layouts[-1]
    if overlapped.threads == serial.threads or not inputs:
        return 1.0
    best = {serial.threads: float("inf"), overlapped.threads: float("inf")}
    items = list(enumerate(inputs))
    for _ in range(rounds):
        for threads in best:
            torch_threads(threads)
            seconds = sum(t.forward_ms for _, t in runtime.run(items, {}) if t is not None) / 1000
            best[threads] = min(best[threads], seconds)
    torch_threads(serial.threads)
    return best[overlapped.threads] / best[serial.threads] if best[serial.threads] > 0 else 1.0


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def from_stages(
    layouts: Sequence[Layout], preprocess_seconds: float, forward_seconds: float, slowdown: float | None = None
) -> Layout:
    """The layout measured stage times call for: the first (serial on every core), or the last (overlapped
    on the fewest threads) when it is clearly faster.

    Serial takes P + F (preprocess, then forward on all N threads); overlapped on n < N threads takes
    about max(P, F x s), s the forward pass's measured slowdown on n threads (``forward_slowdown``; at
    worst N / n when not measured). Overlapped is chosen when that is ``LAYOUT_GAIN`` faster. With as
    many threads (n = N) the prepare thread takes a core from the forward pass: only when P > F.
    """
    serial, overlapped = layouts[0], layouts[-1]
    if overlapped == serial or overlapped.prepare_ahead == 0:
        return serial
    if overlapped.threads == serial.threads:
        return overlapped if preprocess_seconds > forward_seconds else serial
    s = slowdown if slowdown is not None else serial.threads / overlapped.threads
    serial_time = preprocess_seconds + forward_seconds
    overlapped_time = max(preprocess_seconds, forward_seconds * s)
    return overlapped if overlapped_time * C.LAYOUT_GAIN < serial_time else serial
