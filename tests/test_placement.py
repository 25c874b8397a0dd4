"""A model larger than one device: ``--device-map``, ``--max-memory``, the 4-bit precision, and what the
worker records about the placement (on the CPU and the disk here; GPU maps in ``tests/test_gpu.py``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_context import submit
from typer.testing import CliRunner

import tinymodels
from pipeq import Settings, precisions
from pipeq.cli import app as cli_app
from pipeq.errors import ConfigurationError
from pipeq.precisions import DEFAULT_ALLOWED_PRECISIONS, PRECISIONS
from pipeq.routing import ServeKey
from pipeq.store import Store
from pipeq.worker.config import WorkerConfig, parse_precisions
from pipeq.worker.context import WorkerContext
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import LoadedPipeline, load_pipeline
from pipeq.worker.placement import parse_device_map, parse_max_memory, placement

TASK = "text-classification"
TEXTS = ["hello world", "I hate this so much!", "我非常讨厌这个！", "a somewhat longer sentence about the weather"]
#: 7.8 MB of embeddings and four layers of 2 MB: a 12 MB CPU limit splits the fp32 model between the CPU
#: (embeddings first) and the disk. Rows of 64 values, the least bitsandbytes' 4-bit CPU kernels take.
LAYERED = {"hidden_size": 64, "intermediate_size": 4096, "num_hidden_layers": 4}
#: A CPU limit that holds the fp32 model's embeddings and not the rest.
SPLITTING = {"cpu": 12_000_000}


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tinymodels.build(TASK, tmp_path_factory.mktemp("layered"), **LAYERED)


def outputs(loaded: LoadedPipeline) -> list[Any]:
    """The texts' outputs through the worker's batched runtime, in order."""
    runtime = PipelineRuntime(loaded.pipe, TASK)
    try:
        done = {r.idx: r for results, _ in runtime.run(list(enumerate(TEXTS)), {"top_k": None}) for r in results}
    finally:
        runtime.close()
    assert {r.status for r in done.values()} == {"done"}, [r.error for r in done.values()]
    return [done[i].output for i in range(len(TEXTS))]


def load(model: str, precision: str = "fp32", **settings: Any) -> LoadedPipeline:
    return load_pipeline(WorkerConfig(key=ServeKey(TASK, model, precision), **settings))


# ---------------------------------------------------------------- flags


def test_max_memory_reads_devices_and_sizes_as_accelerate_does() -> None:
    limits = parse_max_memory(["0=20GiB", "cuda:1=1.5GB", "cpu=64GiB"])
    assert limits == {"cuda:0": 20 * 2**30, "cuda:1": 1_500_000_000, "cpu": 64 * 2**30}
    assert parse_max_memory(["cpu=512MiB", "1=1000"]) == {"cpu": 512 * 2**20, "cuda:1": 1000}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["0:20GiB"], "--max-memory '0:20GiB': expected DEVICE=SIZE"),
        (["gpu=20GiB"], "--max-memory 'gpu=20GiB': expected DEVICE=SIZE"),
        (["disk=20GiB"], "--max-memory 'disk=20GiB': expected DEVICE=SIZE"),
        (["cpu=lots"], "--max-memory 'cpu=lots': size 'lots' is not a number with a unit"),
        (["cpu=20 parsecs"], "size '20 parsecs' is not a number with a unit (B, KB, MB"),
        (["cpu=0GiB"], "--max-memory 'cpu=0GiB': the size must be more than 0 bytes"),
        (["0=1GiB", "cuda:0=2GiB"], "--max-memory names cuda:0 twice"),
    ],
)
def test_bad_max_memory_names_the_flag_and_the_value(values: list[str], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_max_memory(values)
    assert message in str(info.value)


def test_device_map_is_a_strategy_or_a_json_file_of_modules(tmp_path: Path) -> None:
    assert [parse_device_map(s) for s in ("auto", "balanced", "sequential")] == ["auto", "balanced", "sequential"]
    good = tmp_path / "map.json"
    good.write_text(json.dumps({"bert.embeddings": 0, "bert.encoder": "cuda:1", "classifier": "cpu", "x": "disk"}))
    assert parse_device_map(str(good)) == {
        "bert.embeddings": "cuda:0",
        "bert.encoder": "cuda:1",
        "classifier": "cpu",
        "x": "disk",
    }
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "bert": 0,\n  "classifier" "cpu"\n}\n')
    with pytest.raises(ConfigurationError, match=rf"--device-map {broken}:3: not JSON"):
        parse_device_map(str(broken))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"bert": "gpu0"}))
    with pytest.raises(ConfigurationError, match="module 'bert' goes to 'gpu0'; use a GPU index, cuda:N, cpu or disk"):
        parse_device_map(str(wrong))
    with pytest.raises(ConfigurationError, match="'autoo' is neither a strategy .* nor a JSON file"):
        parse_device_map("autoo")


def test_placement_options_that_contradict_are_refused() -> None:
    key = ServeKey(TASK, "m", "fp32")
    with pytest.raises(ConfigurationError, match="--max-memory only applies with --device-map"):
        WorkerConfig(key=key, max_memory={"cpu": 2**30})
    with pytest.raises(ConfigurationError, match="--offload-folder only applies with --device-map"):
        WorkerConfig(key=key, offload_folder="/tmp/x")
    with pytest.raises(ConfigurationError, match="--concurrency 2 would load a copy per pool child"):
        WorkerConfig(key=key, device_map="auto", concurrency=2)
    with pytest.raises(ConfigurationError, match="--streams 2 runs forward passes at once on one model"):
        WorkerConfig(key=key, device_map="auto", streams=2)


def test_measuring_a_model_over_several_devices_runs_one_pass_at_a_time(layered: str) -> None:
    # What --precision auto and --calibrate run in their measuring process: with two threads, two streams
    # over the CPU and disk map would fail inputs (or change them).
    from pipeq.worker.measure import _runtime

    cfg = WorkerConfig(key=ServeKey(TASK, layered, "fp32"), device_map="auto", max_memory=SPLITTING, threads=2)
    with _runtime(cfg, 2) as runtime:
        assert runtime.streams == 1


def test_a_model_over_several_devices_runs_one_forward_pass_at_a_time() -> None:
    # Two passes at once over a CPU and disk map gave wrong outputs: accelerate's hooks swap weights per pass.
    key = ServeKey(TASK, "m", "fp32")
    assert WorkerConfig(key=key, device_map="auto", placement={"cpu": 1}).resolved_streams(4) == 4
    assert WorkerConfig(key=key, device_map="auto", placement={"cpu": 1, "disk": 4}).resolved_streams(4) == 1


def test_a_device_mapped_worker_has_no_shadow_check_unless_asked() -> None:
    # An fp32 copy of a model that needs several devices would not fit beside it.
    key = ServeKey(TASK, "m", "int8")
    assert WorkerConfig(key=key).shadow_share > 0
    assert WorkerConfig(key=key, device_map="auto").shadow_share == 0.0
    assert WorkerConfig(key=key, device_map="auto", shadow_fraction=0.5).shadow_share == 0.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device-map", "auto", "--device", "cuda:1"], "--device cuda:1 contradicts it: leave --device out"),
        (["--device-map", "auto", "--device", "cpu"], "--device cpu contradicts it"),
        (["--device-map", "auto", "--max-memory", "0:20GiB"], "--max-memory '0:20GiB': expected DEVICE=SIZE"),
        (["--device-map", "auto", "--max-memory", "cpu=big"], "--max-memory 'cpu=big': size 'big'"),
        (["--max-memory", "cpu=1GiB"], "--max-memory only applies with --device-map"),
        (["--device-map", "nowhere.json"], "--device-map 'nowhere.json' is neither a strategy"),
        (["--device-map", "auto", "-c", "2"], "--concurrency 2 would load a copy per pool child"),
        # This machine's torch is a CPU build: a GPU named by --max-memory is refused before anything loads.
        (["--device-map", "auto", "--max-memory", "1=20GiB"], "cuda:1 asked for, but torch sees no CUDA device"),
    ],
)
def test_worker_placement_flags_are_checked_at_the_command_line(
    flags: list[str], message: str, sqlite_url: str, model_dir: Callable[[str], str]
) -> None:
    env = {"PIPEQ_DATABASE_URL": sqlite_url, "PIPEQ_BROKER_URL": "memory://"}
    out = CliRunner().invoke(cli_app, ["worker", "--task", TASK, "--model", model_dir(TASK), *flags], env=env)
    assert out.exit_code == 2 and message in out.stderr, out.stderr


def test_bad_max_memory_fails_before_torch_is_imported(tmp_path: Path, model_dir: Callable[[str], str]) -> None:
    script = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from pipeq.cli import app
        result = CliRunner().invoke(app, ["worker", "--task", "text-classification", *sys.argv[1:]])
        print(result.exit_code, "torch" in sys.modules, result.output.replace("\\n", " "))
        """
    )
    env = {**os.environ, "PIPEQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PIPEQ_BROKER_URL": "memory://"}
    args = ["--model", model_dir(TASK), "--device-map", "auto", "--max-memory", "cpu"]
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("2 False ") and "--max-memory 'cpu': expected DEVICE=SIZE" in out.stdout, out.stderr


