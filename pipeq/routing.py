"""What a worker serves, and the queue a job for it is published to."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from pipeq import constants, generation
from pipeq import precisions as registry
from pipeq.errors import ConfigurationError, InputError, ModelNotFoundError

#: The names of the precisions in ``pipeq.precisions.PRECISIONS``, in its order.
PRECISIONS: tuple[str, ...] = tuple(registry.PRECISIONS)
#: A worker's ``--precision auto``: it measures the allowed precisions and serves the fastest.
AUTO_PRECISION = "auto"


def normalize_model(model: str) -> str:
    """A local directory becomes its absolute real path; a hub id stays as written."""
    model = model.strip()
    if not model:
        raise ConfigurationError("model must not be empty")
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return os.path.realpath(expanded)
    return model


def check_model(model: str) -> str:
    """Normalize a model reference; fail early on a missing local path or an uncached offline hub id."""
    normalized = normalize_model(model)
    if os.path.isdir(normalized):
        if not os.path.isfile(os.path.join(normalized, "config.json")):
            raise ModelNotFoundError(f"model directory {normalized} has no config.json")
        return normalized
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"model path {model!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ModelNotFoundError(
                f"model {model!r} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
            )
    return normalized


#: Parameters that would choose what a worker loads or runs: a worker's own start flags, never a job's.
RESERVED_PARAMS = frozenset(
    {
        "model", "tokenizer", "feature_extractor", "image_processor", "processor", "config", "revision",
        "trust_remote_code", "device", "device_map", "dtype", "torch_dtype", "model_kwargs", "pipeline_class",
        "framework", "token", "use_auth_token", "cache_dir", "local_files_only",
    }
)  # fmt: skip


#: Reserved names a task takes as a parameter of its own, checked by its own rules: a pooled embedding's
#: storage type (``pipeq.embedding``: float32 or float16), which never reaches the model's loading.
TASK_OWN_PARAMS: dict[str, frozenset[str]] = {"feature-extraction": frozenset({"dtype"})}


def check_params(params: dict[str, Any] | None, task: str | None = None) -> dict[str, Any]:
    """Task parameters must be a JSON object (they travel to workers as JSON) and may not pick code or models.

    A text-generation job's are its items' default sampling parameters (``pipeq.generation.check_params``:
    ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``), returned normalized.
    """
    params = dict(params or {})
    reserved = sorted((RESERVED_PARAMS - TASK_OWN_PARAMS.get(task or "", frozenset())) & set(params))
    if reserved:
        raise ConfigurationError(
            f"task parameters may not set {', '.join(reserved)}: what a worker loads is fixed by its own "
            f"start flags (pipeq worker --model/--revision/--trust-remote-code/--device)"
        )
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"task parameters must be JSON-serializable: {exc}") from None
    if task == generation.TASK:
        try:
            return generation.check_params(params)
        except InputError as exc:
            raise ConfigurationError(f"{generation.TASK} job parameters: {exc}") from None
    return params


def check_precision(precision: str) -> str:
    """Return ``precision`` if pipeq knows it, else raise ConfigurationError."""
    if precision == AUTO_PRECISION:
        raise ConfigurationError(
            "precision 'auto' is a worker's own choice; a job names the precision it requires "
            f"({', '.join(PRECISIONS)}): `pipeq workers` shows what the live workers serve"
        )
    if precision not in PRECISIONS:
        raise ConfigurationError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class ServeKey:
    """The part of a configuration a job names: jobs are routed on exactly this."""

    task: str
    model: str
    precision: str = "fp32"
    revision: str | None = None

    @property
    def queue(self) -> str:
        """Queue name: readable task and model tail plus a digest of the whole key."""
        digest = hashlib.sha1(
            "\x1f".join([self.task, self.model, self.precision, self.revision or ""]).encode()
        ).hexdigest()[:12]
        tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(self.model.rstrip("/")) or "model")[:40]
        return f"{constants.QUEUE_PREFIX}.{self.task}.{tail}.{self.precision}.{digest}"

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)
