"""Measure a worker's real pipeline: items/s per precision, per token budget, in a separate process.

The worker's parent process later forks Celery pool children; torch's OpenMP pool (or CUDA)
started in a parent before fork can hang or break them, so every measurement runs in a freshly
spawned process that hands back plain results.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pipeq import constants as C
from pipeq.errors import ConfigurationError
from pipeq.precisions import PRECISIONS, REFERENCE
from pipeq.tasks import traits
from pipeq.worker.config import WorkerConfig
from pipeq.worker.devices import device_name_here
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.gate import agreement, calibration_outputs
from pipeq.worker.loading import load_pipeline, set_threads, synthetic_text

log = logging.getLogger(__name__)

#: Inputs in the synthetic measuring set: enough for several batches at the largest budget.
MEASURE_ITEMS = 128
#: Least seconds of timed passes per measurement (after the warm-up pass); more passes smooth noise.
MEASURE_SECONDS = 2.0
#: Least seconds of timed passes when precisions are compared: their speeds differ by tens of percent or
#: more, where the token budgets of a calibration sweep differ by a few.
PRECISION_SECONDS = 1.0
#: Inputs of the probe that sizes a precision's measuring set (``measuring_set``): one batch.
PROBE_ITEMS = 8
#: Median and spread (log-normal) of the synthetic inputs' token lengths: short texts with a long tail.
_MEDIAN_TOKENS, _LENGTH_SIGMA = 32, 0.9
#: Longest synthetic input, in tokens (further capped by the model's maximum).
_LONGEST_TOKENS = 512
#: Rounds over all budgets in a calibration sweep (each budget keeps its best round).
_SWEEP_ROUNDS = 3


@dataclass(frozen=True)
class PrecisionMeasurement:
    """Items/s per precision measured on one device, why the others were left out, and their agreement with fp32."""

    device_name: str
    measured: dict[str, float]
    skipped: dict[str, str]
    supported: list[str]
    #: Figures (``pipeq.agreement.merge``) of each lower precision's calibration outputs against fp32's.
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Why a lower precision could not be compared with fp32 (it ran, but its or fp32's calibration run failed).
    not_compared: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetSweep:
    """Items/s per token budget at one precision on one device."""

    device_name: str
    items_per_s: dict[int, float]


def synthetic_inputs(pipe: Any, task: str, *, max_length: int | None, n: int = MEASURE_ITEMS) -> list[str]:
    """``n`` texts of uneven, heavy-tailed token lengths, the same on every call; [] for tasks that need more."""
    longest = min(max_length or _LONGEST_TOKENS, _LONGEST_TOKENS)
    rng = random.Random(0)
    texts: list[str] = []
    for _ in range(n):
        tokens = min(longest, max(4, round(rng.lognormvariate(math.log(_MEDIAN_TOKENS), _LENGTH_SIGMA))))
        text = synthetic_text(pipe, task, tokens)
        if text is None:
            return []
        texts.append(text)
    return texts


def throughput(
    runtime: PipelineRuntime, inputs: Sequence[Any], *, min_seconds: float = MEASURE_SECONDS, warm_up: bool = True
) -> float:
    """Items/s of ``runtime.run`` over ``inputs``: the best of the passes timed within ``min_seconds`` (at least one).

    The best pass rather than the mean: on a shared machine other work only ever slows a pass down.
    """
    items = list(enumerate(inputs))
    if warm_up:
        _run_all(runtime, items)  # new shapes are slow the first time (kernel choice, oneDNN caches)
    best, deadline = 0.0, time.perf_counter() + min_seconds
    while True:
        t0 = time.perf_counter()
        done = _run_all(runtime, items)
        best = max(best, done / (time.perf_counter() - t0))
        if time.perf_counter() >= deadline:
            return best


def measuring_set(runtime: PipelineRuntime, inputs: Sequence[Any], min_seconds: float) -> list[Any]:
    """``inputs``, or as many of them as one pass runs in about half of ``min_seconds`` where that is fewer.

    A probe of ``PROBE_ITEMS`` inputs gives the pace; the set keeps inputs spread evenly over the
    lengths, so it is shaped like the whole. On a device that runs the precision fast this is every input;
    on a small CPU a few dozen; and where the precision is emulated (bf16 on a CPU without it) the warm-up
    and the timed passes take about ``min_seconds`` together, where passes over the whole set took minutes.
    """
    probe = _spread(inputs, PROBE_ITEMS)
    t0 = time.perf_counter()
    _run_all(runtime, list(enumerate(probe)))
    pace = len(probe) / max(time.perf_counter() - t0, 1e-6)
    n = max(len(probe), int(pace * max(min_seconds, 0.5) / 2))
    return list(inputs) if n >= len(inputs) else _spread(inputs, n)


def _spread(inputs: Sequence[Any], n: int) -> list[Any]:
    """``n`` of ``inputs`` at even steps through them sorted by length."""
    ordered = sorted(inputs, key=lambda value: len(str(value)))
    if n >= len(ordered):
        return ordered
    return [ordered[i * len(ordered) // n] for i in range(n)]


def _run_all(runtime: PipelineRuntime, items: list[tuple[int, Any]]) -> int:
    """Run every item; a failed item makes the measurement meaningless, so it raises."""
    n = 0
    for results, _ in runtime.run(items, {}):
        failed = [r for r in results if r.status != C.ITEM_DONE]
        if failed:
            raise ConfigurationError(f"{len(failed)} synthetic inputs failed while measuring: {failed[0].error}")
        n += len(results)
    return n


def unsupported_reason(cfg: WorkerConfig) -> str | None:
    """Why ``cfg``'s device cannot run its precision (None when it can); may import torch, so call it in the child."""
    return PRECISIONS[cfg.key.precision].unsupported(cfg)


