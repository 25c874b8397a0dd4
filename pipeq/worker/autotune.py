"""Settle what a worker's flags leave open before it serves: ``--precision auto`` and the token budget.

Measurements run in a spawned process (``measure``); the outcome fixes the ServeKey, so a worker
that chose bf16 serves the bf16 queue exactly as if it had been started with ``--precision bf16``.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

from pipeq import constants as C
from pipeq.agreement import describe_agreement, shortfalls
from pipeq.errors import ConfigurationError
from pipeq.precisions import PRECISIONS, REFERENCE
from pipeq.routing import AUTO_PRECISION
from pipeq.store import Store
from pipeq.tasks import traits
from pipeq.worker.config import WorkerConfig
from pipeq.worker.devices import Runner, device_name, in_subprocess, spawned_process
from pipeq.worker.gate import calibration_texts
from pipeq.worker.measure import (
    MEASURE_SECONDS,
    PRECISION_SECONDS,
    measure_precisions,
    measure_speeds,
    sweep_budgets,
)

log = logging.getLogger(__name__)


def tune(store: Store, cfg: WorkerConfig, *, min_seconds: float = MEASURE_SECONDS) -> WorkerConfig:
    """``cfg`` with a fixed precision and token budget: measured now, stored by an earlier start, or default."""
    auto = cfg.key.precision == AUTO_PRECISION
    # Both measured: in one spawned process, which imports torch and transformers once.
    with spawned_process() if auto and cfg.calibrate else nullcontext(None) as run:
        compare = min(min_seconds, PRECISION_SECONDS)
        if auto:
            cfg = choose_precision(cfg, min_seconds=compare, run=run)
        else:
            check_speed(cfg, min_seconds=compare, run=run)
        if cfg.calibrate:
            return calibrate(store, cfg, min_seconds=min_seconds, run=run)
    if cfg.max_batch_tokens is None:
        return reuse_calibration(store, cfg)
    return cfg


def _rates(speeds: dict[Any, float]) -> str:
    return ", ".join(f"{name} {rate:,.0f}/s" for name, rate in speeds.items())


def choose_precision(
    cfg: WorkerConfig, *, min_seconds: float = PRECISION_SECONDS, run: Runner | None = None
) -> WorkerConfig:
    """Serve the fastest allowed precision that agrees with fp32 on the calibration texts (``--precision auto``).

    Each lower precision runs the calibration texts beside fp32 in the measuring process; one whose
    agreement falls below ``cfg.thresholds`` (or that could not be compared) is not eligible.
    """
    allowed = list(cfg.allowed_precisions)
    texts = calibration_texts(cfg.calibration_texts)
    task = cfg.key.task
    t0 = time.perf_counter()
    result = (run or in_subprocess)(measure_precisions, cfg, allowed, min_seconds, texts)
    seconds = time.perf_counter() - t0
    for precision, reason in result.skipped.items():
        log.warning("--precision auto leaves out %s: %s", precision, reason)
    refused = {p: shortfalls(figures, task, cfg.thresholds) for p, figures in result.agreement.items()}
    refused = {p: reasons for p, reasons in refused.items() if reasons}
    for p, why in _slower_than_reference(result.measured).items():
        refused[p] = refused.get(p, []) + why
    refused.update({p: [f"not compared with {REFERENCE} ({why})"] for p, why in result.not_compared.items()})
    eligible = {p: rate for p, rate in result.measured.items() if p not in refused}
    if eligible:
        chosen = max(eligible, key=eligible.__getitem__)
    elif result.supported and not traits(task).synthetic_warmup:
        chosen = next((p for p in result.supported if p not in refused), result.supported[0])
        if chosen in refused:  # only refused precisions run here: fp32 was not allowed
            raise ConfigurationError(
                f"--precision auto: every allowed precision falls below the agreement thresholds "
                f"({_refusals(refused)}); allow {REFERENCE} or lower the thresholds"
            )
        log.warning("--precision auto cannot time task %s; serving %s, the first allowed that passed", task, chosen)
    elif refused and result.measured:
        raise ConfigurationError(
            f"--precision auto: no allowed precision is both faster than {REFERENCE} and within the agreement "
            f"thresholds ({_refusals(refused)}); allow {REFERENCE} or lower the thresholds (--min-agreement, "
            "--max-score-diff, --min-cosine)"
        )
    else:
        reasons = "; ".join(f"{p}: {why}" for p, why in result.skipped.items())
        raise ConfigurationError(f"--precision auto found no allowed precision that runs on {cfg.device} ({reasons})")
    summary = summarize(chosen, result.measured, refused, result.agreement, task)
    log.info("--precision auto on %s (%s): %s; %s", cfg.device, result.device_name, _rates(result.measured), summary)
    choice = {
        "chosen": chosen,
        "measured": {p: round(rate, 2) for p, rate in result.measured.items()},
        "allowed": allowed,
        "skipped": result.skipped,
        "agreement": result.agreement,
        "refused": refused,
        "thresholds": cfg.thresholds.as_record(),
        "calibration_texts": {"source": cfg.calibration_texts or "built-in", "count": len(texts)},
        "summary": summary,
        "device_name": result.device_name,
        "seconds": round(seconds, 1),  # what choosing cost at start: loads and measuring, in a spawned process
    }
    return replace(cfg.with_precision(chosen), precision_choice=choice)


def _slower_than_reference(measured: dict[str, float]) -> dict[str, list[str]]:
    """The measured precisions that ran slower than fp32, each with its speed as a share of fp32's."""
    base = measured.get(REFERENCE)
    if not base:
        return {}
    return {p: [f"{rate / base:.2f}x {REFERENCE}'s speed here"] for p, rate in measured.items() if rate < base}


