"""``pipeq report`` and ``pipeq jobs`` on SQLite and PostgreSQL, from batches with known timings."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeq import constants as C
from pipeq.cli import app as cli_app
from pipeq.errors import ConfigurationError, JobNotFoundError
from pipeq.primitives import BatchTiming, ItemResult
from pipeq.report import JobReport, build_report, failure_reason, time_buckets
from pipeq.report.html import write_html
from pipeq.report.text import format_text
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row

#: Worker A runs batches 1..60, worker B batches 61..100; each batch holds two items.
WORKER_A = "a" * 32
WORKER_B = "b" * 32
N_BATCHES = 100
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_job(store: Store, job_id: str, n: int) -> str:
    rows = [NewItem(i, None, f"text {i}", len(f"text {i}")) for i in range(n)]
    store.create_job(new_job_row(job_id, ServeKey("text-classification", "/models/tiny", "int8")), [rows])
    return job_id


def register(store: Store, worker_id: str, host: str, device: str, quantization: str, footprint: int) -> None:
    store.register_worker(
        {
            "id": worker_id,
            "host": host,
            "pid": 1234,
            "queue": "q",
            "task": "text-classification",
            "model": "/models/tiny",
            "precision": "int8",
            "device": device,
            "status": "ready",
            "quantization": quantization,
            "footprint_bytes": footprint,
            "load_seconds": 2.0,
        }
    )


def error_of(k: int) -> str | None:
    """The error of batch k's second item (None: it succeeded)."""
    if k <= 5:
        return f"forward: RuntimeError: boom in batch {k}"
    if k <= 8:
        return "preprocess: ValueError: text input must be of type `str`"
    if k == 9:
        return "gave up after 3 deliveries without a result (the worker died or lost the store)"
    return None


def finished_job(store: Store, job_id: str = "job-finished") -> str:
    """100 batches: forward k ms, preprocess 1 ms, postprocess 0.5 ms, finishing every 0.5 s over 50 s."""
    make_job(store, job_id, 2 * N_BATCHES)
    register(store, WORKER_A, "gpu-1", "cuda:0", "bnb-int8", 70_000_000)
    register(store, WORKER_B, "cpu-1", "cpu", "dynamic-int8", 60_000_000)
    assert store.claim(job_id, list(range(2 * N_BATCHES)))
    for k in range(1, N_BATCHES + 1):
        on_a = k <= 60
        error = error_of(k)
        results = [
            ItemResult(2 * (k - 1), C.ITEM_DONE, output={"label": "POSITIVE"}),
            ItemResult(2 * (k - 1) + 1, C.ITEM_FAILED, error=error)
            if error
            else ItemResult(2 * (k - 1) + 1, C.ITEM_DONE, output={"label": "NEGATIVE"}),
        ]
        timing = BatchTiming(
            size=2,
            rows=2 if on_a else 4,
            real_tokens=6 if on_a else 1,
            padded_tokens=8 if on_a else 4,
            queue_wait_ms=10.0,
            preprocess_ms=1.0,
            forward_ms=float(k),
            postprocess_ms=0.5,
            total_ms=k + 1.5,
            started_at=T0 + timedelta(seconds=(k - 1) / 2),
            finished_at=T0 + timedelta(seconds=k / 2),
        )
        store.record_batch(
            job_id,
            results,
            timing,
            worker_id=WORKER_A if on_a else WORKER_B,
            model_revision="rev1",
            precision="int8",
            device="cuda:0" if on_a else "cpu",
        )
    return job_id


@pytest.fixture
def report(store: Store) -> JobReport:
    return build_report(store, finished_job(store))


def test_job_counts_and_model(report: JobReport) -> None:
    job = report.job
    assert (job.status, job.total, job.done, job.failed, job.pending) == (C.JOB_DONE, 200, 191, 9, 0)
    assert job.started_at is not None and job.finished_at is not None and job.items_per_second > 0
    assert report.model.precision == "int8" and report.model.revisions == ["rev1"]
    assert report.model.devices == ["cpu", "cuda:0"] and report.model.quantization == ["bnb-int8", "dynamic-int8"]
    assert report.model.footprint_bytes == 70_000_000 and report.model.load_seconds == 2.0


