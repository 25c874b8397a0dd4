"""The opt-in result cache: keys, the store's queries on SQLite and PostgreSQL, a worker reusing outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from typer.testing import CliRunner

from pipeq import Client, Settings
from pipeq import constants as C
from pipeq.cache import CacheScope, cache_key
from pipeq.cli import app as cli_app
from pipeq.primitives import ItemResult
from pipeq.report import build_report
from pipeq.report.html import write_html
from pipeq.report.text import format_text
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext

TASK = "text-classification"
TEXTS = [f"text number {i} " * (i % 5 + 1) for i in range(12)]


def scalar(url: str, sql: str, **params: Any) -> Any:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        value = conn.execute(sa.text(sql), params).scalar_one()
    engine.dispose()
    return value


def submit(
    store: Store,
    key: ServeKey,
    texts: list[str],
    job_id: str,
    *,
    use_cache: bool = True,
    params: dict[str, Any] | None = None,
) -> list[list[Any]]:
    """Store a job the way the client does and return its one message's items."""
    rows = [NewItem(i, None, t, len(t)) for i, t in enumerate(texts)]
    store.create_job(new_job_row(job_id, key, params=params, use_cache=use_cache), [rows])
    return [[i, t] for i, t in enumerate(texts)]


def outputs(store: Store, job_id: str) -> list[Any]:
    return [r["output"] for r in store.iter_results(job_id)]


def cached_flags(store: Store, job_id: str) -> list[bool | None]:
    return [r["cached"] for r in store.iter_results(job_id)]


# ------------------------------------------------------------------- keys


