"""Generation at engine speed: pipeq end to end against the ways people generate in process.

A decoder-only model shaped like a small Llama is built from a config (random weights; its
end-of-sequence id is one no logit can produce, so every item runs to its own ``max_tokens``). Its
prompts run 8 to 500 tokens (log-uniform), its ``max_tokens`` 16 to 256 (uniform). Four ways to
generate them, in turns, each round in the same order, and each figure is useful output tokens per
second (the tokens each item asked for, over the wall time):

- ``pipeq``: ``pipeq submit FILE --wait`` with an id and a ``max_tokens`` on every record, timed from the
  command's start to its exit, one warm ``pipeq worker`` on the store (SQLite by default);
- ``pipeline``: ``pipeline("text-generation", batch_size=16)`` as users run it: one ``max_new_tokens`` for
  the job (the largest), each output then cut to its own;
- ``generate``: ``model.generate`` on batches of 16 sorted by prompt length, each run to its largest
  ``max_tokens``;
- ``continuous``: transformers' continuous batching in process (``init_continuous_batching``, each request
  added with its own ``max_new_tokens``).

    python benchmarks/generate.py [--items 48] [--rounds 2] [--hidden 512] [--layers 4] [--stores sqlite]

Needs Redis (database 11 unless PIPEQ_BENCH_WHOLEJOB_REDIS_URL says otherwise). Nothing else may run on
the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchenv  # noqa: E402,F401  (before torch)
import corpus  # noqa: E402
import torch  # noqa: E402
from wholejob import PIPEQ, REDIS, Worker, machine, store_url, timed  # noqa: E402

from pipeq.demo import minilm_path  # noqa: E402
from pipeq.store import Store  # noqa: E402

TASK = "text-generation"
BATCH = 16


def build_model(root: Path, hidden: int, layers: int) -> str:
    """A Llama-shaped causal LM with random weights and an end-of-sequence id outside its vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / f"llama-{hidden}x{layers}"
    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.model_max_length = 1024
    never = tok.vocab_size + 1  # no logit stands for it: every item runs to its max_tokens
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=1024,
        bos_token_id=tok.cls_token_id,
        eos_token_id=never,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def workload(model: str, n: int, seed: int) -> tuple[list[str], list[list[int]], list[int]]:
    """Prompts of 8 to 500 tokens (log-uniform), their ids, and max_tokens of 16 to 256 (uniform)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    words = " ".join(corpus.english(400, seed=seed)).split()
    prompts, ids = [], []
    for _ in range(n):
        want = int(math.exp(rng.uniform(math.log(8), math.log(500))))
        start = rng.randrange(len(words))
        text = " ".join(words[start : start + want])
        encoded = tok(text, add_special_tokens=True, truncation=True, max_length=want)["input_ids"]
        text = tok.decode(encoded, skip_special_tokens=True)
        prompts.append(text)
        ids.append(tok(text)["input_ids"])
    budgets = [rng.randint(16, 256) for _ in range(n)]
    return prompts, ids, budgets


def _load(model: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"  # decoder-only batches pad on the left, as transformers' docs say
    return AutoModelForCausalLM.from_pretrained(model).eval(), tok


def run_pipeline(model: str, prompts: list[str], budgets: list[int]) -> float:
    from transformers import pipeline

    lm, tok = _load(model)
    pipe = pipeline(TASK, model=lm, tokenizer=tok)
    t0 = time.perf_counter()
    out = pipe(prompts, batch_size=BATCH, max_new_tokens=max(budgets), do_sample=False, return_full_text=False)
    seconds = time.perf_counter() - t0
    assert len(out) == len(prompts)
    return seconds


def run_generate(model: str, ids: list[list[int]], budgets: list[int]) -> float:
    lm, tok = _load(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            padded = tok.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            lm.generate(
                input_ids=padded["input_ids"],
                attention_mask=padded["attention_mask"],
                max_new_tokens=max(budgets[i] for i in batch),
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    return time.perf_counter() - t0


def run_continuous(model: str, ids: list[list[int]], budgets: list[int]) -> float:
    from transformers import GenerationConfig

    lm, tok = _load(model)
    config = GenerationConfig(max_new_tokens=max(budgets), do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    manager = lm.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        for i, (prompt, budget) in enumerate(zip(ids, budgets, strict=True)):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=budget)
        got = 0
        while got < len(ids):
            if manager.get_result(timeout=1.0) is not None:
                got += 1
    finally:
        manager.stop(block=True)
    return time.perf_counter() - t0


def run_pipeq(worker: Worker, path: Path, n: int) -> float:
    env = {**os.environ, "PIPEQ_BROKER_URL": REDIS, "PIPEQ_DATABASE_URL": worker.url}
    seconds, _rss, stdout = timed(
        [*PIPEQ, "submit", str(path), "--task", TASK, "--model", worker.model, "--wait"], env
    )
    job_id = stdout.strip().splitlines()[-1]
    with Store(worker.url) as store:
        progress = store.job(job_id)
    assert progress.done == n, f"pipeq ran {progress.done} of {n} items: {progress}"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--stores", default="sqlite")
    parser.add_argument("--skip", default="", help="comma-separated ways to leave out (pipeline, continuous, ...)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="pipeq-generate-"))
    model = build_model(Path(tempfile.gettempdir()) / "pipeq-bench-models", args.hidden, args.layers)
    prompts, ids, budgets = workload(model, args.items, args.seed)
    useful = sum(budgets)
    lengths = sorted(len(x) for x in ids)
    path = work / "prompts.jsonl"
    with path.open("w") as fh:
        for i, (text, budget) in enumerate(zip(prompts, budgets, strict=True)):
            fh.write(json.dumps({"id": f"p{i}", "text": text, "max_tokens": budget}) + "\n")
    params = sum(p.numel() for p in _load(model)[0].parameters())
    print(
        f"# {machine()}; Llama-shaped {args.hidden} wide, {args.layers} layers, {params / 1e6:.1f}M parameters, fp32\n"
        f"# {args.items} prompts: tokens median {statistics.median(lengths):.0f}, max {lengths[-1]}; "
        f"max_tokens 16-256, {useful:,} useful output tokens",
        flush=True,
    )
    ways: dict[str, Callable[[], float]] = {
        "pipeline": lambda: run_pipeline(model, prompts, budgets),
        "generate": lambda: run_generate(model, ids, budgets),
        "continuous": lambda: run_continuous(model, ids, budgets),
    }
    torch.set_num_threads(os.cpu_count() or 1)
    for store in args.stores.split(","):
        with store_url(store, work) as url:
            worker = Worker(model, "fp32", url, None, work / f"worker-{store}.log", task=TASK)
            try:
                worker.wait_ready()
                run_pipeq(worker, path, args.items)  # the worker's first shapes and the store's first pages
                rounds: list[dict[str, float]] = []
                for r in range(args.rounds):
                    seconds = {f"pipeq-{store}": run_pipeq(worker, path, args.items)}
                    for name, way in ways.items():
                        if name not in skip:
                            seconds[name] = way()
                    rounds.append(seconds)
                    print(f"round {r + 1}: " + ", ".join(f"{k} {useful / v:,.0f} tok/s" for k, v in seconds.items()), flush=True)
            finally:
                worker.stop()
        best = {k: max(useful / r[k] for r in rounds) for k in rounds[0]}
        pipeq_key = f"pipeq-{store}"
        print(f"\n| way | output tokens/s (best of {args.rounds}) | pipeq / way, per round |")
        print("| --- | ---: | --- |")
        for name, value in best.items():
            ratios = ", ".join(f"{r[name] / r[pipeq_key]:.2f}" for r in rounds)
            print(f"| {name} | {value:,.0f} | {ratios} |")


if __name__ == "__main__":
    main()
