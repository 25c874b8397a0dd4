"""A worker's configuration: what it serves, where, and how it batches."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeq import constants as C
from pipeq.errors import ConfigurationError
from pipeq.routing import ServeKey

#: int8 implementations: bitsandbytes LLM.int8 (CUDA) or torch dynamic quantization (CPU).
INT8_BACKENDS = ("bnb", "dynamic")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs to load and serve its one pipeline."""

    key: ServeKey
    device: str = "cpu"
    concurrency: int = 1
    max_batch_tokens: int = C.DEFAULT_MAX_BATCH_TOKENS
    max_batch_size: int = C.DEFAULT_MAX_BATCH_SIZE
    int8_backend: str | None = None
    pipeline_class: str | None = None
    model_class: str | None = None
    trust_remote_code: bool = False
    threads: int | None = None
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.int8_backend is not None and self.int8_backend not in INT8_BACKENDS:
            raise ConfigurationError(f"unknown int8 backend {self.int8_backend!r}; choose bnb or dynamic")
        if self.concurrency < 1:
            raise ConfigurationError("--concurrency must be at least 1")
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ConfigurationError("--max-batch-tokens and --max-batch-size must be positive")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigurationError(f"unknown device {self.device!r}; use cpu or cuda[:N]")

    @property
    def resolved_int8_backend(self) -> str:
        """bitsandbytes on CUDA, torch dynamic quantization on the CPU, unless chosen explicitly."""
        if self.int8_backend:
            return self.int8_backend
        return "bnb" if self.device.startswith("cuda") else "dynamic"

    def as_record(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("key")
        return data