# ---------------------------------------------------------------- loading


def test_device_map_auto_on_a_cpu_host_loads_whole_on_the_cpu(model_dir: Callable[[str], str]) -> None:
    model = model_dir(TASK)
    plain, mapped = load(model), load(model, device_map="auto")
    assert mapped.placed == plain.placed == {"cpu": 1}
    assert outputs(mapped) == outputs(plain)


def test_a_cpu_memory_limit_offloads_the_rest_to_the_disk_with_the_same_outputs(
    layered: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a CPU limit that holds the embeddings, not the whole model
    plain = load(layered)
    with caplog.at_level(logging.INFO, logger="pipeq.worker.loading"):
        mapped = load(layered, device_map="auto", max_memory=SPLITTING, offload_folder=str(tmp_path))
    # Then accelerate put the rest on the disk (read from the safetensors checkpoint in place), the start
    # log says so, and the outputs are the plain load's
    assert list(mapped.placed) == ["cpu", "disk"] and sum(mapped.placed.values()) >= 3
    assert f"placed cpu {mapped.placed['cpu']}, disk {mapped.placed['disk']} modules" in caplog.text
    assert "spans 2 devices: its layers run one device after another" in caplog.text
    assert outputs(mapped) == outputs(plain)


def test_a_json_device_map_places_each_module_where_it_says(layered: str, tmp_path: Path) -> None:
    # Given a map file with the first half of the model on the CPU and the rest on the disk
    halves = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "cpu"}
    rest = ["bert.encoder.layer.2", "bert.encoder.layer.3", "bert.pooler", "dropout", "classifier"]
    path = tmp_path / "map.json"
    path.write_text(json.dumps({**halves, **dict.fromkeys(rest, "disk")}))
    # When the worker loads with it
    mapped = load(layered, device_map=parse_device_map(str(path)))
    # Then each module is where the file put it, and the outputs are the plain load's
    assert mapped.placed == {"cpu": 3, "disk": 5}
    assert outputs(mapped) == outputs(load(layered))


