"""The engines a worker runs a loaded pipeline with, by task: a small registry.

- ``batched`` (``engines/batched/``): the pipeline's own stages over padded micro-batches cut by a token
  budget (tokenize, collate, forward, postprocess), for every encoder task;
- ``sequence`` (``engines/sequence/``): a scheduler of sequences for causal language models, where
  each item decodes in a slot of its own and leaves the moment it ends.

Both yield ``Step``s (``engines.base``) to the same writer; the claim, the lease and the Celery task
do not know which engine runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeq.generation import TASK as GENERATION_TASK

if TYPE_CHECKING:
    from pipeq.worker.config import WorkerConfig
    from pipeq.worker.engines.base import Engine


def _batched(pipe: Any, cfg: WorkerConfig, threads: int) -> Engine:
    from pipeq.worker.engines.batched.runtime import PipelineRuntime

    return PipelineRuntime.for_worker(pipe, cfg, threads)


def _sequence(pipe: Any, cfg: WorkerConfig, threads: int) -> Engine:
    from pipeq.worker.engines.sequence.engine import SequenceEngine

    return SequenceEngine.for_worker(pipe, cfg, threads)


@dataclass(frozen=True)
class EngineSpec:
    name: str
    #: Builds the engine for a loaded pipeline (imports torch only when called).
    build: Callable[[Any, WorkerConfig, int], Engine]
    #: Tasks it serves; None: every task no other engine claims.
    tasks: frozenset[str] | None = None


#: Every engine, by name; a new engine is one entry.
ENGINES: dict[str, EngineSpec] = {
    e.name: e
    for e in (
        EngineSpec("batched", _batched),
        EngineSpec("sequence", _sequence, frozenset({GENERATION_TASK})),
    )
}


def engine_name(task: str) -> str:
    """The engine that serves ``task``."""
    for spec in ENGINES.values():
        if spec.tasks is not None and task in spec.tasks:
            return spec.name
    return "batched"


def build_engine(pipe: Any, cfg: WorkerConfig, threads: int) -> Engine:
    """The engine for ``cfg``'s task, built around the loaded pipeline."""
    return ENGINES[engine_name(cfg.key.task)].build(pipe, cfg, threads)
