"""--precision auto and --calibrate: measuring in a spawned process, the choice, and the stored budget.

Speeds are never asserted: only that what was measured is recorded and that the choice follows it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from transformers import pipeline
from typer.testing import CliRunner

from pipeq import Client, Settings, precisions
from pipeq import constants as C
from pipeq.cli import app as cli_app
from pipeq.errors import ConfigurationError
from pipeq.precisions import PRECISIONS
from pipeq.routing import ServeKey, check_precision
from pipeq.store import Store
from pipeq.worker import autotune
from pipeq.worker.autotune import calibrate, choose_precision, describe, reuse_calibration, tune
from pipeq.worker.config import WorkerConfig, parse_precisions
from pipeq.worker.devices import device_name
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.measure import (
    MEASURE_ITEMS,
    PROBE_ITEMS,
    PrecisionMeasurement,
    budget_candidates,
    measuring_set,
    synthetic_inputs,
    throughput,
    unsupported_reason,
)

TASK = "text-classification"


def auto_config(model: str, *allowed: str, **more: Any) -> WorkerConfig:
    return WorkerConfig(key=ServeKey(TASK, model, "auto"), allowed_precisions=allowed, warmup=False, **more)


# ------------------------------------------------------------------ measuring


def test_synthetic_inputs_are_uneven_repeatable_and_within_the_model_maximum(model_dir: Callable[[str], str]) -> None:
    pipe = pipeline(TASK, model=model_dir(TASK))
    inputs = synthetic_inputs(pipe, TASK, max_length=64)
    lengths = [len(pipe.tokenizer(text)["input_ids"]) for text in inputs]
    assert len(inputs) == MEASURE_ITEMS and inputs == synthetic_inputs(pipe, TASK, max_length=64)
    assert len(set(lengths)) > 10 and max(lengths) <= 64  # a spread of shapes, capped
    uncapped = [len(pipe.tokenizer(text)["input_ids"]) for text in synthetic_inputs(pipe, TASK, max_length=None)]
    assert sorted(uncapped)[len(uncapped) // 2] * 4 < max(uncapped)  # heavy-tailed: the median is short
    assert synthetic_inputs(pipe, "zero-shot-classification", max_length=64) == []


def test_throughput_runs_every_input_and_refuses_failed_ones(model_dir: Callable[[str], str]) -> None:
    runtime = PipelineRuntime(pipeline(TASK, model=model_dir(TASK)), TASK, max_batch_size=8)
    assert throughput(runtime, ["a short text", "word " * 40] * 4, min_seconds=0) > 0
    # An input the pipeline cannot take would make the figure meaningless.
    with pytest.raises(ConfigurationError, match="synthetic inputs failed"):
        throughput(runtime, ["fine", {"not": "a text"}], min_seconds=0)


def test_budget_candidates_are_capped_by_what_a_batch_can_hold() -> None:
    assert budget_candidates(64, 512) == list(C.CALIBRATION_BUDGETS)
    assert budget_candidates(16, 128) == [1024, 2048]
    assert budget_candidates(4, 128) == [512]
    assert budget_candidates(64, None) == list(C.CALIBRATION_BUDGETS)  # no limit: the synthetic longest, 512


def test_unsupported_precisions_name_the_reason(model_dir: Callable[[str], str]) -> None:
    key = ServeKey(TASK, model_dir(TASK))
    assert unsupported_reason(WorkerConfig(key=key)) is None
    assert "CUDA" in str(unsupported_reason(WorkerConfig(key=key).with_precision("fp16")))
    assert "bitsandbytes" in str(unsupported_reason(WorkerConfig(key=key, int8_backend="bnb").with_precision("int8")))


# -------------------------------------------------------------- auto precision


def test_auto_serves_the_fastest_measured_precision(model_dir: Callable[[str], str]) -> None:
    model = model_dir(TASK)
    cfg = choose_precision(auto_config(model, "fp32", "bf16", "int8"), min_seconds=0)
    choice = cfg.precision_choice
    assert choice is not None and choice["allowed"] == ["fp32", "bf16", "int8"]
    # Every allowed precision was either measured or left out with a reason; fp32 always runs.
    assert set(choice["measured"]) | set(choice["skipped"]) == {"fp32", "bf16", "int8"}
    assert "fp32" in choice["measured"] and all(rate > 0 for rate in choice["measured"].values())
    assert choice["chosen"] == max(choice["measured"], key=choice["measured"].get)
    # The choice fixes the queue exactly as an explicit --precision would.
    assert cfg.key == ServeKey(TASK, model, choice["chosen"])
    assert "precision_choice" not in cfg.as_record()  # it has its own column on the worker row
    assert choice["seconds"] > 0  # the time choosing took at start is kept with the choice


def test_auto_leaves_out_what_the_device_cannot_run(model_dir: Callable[[str], str]) -> None:
    cfg = choose_precision(auto_config(model_dir(TASK), "fp16", "fp32"), min_seconds=0)
    assert cfg.key.precision == "fp32"
    assert cfg.precision_choice is not None
    assert list(cfg.precision_choice["measured"]) == ["fp32"] and "CUDA" in cfg.precision_choice["skipped"]["fp16"]


def test_auto_for_a_task_without_synthetic_inputs_serves_the_first_allowed_precision_that_passes(
    model_dir: Callable[[str], str],
) -> None:
    key = ServeKey("text-generation", model_dir(TASK), "auto")
    cfg = choose_precision(WorkerConfig(key=key, allowed_precisions=("fp16", "bf16", "fp32")), min_seconds=0)
    choice = cfg.precision_choice
    assert choice is not None and choice["measured"] == {} and "fp16" in choice["skipped"]
    # Generation cannot be timed on made-up inputs, so nothing is measured; a lower precision that runs
    # here is compared with fp32 on the calibration texts (the tokens it generates) and served only if it
    # agrees: the first allowed precision that runs and passes is served.
    runs_and_passes = [p for p in ("bf16", "fp32") if p not in choice["skipped"] and p not in choice["refused"]]
    assert cfg.key.precision == choice["chosen"] == runs_and_passes[0]
    if "bf16" not in choice["skipped"] and choice["chosen"] == "fp32":
        assert "generated tokens identical" in choice["refused"]["bf16"][0], choice["refused"]


def test_auto_with_nothing_that_runs_is_a_clear_error(model_dir: Callable[[str], str]) -> None:
    with pytest.raises(ConfigurationError, match="no allowed precision that runs on cpu.*fp16"):
        choose_precision(auto_config(model_dir(TASK), "fp16"), min_seconds=0)


def test_precision_names_are_checked() -> None:
    assert parse_precisions(" fp32, bf16,fp32 ,int8") == ("fp32", "bf16", "int8")
    with pytest.raises(ConfigurationError, match="unknown precision 'int4'"):
        parse_precisions("fp32,int4")
    with pytest.raises(ConfigurationError, match="names no precision"):
        parse_precisions(" , ")
    with pytest.raises(ConfigurationError, match="a job names the precision it requires"):
        parse_precisions("auto")
    with pytest.raises(ConfigurationError, match="at least one precision"):
        auto_config("m")
    with pytest.raises(ConfigurationError, match="a job names the precision it requires"):
        check_precision("auto")


def test_a_job_cannot_ask_for_auto(sqlite_url: str, model_dir: Callable[[str], str]) -> None:
    with Client(Settings(broker_url="memory://", database_url=sqlite_url)) as client:
        with pytest.raises(ConfigurationError, match="precision 'auto' is a worker's own choice"):
            client.submit(["x"], task=TASK, model=model_dir(TASK), precision="auto")
    env = {"PIPEQ_DATABASE_URL": sqlite_url, "PIPEQ_BROKER_URL": "memory://"}
    out = CliRunner().invoke(
        cli_app,
        ["submit", "-", "--task", TASK, "--model", model_dir(TASK), "--precision", "auto"],
        input="x\n",
        env=env,
    )
    assert out.exit_code == 2 and "a worker's own choice" in out.stderr


def test_submit_warns_when_the_model_is_served_only_at_another_precision(
    sqlite_url: str, model_dir: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    model = model_dir(TASK)
    bf16 = ServeKey(TASK, model, "bf16")
    with Client(Settings(broker_url="memory://", database_url=sqlite_url)) as client:
        client.store.register_worker(
            {"id": "w1", "host": "h", "pid": 1, "queue": bf16.queue, "task": TASK, "model": model, "revision": None,
             "precision": "bf16", "device": "cpu", "status": "ready", "settings": {}}
        )  # fmt: skip
        with caplog.at_level("WARNING", logger="pipeq.producer.client"):
            client.submit(["x"], task=TASK, model=model, precision="fp32")
            assert "no live worker serves" in caplog.text and "only at bf16" in caplog.text
            caplog.clear()
            client.submit(["x"], task=TASK, model=model, precision="bf16")
            assert "no live worker serves" not in caplog.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "bf16", "--allow-precision", "fp32"], "only applies to --precision auto"),
        (["--allow-precision", "fp32,fp8"], "unknown precision 'fp8'"),
        (["--calibrate", "--max-batch-tokens", "512"], "pass one or the other"),
    ],
)
def test_worker_flags_that_contradict_are_refused(
    flags: list[str], message: str, sqlite_url: str, model_dir: Callable[[str], str]
) -> None:
    env = {"PIPEQ_DATABASE_URL": sqlite_url, "PIPEQ_BROKER_URL": "memory://"}
    out = CliRunner().invoke(
        cli_app, ["worker", "--task", TASK, "--model", model_dir(TASK), "--device", "cpu", *flags], env=env
    )
    assert out.exit_code == 2 and message in out.stderr


# ----------------------------------------------------------------- calibration


def test_store_keeps_the_newest_calibration_per_model_and_device(store: Store) -> None:
    row = {
        "task": TASK,
        "model": "/m",
        "revision": None,
        "precision": "int8",
        "device": "cpu",
        "device_name": "CPU X",
        "max_batch_tokens": 2048,
        "items_per_s": 10.0,
        "sweep": {"1024": 5.0, "2048": 10.0},
    }
    store.save_calibration(row)
    store.save_calibration({**row, "max_batch_tokens": 4096, "sweep": {"4096": 12.0}})
    store.save_calibration({**row, "revision": "abc", "max_batch_tokens": 1024})
    where = {k: row[k] for k in ("task", "model", "revision", "precision", "device", "device_name")}
    latest = store.latest_calibration(**where)
    assert latest is not None and (latest["max_batch_tokens"], latest["sweep"]) == (4096, {"4096": 12.0})
    assert latest["created_at"].tzinfo is not None
    pinned = store.latest_calibration(**{**where, "revision": "abc"})
    assert pinned is not None and pinned["max_batch_tokens"] == 1024
    assert store.latest_calibration(**{**where, "device_name": "CPU Y"}) is None
    assert store.latest_calibration(**{**where, "precision": "fp32"}) is None


def test_calibrate_stores_the_fastest_budget_and_the_next_start_reuses_it(
    sqlite_url: str, model_dir: Callable[[str], str]
) -> None:
    store = Store(sqlite_url)
    key = ServeKey(TASK, model_dir(TASK), "fp32")
    # Given a calibration run (16 rows x 128 tokens: budgets 1024 and 2048)
    cfg = calibrate(store, WorkerConfig(key=key, max_batch_size=16, calibrate=True), min_seconds=0)
    where = {"task": TASK, "model": key.model, "revision": None, "precision": "fp32", "device": "cpu"}
    row = store.latest_calibration(**where, device_name=device_name("cpu"))
    assert row is not None and set(row["sweep"]) == {"1024", "2048"}
    assert row["max_batch_tokens"] == int(max(row["sweep"], key=row["sweep"].get))
    assert cfg.max_batch_tokens == row["max_batch_tokens"] and cfg.calibration is not None
    assert cfg.calibration["source"] == "calibrated"
    # When a later worker starts without a budget, it serves with the stored one
    later = reuse_calibration(store, WorkerConfig(key=key, max_batch_size=16))
    assert later.max_batch_tokens == row["max_batch_tokens"] and later.calibration is not None
    assert later.calibration["source"] == "stored" and later.as_record()["calibration"]["sweep"] == row["sweep"]
    # An explicit budget always wins; another precision has no calibration and gets the default
    assert tune(store, WorkerConfig(key=key, max_batch_tokens=300)).max_batch_tokens == 300
    other = tune(store, WorkerConfig(key=key).with_precision("int8"))
    assert (other.max_batch_tokens, other.calibration) == (C.DEFAULT_MAX_BATCH_TOKENS, None)
    store.close()


def test_auto_and_calibrate_measure_in_one_process(
    sqlite_url: str, model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the processes tune opens, each recording what runs in it (here in this process, not spawned)
    opened: list[list[str]] = []

    @contextmanager
    def recording_process() -> Iterator[Callable[..., Any]]:
        calls: list[str] = []
        opened.append(calls)
        yield lambda fn, *args: (calls.append(fn.__name__), fn(*args))[1]

    def one_shot(fn: Callable[..., Any], *args: Any) -> Any:
        raise AssertionError(f"{fn.__name__} ran in a process of its own")

    monkeypatch.setattr(autotune, "spawned_process", recording_process)
    monkeypatch.setattr(autotune, "in_subprocess", one_shot)
    store = Store(sqlite_url)
    # When a worker with --precision auto and --calibrate is tuned
    cfg = tune(store, auto_config(model_dir(TASK), "fp32", calibrate=True, max_batch_size=16), min_seconds=0)
    # Then one process measured the precisions and then swept the budget for the chosen one
    assert opened == [["measure_precisions", "sweep_budgets"]]
    assert cfg.key.precision == "fp32" and cfg.calibration is not None and cfg.calibration["source"] == "calibrated"
    assert cfg.max_batch_tokens in (1024, 2048) and not cfg.calibrate
    store.close()


def test_describe_shows_how_precision_and_budget_were_chosen() -> None:
    settings = {
        "max_batch_tokens": 4096,
        "precision_choice": {"chosen": "bf16", "measured": {"fp32": 120.4, "bf16": 250.0, "int8": 1240.0}},
        "calibration": {"source": "stored", "items_per_s": 251.2},
    }
    assert describe(settings) == (
        " (auto: fp32 120/s, bf16 250/s, int8 1,240/s)",
        " tokens 4096 (stored calibration, 251/s)",
    )
    assert describe({"max_batch_tokens": 8192, "precision_choice": None, "calibration": None}) == ("", "")
    settings["precision_choice"] = {"chosen": "fp32", "measured": {"fp32": 120.4}, "seconds": 7.4}
    assert describe(settings)[0] == " (auto: fp32 120/s, chosen in 7s)"


@pytest.mark.integration
def test_worker_cli_auto_and_calibrate_then_reuse(
    sqlite_url: str, redis_url: str, model_dir: Callable[[str], str], start_worker: Any
) -> None:
    model = model_dir(TASK)
    store = Store(sqlite_url)
    env = {**os.environ, "PIPEQ_DATABASE_URL": sqlite_url}

    def workers(*flags: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "pipeq", "workers", *flags]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)

    # Given a first worker that picks its precision (fp32 is all it may) and calibrates
    queue = ServeKey(TASK, model, "fp32").queue
    first = start_worker(
        "--task", TASK, "--model", model, "--allow-precision", "fp32", "--calibrate", "--max-batch-size", "16",
        broker_url=redis_url, database_url=sqlite_url,
    )  # fmt: skip
    first.wait_ready(store, queue)
    (row,) = json.loads(workers("--json").stdout)
    choice, calibration = row["precision_choice"], row["settings"]["calibration"]
    assert row["precision"] == choice["chosen"] == "fp32" and list(choice["measured"]) == ["fp32"]
    assert calibration["source"] == "calibrated" and row["settings"]["max_batch_tokens"] in (1024, 2048)
    text = workers().stdout
    assert "precision fp32 (auto: serving fp32 1.0x; fp32 " in text and "(calibrated now, " in text
    first.stop()
    # When a second worker starts for the same model and precision without a budget
    second = start_worker("--task", TASK, "--model", model, "--precision", "fp32", "--max-batch-size", "16",
                          broker_url=redis_url, database_url=sqlite_url)  # fmt: skip
    second.wait_ready(store, queue)
    # Then it serves with the stored budget and says so
    (row2,) = json.loads(workers("--json").stdout)
    assert row2["settings"]["calibration"]["source"] == "stored"
    assert row2["settings"]["max_batch_tokens"] == row["settings"]["max_batch_tokens"]
    assert row2["precision_choice"] is None
    assert "calibrated on cpu" in second.log()
    store.close()


# ------------------------------------------------------------------ precisions slower than fp32


def test_a_slow_precisions_measurement_is_bounded_in_time(
    model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a runtime whose every forward pass takes 0.1 s: one pass over the 128 measuring inputs, 4 a batch,
    # takes 3.2 s, and the warm-up pass and timed passes over all of them took 6.4 s or more
    runtime = PipelineRuntime(pipeline(TASK, model=model_dir(TASK)), TASK, max_batch_size=4)
    forward = runtime._forward

    def slow_forward(*args: Any) -> Any:
        time.sleep(0.1)
        return forward(*args)

    monkeypatch.setattr(runtime, "_forward", slow_forward)
    inputs = synthetic_inputs(runtime.pipe, TASK, max_length=runtime.max_length)
    assert len(inputs) == MEASURE_ITEMS
    # When its speed is measured for one second
    t0 = time.perf_counter()
    chosen = measuring_set(runtime, inputs, 1.0)
    rate = throughput(runtime, chosen, min_seconds=1.0)
    took = time.perf_counter() - t0
    # Then a spread of the inputs a pass can run in half of that is timed, in about two seconds all told
    assert PROBE_ITEMS <= len(chosen) < MEASURE_ITEMS / 2 and rate > 0
    assert took < 5, took
    lengths = sorted(len(text) for text in inputs)
    assert min(map(len, chosen)) == lengths[0] and max(map(len, chosen)) >= lengths[len(lengths) * 3 // 4]


def test_auto_never_serves_a_precision_slower_than_fp32(model_dir: Callable[[str], str]) -> None:
    # Given a measurement where int8 ran at half fp32's speed and bf16 faster than it, both agreeing with fp32
    measured = PrecisionMeasurement(
        "cpu", {"fp32": 100.0, "int8": 50.0, "bf16": 150.0}, {}, ["fp32", "int8", "bf16"],
        agreement={},
    )  # fmt: skip
    cfg = auto_config(model_dir(TASK), "fp32", "int8", "bf16")

    def measure(fn: Callable[..., Any], *args: Any) -> Any:
        assert fn.__name__ == "measure_precisions"
        return measured

    choice = choose_precision(cfg, run=measure).precision_choice
    assert choice is not None and choice["chosen"] == "bf16"
    assert choice["refused"] == {"int8": ["0.50x fp32's speed here"]}
    # And where only slower precisions are allowed besides fp32, fp32 is served
    slow = PrecisionMeasurement("cpu", {"fp32": 100.0, "int8": 50.0}, {}, ["fp32", "int8"])
    cfg = choose_precision(auto_config(model_dir(TASK), "fp32", "int8"), run=lambda fn, *args: slow)
    assert cfg.key.precision == "fp32"


def test_a_cpu_without_native_bf16_is_named(model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a CPU whose flags lack avx512_bf16 and amx_bf16 (an AVX2-only AMD EPYC, say) and lack VNNI
    monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset({"avx2", "fma", "sse4_2"}))
    cfg = WorkerConfig(key=ServeKey(TASK, model_dir(TASK)))
    # Then bf16 is emulated there, auto leaves it out unmeasured, and int8 is measured against fp32
    why = PRECISIONS["bf16"].emulated(cfg.with_precision("bf16"))
    assert why is not None and "no native bf16 (neither avx512_bf16 nor amx_bf16)" in why
    assert unsupported_reason(cfg.with_precision("bf16")) == why
    assert "VNNI" in str(PRECISIONS["int8"].emulated(cfg.with_precision("int8")))
    assert PRECISIONS["fp32"].emulated(cfg) is None
    # And a CPU that has them runs both natively
    monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "avx512_vnni"}))
    assert PRECISIONS["int8"].emulated(cfg.with_precision("int8")) is None
    import torch

    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert PRECISIONS["bf16"].emulated(cfg.with_precision("bf16")) is None


#: Environment that makes torch run as on a CPU without native bf16: its own kernels at AVX2, oneDNN's too.
NO_NATIVE_BF16 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.integration
def test_a_worker_at_an_emulated_precision_says_how_slow_it_runs(
    sqlite_url: str, redis_url: str, minilm_dir: str, start_worker: Any
) -> None:
    # Given a worker for all-MiniLM-L6-v2 at bf16 on a CPU where torch emulates bf16
    worker = start_worker(
        "--task", "feature-extraction", "--model", minilm_dir, "--precision", "bf16", "--no-warmup",
        broker_url=redis_url, database_url=sqlite_url, extra_env=NO_NATIVE_BF16,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while "would serve fp32" not in worker.log() and time.monotonic() < deadline:
        assert worker.proc.poll() is None, worker.log()[-4000:]
        time.sleep(0.5)
    # Then it says so at start: the measured ratio, why, and what auto would serve
    log = worker.log()
    line = next(x for x in log.splitlines() if "would serve fp32" in x)
    match = re.search(
        r"bf16 runs at (\d\.\d\d)x fp32's speed on cpu: torch runs no native bf16.*measured in (\d+)s", line
    )
    assert match, line
    assert float(match.group(1)) < 1 and "WARNING" in line
    # And measuring fp32 and bf16 took at most 30 s
    assert int(match.group(2)) <= 30, line
