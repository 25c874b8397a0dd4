"""Precisions load and run: fp32, bf16, int8 by torch dynamic quantization and by bitsandbytes (on the CPU here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from pipeq import precisions, routing
from pipeq.errors import ConfigurationError
from pipeq.precisions import DEFAULT_ALLOWED_PRECISIONS, PRECISIONS
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines.batched.runtime import PipelineRuntime
from pipeq.worker.loading import LoadedPipeline, load_pipeline

TASK = "text-classification"
TEXTS = ["hello world", "I hate this so much!", "我非常讨厌这个！", "a somewhat longer sentence about the weather"]


def run(loaded: LoadedPipeline) -> list[Any]:
    rt = PipelineRuntime(loaded.pipe, TASK)
    out = {r.idx: r for results, _ in rt.run(list(enumerate(TEXTS)), {"top_k": None}) for r in results}
    return [out[i] for i in range(len(TEXTS))]


def scores(result: Any) -> dict[str, float]:
    return {d["label"]: d["score"] for d in result.output}


def load(model: str, precision: str, backend: str | None = None) -> LoadedPipeline:
    return load_pipeline(WorkerConfig(key=ServeKey(TASK, model, precision), int8_backend=backend))


def test_dynamic_int8_quantizes_linear_layers(model_dir: Callable[[str], str]) -> None:
    model = model_dir(TASK)
    fp32, int8 = load(model, "fp32"), load(model, "int8")
    assert int8.quantization == "torch-dynamic-int8"
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.pipe.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in int8.pipe.model.modules())
    assert int8.footprint_bytes < fp32.footprint_bytes
    for a, b in zip(run(fp32), run(int8), strict=True):
        assert a.status == b.status == "done"
        sa, sb = scores(a), scores(b)
        assert sa.keys() == sb.keys()
        assert max(abs(sa[k] - sb[k]) for k in sa) < 0.05


def test_bf16_runs_close_to_fp32(model_dir: Callable[[str], str]) -> None:
    model = model_dir(TASK)
    bf16 = load(model, "bf16")
    assert next(bf16.pipe.model.parameters()).dtype == torch.bfloat16
    for a, b in zip(run(load(model, "fp32")), run(bf16), strict=True):
        sa, sb = scores(a), scores(b)
        # bf16 keeps 8 bits of mantissa: scores agree to about 1e-2, not 1e-4.
        assert max(abs(sa[k] - sb[k]) for k in sa) < 2e-2


def test_bnb_int8_skips_heads_missing_from_the_checkpoint(
    model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("bitsandbytes")
    # A checkpoint with no classifier (a bare encoder): the head is newly initialised at load.
    encoder_only = model_dir("feature-extraction")
    loaded = load(encoder_only, "int8", "bnb")
    assert loaded.quantization == "bitsandbytes-llm-int8"
    assert {r.status for r in run(loaded)} == {"done"}
    # Without the skip list the same load fails in forward with bitsandbytes' "CB" error.
    monkeypatch.setattr(precisions, "BNB_SKIP_MODULES", [])
    broken = run(load(encoder_only, "int8", "bnb"))
    assert all(r.status == "failed" and "'CB'" in r.error for r in broken)


def test_int8_backend_defaults_follow_the_device() -> None:
    key = ServeKey(TASK, "m", "int8")
    assert WorkerConfig(key=key, device="cpu").resolved_int8_backend == "dynamic"
    assert WorkerConfig(key=key, device="cuda:0").resolved_int8_backend == "bnb"
    assert WorkerConfig(key=key, device="cpu", int8_backend="bnb").resolved_int8_backend == "bnb"


def test_the_precision_registry_names_the_precisions() -> None:
    assert routing.PRECISIONS == tuple(PRECISIONS) == ("fp32", "fp16", "bf16", "int8", "nf4")
    assert DEFAULT_ALLOWED_PRECISIONS == ("fp32", "bf16", "int8")
    assert {p.name: getattr(torch, p.dtype) for p in PRECISIONS.values()} == {
        "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
        "nf4": torch.bfloat16,
    }  # fmt: skip
    cpu = WorkerConfig(key=ServeKey(TASK, "m", "fp16"))
    assert PRECISIONS["fp16"].load_warning(cpu) is not None
    assert PRECISIONS["fp16"].load_warning(replace(cpu, device="cuda:0")) is None
    assert PRECISIONS["int8"].load_kwargs(cpu) == {}  # dynamic quantization: after loading
    with pytest.raises(ConfigurationError, match="unknown precision 'fp8'; choose one of fp32, fp16, bf16, int8, nf4"):
        routing.check_precision("fp8")
