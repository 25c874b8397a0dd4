"""A job report as plain text for a terminal (``pipeq report JOB``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pipeq.agreement import mean_cosine, shortfalls
from pipeq.report.build import GenerationStats, JobReport, WorkerShare


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f} ms"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def _worker_line(w: WorkerShare, generation: bool) -> str:
    where = f"{w.host or '?'}:{w.pid or '?'}"
    return (
        f"{w.worker_id[:8]:<10}{where:<24}{w.device or '-':<8}{w.items:>10,}{_pct(w.share):>8}"
        f"{w.batches:>9,}{w.busy_seconds:>9.1f}{_pct(w.padding_efficiency):>9}{_mb(w.footprint_bytes):>12}"
        + (f"{_rate(w.output_tokens_per_second):>12}" if generation else "")
    )


def generation_line(g: GenerationStats) -> str:
    """A generation job's tokens in a sentence: output tokens per second, time to first token, decode per token."""
    return (
        f"{g.output_tokens:,} output tokens from {g.items:,} items, {_rate(g.output_tokens_per_second)} tokens/s; "
        f"time to first token p50 {_ms(g.first_token_p50_ms)}, p90 {_ms(g.first_token_p90_ms)}; "
        f"decode per token p50 {_ms(g.decode_per_token_p50_ms)}, p90 {_ms(g.decode_per_token_p90_ms)}"
    )


def format_text(report: JobReport) -> str:
    """A summary of the report: job, model, batches, phases, workers and failures."""
    j, m, b = report.job, report.model, report.batches
    lines = [
        f"job {j.id} [{j.task} {j.precision}] {j.status}  model {j.model}",
        f"items: {j.total:,} total, {j.done:,} done, {j.failed:,} failed, {j.cancelled:,} cancelled, "
        f"{j.pending:,} pending",
        f"time: created {j.created_at:%Y-%m-%d %H:%M:%S} UTC, wall {timedelta(seconds=round(j.wall_seconds))}, "
        f"{j.items_per_second:,.1f} items/s",
        f"model: revision {', '.join(m.revisions) or '-'}; device {', '.join(m.devices) or '-'}; "
        f"quantization {', '.join(m.quantization) or '-'}; footprint {_mb(m.footprint_bytes)}",
    ]
    if report.generation is not None:
        lines.append(f"generation: {generation_line(report.generation)}")
    if j.cache_hits:
        lines.append(f"result cache: {j.cache_hits:,} of the {j.done:,} done items reused, not computed")
    lines += [f"precision: {summary}" for summary in m.precision_choices]
    if j.shadow:
        lines.append(f"shadow check: {shadow_line(j.shadow)}")
        warning = shadow_warning(j.shadow, j.task)
        if warning:
            lines.append(f"warning: {warning}")
    if b.mean_items is None or b.mean_rows is None:
        lines.append("batches: none recorded yet")
    else:
        lines += [
            f"batches: {b.batches:,}, {b.mean_items:.1f} items and {b.mean_rows:.1f} rows each on average; "
            f"padding efficiency {_pct(b.padding_efficiency)} ({b.real_tokens:,} real of {b.padded_tokens:,} "
            f"padded tokens)",
            "",
            f"{'phase (ms/batch)':<17}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}{'share':>8}",
        ]
        lines += [
            f"{p.name:<17}{p.mean_ms:>10.2f}{p.p50_ms:>10.2f}{p.p95_ms:>10.2f}{p.p99_ms:>10.2f}{p.max_ms:>10.2f}"
            f"{_pct(p.share):>8}"
            for p in report.phases
        ]
        lines += [
            "",
            f"{'worker':<10}{'host:pid':<24}{'device':<8}{'items':>10}{'share':>8}{'batches':>9}{'busy s':>9}"
            f"{'padding':>9}{'footprint':>12}" + (f"{'out tok/s':>12}" if report.generation is not None else ""),
        ]
        lines += [_worker_line(w, report.generation is not None) for w in report.workers]
    if report.failures:
        lines += ["", "failures:"]
        lines += [f"{f.count:>8,}  {f.reason}  (e.g. item {f.example_idx}: {f.example_error})" for f in report.failures]
    if j.error:
        lines.append(f"error: {j.error}")
    return "\n".join(lines)


def shadow_line(figures: dict[str, Any]) -> str:
    """``--shadow-fraction`` figures in a sentence: label agreement and score difference, or cosine similarity."""
    head = f"{figures.get('precision', '?')} vs fp32 on {figures.get('sampled', 0):,} sampled items"
    parts = []
    agree, labelled = figures.get("label_agree"), figures.get("labelled")
    if agree is not None and labelled:
        parts.append(f"top label identical on {agree:,} ({100 * agree / labelled:.1f}%)")
    if figures.get("max_score_diff") is not None:
        parts.append(f"largest score difference {figures['max_score_diff']:.4f}")
    if figures.get("min_cosine") is not None:
        mean = mean_cosine(figures)
        parts.append(
            f"lowest cosine similarity {figures['min_cosine']:.4f}"
            + (f" (mean {mean:.4f})" if mean is not None else "")
        )
    return f"{head}: {', '.join(parts)}" if parts else f"{head} (outputs of this task are not compared)"


def shadow_warning(figures: dict[str, Any], task: str) -> str | None:
    """A sentence when the shadow figures fall below the thresholds the worker judged them by; else None."""
    found = shortfalls(figures, task)
    if not found:
        return None
    return (
        f"{figures.get('precision', '?')} falls below the agreement thresholds with fp32 on this job's sample: "
        f"{'; '.join(found)} (resubmit at --precision fp32 if this matters)"
    )