def test_phase_percentiles_and_shares(report: JobReport) -> None:
    phases = {p.name: p for p in report.phases}
    assert list(phases) == ["queue_wait", "preprocess", "forward", "postprocess", "total"]
    forward, total = phases["forward"], phases["total"]
    # forward is 1..100 ms: linear-interpolated percentiles.
    assert (forward.p50_ms, forward.p95_ms, forward.p99_ms) == pytest.approx((50.5, 95.05, 99.01))
    assert (total.p50_ms, total.p95_ms, total.p99_ms, total.max_ms) == pytest.approx((52.0, 96.55, 100.51, 101.5))
    assert forward.mean_ms == pytest.approx(50.5) and forward.sum_ms == pytest.approx(5050)
    assert forward.share == pytest.approx(5050 / 5200) and phases["preprocess"].share == pytest.approx(100 / 5200)
    assert phases["postprocess"].share == pytest.approx(50 / 5200) and total.share == pytest.approx(1.0)
    assert phases["queue_wait"].share is None and phases["queue_wait"].p99_ms == pytest.approx(10.0)


def test_batch_shapes_and_padding(report: JobReport) -> None:
    b = report.batches
    assert (b.batches, b.items, b.mean_items, b.mean_rows) == (100, 200, 2.0, 2.8)
    assert b.rows_histogram == [(2, 60), (4, 40)]
    assert (b.real_tokens, b.padded_tokens) == (400, 640)
    assert b.padding_efficiency == pytest.approx(0.625)
    assert sum(report.latency.counts) == 100 and len(report.latency.edges) == len(report.latency.counts) + 1
    assert report.latency.edges[-1] == pytest.approx(101.5)


def test_throughput_buckets_overall_and_per_worker(report: JobReport) -> None:
    t = report.throughput
    # Batches finish every 0.5 s over 50 s: 50 one-second buckets; the last one holds the end edge.
    assert t.start == T0 and t.bucket_seconds == pytest.approx(1.0)
    assert t.items == [2] + [4] * 48 + [6]
    assert t.per_worker[WORKER_A] == [2] + [4] * 29 + [2] + [0] * 19
    assert t.per_worker[WORKER_B] == [0] * 30 + [2] + [4] * 18 + [6]


def test_per_worker_shares(report: JobReport) -> None:
    a, b = report.workers
    assert (a.worker_id, a.items, a.batches, a.host, a.device, a.quantization) == (
        WORKER_A,
        120,
        60,
        "gpu-1",
        "cuda:0",
        "bnb-int8",
    )
    assert (b.worker_id, b.items, b.batches, b.host, b.device, b.footprint_bytes) == (
        WORKER_B,
        80,
        40,
        "cpu-1",
        "cpu",
        60_000_000,
    )
    assert (a.share, b.share) == pytest.approx((0.6, 0.4))
    assert a.busy_seconds == pytest.approx(sum(k + 1.5 for k in range(1, 61)) / 1000)
    assert b.busy_seconds == pytest.approx(sum(k + 1.5 for k in range(61, 101)) / 1000)
    assert (a.padding_efficiency, b.padding_efficiency) == pytest.approx((0.75, 0.25))
    assert a.phase_mean_ms == pytest.approx({"preprocess": 1.0, "forward": 30.5, "postprocess": 0.5})
    assert a.pid == 1234 and a.load_seconds == 2.0 and a.precision == "int8"


def test_failures_grouped_by_reason(report: JobReport) -> None:
    got = [(f.reason, f.count, f.example_idx) for f in report.failures]
    assert got == [
        ("forward: RuntimeError", 5, 1),
        ("preprocess: ValueError", 3, 11),
        ("gave up after N deliveries without a result (…)", 1, 17),
    ]
    assert report.failures[0].example_error == "forward: RuntimeError: boom in batch 1"


def test_failure_reason_masks_variable_parts() -> None:
    assert failure_reason("postprocess: KeyError: 'label'") == "postprocess: KeyError"
    assert (
        failure_reason("job asks for ('a', 'm', 'fp32', None) but this worker serves ('b', 'm', 'int8', None)")
        == "job asks for (…) but this worker serves (…)"
    )
    assert failure_reason(None) == failure_reason("") == "(no error text)"
    assert failure_reason("x" * 200).endswith("…") and len(failure_reason("x" * 200)) == 80


def test_time_buckets_cover_the_span() -> None:
    assert time_buckets(0.0) == (1, 1.0)
    # A short job still gets ten buckets (a 1.1 s job once drew one bucket: a chart with no line).
    assert time_buckets(0.4) == (10, pytest.approx(0.04))
    assert time_buckets(1.1) == (10, pytest.approx(0.11))
    assert time_buckets(50.0) == (50, 1.0)
    n, width = time_buckets(3600.0)
    assert (n, width) == (60, 60.0)