def test_a_limit_that_leaves_the_first_modules_on_the_disk_is_refused(layered: str) -> None:
    # The embeddings alone are 7.8 MB: with 1 MB for the CPU the pipeline would have no device to run on.
    with pytest.raises(ConfigurationError, match="first modules on the disk.*give the first device more --max-memory"):
        load(layered, device_map="auto", max_memory={"cpu": 1_000_000})


def test_dynamic_int8_refuses_a_model_split_over_cpu_and_disk(layered: str) -> None:
    with pytest.raises(ConfigurationError, match="placed this one over cpu and disk: give cpu more --max-memory"):
        load(layered, "int8", device_map="auto", max_memory=SPLITTING)
    # Whole on the CPU, the same map quantizes as ever.
    assert load(layered, "int8", device_map="auto").quantization == "torch-dynamic-int8"


def test_placement_counts_a_device_maps_modules_per_device() -> None:
    class Mapped(torch.nn.Module):
        hf_device_map = {"embed": 0, "layer.0": 0, "layer.1": 1, "layer.2": "cpu", "head": "disk"}

    assert placement(Mapped()) == {"cuda:0": 2, "cuda:1": 1, "cpu": 1, "disk": 1}
    assert placement(torch.nn.Linear(2, 2)) == {"cpu": 1}


# ---------------------------------------------------------------- the worker


