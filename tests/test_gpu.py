"""The CUDA paths: fp32, fp16, bf16, bitsandbytes LLM.int8 and NF4 on a GPU, and a device map over the GPU and
the CPU, in process and through a real worker.

Marked ``gpu`` and deselected by default (CI and this project's machines have no GPU); run them where
a GPU is: ``pytest -m gpu``. Without CUDA they fail rather than skip, so a GPU run can't pass empty.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import pipeline

import tinymodels
from pipeq import Client, Settings
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.store import schema as db
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import LoadedPipeline, load_pipeline
from test_runtime import assert_close

pytestmark = pytest.mark.gpu

TASK = "text-classification"
TEXTS = [
    "I've been waiting for a HuggingFace course my whole life.",
    "I hate this so much!",
    "我非常讨厌这个！",
    "ok",
    "a somewhat longer sentence about the weather " * 6,
    "word " * 400,  # over the model's maximum: truncated
] * 4
DEVICE = "cuda:0"


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA: run them on a GPU machine (pytest -m gpu)")


def load(model: str, precision: str, task: str = TASK) -> LoadedPipeline:
    return load_pipeline(WorkerConfig(key=ServeKey(task, model, precision), device=DEVICE))


def run(loaded: LoadedPipeline, task: str = TASK, params: dict[str, Any] | None = None) -> list[Any]:
    rt = PipelineRuntime(loaded.pipe, task, max_batch_tokens=512, max_batch_size=8)
    out = {r.idx: r for results, _ in rt.run(list(enumerate(TEXTS)), params or {}) for r in results}
    assert sorted(out) == list(range(len(TEXTS)))
    assert all(r.status == "done" for r in out.values()), [r.error for r in out.values() if r.error]
    return [out[i].output for i in range(len(TEXTS))]


def scores(output: list[dict[str, Any]]) -> dict[str, float]:
    return {d["label"]: d["score"] for d in output}


@pytest.mark.parametrize("task", [TASK, "feature-extraction"])
def test_fp32_on_cuda_equals_plain_pipeline_on_the_cpu(task: str, model_dir: Callable[[str], str]) -> None:
    model = model_dir(task)
    loaded = load(model, "fp32", task)
    assert next(loaded.pipe.model.parameters()).device.type == "cuda"
    params = {"top_k": None} if task == TASK else {}
    got = run(loaded, task, params)
    cpu = pipeline(task, model=model, device="cpu")
    want = [cpu(t, truncation=True, **params) for t in TEXTS]
    assert_close(got, want, tol=1e-3)  # TF32-free fp32 on the GPU, different kernels: 1e-3 not 1e-4


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precisions_on_cuda_stay_close_to_fp32(
    precision: str, dtype: torch.dtype, model_dir: Callable[[str], str]
) -> None:
    model = model_dir(TASK)
    half = load(model, precision)
    assert next(half.pipe.model.parameters()).dtype == dtype
    assert half.footprint_bytes < load(model, "fp32").footprint_bytes * 0.6
    ref, got = run(load(model, "fp32"), params={"top_k": None}), run(half, params={"top_k": None})
    for a, b in zip(ref, got, strict=True):
        sa, sb = scores(a), scores(b)
        assert sa.keys() == sb.keys()
        assert max(abs(sa[k] - sb[k]) for k in sa) < 2e-2


def test_bitsandbytes_int8_on_cuda(model_dir: Callable[[str], str]) -> None:
    import bitsandbytes as bnb

    model = model_dir(TASK)
    fp32, int8 = load(model, "fp32"), load(model, "int8")
    assert int8.quantization == "bitsandbytes-llm-int8"
    linears = [m for m in int8.pipe.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    assert int8.footprint_bytes < fp32.footprint_bytes
    for a, b in zip(run(fp32, params={"top_k": None}), run(int8, params={"top_k": None}), strict=True):
        sa, sb = scores(a), scores(b)
        assert max(abs(sa[k] - sb[k]) for k in sa) < 0.05


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_worker_on_cuda_end_to_end(
    precision: str, tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    model = model_dir(TASK)
    args = ("--task", TASK, "--model", model, "--precision", precision, "--device", DEVICE, "--concurrency", "2")
    worker = start_worker(*args, broker_url=redis_url, database_url=url)
    store = Store(url)
    queue = ServeKey(TASK, model, precision).queue
    # Both children loaded before the job: a child still loading has no quantization on its row yet.
    worker.wait_ready(store, queue, children=2)
    with Client(Settings(broker_url=redis_url, database_url=url, chunk_size=8)) as client:
        job = client.submit(TEXTS, task=TASK, model=model, precision=precision)
        state = job.wait(timeout=120)
        results = list(job.results())
    assert (state.status, state.done, state.failed) == ("done", len(TEXTS), 0)
    assert [r["index"] for r in results] == list(range(len(TEXTS)))
    assert all(r["timing"]["forward_ms"] > 0 for r in results)
    live = store.live_workers(queue)
    assert {w["device"] for w in live} == {DEVICE}
    want = "bitsandbytes-llm-int8" if precision == "int8" else "none"
    assert {w["quantization"] for w in live} == {want}
    store.close()


def test_a_cuda_worker_runs_several_children_of_a_small_model_by_default(
    tmp_path: Path, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    """No --concurrency: as many children as the host's cores and the GPU's memory allow for a small model
    (pipeq/worker/children.py), each serving the queue with its share of the tokenizer's threads."""
    from pipeq.worker.children import default_children, weights_bytes
    from pipeq.worker.devices import available_cores

    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    model = model_dir(TASK)
    memory = torch.cuda.get_device_properties(0).total_memory
    cores = available_cores() // torch.cuda.device_count()  # the GPU's share of them
    want = default_children(DEVICE, cores=cores, weights=weights_bytes(model), device_memory=memory).children
    assert want > 1, f"this test needs a host of at least 8 cores ({cores} here)"
    worker = start_worker("--task", TASK, "--model", model, "--precision", "fp16", "--device", DEVICE,
                          broker_url=redis_url, database_url=url)  # fmt: skip
    store = Store(url)
    queue = ServeKey(TASK, model, "fp16").queue
    worker.wait_ready(store, queue, children=want)
    ready = [w for w in store.live_workers(queue) if w["status"] == "ready"]
    assert len(ready) == len(store.live_workers(queue)) == want
    assert {w["settings"]["concurrency"] for w in ready} == {want}
    assert {w["settings"]["tokenizer_threads"] for w in ready} == {
        WorkerConfig(ServeKey(TASK, model, "fp16"), device=DEVICE, concurrency=want).resolved_tokenizer_threads
    }
    with Client(Settings(broker_url=redis_url, database_url=url, chunk_size=4)) as client:
        job = client.submit(TEXTS * 4, task=TASK, model=model, precision="fp16")
        state = job.wait(timeout=120)
        results = list(job.results())
    assert (state.status, state.done, state.failed) == ("done", len(TEXTS) * 4, 0)
    assert len({r["timing"]["worker_id"] for r in results}) > 1  # the children shared the job
    store.close()


