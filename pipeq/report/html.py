"""A job report as one self-contained HTML page: inline CSS, matplotlib charts inlined as PNG data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from pipeq.errors import ConfigurationError
from pipeq.primitives import WORK_PHASES
from pipeq.report.build import JobReport, WorkerShare
from pipeq.report.text import generation_line, shadow_line, shadow_warning

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Colour of each work phase in every chart.
PHASE_COLOURS = {"preprocess": "#4c78a8", "forward": "#f58518", "postprocess": "#54a24b"}
#: Resolution of the inlined charts.
DPI = 100
#: Two-line tick labels of the phases in the percentile chart.
_PHASE_TICKS = {"queue_wait": "queue\nwait", "preprocess": "pre-\nprocess", "postprocess": "post-\nprocess"}
#: Timelines longer than this many seconds are drawn in minutes.
MINUTES_AFTER = 180

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; } img { max-width: 100%; display: block; margin: 8px 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; white-space: nowrap; }
th { text-align: left; background: #f6f6f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.err { font-family: ui-monospace, monospace; font-size: 12px; white-space: normal; word-break: break-word; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; } .empty { color: #888; font-style: italic; }
"""


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigurationError(
            "the HTML report draws its charts with matplotlib, which is not installed: pip install 'pipeq[report]'"
        ) from None
    return Figure


def write_html(report: JobReport, path: str | Path) -> Path:
    """Write the report as a self-contained HTML page; returns the path written."""
    figure = _figure_class()
    charts = _charts(report, figure)
    out = Path(path)
    out.write_text(_page(report, charts), encoding="utf-8")
    return out


# ------------------------------------------------------------------ charts


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label(w: WorkerShare) -> str:
    return f"{w.worker_id[:8]} {w.host}:{w.pid}" if w.host else w.worker_id[:8]


def _charts(report: JobReport, figure: Callable[..., Figure]) -> dict[str, str]:
    """PNG data URIs by chart name; none when the job has no batches yet."""
    if not report.batches.batches:
        return {}
    return {
        "throughput": _png(_throughput(report, figure)),
        "phase_means": _png(_phase_means(report, figure)),
        "phase_percentiles": _png(_phase_percentiles(report, figure)),
        "rows": _png(_rows(report, figure)),
        "latency": _png(_latency(report, figure)),
    }


#: Throughput charts with at most this many buckets mark each one.
MARKERS_UP_TO = 20


