"""What each of pipeq's choices is worth, one at a time: switch one off, keep the rest, measure.

    python benchmarks/ablation.py [--n 400] [--model distilbert] [--rounds 3]

All variants run pipeq's own runtime (``PipelineRuntime``) in process on the same model and the
same real English texts, truncation at 128 tokens, token budget 4096, at most 32 rows a batch:

- **pipeq**: the job sorted by length before it is cut into chunks of 256 (what ``submit`` does),
  each chunk cut into length-sorted token-budget batches, ``torch.inference_mode``, SDPA attention;
- **no job-level sort**: chunks of 256 in submission order, each sorted on its own;
- **no sorting**: batches of 32 in submission order (what ``pipeline(texts, batch_size=32)`` does);
- **no_grad**: transformers' default ``torch.no_grad`` instead of ``inference_mode``;
- **eager attention**: the model loaded with ``attn_implementation="eager"`` instead of SDPA.

Then thread counts, with two worker processes sharing the machine's cores as a worker with
``--concurrency 2`` does: each with its share of the cores (pipeq's default) against each with
torch's default (all cores). Variants are interleaved over ``--rounds`` rounds, so drift on a noisy
machine hits all alike, and the tables show each one's median round (and its best). Padding
efficiency (real tokens over padded tokens) does not depend on the machine's speed. Prints one
JSON line per figure, then the tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
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

from pipeq import constants as C  # noqa: E402
from pipeq.broker.publish import longest_first  # noqa: E402
from pipeq.worker.engines.batched.runtime import PipelineRuntime  # noqa: E402

TASK = "text-classification"
BUDGET, ROWS = 4096, 32


def load(path: str, attention: str = "sdpa") -> Any:
    from transformers import pipeline

    pipe = pipeline(TASK, model=path, model_kwargs={"attn_implementation": attention})
    pipe.model.eval()
    pipe.get_inference_context = lambda: torch.inference_mode  # as pipeq's loader does
    return pipe


def run_chunks(pipe: Any, chunks: list[list[tuple[int, str]]]) -> tuple[float, float]:
    """Texts/s and padding efficiency (real / padded tokens) of running these chunks one after another."""
    rt = PipelineRuntime(pipe, TASK, max_batch_tokens=BUDGET, max_batch_size=ROWS)
    real = padded = n = 0
    t0 = time.perf_counter()
    for chunk in chunks:
        for results, timing in rt.run(chunk, {}):
            n += len(results)
            if timing is not None:
                real += timing.real_tokens
                padded += timing.padded_tokens
    return n / (time.perf_counter() - t0), real / padded if padded else float("nan")


def cut(items: list[tuple[int, str]], size: int) -> list[list[tuple[int, str]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def variants(path: str, texts: list[str]) -> dict[str, Callable[[], tuple[float, float]]]:
    items = list(enumerate(texts))
    job_sorted = cut(longest_first(items), C.DEFAULT_CHUNK_SIZE)
    in_order = cut(items, C.DEFAULT_CHUNK_SIZE)
    pipe, eager = load(path), load(path, "eager")
    no_grad = load(path)
    no_grad.get_inference_context = lambda: torch.no_grad
    for p in (pipe, eager, no_grad):  # warm-up: first passes over new shapes are slow (oneDNN caches)
        run_chunks(p, cut(items[:128], 32))
    return {
        "pipeq (job sorted, token-budget batches, inference_mode, SDPA)": lambda: run_chunks(pipe, job_sorted),
        "no job-level sort (each chunk of 256 sorted alone)": lambda: run_chunks(pipe, in_order),
        "no sorting (batches of 32 in submission order)": lambda: run_chunks(pipe, cut(items, ROWS)),
        "torch.no_grad instead of inference_mode": lambda: run_chunks(no_grad, job_sorted),
        "eager attention instead of SDPA": lambda: run_chunks(eager, job_sorted),
    }


def _process(path: str, texts: list[str], threads: int, barrier: Any, out: Any) -> None:
    torch.set_num_threads(threads)
    pipe = load(path)
    chunks = cut(longest_first(list(enumerate(texts))), C.DEFAULT_CHUNK_SIZE)
    run_chunks(pipe, cut(list(enumerate(texts[:128])), 32))
    barrier.wait()
    t0 = time.perf_counter()
    run_chunks(pipe, chunks)
    out.put(time.perf_counter() - t0)


def two_processes(path: str, texts: list[str], threads: int) -> float:
    """Texts/s of two processes, each running half the texts with ``threads`` torch threads, side by side."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    halves = [texts[0::2], texts[1::2]]
    procs = [ctx.Process(target=_process, args=(path, half, threads, barrier, out)) for half in halves]
    for p in procs:
        p.start()
    elapsed = max(out.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return len(texts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--model", default="distilbert")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "pipeq-bench-models"))
    args = parser.parse_args()
    texts = corpus.english(args.n)
    path = build_models(Path(args.cache), [args.model])[args.model]
    cores = os.cpu_count() or 1
    print(f"Machine: {machine()}")
    print(f"{args.model}, fp32, {args.n} English texts ({corpus.describe(texts)}), {args.rounds} rounds\n")
    torch.set_num_threads(cores)
    runs = variants(path, texts)
    rates: dict[str, list[float]] = {label: [] for label in runs}
    padding: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, run in runs.items():
            tps, padding[label] = run()
            rates[label].append(tps)
            print(json.dumps({"variant": label, "texts_per_s": round(tps, 1), "padding_eff": round(padding[label], 3)}))
    threads: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for label, n in ((f"2 processes x {max(1, cores // 2)} thread(s) (pipeq)", max(1, cores // 2)),
                         (f"2 processes x {cores} threads (torch's default)", cores)):  # fmt: skip
            tps = two_processes(path, texts, n)
            threads.setdefault(label, []).append(tps)
            print(json.dumps({"variant": label, "texts_per_s": round(tps, 1)}))
    print_table("variant (one thing switched off)", rates, padding)
    print_table("two worker processes on the same cores", threads)


def print_table(title: str, rates: dict[str, list[float]], padding: dict[str, float] | None = None) -> None:
    """Median (and best) texts/s of each variant, against the first one's median."""
    extra = " padding efficiency |" if padding else ""
    print(f"\n| {title} | texts/s, median (best) | vs pipeq |{extra}")
    print("| --- | --- | --- |" + (" --- |" if padding else ""))
    base = statistics.median(next(iter(rates.values())))
    for label, got in rates.items():
        mid = statistics.median(got)
        cell = f" {padding[label]:.1%} |" if padding else ""
        print(f"| {label} | {mid:.1f} ({max(got):.1f}) | {mid / base:.2f}x |{cell}")


if __name__ == "__main__":
    main()
