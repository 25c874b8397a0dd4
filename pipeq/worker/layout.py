"""How a worker's stages share its cores: the layouts a CPU worker times at start, and the choice.

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

A CPU worker whose warm-up is quick times its candidates in turns on its warm-up inputs (this
machine's speed drifts, so each keeps its best pass) and keeps the first, serial on all cores,
unless another is clearly faster (``LAYOUT_GAIN``). The choice is shown by ``pipeq workers --json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
        import torch

        torch.set_num_threads(self.threads)
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


def choose(
    runtime: PipelineRuntime,
    layouts: Sequence[Layout],
    timed: Callable[[], float],
    *,
    rounds: int = 3,
    gain: float = C.LAYOUT_GAIN,
) -> tuple[Layout, dict[str, float]]:
    """Time each layout (``timed()`` returns items/s of one pass) in ``rounds`` turns, and apply the best.

    Returns the layout applied and each one's best items/s. The first layout is kept unless another
    beats it by ``gain``: a smaller margin would pick this machine's noise.
    """
    default = layouts[0]
    if len(layouts) == 1:
        default.apply(runtime)
        return default, {}
    best = dict.fromkeys(layouts, 0.0)
    for _ in range(rounds):
        for layout in layouts:
            layout.apply(runtime)
            best[layout] = max(best[layout], timed())
    fastest = max(best, key=lambda layout: best[layout])
    chosen = fastest if best[fastest] > best[default] * gain else default
    chosen.apply(runtime)
    return chosen, {layout.name: round(rate, 1) for layout, rate in best.items()}