def _release(device: str) -> None:
    """Free the last candidate's model (unreferenced once measured) before loading the next."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def measure_precisions(
    cfg: WorkerConfig, candidates: Sequence[str], min_seconds: float, texts: Sequence[str] = ()
) -> PrecisionMeasurement:
    """Load ``cfg``'s model at each candidate precision the device supports, measure its speed and, with
    ``texts``, run them through it and through fp32 to measure their agreement (runs in the child)."""
    threads = set_threads(cfg.resolved_threads)
    measured: dict[str, float] = {}
    skipped: dict[str, str] = {}
    runs: list[str] = []
    for precision in candidates:
        reason = unsupported_reason(cfg.with_precision(precision))
        if reason is None:
            runs.append(precision)
        else:
            skipped[precision] = reason
    lower = [p for p in runs if p != REFERENCE]
    gated = bool(texts) and bool(lower)
    # fp32 first: its calibration outputs are what the others are compared with (loaded for that alone if not allowed).
    order = ([REFERENCE] if gated else []) + [p for p in runs if not (gated and p == REFERENCE)]
    timed = traits(cfg.key.task).synthetic_warmup
    outputs: dict[str, dict[int, Any]] = {}
    failed: dict[str, str] = {}
    for precision in order if timed or gated else ():
        runtime: PipelineRuntime | None = None
        try:
            with _runtime(cfg.with_precision(precision), threads) as runtime:  # its stream threads end either way
                if timed and precision in runs:
                    measured[precision] = _throughput(runtime, cfg.key.task, min_seconds)
                if gated:
                    try:
                        outputs[precision] = calibration_outputs(runtime, cfg.key.task, texts)
                    except Exception as exc:  # the model's own code on real texts: this precision stays unjudged
                        failed[precision] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # the model's own code at this precision: recorded, and auto picks another
            failed[precision] = f"{type(exc).__name__}: {exc}"
            if precision in runs:
                skipped[precision] = failed[precision]
        runtime = None  # its model unreferenced, whether it ran or failed: freed before the next one loads
        _release(cfg.device)
    figures, not_compared = _compared(lower if gated else [], outputs, failed, cfg)
    supported = [p for p in runs if p not in skipped]
    return PrecisionMeasurement(device_name_here(cfg.device), measured, skipped, supported, figures, not_compared)


def _compared(
    lower: Sequence[str], outputs: dict[str, dict[int, Any]], failed: dict[str, str], cfg: WorkerConfig
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The agreement figures of each lower precision with fp32's outputs, and why any could not be compared."""
    figures: dict[str, dict[str, Any]] = {}
    not_compared: dict[str, str] = {}
    for precision in lower:
        if REFERENCE not in outputs:
            not_compared[precision] = f"{REFERENCE} reference failed: {failed.get(REFERENCE, '?')}"
        elif precision not in outputs:
            not_compared[precision] = failed.get(precision, "not run")
        else:
            figures[precision] = agreement(outputs[REFERENCE], outputs[precision], precision, cfg.thresholds)
    return figures, not_compared


def measure_speeds(cfg: WorkerConfig, precisions: Sequence[str], min_seconds: float) -> dict[str, float]:
    """Items/s of ``cfg``'s model at each of ``precisions``, loaded one after another (runs in the child)."""
    threads = set_threads(cfg.resolved_threads)
    speeds: dict[str, float] = {}
    for precision in precisions:
        with _runtime(cfg.with_precision(precision), threads) as runtime:
            speeds[precision] = _throughput(runtime, cfg.key.task, min_seconds)
        _release(cfg.device)
    return speeds


def _runtime(cfg: WorkerConfig, threads: int) -> PipelineRuntime:
    loaded = load_pipeline(cfg)
    # Streams as the worker will have them: one for a model over several devices.
    return PipelineRuntime.for_worker(loaded.pipe, replace(cfg, placement=loaded.placed), threads)


def _throughput(runtime: PipelineRuntime, task: str, min_seconds: float) -> float:
    inputs = synthetic_inputs(runtime.pipe, task, max_length=runtime.max_length)
    if not inputs:
        raise ConfigurationError(f"pipeq cannot make measuring inputs for task {task!r}")
    return throughput(runtime, measuring_set(runtime, inputs, min_seconds), min_seconds=min_seconds)


def budget_candidates(max_batch_size: int, max_length: int | None) -> list[int]:
    """The calibration budgets, each capped at what one batch can hold (rows x longest input)."""
    cap = max_batch_size * min(max_length or _LONGEST_TOKENS, _LONGEST_TOKENS)
    return sorted({min(budget, cap) for budget in C.CALIBRATION_BUDGETS})


def sweep_budgets(cfg: WorkerConfig, min_seconds: float) -> BudgetSweep:
    """Load ``cfg``'s model once and measure items/s at each token budget (runs in the child)."""
    threads = set_threads(cfg.resolved_threads)
    with _runtime(cfg, threads) as runtime:
        inputs = synthetic_inputs(runtime.pipe, cfg.key.task, max_length=runtime.max_length)
        if not inputs:
            raise ConfigurationError(f"--calibrate cannot make inputs for task {cfg.key.task!r}")
        speeds = dict.fromkeys(budget_candidates(cfg.max_batch_size, runtime.max_length), 0.0)
        # Interleaved rounds, so a burst of other work on the machine does not decide for one budget.
        for round_no in range(_SWEEP_ROUNDS):
            for budget in speeds:
                runtime.max_batch_tokens = budget
                rate = throughput(runtime, inputs, min_seconds=min_seconds / _SWEEP_ROUNDS, warm_up=round_no == 0)
                speeds[budget] = max(speeds[budget], rate)
    return BudgetSweep(device_name_here(cfg.device), speeds)
