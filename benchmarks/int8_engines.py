"""Which int8 is fastest on this CPU, against fp32 and bf16: what torch and torchao offer, side by side.

    python benchmarks/int8_engines.py [--n 600] [--models distilbert,minilm] [--rounds 2]

Each variant runs pipeq's own runtime (length-sorted token-budget batches, truncation at 128
tokens) over the same real English texts, after a warm-up pass; variants are interleaved over
``--rounds`` rounds and each keeps its best round, so drift on a noisy machine hits all alike.
Accuracy is the largest softmax difference from fp32 and the share of identical top labels.
torchao is optional (``pip install torchao``); its variants are skipped when it is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
from run import build_models, machine  # noqa: E402

from pipeq.worker.engines.batched.runtime import PipelineRuntime  # noqa: E402


def dynamic_int8(engine: str) -> Callable[[Any], Any]:
    def make(model: Any) -> Any:
        torch.backends.quantized.engine = engine
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    return make


def bf16(model: Any) -> Any:
    return model.to(torch.bfloat16)


def torchao_variant(kind: str) -> Callable[[Any], Any]:
    def make(model: Any) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        if kind == "w8-bf16":  # int8 weights, bf16 compute
            model = model.to(torch.bfloat16)
            quantize_(model, Int8WeightOnlyConfig())
        elif kind == "w8a8":  # int8 weights and dynamically quantized int8 activations
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model

    return make


def pipeq_int8(model: Any) -> Any:
    from pipeq.worker.quantize import quantize_dynamic_int8

    return quantize_dynamic_int8(model)


VARIANTS: dict[str, Callable[[Any], Any]] = {
    "fp32": lambda m: m,
    "bf16": bf16,
    "dynamic int8, per-channel weights (x86 engine, pipeq's)": pipeq_int8,
    "dynamic int8, per-tensor (x86 engine)": dynamic_int8("x86"),
    "dynamic int8, per-tensor (onednn engine)": dynamic_int8("onednn"),
    "dynamic int8, per-tensor (fbgemm engine)": dynamic_int8("fbgemm"),
    "torchao int8 weight-only, bf16 compute": torchao_variant("w8-bf16"),
    "torchao int8 dynamic act + weight": torchao_variant("w8a8"),
}


def footprint_mb(model: Any) -> float:
    from pipeq.worker.quantize import memory_footprint

    return memory_footprint(model) / 1e6


def run_once(pipe: Any, texts: list[str]) -> tuple[float, dict[int, Any]]:
    rt = PipelineRuntime(pipe, "text-classification", max_batch_tokens=4096, max_batch_size=32)
    t0 = time.perf_counter()
    out = {r.idx: r.output for batch, _ in rt.run(list(enumerate(texts)), {"top_k": None}) for r in batch}
    return len(texts) / (time.perf_counter() - t0), out


def compare(ref: dict[int, Any], got: dict[int, Any]) -> tuple[float, float]:
    same, diff = 0, 0.0
    for i, want in ref.items():
        a = {x["label"]: x["score"] for x in want}
        b = {x["label"]: x["score"] for x in got[i]}
        same += max(a, key=a.__getitem__) == max(b, key=b.__getitem__)
        diff = max(diff, max(abs(a[k] - b[k]) for k in a))
    return same / len(ref), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--models", default="distilbert,minilm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "pipeq-bench-models"))
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    texts = corpus.english(args.n)
    print(f"Machine: {machine()}; quantized engines {torch.backends.quantized.supported_engines}")
    print(f"{args.n} English texts ({corpus.describe(texts)}), truncation at 128 tokens, best of {args.rounds}\n")
    for name, path in build_models(Path(args.cache), args.models.split(",")).items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForSequenceClassification.from_pretrained(path).eval()
        pipes: dict[str, Any] = {}
        sizes: dict[str, float] = {}
        for label, make in VARIANTS.items():
            try:
                model = make(copy.deepcopy(base))
            except Exception as exc:  # a variant this torch/torchao/CPU cannot build
                print(json.dumps({"model": name, "variant": label, "skipped": f"{type(exc).__name__}: {exc}"[:200]}))
                continue
            pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, truncation=True)
            try:
                run_once(pipe, texts[:64])  # warm-up: oneDNN primitive caches
            except Exception as exc:  # built, but cannot run here
                print(json.dumps({"model": name, "variant": label, "skipped": f"{type(exc).__name__}: {exc}"[:200]}))
                continue
            pipes[label] = pipe
            sizes[label] = footprint_mb(model)
        best: dict[str, float] = {}
        outputs: dict[str, dict[int, Any]] = {}
        for _ in range(args.rounds):
            for label, pipe in pipes.items():
                engine = "onednn" if "onednn" in label else "fbgemm" if "fbgemm" in label else "x86"
                if engine in torch.backends.quantized.supported_engines:
                    torch.backends.quantized.engine = engine
                rate, outputs[label] = run_once(pipe, texts)
                best[label] = max(best.get(label, 0.0), rate)
        print(f"\n| {name} | texts/s | vs fp32 | vs bf16 | footprint MB | top label = fp32 | largest score diff |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        bf16_rate = best.get("bf16", float("nan"))
        for label, rate in best.items():
            agree, diff = compare(outputs["fp32"], outputs[label])
            print(
                f"| {label} | {rate:,.1f} | {rate / best['fp32']:.2f}x | {rate / bf16_rate:.2f}x | "
                f"{sizes[label]:,.1f} | {agree * 100:.1f}% | {diff:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