def test_nf4_on_cuda(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model = tinymodels.build(TASK, tmp_path / "m", hidden_size=64, intermediate_size=128)
    fp32, nf4 = load(model, "fp32"), load(model, "nf4")
    assert nf4.quantization == "bitsandbytes-nf4" and nf4.placed == {DEVICE: 1}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in nf4.pipe.model.modules())
    assert nf4.footprint_bytes < fp32.footprint_bytes
    for a, b in zip(run(fp32, params={"top_k": None}), run(nf4, params={"top_k": None}), strict=True):
        sa, sb = scores(a), scores(b)
        assert max(abs(sa[k] - sb[k]) for k in sa) < 0.05


#: The first half of a four-layer classifier on the GPU, the rest on the CPU.
SPLIT = {
    "bert.embeddings": DEVICE,
    "bert.encoder.layer.0": DEVICE,
    "bert.encoder.layer.1": DEVICE,
    "bert.encoder.layer.2": "cpu",
    "bert.encoder.layer.3": "cpu",
    "bert.pooler": "cpu",
    "dropout": "cpu",
    "classifier": "cpu",
}


@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-3), ("int8", 0.05), ("nf4", 0.05)])
def test_a_device_map_over_the_gpu_and_the_cpu(precision: str, tol: float, tmp_path: Path) -> None:
    # Given a model whose map puts its first half on the GPU and the rest on the CPU (bitsandbytes quantizes
    # the GPU's half; the CPU's stays at fp32)
    model = tinymodels.build(TASK, tmp_path / "m", hidden_size=64, intermediate_size=1024, num_hidden_layers=4)
    cfg = WorkerConfig(key=ServeKey(TASK, model, precision), device=DEVICE, device_map=SPLIT)
    mapped = load_pipeline(cfg)
    # Then it is placed as asked, its inputs go to the GPU, and it answers as the model whole on the GPU does
    assert mapped.placed == {DEVICE: 3, "cpu": 5}
    assert mapped.pipe.device == torch.device(DEVICE)
    whole = load(model, precision)
    for a, b in zip(run(whole, params={"top_k": None}), run(mapped, params={"top_k": None}), strict=True):
        sa, sb = scores(a), scores(b)
        assert max(abs(sa[k] - sb[k]) for k in sa) < tol


def test_device_map_auto_fills_the_gpu_first_within_its_limit(tmp_path: Path) -> None:
    model = tinymodels.build(TASK, tmp_path / "m", hidden_size=64, intermediate_size=4096, num_hidden_layers=4)
    limits = {DEVICE: 12 * 2**20, "cpu": 2**30}
    mapped = load_pipeline(
        WorkerConfig(key=ServeKey(TASK, model, "fp32"), device=DEVICE, device_map="auto", max_memory=limits)
    )
    assert next(iter(mapped.placed)) == DEVICE and "cpu" in mapped.placed, mapped.placed
    run(mapped, params={"top_k": None})