def check_speed(cfg: WorkerConfig, *, min_seconds: float = PRECISION_SECONDS, run: Runner | None = None) -> None:
    """Warn when a worker's fixed precision runs slower than fp32 on its device (``Precision.emulated``).

    Measured only where the device lacks the precision's instructions (bf16 on a CPU without it, int8
    without VNNI): fp32 and the precision, each timed for about ``min_seconds`` (``measure.measuring_set``).
    """
    precision = cfg.key.precision
    if precision in (REFERENCE, AUTO_PRECISION) or not traits(cfg.key.task).synthetic_warmup:
        return
    why = PRECISIONS[precision].emulated(cfg)
    if why is None:
        return
    t0 = time.perf_counter()
    speeds = (run or in_subprocess)(measure_speeds, cfg, [REFERENCE, precision], min_seconds)
    seconds = time.perf_counter() - t0
    ratio = speeds[precision] / speeds[REFERENCE]
    figures = (
        f"{precision} {speeds[precision]:,.1f}/s, {REFERENCE} {speeds[REFERENCE]:,.1f}/s, measured in {seconds:.0f}s"
    )
    if ratio >= 1:
        log.info(
            "%s runs at %.2fx %s's speed on %s although %s (%s)", precision, ratio, REFERENCE, cfg.device, why, figures
        )
        return
    log.warning(
        "%s runs at %.2fx %s's speed on %s: %s (%s); --precision auto would serve %s over it (it never serves a "
        "precision slower than %s)",
        precision,
        ratio,
        REFERENCE,
        cfg.device,
        why,
        figures,
        REFERENCE,
        REFERENCE,
    )


def _refusals(refused: dict[str, list[str]]) -> str:
    return "; ".join(f"{p}: {', '.join(reasons)}" for p, reasons in refused.items())


def summarize(
    chosen: str,
    measured: dict[str, float],
    refused: dict[str, list[str]],
    agreement: dict[str, dict[str, Any]],
    task: str,
) -> str:
    """The choice in one line: "auto: int8 2.6x but embedding cosine min 0.944 < 0.99, serving bf16 1.9x (...)"."""
    base = measured.get(REFERENCE)

    def speed(p: str) -> str:
        if p not in measured:
            return p
        return f"{p} {measured[p] / base:.1f}x" if base else f"{p} {measured[p]:,.0f}/s"

    passed_over = [
        f"{speed(p)} but {', '.join(reasons)}"
        for p, reasons in sorted(refused.items(), key=lambda kv: -measured.get(kv[0], 0.0))
        if measured.get(p, float("inf")) > measured.get(chosen, 0.0)
    ]
    kept = f" ({describe_agreement(agreement[chosen], task)})" if chosen in agreement else ""
    head = f"{'; '.join(passed_over)}, serving" if passed_over else "serving"
    return f"auto: {head} {speed(chosen)}{kept}"


