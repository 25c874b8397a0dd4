"""How many pool children a worker runs without ``--concurrency`` (pipeq/worker/children.py).

A real CUDA worker choosing its children is in tests/test_gpu.py (``pytest -m gpu``); here the rule,
the weights lookup and the CLI's wiring run on the CPU, with the CUDA device's figures faked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeq import constants as C
from pipeq.cli import app
from pipeq.errors import ConfigurationError
from pipeq.worker import children as children_module
from pipeq.worker import devices
from pipeq.worker.children import default_children, weights_bytes
from pipeq.worker.config import WorkerConfig

TASK = "text-classification"
GIB = 2**30
MIB = 2**20


def test_a_cpu_worker_runs_one_child() -> None:
    for weights in (None, 10 * MIB, 10 * GIB):
        choice = default_children("cpu", cores=64, weights=weights, device_memory=None)
        assert choice.children == 1, choice


def test_a_small_model_on_cuda_gets_a_child_per_four_cores_up_to_four() -> None:
    small = 90 * MIB  # all-MiniLM-L6-v2 in fp32
    got = {
        cores: default_children("cuda:0", cores=cores, weights=small, device_memory=80 * GIB)
        for cores in (2, 4, 8, 12, 16, 64)
    }
    assert {cores: c.children for cores, c in got.items()} == {2: 1, 4: 1, 8: 2, 12: 3, 16: 4, 64: 4}
    assert "90 MiB of weights and 16 cores" in got[16].reason


def test_large_or_unknown_weights_on_cuda_get_one_child() -> None:
    big = default_children("cuda:1", cores=64, weights=C.SMALL_MODEL_BYTES + 1, device_memory=80 * GIB)
    assert big.children == 1 and "forward pass bounds" in big.reason
    unknown = default_children("cuda:0", cores=64, weights=None, device_memory=80 * GIB)
    assert unknown.children == 1 and "unknown" in unknown.reason
    at_limit = default_children("cuda:0", cores=64, weights=C.SMALL_MODEL_BYTES, device_memory=80 * GIB)
    assert at_limit.children == C.MAX_GPU_CHILDREN


def test_the_device_memory_bounds_the_children() -> None:
    # 2 x 512 MiB + 2 GiB = 3 GiB a child: 0.8 x 8 GiB holds two, 0.8 x 4 GiB one.
    weights = 512 * MIB
    bound = default_children("cuda:0", cores=16, weights=weights, device_memory=8 * GIB)
    assert bound.children == 2 and "as many children as fit in 80% of 8 GiB" in bound.reason
    assert default_children("cuda:0", cores=16, weights=weights, device_memory=4 * GIB).children == 1
    assert default_children("cuda:0", cores=16, weights=weights, device_memory=1 * GIB).children == 1
    assert default_children("cuda:0", cores=16, weights=weights, device_memory=None).children == 4


def test_weights_are_the_safetensors_files_of_a_model_folder(model_dir: Callable[[str], str]) -> None:
    folder = Path(model_dir(TASK))
    files = list(folder.glob("*.safetensors"))
    assert files
    assert weights_bytes(str(folder)) == sum(f.stat().st_size for f in files)


def test_weights_of_a_pytorch_bin_folder_and_of_none(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert weights_bytes(str(tmp_path)) is None
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"x" * 300)
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(b"x" * 200)
    assert weights_bytes(str(tmp_path)) == 500
    (tmp_path / "model.safetensors").write_bytes(b"y" * 70)  # preferred, as transformers prefers it
    assert weights_bytes(str(tmp_path)) == 70


def test_weights_of_a_hub_model_come_from_the_cache_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--small-model" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"z" * 1234)
    (cache / "models--someone--small-model" / "refs").mkdir()
    (cache / "models--someone--small-model" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert weights_bytes("someone/small-model") == 1234
    assert weights_bytes("someone/not-cached") is None
    assert weights_bytes("not a valid id at all!") is None


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[WorkerConfig]:
    """``pipeq worker`` up to the point it would start Celery: the configuration it would run."""
    seen: list[WorkerConfig] = []

    def fake_run_worker(settings: Any, cfg: WorkerConfig, **_: Any) -> None:
        seen.append(cfg)

    monkeypatch.setattr("pipeq.worker.main.run_worker", fake_run_worker)
    return seen


def fake_gpu(monkeypatch: pytest.MonkeyPatch, *, cores: int, memory: int) -> None:
    monkeypatch.setattr(devices, "cuda_devices", lambda: (("Fake GPU", memory),))
    monkeypatch.setattr(devices, "available_cores", lambda: cores)


def worker_cfg(captured: list[WorkerConfig], redis_url: str, model: str, *extra: str) -> WorkerConfig:
    return run_cli(captured, redis_url, model, *extra)[0]


def run_cli(captured: list[WorkerConfig], redis_url: str, model: str, *extra: str) -> tuple[WorkerConfig, str]:
    """The configuration ``pipeq worker`` would run, and what it printed (its log goes to stderr)."""
    args = ["worker", "--task", TASK, "--model", model, "--precision", "fp32", "--broker-url", redis_url, *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(captured) == 1
    return captured.pop(), result.output


def test_the_cli_gives_a_small_model_on_cuda_several_children(
    captured: list[WorkerConfig],
    redis_url: str,
    model_dir: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_gpu(monkeypatch, cores=16, memory=80 * GIB)
    model = model_dir(TASK)
    cfg, printed = run_cli(captured, redis_url, model)
    assert (cfg.device, cfg.concurrency) == ("cuda:0", 4)
    assert "4 pool children on cuda:0" in printed and "--concurrency to choose" in printed
    # An explicit count, a solo pool and a CPU device are left as they are.
    assert worker_cfg(captured, redis_url, model, "--concurrency", "2").concurrency == 2
    assert worker_cfg(captured, redis_url, model, "--pool", "solo").concurrency == 1
    assert worker_cfg(captured, redis_url, model, "--device", "cpu").concurrency == 1
    # Two GPUs: each GPU's worker takes half the cores, for its children and their threads.
    monkeypatch.setattr(devices, "cuda_devices", lambda: (("Fake GPU", 80 * GIB), ("Fake GPU", 80 * GIB)))
    cfg = worker_cfg(captured, redis_url, model, "--device", "cuda:1")
    assert (cfg.cores, cfg.concurrency, cfg.resolved_tokenizer_threads) == (8, 2, 3)


def test_the_cli_gives_a_cpu_worker_one_child_and_refuses_zero(
    captured: list[WorkerConfig], redis_url: str, model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "cuda_devices", lambda: ())
    model = model_dir(TASK)
    cfg = worker_cfg(captured, redis_url, model)
    assert (cfg.device, cfg.concurrency) == ("cpu", 1)
    result = CliRunner().invoke(
        app, ["worker", "--task", TASK, "--model", model, "--concurrency", "0", "--broker-url", redis_url]
    )
    assert result.exit_code != 0 and "--concurrency must be at least 1" in result.output
    assert not captured


# ---------------------------------------------------------------- the cores a worker may use


def cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> str:
    """A cgroup folder with a v2 ``cpu.max`` and/or v1 quota files, as ``available_cores`` reads them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return str(tmp_path)


