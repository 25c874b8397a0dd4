"""Pooled embeddings stored as binary vectors: the format, dtype and dims, the store on SQLite and PostgreSQL,
results, to_numpy, Arrow and Parquet exports, the result cache, the shadow check and the migration."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from pipeq import Client, Job, Settings
from pipeq import constants as C
from pipeq.cli import app as cli_app
from pipeq.errors import ConfigurationError
from pipeq.primitives import ItemResult
from pipeq.producer.writers import COLUMNS, EMBEDDING, write_results
from pipeq.routing import ServeKey
from pipeq.store import NewItem, Store, new_job_row
from pipeq.store import schema as db
from pipeq.vectors import HEADER_BYTES, Vector, stack
from pipeq.worker.config import WorkerConfig
from pipeq.worker.context import WorkerContext
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import load_pipeline

TASK = "feature-extraction"
TEXTS = [" ".join(["word"] * (1 + (i * 5) % 17)) + f" text {i}" for i in range(10)]
POOLED = {"pooling": "mean", "normalize": True}
WRITE = {"worker_id": None, "model_revision": None, "precision": "fp32", "device": "cpu"}


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, dim)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def scalar(url: str, sql: str) -> Any:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        value = conn.execute(sa.text(sql)).scalar()
    engine.dispose()
    return value


def store_job(store: Store, job_id: str, n: int, params: dict[str, Any], model: str = "m") -> None:
    rows = [NewItem(i, None, f"t{i}", len(f"t{i}"))
            for i in range(n)]  # fmt: skip
    store.create_job(new_job_row(job_id, ServeKey(TASK, model), params=params), [rows])


# ------------------------------------------------------------------ the format


def test_float32_round_trips_exactly_and_names_its_type() -> None:
    values = unit_vectors(1, 384)[0]
    vector = Vector.encode(values)
    assert vector.blob[:HEADER_BYTES] == b"<f4\0" and len(vector.blob) == HEADER_BYTES + 384 * 4
    assert (vector.dim, vector.dtype) == (384, np.dtype("<f4"))
    assert np.array_equal(vector.array(), values)
    # The floats results() gives are the float32 values widened, as tolist() of the tensor gave them before.
    assert vector.tolist() == values.tolist()
    assert np.array_equal(np.asarray([vector, vector]), np.stack([values, values]))


def test_float16_halves_the_bytes_within_its_precision() -> None:
    values = unit_vectors(1, 384)[0]
    vector = Vector.encode(values, "float16")
    assert vector.blob[:HEADER_BYTES] == b"<f2\0" and len(vector.blob) == HEADER_BYTES + 384 * 2
    # float16 keeps 11 significant bits: relative rounding of at most 2**-11.
    np.testing.assert_allclose(vector.array(), values, rtol=2**-11, atol=2**-24)
    assert not np.array_equal(vector.array(), values), "the values are rounded, so the test can fail"


def test_a_value_float16_cannot_hold_is_refused_not_stored_as_infinity() -> None:
    with pytest.raises(ValueError, match=r"does not fit float16 \(largest magnitude 70000\); store it as float32"):
        Vector.encode([1.0, 70000.0], "float16")
    assert Vector.encode([1.0, 70000.0]).tolist() == [1.0, 70000.0]


def test_non_finite_values_read_back_as_none_as_json_stored_them() -> None:
    assert Vector.encode([1.0, float("nan"), float("inf")]).tolist() == [1.0, None, None]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_encoded_at_once_are_the_vectors_of_each_row(dtype: str) -> None:
    values = unit_vectors(5, 384) * 3
    values[2, 7] = float("nan")  # kept, as encode keeps it
    rows = Vector.encode_rows(values, dtype)
    assert rows == [Vector.encode(row, dtype) for row in values]
    assert all(type(v) is Vector and v.dim == 384 for v in rows)
    assert Vector.encode_rows(np.zeros((0, 8), dtype=np.float32)) == []


def test_rows_encoded_at_once_refuse_a_row_that_does_not_fit_as_encode_does() -> None:
    values = np.ones((3, 4), dtype=np.float32)
    values[1, 2] = 70000.0
    with pytest.raises(ValueError, match=r"does not fit float16 \(largest magnitude 70000\); store it as float32"):
        Vector.encode_rows(values, "float16")
    with pytest.raises(ValueError, match="2-D"):
        Vector.encode_rows(values[0])


def test_a_blob_that_is_not_a_vector_is_refused() -> None:
    with pytest.raises(ValueError, match="not a stored vector"):
        Vector(b"\x00\x01\x02\x03\x04\x05")
    with pytest.raises(ValueError, match="not a stored vector"):
        Vector(b"<f4\0\x01\x02")  # half a float


def test_stack_reads_a_page_in_one_piece_and_mixed_pages_row_by_row() -> None:
    values = unit_vectors(5, 8)
    same = [Vector.encode(v, "float16") for v in values]
    got, present = stack(same, 8)
    assert got.dtype == np.float32 and present.all()
    np.testing.assert_array_equal(got, np.stack([v.array() for v in same]))
    # Failed items (None), JSON lists stored before vectors were binary, and both types in one page.
    mixed = [Vector.encode(values[0]), None, values[2].tolist(), Vector.encode(values[3], "float16"), None]
    got, present = stack(mixed, 8)
    assert present.tolist() == [True, False, True, True, False]
    np.testing.assert_array_equal(got[0], values[0])
    np.testing.assert_array_equal(got[2], values[2])
    assert np.isnan(got[1]).all() and np.isnan(got[4]).all()
    with pytest.raises(ValueError, match="a vector of 8 values among vectors of 4"):
        stack(same, 4)


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({**POOLED, "dtype": "bfloat16"}, "dtype must be one of float32, float16"),
        ({**POOLED, "dims": 0}, "dims must be a whole number of dimensions, 1 or more, not 0"),
        ({**POOLED, "dims": "16"}, "dims must be a whole number"),
        ({**POOLED, "dims": True}, "dims must be a whole number"),
        ({**POOLED, "dims": 33}, "dims=33 is more than the model's 32 dimensions"),
        ({"dtype": "float16"}, "dtype needs pooling"),
        ({"dims": 8}, "dims needs pooling"),
    ],
)
def test_bad_dtype_or_dims_is_refused_at_submit_and_nothing_is_stored(
    client: Client, model_dir: Callable[[str], str], params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        client.submit(TEXTS, task=TASK, model=model_dir(TASK), params=params)
    assert client.store.recent_jobs() == []


def test_dtype_is_reserved_for_every_other_task(client: Client, model_dir: Callable[[str], str]) -> None:
    model = model_dir("text-classification")
    with pytest.raises(ConfigurationError, match="task parameters may not set dtype"):
        client.submit(TEXTS, task="text-classification", model=model, params={"dtype": "float16"})


def test_the_cli_parses_dims_as_a_number_and_refuses_a_bad_one(model_dir: Callable[[str], str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    db.upgrade(url)
    texts = tmp_path / "in.txt"
    texts.write_text("one\ntwo\n")
    env = {"PIPEQ_DATABASE_URL": url, "PIPEQ_BROKER_URL": "memory://", "HF_HUB_OFFLINE": "1"}
    args = ["submit", str(texts), "--task", TASK, "--model", model_dir(TASK), "--param", "pooling=mean"]
    bad = CliRunner().invoke(cli_app, [*args, "--param", "dims=64"], env=env)
    assert bad.exit_code != 0 and "dims=64 is more than the model's 32 dimensions" in bad.stderr
    good = CliRunner().invoke(cli_app, [*args, "--param", "dims=16", "--param", "dtype=float16"], env=env)
    assert good.exit_code == 0, good.stderr
    with Store(url) as store:
        job = store.job_row(good.stdout.strip().splitlines()[-1])
    assert job is not None and job["params"] == {"pooling": "mean", "dims": 16, "dtype": "float16"}


# ------------------------------------------------------------------ the worker's runtime


@pytest.fixture(scope="module")
def runtime(model_dir: Callable[[str], str]) -> PipelineRuntime:
    loaded = load_pipeline(WorkerConfig(key=ServeKey(TASK, model_dir(TASK))))
    return PipelineRuntime(loaded.pipe, TASK, max_batch_size=4)


def run(rt: PipelineRuntime, params: dict[str, Any]) -> list[Any]:
    out = {r.idx: r for results, _ in rt.run(list(enumerate(TEXTS)), params) for r in results}
    assert all(out[i].status == C.ITEM_DONE for i in range(len(TEXTS))), [r.error for r in out.values()]
    return [out[i].output for i in range(len(TEXTS))]


def test_pooled_outputs_are_float32_vectors_unless_the_job_names_another_type(runtime: PipelineRuntime) -> None:
    default = run(runtime, {"pooling": "mean"})
    assert all(isinstance(v, Vector) and v.dtype == np.dtype("<f4") for v in default)
    half = run(runtime, {"pooling": "mean", "dtype": "float16"})
    assert all(v.dtype == np.dtype("<f2") for v in half)
    np.testing.assert_allclose(np.asarray(half), np.asarray(default), rtol=2**-11, atol=2**-24)
    tokens = run(runtime, {})
    assert all(isinstance(t, list) and isinstance(t[0][0], list) for t in tokens), "per-token outputs stay JSON"


def test_dims_keeps_the_first_values_and_normalizes_again_only_with_normalize(runtime: PipelineRuntime) -> None:
    full = np.asarray(run(runtime, {"pooling": "mean"}))
    assert full.shape == (len(TEXTS), 32)
    cut = np.asarray(run(runtime, {"pooling": "mean", "dims": 8}))
    np.testing.assert_array_equal(cut, full[:, :8])
    unit = np.asarray(run(runtime, {"pooling": "mean", "dims": 8, "normalize": True}))
    np.testing.assert_allclose(unit, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)


def test_a_worker_refuses_dims_beyond_the_model_whatever_wrote_the_job(runtime: PipelineRuntime) -> None:
    with pytest.raises(ConfigurationError, match="dims=40 is more than the model's 32 dimensions"):
        runtime.stage_params({"pooling": "mean", "dims": 40})


# ------------------------------------------------------------------ the store (SQLite and PostgreSQL)


def test_vectors_are_stored_as_bytes_and_read_back_as_the_same_floats(store: Store, store_url: str) -> None:
    # Given a pooled job whose items were written as vectors, one failed
    store_job(store, "job", 4, POOLED)
    values = unit_vectors(4, 384)
    results = [ItemResult(i, C.ITEM_DONE, output=Vector.encode(values[i]), n_tokens=3) for i in (0, 1, 3)]
    results.insert(2, ItemResult(2, C.ITEM_FAILED, error="forward: RuntimeError: boom"))
    assert store.record_batch("job", results, None, **WRITE).done == 3  # type: ignore[arg-type]
    # Then the bytes are in items.vector, and output is NULL
    assert scalar(store_url, "select count(*) from items where vector is not null and output is null") == 3
    assert scalar(store_url, "select max(length(vector)) from items") == HEADER_BYTES + 384 * 4
    # And results() gives the lists of floats a JSON output held, exactly
    rows = list(Job(store, "job").results())
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    for i in (0, 1, 3):
        assert rows[i]["output"] == values[i].tolist()
        assert json.loads(json.dumps(rows[i]["output"])) == rows[i]["output"]
    assert rows[2]["output"] is None


def test_a_second_delivery_neither_duplicates_nor_overwrites_a_vector(store: Store) -> None:
    store_job(store, "job", 1, POOLED)
    first, second = unit_vectors(2, 16)
    assert store.record_batch("job", [ItemResult(0, C.ITEM_DONE, output=Vector.encode(first))], None, **WRITE).done == 1  # type: ignore[arg-type]
    again = store.record_batch("job", [ItemResult(0, C.ITEM_DONE, output=Vector.encode(second))], None, **WRITE)  # type: ignore[arg-type]
    assert again.skipped == 1
    assert next(Job(store, "job").results())["output"] == first.tolist()


def test_to_numpy_rows_are_item_indexes_and_nan_where_no_vector(store: Store) -> None:
    # Given a job of 5 items: 3 done (one stored as JSON before vectors were binary), 1 failed, 1 pending
    store_job(store, "job", 5, {**POOLED, "dtype": "float16"})
    values = unit_vectors(5, 24)
    results = [
        ItemResult(0, C.ITEM_DONE, output=Vector.encode(values[0], "float16")),
        ItemResult(1, C.ITEM_FAILED, error="forward: RuntimeError: boom"),
        ItemResult(3, C.ITEM_DONE, output=values[3].tolist()),
        ItemResult(4, C.ITEM_DONE, output=Vector.encode(values[4], "float16")),
    ]
    store.record_batch("job", results, None, **WRITE)  # type: ignore[arg-type]
    job = Job(store, "job")
    # When read as an array
    array = job.to_numpy()
    # Then row i is item i, NaN where it has no vector
    assert array.shape == (5, 24) and array.dtype == np.float32
    assert (~np.isnan(array[:, 0])).tolist() == [True, False, False, True, True]
    np.testing.assert_allclose(array[0], values[0], rtol=2**-11)
    np.testing.assert_array_equal(array[3], values[3])
    assert job.embedding_dim() == 24


def test_to_numpy_of_a_job_that_is_not_pooled_says_what_it_needs(store: Store) -> None:
    store_job(store, "job", 1, {})
    with pytest.raises(ConfigurationError, match="to_numpy\\(\\) reads pooled embeddings"):
        Job(store, "job").to_numpy()
    assert Job(store, "job").embedding_dim() is None


def test_parquet_and_arrow_write_a_fixed_size_list_column(store: Store, tmp_path: Path) -> None:
    # Given 25,000 pooled items over several store pages and Arrow batches, every 7th one failed
    n, dim = 25_000, 48
    store_job(store, "job", n, POOLED)
    values = unit_vectors(n, dim)
    failed = set(range(0, n, 7))
    results = [
        ItemResult(i, C.ITEM_FAILED, error="forward: boom") if i in failed
        else ItemResult(i, C.ITEM_DONE, output=Vector.encode(values[i]))
        for i in range(n)
    ]  # fmt: skip
    for start in range(0, n, 5000):
        store.record_batch("job", results[start : start + 5000], None, **WRITE)  # type: ignore[arg-type]
    job = Job(store, "job")
    # When exported
    target = tmp_path / "out.parquet"
    assert job.export("parquet", path=str(target)) == n
    table = pq.read_table(target)
    # Then the embedding column holds the float32 vectors, null where the item failed
    assert table.column_names == [EMBEDDING if c == "output" else c for c in COLUMNS]
    assert table.schema.field(EMBEDDING).type == pa.list_(pa.float32(), dim)
    column = table.column(EMBEDDING)
    assert column.null_count == len(failed)
    assert [i for i, v in enumerate(column.is_null().to_pylist()) if v] == sorted(failed)
    flat = column.combine_chunks().flatten().to_numpy().reshape(-1, dim)
    kept = [i for i in range(n) if i not in failed]
    np.testing.assert_array_equal(flat, values[kept])  # flatten() skips the null rows
    assert table.column("index").to_pylist() == list(range(n))
    assert table.equals(job.to_arrow())
    reader = job.to_arrow_reader()
    assert reader.schema == table.schema and reader.read_all().equals(table)
    # And to_numpy agrees with it
    np.testing.assert_array_equal(job.to_numpy()[kept], values[kept])


def test_text_formats_and_pandas_keep_lists_of_floats(store: Store, tmp_path: Path) -> None:
    store_job(store, "job", 2, POOLED)
    values = unit_vectors(2, 8)
    results = [ItemResult(i, C.ITEM_DONE, output=Vector.encode(values[i])) for i in range(2)]
    store.record_batch("job", results, None, **WRITE)  # type: ignore[arg-type]
    job = Job(store, "job")
    out = io.StringIO()
    assert job.export("jsonl", out=out) == 2
    assert [json.loads(line)["output"] for line in out.getvalue().splitlines()] == values.tolist()
    frame = job.to_pandas()
    assert EMBEDDING in frame.columns and "output" not in frame.columns
    np.testing.assert_array_equal(np.stack(frame[EMBEDDING].to_list()), values)
    # Rows decoded to lists (as results() gives them) still make the same Parquet column when told the size.
    target = tmp_path / "lists.parquet"
    write_results(job.results(), "parquet", path=str(target), embedding_dim=8)
    np.testing.assert_array_equal(pq.read_table(target).column(EMBEDDING).combine_chunks().flatten().to_numpy(),
                                  values.reshape(-1))  # fmt: skip


# ------------------------------------------------------------------ a real worker, end to end


@pytest.fixture
def embedding_ctx(sqlite_url: str, model_dir: Callable[[str], str]) -> Iterator[WorkerContext]:
    cfg = WorkerConfig(key=ServeKey(TASK, model_dir(TASK)), max_batch_size=4, warmup=False, shadow_fraction=1.0)
    context = WorkerContext(Settings(broker_url="memory://", database_url=sqlite_url), cfg)
    context.start()
    yield context
    context.stop()


def chunk(store: Store, key: ServeKey, job_id: str, params: dict[str, Any], use_cache: bool = False) -> list[Any]:
    rows = [NewItem(i, None, t, len(t))
            for i, t in enumerate(TEXTS)]  # fmt: skip
    store.create_job(new_job_row(job_id, key, params=params, use_cache=use_cache), [rows])
    return [[i, t] for i, t in enumerate(TEXTS)]


def test_worker_stores_vectors_that_equal_the_pipeline_and_the_cache_and_shadow_read_them(
    embedding_ctx: WorkerContext, sqlite_url: str, runtime: PipelineRuntime
) -> None:
    store = Store(sqlite_url)
    key = embedding_ctx.cfg.key
    want = np.asarray(run(runtime, POOLED))
    # Given a pooled job run by a worker with the cache and the shadow check on
    counts = embedding_ctx.run_chunk("first", chunk(store, key, "first", POOLED, use_cache=True), None)
    assert counts["done"] == len(TEXTS)
    # Then its items and cache entries hold vectors, not JSON
    assert scalar(sqlite_url, "select count(*) from items where vector is not null and output is null") == len(TEXTS)
    assert scalar(sqlite_url, "select count(*) from result_cache where vector is not null") == len(TEXTS)
    np.testing.assert_allclose(Job(store, "first").to_numpy(), want, atol=1e-6)
    # And the shadow check compared the vectors (fp32 against fp32: the same direction)
    assert embedding_ctx.shadow is not None and embedding_ctx.shadow.drain(timeout=60)
    shadow = store.job("first").shadow
    assert shadow is not None and shadow["sampled"] == len(TEXTS)
    assert shadow["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    # When the same texts come again, they are served from the cache as the same vectors
    embedding_ctx.run_chunk("second", chunk(store, key, "second", POOLED, use_cache=True), None)
    assert store.job("second").cache_hits == len(TEXTS)
    assert [r["output"] for r in Job(store, "second").results()] == [r["output"] for r in Job(store, "first").results()]


def test_client_job_end_to_end_in_float16(client: Client, thread_embedding_worker: str) -> None:
    job = client.submit(TEXTS, task=TASK, model=thread_embedding_worker, params={**POOLED, "dtype": "float16"})
    assert job.wait(timeout=120).done == len(TEXTS)
    array = job.to_numpy()
    assert array.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-3)
    assert [r["output"] for r in job.results()] == array.tolist()
    assert scalar(client.settings.database_url, "select max(length(vector)) from items") == HEADER_BYTES + 32 * 2


# ------------------------------------------------------------------ the migration


def test_downgrade_writes_vectors_back_as_json_and_upgrade_adds_the_column_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    values = unit_vectors(3, 16)
    with Store(url) as store:
        store_job(store, "job", 3, POOLED)
        results = [ItemResult(0, C.ITEM_DONE, output=Vector.encode(values[0], "float16")),
                   ItemResult(1, C.ITEM_DONE, output={"kept": "as it was"}),
                   ItemResult(2, C.ITEM_DONE, output=Vector.encode(values[2]))]  # fmt: skip
        store.record_batch("job", results, None, **WRITE)  # type: ignore[arg-type]
        store.cache_put([{"key": "k", "task": TASK, "model": "m", "revision": None, "precision": "fp32",
                          "output": None, "vector": Vector.encode(values[1]).blob}])  # fmt: skip
        before = [r["output"] for r in Job(store, "job").results()]
    db.downgrade(url, "0006")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert "vector" not in {c["name"] for c in sa.inspect(conn).get_columns("items")}
        stored = [json.loads(o) for (o,) in conn.execute(sa.text("select output from items order by idx"))]
        cached = json.loads(conn.execute(sa.text("select output from result_cache")).scalar_one())
    engine.dispose()
    assert stored == before
    assert cached == values[1].tolist()
    db.upgrade(url)
    with Store(url) as store:
        store.check_schema()
        assert [r["output"] for r in Job(store, "job").results()] == before


def test_a_store_without_the_vector_column_is_told_to_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0006")
    from pipeq.errors import StoreError

    with Store(url) as store, pytest.raises(StoreError, match=r"missing .*items\.vector.*pipeq db upgrade"):
        store.check_schema()