def test_the_worker_row_and_the_engine_know_how_the_model_was_placed(
    layered: str, sqlite_url: str, tmp_path: Path
) -> None:
    # Given a worker whose device map spreads its model over the CPU and the disk
    limits = SPLITTING
    key = ServeKey(TASK, layered, "fp32")
    cfg = WorkerConfig(key=key, device_map="auto", max_memory=limits, threads=2, warmup=False)
    assert cfg.placement is None and not cfg.multi_device
    context = WorkerContext(Settings(broker_url="memory://", database_url=sqlite_url), cfg)
    context.start()
    try:
        # Then its configuration, which the engine is built with, says the model spans devices
        assert context.cfg.multi_device and context.cfg.placement == context.loaded.placed  # type: ignore[union-attr]
        # And its row records the flags and the placement
        store = Store(sqlite_url)
        (row,) = store.live_workers(cfg.key.queue)
        settings = row["settings"]
        assert settings["device_map"] == "auto" and settings["max_memory"] == limits
        # And one forward pass at a time, where two threads would run two streams on a model whole on the CPU
        assert context.runtime.streams == settings["forward_streams"] == 1  # type: ignore[union-attr]
        assert list(settings["placement"]) == ["cpu", "disk"]
        # And `pipeq workers` shows it beside the device
        listed = CliRunner().invoke(cli_app, ["workers", "--database-url", sqlite_url])
        placed = settings["placement"]
        assert f" cpu (cpu {placed['cpu']}, disk {placed['disk']} modules) " in listed.stdout, listed.output
        # And it serves a chunk
        counts = context.run_chunk("job", submit(store, cfg.key, TEXTS), None)
        assert counts["done"] == len(TEXTS)
    finally:
        context.stop()


def test_a_plain_worker_is_on_one_device() -> None:
    cfg = WorkerConfig(key=ServeKey(TASK, "m", "fp32"), placement={"cpu": 1})
    assert not cfg.multi_device and cfg.as_record()["placement"] == {"cpu": 1}
    assert WorkerConfig(key=ServeKey(TASK, "m", "fp32"), placement={"cuda:0": 30, "cuda:1": 32}).multi_device


# ---------------------------------------------------------------- 4-bit


def test_nf4_is_opt_in_for_precision_auto() -> None:
    assert "nf4" in PRECISIONS and not PRECISIONS["nf4"].auto_default
    assert "nf4" not in DEFAULT_ALLOWED_PRECISIONS
    assert parse_precisions("fp32,nf4") == ("fp32", "nf4")


def test_nf4_runs_on_this_cpu_with_4bit_layers_close_to_fp32(layered: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    cfg = WorkerConfig(key=ServeKey(TASK, layered, "nf4"))
    assert PRECISIONS["nf4"].unsupported(cfg) is None
    fp32, nf4 = load(layered), load(layered, "nf4")
    assert nf4.quantization == "bitsandbytes-nf4"
    linears = [m for m in nf4.pipe.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and linears[0].weight.quant_state.quant_type == "nf4"
    # The task head stays unquantized (bitsandbytes' skip list).
    assert type(nf4.pipe.model.classifier) is torch.nn.Linear
    assert nf4.footprint_bytes < fp32.footprint_bytes
    for a, b in zip(outputs(fp32), outputs(nf4), strict=True):
        sa, sb = ({d["label"]: d["score"] for d in out} for out in (a, b))
        assert sa.keys() == sb.keys() and max(abs(sa[k] - sb[k]) for k in sa) < 0.05


def test_nf4_fits_whole_in_a_limit_that_splits_fp32(layered: str) -> None:
    pytest.importorskip("bitsandbytes")
    assert list(load(layered, device_map="auto", max_memory=SPLITTING).placed) == ["cpu", "disk"]
    mapped = load(layered, "nf4", device_map="auto", max_memory=SPLITTING)
    assert mapped.quantization == "bitsandbytes-nf4" and mapped.placed == {"cpu": 1}
    assert outputs(mapped) == outputs(load(layered, "nf4"))


def test_nf4_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    # A device the installed bitsandbytes cannot run 4-bit layers on (this torch has no CUDA): it says which.
    reason = precisions.bnb_4bit_failure("cuda")
    assert reason is not None and reason.startswith("bitsandbytes ") and "cannot run 4-bit layers on cuda" in reason
    # Without the package, it names the package.
    monkeypatch.setattr(precisions.importlib.util, "find_spec", lambda name: None)
    cfg = WorkerConfig(key=ServeKey(TASK, "m", "nf4"))
    assert (
        PRECISIONS["nf4"].unsupported(cfg)
        == "bitsandbytes 4-bit needs the bitsandbytes package (pip install 'pipeq[bnb]')"
    )