def test_available_cores_are_the_cpus_this_process_may_run_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(12)))
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 64)
    assert devices.available_cores(cgroup(tmp_path / "none")) == 12  # no cgroup files at all
    assert devices.available_cores(cgroup(tmp_path, v2="max 100000")) == 12


def test_a_cpu_quota_caps_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert devices.available_cores(cgroup(tmp_path / "v2", v2="400000 100000")) == 4  # docker --cpus 4
    assert devices.available_cores(cgroup(tmp_path / "v2half", v2="150000 100000")) == 2  # 1.5 CPUs: 2 threads
    assert devices.available_cores(cgroup(tmp_path / "v1", v1=("200000", "100000"))) == 2
    assert devices.available_cores(cgroup(tmp_path / "v1none", v1=("-1", "100000"))) == 64
    # A quota above the CPUs it may run on leaves those.
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1})
    assert devices.available_cores(str(tmp_path / "v2")) == 2


def test_the_threads_and_children_follow_the_available_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pipeq.routing import ServeKey
    from pipeq.worker.loading import set_threads

    key = ServeKey(TASK, "m", "fp32")
    monkeypatch.setattr(devices, "available_cores", lambda: 8)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 64)  # the host's count is not what a worker sizes by
    cfg = WorkerConfig(key=key, device="cuda:0", concurrency=2)
    assert cfg.resolved_cores == 8 and cfg.resolved_tokenizer_threads == 3
    before = torch.get_num_threads()
    try:
        assert set_threads(cfg.resolved_threads) == 4 and torch.get_num_threads() == 4
        assert set_threads(replace(cfg, threads=3).resolved_threads) == 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(children_module, "cuda_device_memory", lambda device: 80 * GIB)
    monkeypatch.setattr(children_module, "weights_bytes", lambda model, revision=None: 90 * MIB)
    assert children_module.choose_children(WorkerConfig(key=key, device="cuda:0")).children == 2


def test_a_host_of_several_gpus_gives_each_worker_its_gpus_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeq.routing import ServeKey

    monkeypatch.setattr(devices, "available_cores", lambda: 64)
    monkeypatch.setattr(devices, "cuda_devices", lambda: tuple((f"GPU {i}", 80 * GIB) for i in range(8)))
    assert devices.worker_cores("cuda:3") == 8 and devices.worker_cores("cpu") is None
    cfg = WorkerConfig(key=ServeKey(TASK, "m", "fp16"), device="cuda:3", cores=devices.worker_cores("cuda:3"))
    monkeypatch.setattr(children_module, "cuda_device_memory", lambda device: 80 * GIB)
    monkeypatch.setattr(children_module, "weights_bytes", lambda model, revision=None: 90 * MIB)
    assert children_module.choose_children(cfg).children == 2  # 8 cores: 2 children
    assert WorkerConfig(**{**vars(cfg), "concurrency": 2}).resolved_tokenizer_threads == 3  # 8 // 2 - 1
    monkeypatch.setattr(devices, "cuda_devices", lambda: (("GPU 0", 80 * GIB),))
    assert devices.worker_cores("cuda:0") is None  # one GPU: every core the worker may use
    with pytest.raises(ConfigurationError, match="at least one core"):
        WorkerConfig(key=cfg.key, cores=0)