def calibrate(
    store: Store, cfg: WorkerConfig, *, min_seconds: float = MEASURE_SECONDS, run: Runner | None = None
) -> WorkerConfig:
    """Sweep the token budget on the real model, store the fastest and serve with it (``--calibrate``)."""
    if not traits(cfg.key.task).synthetic_warmup:
        raise ConfigurationError(
            f"--calibrate cannot make test inputs for task {cfg.key.task!r}; set --max-batch-tokens instead"
        )
    sweep = (run or in_subprocess)(sweep_budgets, cfg, min_seconds)
    best = max(sweep.items_per_s, key=sweep.items_per_s.__getitem__)
    rates = {str(budget): round(rate, 2) for budget, rate in sweep.items_per_s.items()}
    key = cfg.key
    store.save_calibration(
        {
            "task": key.task,
            "model": key.model,
            "revision": key.revision,
            "precision": key.precision,
            "device": cfg.device,
            "device_name": sweep.device_name,
            "max_batch_tokens": best,
            "items_per_s": rates[str(best)],
            "sweep": rates,
        }
    )
    log.info(
        "calibrated %s %s on %s (%s), tokens per batch: %s; keeping %d",
        key.model,
        key.precision,
        cfg.device,
        sweep.device_name,
        _rates(sweep.items_per_s),
        best,
    )
    record = {"source": "calibrated", "items_per_s": rates[str(best)], "sweep": rates, "device_name": sweep.device_name}
    # calibrate=False: the budget is now fixed (a config may not both calibrate and name a budget).
    return replace(cfg, calibrate=False, max_batch_tokens=best, calibration=record)


def reuse_calibration(store: Store, cfg: WorkerConfig) -> WorkerConfig:
    """The budget an earlier ``--calibrate`` stored for this model, precision and device; else the default."""
    key, name = cfg.key, device_name(cfg.device)
    row = store.latest_calibration(
        task=key.task,
        model=key.model,
        revision=key.revision,
        precision=key.precision,
        device=cfg.device,
        device_name=name,
    )
    if row is None:
        return replace(cfg, max_batch_tokens=C.DEFAULT_MAX_BATCH_TOKENS)
    log.info(
        "using %d tokens per batch, calibrated on %s (%s) at %s (%.0f items/s); --max-batch-tokens overrides",
        row["max_batch_tokens"],
        cfg.device,
        name,
        row["created_at"],
        row["items_per_s"],
    )
    record = {
        "source": "stored",
        "items_per_s": row["items_per_s"],
        "sweep": row["sweep"],
        "device_name": name,
        "calibrated_at": row["created_at"].isoformat(),
    }
    return replace(cfg, max_batch_tokens=row["max_batch_tokens"], calibration=record)


def describe(settings: dict[str, Any]) -> tuple[str, str]:
    """How a worker row's precision and token budget were chosen, for ``pipeq workers``; empty when given.

    ``settings`` is the row's settings with its ``precision_choice`` column added.
    """
    choice = settings.get("precision_choice")
    precision = ""
    if choice and choice.get("summary"):
        took = f", chosen in {choice['seconds']:.0f}s" if "seconds" in choice else ""
        precision = f" ({choice['summary']}; {_rates(choice['measured'])}{took})"
    elif choice and choice.get("measured"):
        took = f", chosen in {choice['seconds']:.0f}s" if "seconds" in choice else ""
        precision = f" (auto: {_rates(choice['measured'])}{took})"
    calibration = settings.get("calibration")
    budget = ""
    if calibration:
        how = "calibrated now" if calibration["source"] == "calibrated" else "stored calibration"
        budget = f" tokens {settings['max_batch_tokens']} ({how}, {calibration['items_per_s']:,.0f}/s)"
    return precision, budget