def _throughput(report: JobReport, figure: Callable[..., Figure]) -> Figure:
    t = report.throughput
    n = len(t.items)
    minutes = n * t.bucket_seconds > MINUTES_AFTER
    scale = 60.0 if minutes else 1.0
    x = [(i + 0.5) * t.bucket_seconds / scale for i in range(n)]
    fig = figure(figsize=(11, 3.6))
    ax = fig.add_subplot()
    labels = {w.worker_id: _label(w) for w in report.workers}
    marker = "o" if n <= MARKERS_UP_TO else None  # a short job's few buckets stay visible as points
    if len(t.per_worker) > 1:
        for worker_id, series in t.per_worker.items():
            rates = [c / t.bucket_seconds for c in series]
            ax.plot(x, rates, lw=1.2, marker=marker, ms=3, label=labels.get(worker_id, worker_id[:8]))
    rates = [c / t.bucket_seconds for c in t.items]
    ax.plot(x, rates, lw=2.2, marker=marker, ms=4, color="black", label="all workers")
    ax.set_xlabel(f"{'minutes' if minutes else 'seconds'} since the first batch started")
    ax.set_ylabel("items / s")
    ax.set_title(f"Items finished per second ({n} buckets of {t.bucket_seconds:.3g} s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


def _phase_means(report: JobReport, figure: Callable[..., Figure]) -> Figure:
    """Mean time per batch, stacked by phase: all workers, then each worker."""
    names = ["all workers", *(_label(w) for w in report.workers)]
    by_phase = {p.name: p for p in report.phases}
    means = [{name: by_phase[name].mean_ms for name in WORK_PHASES}, *(w.phase_mean_ms for w in report.workers)]
    fig = figure(figsize=(11, 1.3 + 0.38 * len(names)))
    ax = fig.add_subplot()
    rows = list(range(len(names)))[::-1]
    base = [0.0] * len(names)
    for phase in WORK_PHASES:
        widths = [m[phase] for m in means]
        ax.barh(rows, widths, left=base, color=PHASE_COLOURS[phase], label=phase, height=0.6)
        base = [b + w for b, w in zip(base, widths, strict=True)]
    ax.set_yticks(rows, names, fontsize=9)
    ax.set_xlabel("mean ms per batch")
    ax.set_title("Where a batch's time goes")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _phase_percentiles(report: JobReport, figure: Callable[..., Figure]) -> Figure:
    """p50/p95/p99 of each phase, queue wait and total included, on a log scale (phases differ by 1000x)."""
    fig = figure(figsize=(5.4, 3.4))
    ax = fig.add_subplot()
    shown = report.phases
    width = 0.26
    for k, (pct, grey) in enumerate((("p50", "0.7"), ("p95", "0.4"), ("p99", "0.1"))):
        values = [getattr(p, f"{pct}_ms") for p in shown]
        ax.bar([i + (k - 1) * width for i in range(len(shown))], values, width, label=pct, color=grey)
    ax.set_xticks(range(len(shown)), [_PHASE_TICKS.get(p.name, p.name) for p in shown], fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("ms per batch")
    ax.set_title("Percentiles by phase")
    ax.legend(fontsize=8, ncols=3)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _rows(report: JobReport, figure: Callable[..., Figure]) -> Figure:
    fig = figure(figsize=(5.4, 3.4))
    ax = fig.add_subplot()
    hist = report.batches.rows_histogram
    ax.bar([r for r, _ in hist], [c for _, c in hist], width=0.85, color="#4c78a8")
    ax.set_xlabel("rows per forward pass")
    ax.set_ylabel("batches")
    ax.set_title(f"Batch sizes (mean {report.batches.mean_rows or 0:.1f} rows)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _latency(report: JobReport, figure: Callable[..., Figure]) -> Figure:
    fig = figure(figsize=(5.4, 3.4))
    ax = fig.add_subplot()
    edges, counts = report.latency.edges, report.latency.counts
    ax.stairs(counts, edges, fill=True, color="#f58518")
    total = next((p for p in report.phases if p.name == "total"), None)
    if total is not None:
        for name, value, style in (("p50", total.p50_ms, "-"), ("p95", total.p95_ms, "--"), ("p99", total.p99_ms, ":")):
            ax.axvline(value, color="black", ls=style, lw=1, label=f"{name} {value:,.1f} ms")
        ax.legend(fontsize=8)
    ax.set_title("Batch latency")
    ax.set_xlabel("total ms per batch")
    ax.set_ylabel("batches")
    ax.grid(axis="y", alpha=0.3)
    return fig


# ------------------------------------------------------------------ page


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _when(x: datetime | None) -> str:
    return "-" if x is None else f"{x:%Y-%m-%d %H:%M:%S} UTC"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool], err_col: int = -1) -> str:
    """An HTML table of already formatted cells (escaped here)."""
    th = f"<tr>{''.join(f'<th>{escape(h)}</th>' for h in head)}</tr>" if head else ""
    body = []
    for row in rows:
        cells = []
        for i, (cell, is_num) in enumerate(zip(row, numeric, strict=True)):
            cls = ' class="n"' if is_num else ' class="err"' if i == err_col else ""
            cells.append(f"<td{cls}>{escape(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>{th}{''.join(body)}</table>"


def _img(charts: dict[str, str], name: str, alt: str) -> str:
    return f'<img src="{charts[name]}" alt="{escape(alt)}">' if name in charts else ""


def _page(report: JobReport, charts: dict[str, str]) -> str:
    j, m, b = report.job, report.model, report.batches
    summary = _table(
        [],
        [
            ["status", j.status],
            ["task", j.task],
            ["model", j.model],
            ["precision", j.precision],
            [
                "items",
                f"{j.total:,} total: {j.done:,} done, {j.failed:,} failed, {j.cancelled:,} cancelled, "
                f"{j.pending:,} pending",
            ],
            ["result cache", f"{j.cache_hits:,} done items reused, not computed"],
            *([["shadow check", shadow_line(j.shadow)]] if j.shadow else []),
            *([["shadow check warning", warning]] if (warning := shadow_warning(j.shadow or {}, j.task)) else []),
            *([["precision choice", "; ".join(m.precision_choices)]] if m.precision_choices else []),
            ["created / started / finished", f"{_when(j.created_at)} / {_when(j.started_at)} / {_when(j.finished_at)}"],
            ["wall time", f"{_num(j.wall_seconds)} s"],
            ["throughput", f"{_num(j.items_per_second)} items/s"],
            *([["generation", generation_line(report.generation)]] if report.generation else []),
            ["revision", ", ".join(m.revisions) or "-"],
            ["device", ", ".join(m.devices) or "-"],
            ["quantization", ", ".join(m.quantization) or "-"],
            ["model footprint", "-" if m.footprint_bytes is None else f"{m.footprint_bytes / 1e6:,.1f} MB"],
            ["model load time", "-" if m.load_seconds is None else f"{m.load_seconds:.1f} s (mean per worker)"],
            *([["error", j.error]] if j.error else []),
        ],
        [False, False],
    )
    parts = [
        f"<h1>pipeq job {escape(j.id)}</h1>",
        f'<p class="sub">{escape(j.task)} · {escape(j.precision)} · {escape(j.status)} · '
        f"report generated {_when(report.generated_at)}</p>",
        summary,
    ]
    if not b.batches:
        parts.append('<p class="empty">No batches recorded yet.</p>')
    else:
        parts += _timing_sections(report, charts)
    parts += _failure_section(report)
    title = f"pipeq report {j.id}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _timing_sections(report: JobReport, charts: dict[str, str]) -> list[str]:
    b = report.batches
    generation = report.generation is not None
    phases = _table(
        ["phase", "mean ms", "p50 ms", "p95 ms", "p99 ms", "max ms", "share of total"],
        [
            [
                p.name,
                _num(p.mean_ms, 2),
                _num(p.p50_ms, 2),
                _num(p.p95_ms, 2),
                _num(p.p99_ms, 2),
                _num(p.max_ms, 2),
                _pct(p.share),
            ]
            for p in report.phases
        ],
        [False, True, True, True, True, True, True],
    )
    workers = _table(
        [
            "worker",
            "host:pid",
            "device",
            "precision",
            "quantization",
            "items",
            "share",
            "batches",
            "busy s",
            "padding eff.",
            "footprint",
            "load s",
            *(["output tok/s"] if generation else []),
        ],
        [
            [
                w.worker_id[:12],
                f"{w.host or '?'}:{w.pid or '?'}",
                w.device or "-",
                w.precision or "-",
                w.quantization or "-",
                f"{w.items:,}",
                _pct(w.share),
                f"{w.batches:,}",
                _num(w.busy_seconds),
                _pct(w.padding_efficiency),
                "-" if w.footprint_bytes is None else f"{w.footprint_bytes / 1e6:,.1f} MB",
                _num(w.load_seconds),
                *([_num(w.output_tokens_per_second)] if generation else []),
            ]
            for w in report.workers
        ],
        [False, False, False, False, False, True, True, True, True, True, True, True, *([True] if generation else [])],
    )
    return [
        "<h2>Throughput</h2>",
        _img(charts, "throughput", "items per second over time, per worker"),
        "<h2>Time per phase</h2>",
        _img(charts, "phase_means", "mean time per batch by phase, per worker"),
        '<div class="grid">'
        + _img(charts, "phase_percentiles", "percentiles of each phase")
        + f"<div>{phases}</div></div>",
        '<p class="sub">Share is of the summed batch total (preprocess + forward + postprocess); '
        "queue wait is spent before a chunk starts and is not part of it.</p>",
        "<h2>Batches</h2>",
        f"<p>{b.batches:,} batches, {b.mean_items or 0:.1f} items and {b.mean_rows or 0:.1f} rows each on average; "
        f"padding efficiency {_pct(b.padding_efficiency)} ({b.real_tokens:,} real of {b.padded_tokens:,} "
        "padded tokens).</p>",
        '<div class="grid">'
        + _img(charts, "rows", "histogram of rows per forward pass")
        + _img(charts, "latency", "histogram of batch latency")
        + "</div>",
        "<h2>Workers</h2>",
        workers,
    ]


def _failure_section(report: JobReport) -> list[str]:
    if not report.failures:
        return ["<h2>Failures</h2>", '<p class="empty">No failed items.</p>']
    table = _table(
        ["reason", "items", "example item", "example error"],
        [[f.reason, f"{f.count:,}", str(f.example_idx), f.example_error] for f in report.failures],
        [False, True, True, False],
        err_col=3,
    )
    return ["<h2>Failures</h2>", table]
