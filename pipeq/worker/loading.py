"""Load the one pipeline a worker process serves, at the precision and on the device asked for."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeq.embedding import TASK as EMBEDDING_TASK
from pipeq.errors import ConfigurationError, ModelNotFoundError
from pipeq.precisions import PRECISIONS
from pipeq.tasks import traits
from pipeq.worker import placement
from pipeq.worker.config import WorkerConfig
from pipeq.worker.quantize import memory_footprint

log = logging.getLogger(__name__)

#: Token lengths of the warm-up batches (up to the model's maximum).
_WARMUP_LENGTHS = (8, 16, 32, 64, 96, 128, 256, 512)


@dataclass
class LoadedPipeline:
    """A loaded transformers pipeline and what the store records about it."""

    pipe: Any
    footprint_bytes: int
    load_seconds: float
    resolved_revision: str | None
    quantization: str
    #: Modules per device (``placement.placement``): ``{"cpu": 1}`` for a model whole on the CPU.
    placed: dict[str, int]


def import_object(ref: str) -> Any:
    """Import ``package.module:Name``; only called for classes named on the worker's command line."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"expected module:Class, got {ref!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot import {ref}: {exc}") from None


def register_custom_pipeline(cfg: WorkerConfig) -> None:
    """Register the worker's own Pipeline subclass under its task name (transformers' PIPELINE_REGISTRY)."""
    if not cfg.pipeline_class:
        return
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    pipeline_class = import_object(cfg.pipeline_class)
    model_class = import_object(cfg.model_class) if cfg.model_class else AutoModel
    PIPELINE_REGISTRY.register_pipeline(cfg.key.task, pipeline_class=pipeline_class, pt_model=model_class, type="text")


def load_pipeline(cfg: WorkerConfig) -> LoadedPipeline:
    """Load the pipeline once, at its precision's dtype and with its precision's load and post-load steps."""
    import torch
    from transformers import pipeline as make_pipeline

    register_custom_pipeline(cfg)
    key = cfg.key
    precision = PRECISIONS[key.precision]
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": getattr(torch, precision.dtype), "trust_remote_code": cfg.trust_remote_code}
    if key.revision:
        kwargs["revision"] = key.revision
    if cfg.device.startswith("cuda"):
        # cuDNN attention builds an execution plan for every new (batch, length) shape: on an H100 that
        # cost ~43 ms a shape at fp16/bf16 (seeds' loop 47.8 -> 4.8 ms a text with it off), and uneven
        # texts make new shapes all the time. Flash / memory-efficient SDPA need no per-shape plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    kwargs.update(precision.load_kwargs(cfg))
    if cfg.device_map is not None:  # accelerate places the modules; it replaces a precision's one-device map
        kwargs["device_map"], extra = placement.load_kwargs(cfg.device_map, cfg.max_memory, cfg.offload_folder)
        kwargs["model_kwargs"] = {**kwargs.get("model_kwargs", {}), **extra}
    if "device_map" not in kwargs:
        kwargs["device"] = cfg.device
    if key.task == EMBEDDING_TASK and not cfg.pipeline_class:
        from pipeq.worker.embedding import EmbeddingPipeline

        kwargs["pipeline_class"] = EmbeddingPipeline  # transformers' own, plus pooling and normalize
    warning = precision.load_warning(cfg)
    if warning:
        log.warning("%s", warning)
    # A local folder's identity from before the load: weights changed while loading are not what it names.
    local = local_revision(key.model)
    try:
        pipe = make_pipeline(key.task, model=key.model, **kwargs)  # type: ignore[call-overload]
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {key.model!r}: {exc}") from None
    except RuntimeError as exc:
        # The pipeline runs its inputs on the map's first device; the disk is no device to run on.
        if cfg.device_map is None or not str(exc).endswith("device string: disk"):
            raise
        raise ConfigurationError(
            "the device map put the model's first modules on the disk, where nothing runs: give the first "
            "device more --max-memory"
        ) from None
    quantization = precision.after_load(pipe, cfg)
    pipe.model.eval()
    # inference_mode is cheaper than the no_grad transformers uses by default.
    pipe.get_inference_context = lambda: torch.inference_mode
    load_seconds = time.perf_counter() - t0
    revision = local or resolved_revision(key.model, key.revision) or getattr(pipe.model.config, "_commit_hash", None)
    footprint = memory_footprint(pipe.model)
    placed = placement.placement(pipe.model)
    log.info(
        "loaded %s %s (%s, %s) in %.1fs, footprint %.1f MB%s",
        key.task,
        key.model,
        key.precision,
        quantization,
        load_seconds,
        footprint / 1e6,
        "" if cfg.device_map is None else f", placed {placement.describe(placed)}",
    )
    if len(placed) > 1:
        log.info("the model spans %d devices: its layers run one device after another, not at once", len(placed))
    return LoadedPipeline(pipe, footprint, load_seconds, revision, quantization, placed)