def test_key_covers_everything_an_output_depends_on() -> None:
    base = ("text-classification", "m", "abc123", "int8", {"top_k": 2, "truncation": True}, "hello")
    key = cache_key(*base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key("text-classification", "m", "abc123", "int8", {"truncation": True, "top_k": 2}, "hello") == key
    for i, other in enumerate(["zero-shot-classification", "m2", "def456", "fp32", {"top_k": 3}, "hello!"]):
        changed = list(base)
        changed[i] = other
        assert cache_key(*changed) != key, f"argument {i} is part of the key"  # type: ignore[arg-type]
    assert cache_key(*base[:2], None, *base[3:]) != key


# ------------------------------------------------------------ store (both)


def cache_row(key: str, output: Any) -> dict[str, Any]:
    return {"key": key, "task": TASK, "model": "m", "revision": None, "precision": "fp32", "output": output}


def test_cache_put_keeps_the_first_row_and_get_finds_only_stored_keys(store: Store) -> None:
    assert store.cache_get([]) == {}
    store.cache_put([cache_row("k1", {"label": "a", "score": 0.5}), cache_row("k2", [1.0, 2.0])])
    store.cache_put([cache_row("k1", {"label": "changed"}), cache_row("k3", None), cache_row("k3", "dup")])
    found = store.cache_get(["k1", "k2", "k3", "missing"])
    assert found["k1"] == {"label": "a", "score": 0.5} and found["k2"] == [1.0, 2.0]
    assert set(found) == {"k1", "k2", "k3"}


def test_record_batch_caches_computed_outputs_and_counts_hits(store: Store, store_url: str) -> None:
    key = ServeKey(TASK, "m")
    submit(store, key, ["a", "b", "c"], "first")
    job = store.job_row("first")
    assert job is not None and job["use_cache"] is True
    scope = CacheScope.of(job, "rev1", [(0, "a"), (1, "b"), (2, "c")])
    computed = [
        ItemResult(0, C.ITEM_DONE, output={"label": "x", "score": 0.9}),
        ItemResult(1, C.ITEM_FAILED, error="forward: RuntimeError: boom"),
        ItemResult(2, C.ITEM_DONE, output={"label": "y", "score": 0.8}),
    ]
    write = {"worker_id": None, "model_revision": "rev1", "precision": "fp32", "device": "cpu", "cache_scope": scope}
    store.record_batch("first", computed, None, **write)  # type: ignore[arg-type]
    found = store.cache_get(list(scope.keys.values()))
    assert found == {scope.keys[0]: {"label": "x", "score": 0.9}, scope.keys[2]: {"label": "y", "score": 0.8}}
    assert scalar(store_url, "select count(*) from result_cache where revision = 'rev1' and hits = 0") == 2

    # A second job served from the cache: hits counted on the job and on the entries, once per item.
    submit(store, key, ["a", "c"], "second")
    second = store.job_row("second")
    assert second is not None
    scope2 = CacheScope.of(second, "rev1", [(0, "a"), (1, "c")])
    assert scope2.keys[0] == scope.keys[0]
    hits = [ItemResult(i, C.ITEM_DONE, output=found[scope2.keys[i]], cached=True) for i in (0, 1)]
    write2 = {**write, "cache_scope": scope2}
    assert store.record_batch("second", hits, None, **write2).done == 2  # type: ignore[arg-type]
    assert store.record_batch("second", hits, None, **write2).skipped == 2  # type: ignore[arg-type]
    assert store.job("second").cache_hits == 2 and store.job("second").status == C.JOB_DONE
    assert cached_flags(store, "second") == [True, True]
    assert cached_flags(store, "first") == [None, None, None]
    assert scalar(store_url, "select sum(hits) from result_cache") == 2
    assert store.job("first").cache_hits == 0


def test_update_shadow_reads_modifies_writes(store: Store) -> None:
    submit(store, ServeKey(TASK, "m", "int8"), ["a"], "job", use_cache=False)
    assert store.job("job").shadow is None
    for _ in range(3):
        store.update_shadow("job", lambda cur: {"sampled": (cur or {}).get("sampled", 0) + 2})
    assert store.job("job").shadow == {"sampled": 6}


# ----------------------------------------------------------- worker context


def test_resubmitted_job_runs_no_model(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    # Given a cached job that ran
    first = ctx.run_chunk("first", submit(store, ctx.cfg.key, TEXTS, "first"), None)
    assert first["done"] == len(TEXTS) and store.job("first").cache_hits == 0
    assert scalar(sqlite_url, "select count(*) from result_cache") == len(TEXTS)
    # When the same texts are submitted again with the cache
    second = ctx.run_chunk("second", submit(store, ctx.cfg.key, TEXTS, "second"), None)
    # Then no batch runs for it, every item is a hit with the same output
    assert second["done"] == len(TEXTS)
    assert scalar(sqlite_url, "select count(*) from batches where job_id = 'second'") == 0
    assert scalar(sqlite_url, "select count(*) from batches where job_id = 'first'") > 0
    assert cached_flags(store, "second") == [True] * len(TEXTS)
    assert outputs(store, "second") == outputs(store, "first")
    state = store.job("second")
    assert (state.status, state.cache_hits, state.done) == (C.JOB_DONE, len(TEXTS), len(TEXTS))
    assert scalar(sqlite_url, "select sum(hits) from result_cache") == len(TEXTS)


def test_overlapping_job_gets_exactly_the_overlap(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    ctx.run_chunk("first", submit(store, ctx.cfg.key, TEXTS[:8], "first"), None)
    mixed = ["new text one", TEXTS[2], "new text two", TEXTS[5], TEXTS[7], "new text three"]
    ctx.run_chunk("second", submit(store, ctx.cfg.key, mixed, "second"), None)
    assert store.job("second").cache_hits == 3
    assert cached_flags(store, "second") == [None, True, None, True, True, None]
    assert scalar(sqlite_url, "select count(*) from batches where job_id = 'second'") > 0
    by_text = dict(zip(TEXTS[:8], outputs(store, "first"), strict=True))
    assert [outputs(store, "second")[i] for i in (1, 3, 4)] == [by_text[mixed[i]] for i in (1, 3, 4)]
    assert scalar(sqlite_url, "select count(*) from result_cache") == 8 + 3, "the new outputs are cached too"


def test_other_parameters_miss(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    ctx.run_chunk("first", submit(store, ctx.cfg.key, TEXTS, "first"), None)
    ctx.run_chunk("topk", submit(store, ctx.cfg.key, TEXTS, "topk", params={"top_k": None}), None)
    assert store.job("topk").cache_hits == 0 and set(cached_flags(store, "topk")) == {None}
    assert all(isinstance(out, list) for out in outputs(store, "topk")), "computed with its own parameters"
    assert scalar(sqlite_url, "select count(*) from result_cache") == 2 * len(TEXTS), "both jobs' outputs kept"


def test_other_precision_misses(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    ctx.run_chunk("fp32", submit(store, ctx.cfg.key, TEXTS, "fp32"), None)
    int8 = WorkerContext(ctx.settings, ctx.cfg.with_precision("int8"))
    int8.start()
    try:
        counts = int8.run_chunk("int8", submit(store, int8.cfg.key, TEXTS, "int8"), None)
    finally:
        int8.stop()
    assert counts["done"] == len(TEXTS) and store.job("int8").cache_hits == 0
    assert scalar(sqlite_url, "select count(*) from result_cache where precision = 'int8'") == len(TEXTS)


def test_job_without_cache_neither_reads_nor_writes_it(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    ctx.run_chunk("plain", submit(store, ctx.cfg.key, TEXTS, "plain", use_cache=False), None)
    assert scalar(sqlite_url, "select count(*) from result_cache") == 0
    ctx.run_chunk("cached", submit(store, ctx.cfg.key, TEXTS, "cached"), None)
    assert store.job("cached").cache_hits == 0
    ctx.run_chunk("plain2", submit(store, ctx.cfg.key, TEXTS, "plain2", use_cache=False), None)
    assert store.job("plain2").cache_hits == 0 and set(cached_flags(store, "plain2")) == {None}
    assert scalar(sqlite_url, "select count(*) from batches where job_id = 'plain2'") > 0
    assert scalar(sqlite_url, "select sum(hits) from result_cache") == 0


def test_repeated_texts_in_one_job_are_stored_once(ctx: WorkerContext, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    counts = ctx.run_chunk("dups", submit(store, ctx.cfg.key, ["same", "same", "other", "same"], "dups"), None)
    assert counts["done"] == 4
    assert scalar(sqlite_url, "select count(*) from result_cache") == 2


# ------------------------------------------------------ client, CLI, report


def test_cli_submit_cache_and_hits_in_status_and_report(
    settings: Settings, thread_worker: WorkerConfig, tmp_path: Path
) -> None:
    env = {"PIPEQ_BROKER_URL": settings.broker_url, "PIPEQ_DATABASE_URL": settings.database_url}
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS[:5]) + "\n", encoding="utf-8")
    with Client(settings) as client:
        first = client.submit(TEXTS[:3], task=TASK, model=thread_worker.key.model, cache=True)
        first.wait(timeout=60)
        runner = CliRunner()
        args = ["submit", str(src), "--task", TASK, "--model", thread_worker.key.model, "--cache", "--wait"]
        out = runner.invoke(cli_app, args, env=env)
        assert out.exit_code == 0, out.output
        job_id = out.stdout.strip().splitlines()[-1]
        assert client.store.job_row(job_id)["use_cache"] is True  # type: ignore[index]

    status = json.loads(runner.invoke(cli_app, ["status", job_id, "--json"], env=env).stdout)
    assert (status["done"], status["cache_hits"], status["shadow"]) == (5, 3, None)
    assert "result cache: 3 items reused" in runner.invoke(cli_app, ["status", job_id], env=env).stdout
    assert "result cache" not in runner.invoke(cli_app, ["status", first.id], env=env).stdout
    report = json.loads(runner.invoke(cli_app, ["report", job_id, "--json"], env=env).stdout)
    assert report["job"]["cache_hits"] == 3
    rows = [json.loads(line) for line in runner.invoke(cli_app, ["results", job_id], env=env).stdout.splitlines()]
    assert [r["cached"] for r in rows] == [True, True, True, False, False]
    store = Store(settings.database_url)
    job_report = build_report(store, job_id)
    assert "result cache: 3 of the 5 done items reused" in format_text(job_report)
    page = write_html(job_report, tmp_path / "r.html").read_text()
    assert "3 done items reused, not computed" in page