def test_queued_job_without_batches(store: Store, tmp_path: Path) -> None:
    make_job(store, "job-queued", 3)
    report = build_report(store, "job-queued")
    assert (report.job.status, report.job.pending, report.job.wall_seconds) == (C.JOB_QUEUED, 3, 0.0)
    assert report.phases == [] and report.workers == [] and report.failures == []
    assert report.batches.batches == 0 and report.batches.padding_efficiency is None
    assert report.throughput.items == [] and report.latency.counts == []
    assert json.loads(json.dumps(report.as_dict()))["job"]["id"] == "job-queued"
    assert "batches: none recorded yet" in format_text(report)
    page = write_html(report, tmp_path / "queued.html").read_text()
    assert "job-queued" in page and "No batches recorded yet" in page and "data:image/png" not in page


def test_unknown_job(store: Store) -> None:
    with pytest.raises(JobNotFoundError):
        build_report(store, "nope")


def test_text_and_html(report: JobReport, tmp_path: Path) -> None:
    text = format_text(report)
    assert "191 done, 9 failed" in text and "padding efficiency 62.5%" in text
    assert "forward: RuntimeError" in text and "gpu-1:1234" in text
    page = write_html(report, tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "job-finished" in page and "forward: RuntimeError: boom in batch 1" in page


def test_html_without_matplotlib_says_what_to_install(
    report: JobReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'pipeq\[report\]'"):
        write_html(report, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------ CLI


def cli(*args: str) -> Any:
    return CliRunner().invoke(cli_app, list(args))


def test_cli_report(store: Store, store_url: str, tmp_path: Path) -> None:
    job_id = finished_job(store)
    out = cli("report", job_id, "--json", "--database-url", store_url)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["job"]["id"] == job_id and data["batches"]["padding_efficiency"] == pytest.approx(0.625)
    assert data["throughput"]["start"] == T0.isoformat()

    text = cli("report", job_id, "--database-url", store_url)
    assert text.exit_code == 0 and "forward: RuntimeError" in text.stdout

    path = tmp_path / "report.html"
    html = cli("report", job_id, "--html", str(path), "--database-url", store_url)
    assert html.exit_code == 0, html.output
    assert html.stdout == "" and f"to {path}" in html.stderr
    page = path.read_text()
    assert job_id in page and page.count("data:image/png;base64,") == 5

    missing = cli("report", "nope", "--database-url", store_url)
    assert missing.exit_code == 2 and "no job 'nope'" in missing.stderr


def test_cli_jobs(store: Store, store_url: str) -> None:
    finished = finished_job(store)
    queued = make_job(store, "job-queued", 3)
    out = cli("jobs", "--json", "--database-url", store_url)
    assert out.exit_code == 0, out.output
    listed = json.loads(out.stdout)
    assert [j["id"] for j in listed] == [queued, finished]
    assert (listed[1]["status"], listed[1]["done"], listed[1]["failed"], listed[1]["total"]) == ("done", 191, 9, 200)
    assert listed[0]["precision"] == "int8" and listed[0]["model"] == "/models/tiny"

    only_done = json.loads(cli("jobs", "--json", "--status", "done", "--database-url", store_url).stdout)
    assert [j["id"] for j in only_done] == [finished]
    assert [j["id"] for j in json.loads(cli("jobs", "--json", "-n", "1", "--database-url", store_url).stdout)] == [
        queued
    ]
    text = cli("jobs", "--database-url", store_url)
    assert text.exit_code == 0 and text.stdout.splitlines()[1].startswith(finished)
    assert cli("jobs", "--status", "bogus", "--database-url", store_url).exit_code == 2


def test_cli_jobs_shows_a_job_stored_but_not_queued(store: Store, store_url: str) -> None:
    # Given: a job whose publish failed at submit (the producer recorded why on the job)
    job_id = make_job(store, "job-unqueued", 50)
    error = f"job {job_id} is stored but not queued: could not queue job {job_id} on redis://r:6379/0: OOM"
    store.set_job_error(job_id, error)
    # Then: `pipeq jobs` says it is not on the broker, why, and how it gets there
    lines = cli("jobs", "--database-url", store_url).stdout.splitlines()
    assert lines[0].startswith(f"{job_id}  ") and "  unqueued  " in lines[0] and " 0/0/50 " in lines[0]
    assert lines[1:] == [
        f"  error: {error}",
        "  hint: a live worker on its queue publishes it once the queue is empty (PIPEQ_LOST_AFTER); "
        f"`pipeq resume {job_id}` does now",
    ]
    (listed,) = json.loads(cli("jobs", "--json", "--database-url", store_url).stdout)
    assert (listed["status"], listed["published"]) == ("queued", False)
    # Once published, it is listed as queued like any other
    store.mark_published(job_id)
    (line,) = cli("jobs", "--database-url", store_url).stdout.splitlines()
    assert "  queued  " in line