def local_revision(model: str) -> str | None:
    """A local model folder's identity (None for a hub id): ``local-`` and a hash of its files' names, sizes
    and modification times.

    A folder has no commit hash, and its path stays the same when its weights are replaced: this names
    what is in it, in a few ``stat`` calls (no file is read). Hidden files and folders are left out.
    """
    if not os.path.isdir(model):
        return None
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(model):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # removed while walking: the next look sees the folder as it is then
            digest.update(f"{os.path.relpath(path, model)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"local-{digest.hexdigest()[:16]}"


def resolved_revision(model: str, revision: str | None) -> str | None:
    """The commit a hub model was loaded from (its snapshot folder in the Hugging Face cache), if known."""
    if os.path.isdir(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model, "config.json", revision=revision)
    if isinstance(path, str):
        parts = Path(path).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return revision


def warmup_inputs(
    pipe: Any, task: str, *, max_length: int | None, max_batch_tokens: int, max_batch_size: int
) -> list[Any]:
    """Texts whose batches cover the shapes real batches will have (short to the model's maximum).

    The first forward pass over a new shape is markedly slower (kernel selection, allocator and
    oneDNN caches), so the worker pays for it at start, where it counts as load time.
    """
    if synthetic_text(pipe, task, 1) is None:
        return []
    longest = min(max_length or _WARMUP_LENGTHS[-1], _WARMUP_LENGTHS[-1])
    texts: list[str] = []
    for tokens in _WARMUP_LENGTHS:
        if tokens > longest:
            break
        rows = max(1, min(max_batch_size, max_batch_tokens // tokens))
        texts.extend(str(synthetic_text(pipe, task, tokens)) for _ in range(rows))
    return texts


def synthetic_text(pipe: Any, task: str, tokens: int) -> str | None:
    """An input of about ``tokens`` tokens for a task that takes one text; None for other tasks."""
    if not traits(task).synthetic_warmup:
        return None
    mask = getattr(pipe.tokenizer, "mask_token", None) if task == "fill-mask" else ""
    if mask is None:
        return None
    words = " ".join(["word"] * max(1, tokens - 3))
    return f"{words} {mask}".strip()


def set_tokenizer_threads(threads: int) -> int:
    """Let the fast tokenizer split one batch over ``threads`` threads (1: none), before its first call here.

    The tokenizers library reads ``TOKENIZERS_PARALLELISM`` at each call and sizes its thread pool from
    ``RAYON_NUM_THREADS`` once, at its first parallel call in the process: a pool child sets both
    before it loads its pipeline. Outputs are the same either way.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    if threads > 1:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    return threads


def set_threads(threads: int) -> int:
    """Run torch's operators on ``threads`` threads (``WorkerConfig.resolved_threads``: each pool child its
    share of the worker's cores, so children do not fight over them)."""
    import torch

    torch.set_num_threads(threads)
    return threads
