"""A worker's configuration: what it serves, where, and how it batches."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeq import constants as C
from pipeq.agreement import Thresholds
from pipeq.errors import ConfigurationError
from pipeq.precisions import DEFAULT_ALLOWED_PRECISIONS, INT8_BACKENDS, REFERENCE, int8_backend
from pipeq.routing import AUTO_PRECISION, ServeKey, check_precision
from pipeq.worker.placement import DeviceMap


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs to load and serve its one pipeline."""

    key: ServeKey
    device: str = "cpu"
    concurrency: int = 1
    #: None: the budget stored by the last ``--calibrate`` for this model and device, else the default.
    max_batch_tokens: int | None = None
    max_batch_size: int = C.DEFAULT_MAX_BATCH_SIZE
    int8_backend: str | None = None
    pipeline_class: str | None = None
    model_class: str | None = None
    trust_remote_code: bool = False
    threads: int | None = None
    #: Forward passes a child runs at once, each on its share of the threads; None: see ``resolved_streams``.
    streams: int | None = None
    #: Threads the fast tokenizer may use for one batch; None: 1 on the CPU, a share of the cores on CUDA.
    tokenizer_threads: int | None = None
    #: Cores this worker's children share: on a host of several GPUs, one GPU's share of the cores it may use
    #: (``pipeq worker`` sets it); None: all the cores it may use (``devices.available_cores``).
    cores: int | None = None
    warmup: bool = True
    #: What ``--precision auto`` may pick from (ignored for a fixed precision).
    allowed_precisions: tuple[str, ...] = DEFAULT_ALLOWED_PRECISIONS
    #: Sweep the token budget at start and store the fastest (``--calibrate``).
    calibrate: bool = False
    #: How ``--precision auto`` chose: chosen, measured items/s and agreement with fp32 per precision, why
    #: any were refused, and a one-line summary. Stored in the worker row's own column, not in its settings.
    precision_choice: dict[str, Any] | None = None
    #: Least agreement with fp32 a lower precision keeps to be chosen by auto, and below which the shadow check warns.
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: Texts auto's accuracy gate runs through each precision (``--calibration-texts``); None: the shipped set.
    calibration_texts: str | None = None
    #: Where the token budget came from when it was calibrated: now or by an earlier start.
    calibration: dict[str, Any] | None = None
    #: Serve Prometheus metrics on this port from the worker's parent (``--metrics-port``); None: no metrics.
    metrics_port: int | None = None
    #: Share of done items also run through an fp32 copy of the model, to compare outputs (``--shadow-fraction``);
    #: None: ``DEFAULT_SHADOW_FRACTION`` for a worker that serves a lower precision, none for an fp32 one.
    shadow_fraction: float | None = None
    #: Most items of one job the shadow check compares, over every worker (``--shadow-max-items``); 0: no cap.
    shadow_max_items: int = C.SHADOW_MAX_ITEMS
    #: Spread the model over devices (``--device-map``): accelerate's strategy by name, or module names to
    #: ``cuda:N``, ``cpu`` or ``disk``; None: the whole model on ``device``. With a map, ``device`` is the kind
    #: of device it uses (``cuda:0`` where CUDA is seen, else ``cpu``).
    device_map: DeviceMap | None = None
    #: Most bytes the device map may put on each device, by ``cuda:N`` or ``cpu`` (``--max-memory``); None:
    #: accelerate's default (what each device has free).
    max_memory: dict[str, int] | None = None
    #: Where weights the map puts on the disk are written when they cannot be read from the checkpoint in
    #: place (``--offload-folder``; safetensors checkpoints need none): a folder per process under it.
    offload_folder: str | None = None
    #: How the loaded model was placed: its device map's entries (modules) per device, ``{"cpu": 1}`` for a
    #: model whole on one device; None until the pipeline is loaded.
    placement: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.int8_backend is not None and self.int8_backend not in INT8_BACKENDS:
            raise ConfigurationError(f"unknown int8 backend {self.int8_backend!r}; choose {' or '.join(INT8_BACKENDS)}")
        if self.concurrency < 1:
            raise ConfigurationError("--concurrency must be at least 1")
        if self.batch_tokens < 1 or self.max_batch_size < 1:
            raise ConfigurationError("--max-batch-tokens and --max-batch-size must be positive")
        if self.calibrate and self.max_batch_tokens is not None:
            raise ConfigurationError("--calibrate chooses --max-batch-tokens itself; pass one or the other")
        if self.key.precision == AUTO_PRECISION and not self.allowed_precisions:
            raise ConfigurationError("--precision auto needs at least one precision in --allow-precision")
        for precision in self.allowed_precisions:
            check_precision(precision)
        if self.streams is not None and self.streams < 1:
            raise ConfigurationError("--streams must be at least 1")
        if self.streams is not None and self.threads is not None and self.streams > self.threads:
            raise ConfigurationError(f"--streams {self.streams} needs at least as many --threads (got {self.threads})")
        if self.tokenizer_threads is not None and self.tokenizer_threads < 1:
            raise ConfigurationError("--tokenizer-threads must be at least 1")
        if self.cores is not None and self.cores < 1:
            raise ConfigurationError(f"a worker needs at least one core, not {self.cores}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigurationError(f"unknown device {self.device!r}; use cpu or cuda[:N]")
        self._check_shadow_options()
        self._check_placement_options()

    def _check_placement_options(self) -> None:
        if self.device_map is None:
            if self.max_memory:
                raise ConfigurationError("--max-memory only applies with --device-map")
            if self.offload_folder:
                raise ConfigurationError("--offload-folder only applies with --device-map")
        elif self.concurrency > 1:
            raise ConfigurationError(
                f"--device-map spreads one copy of the model over the devices; --concurrency {self.concurrency} "
                "would load a copy per pool child: leave --concurrency out (or 1)"
            )
        elif self.streams is not None and self.streams > 1:
            raise ConfigurationError(
                f"--streams {self.streams} runs forward passes at once on one model, but a model --device-map "
                "spreads has its weights moved between devices around each pass: leave --streams out (or 1)"
            )

    def _check_shadow_options(self) -> None:
        if self.shadow_fraction is not None and not 0.0 <= self.shadow_fraction <= 1.0:
            raise ConfigurationError(f"--shadow-fraction must be in [0, 1], not {self.shadow_fraction}")
        if self.shadow_max_items < 0:
            raise ConfigurationError(f"--shadow-max-items must be 0 (no cap) or more, not {self.shadow_max_items}")

    @property
    def batch_tokens(self) -> int:
        """The token budget in force: the configured one, else the default."""
        return C.DEFAULT_MAX_BATCH_TOKENS if self.max_batch_tokens is None else self.max_batch_tokens

    def with_precision(self, precision: str) -> WorkerConfig:
        """The same configuration serving ``precision`` (its queue changes with it)."""
        return replace(self, key=replace(self.key, precision=precision))

    @property
    def multi_device(self) -> bool:
        """Whether the loaded model is split over more than one device (the disk counts as one): its layers
        run one device after another, and an engine that assumes one device must not."""
        return self.placement is not None and len(self.placement) > 1

    @property
    def shadow_share(self) -> float:
        """The share of done items the shadow check runs at fp32: the one given, else the default for the
        precision (none with a device map: an fp32 copy of a model that needs several devices does not fit)."""
        if self.shadow_fraction is not None:
            return self.shadow_fraction
        if self.device_map is not None:
            return 0.0
        return 0.0 if self.key.precision in (REFERENCE, AUTO_PRECISION) else C.DEFAULT_SHADOW_FRACTION

    def check_shadow(self) -> None:
        """Raise ConfigurationError when a shadow check is asked of a worker that serves fp32 itself."""
        if self.shadow_fraction and self.key.precision == REFERENCE:
            raise ConfigurationError(
                f"--shadow-fraction compares this worker's outputs with {REFERENCE} ones, but it serves {REFERENCE}: "
                f"nothing to compare (with --precision auto, leave {REFERENCE} out of --allow-precision)"
            )

    def resolved_streams(self, threads: int) -> int:
        """Forward streams for a child with ``threads`` torch threads: one for a model over several devices,
        else as set, else on the CPU one per thread (at most ``MAX_CPU_STREAMS``), on an accelerator one.

        On a CPU, torch splits each operator evenly over its threads and waits for the last, so any
        other thread of the worker (tokenizing, writing) that takes a core for a moment stalls the
        whole forward pass; streams of one thread each lose only their own moment, and a stream's
        tokenizing or writing fills the cores the others leave. One loaded model serves them all.
        """
        if self.multi_device:
            # accelerate's hooks move an offloaded module's weights in before its forward and out after:
            # a second pass at once would find them gone (wrong outputs, or an error).
            return 1
        if self.streams is not None:
            return min(self.streams, threads)
        if self.device != "cpu":
            return 1
        return max(1, min(threads, C.MAX_CPU_STREAMS))

    @property
    def resolved_threads(self) -> int:
        """torch's threads per child: as set, else the child's share of the worker's cores."""
        return self.threads or max(1, self.resolved_cores // self.concurrency)

    @property
    def resolved_tokenizer_threads(self) -> int:
        """The tokenizer's threads per child: as set, else 1 on the CPU (torch's forward needs every core)
        and on an accelerator the child's share of the cores, less one for its own Python, at most
        ``MAX_TOKENIZER_THREADS`` (the cores are idle while the device runs the model)."""
        if self.tokenizer_threads is not None:
            return self.tokenizer_threads
        if self.device == "cpu":
            return 1
        share = self.resolved_cores // self.concurrency - 1
        return max(1, min(C.MAX_TOKENIZER_THREADS, share))

    @property
    def resolved_cores(self) -> int:
        """The cores this worker's children share: as set, else all the cores the process may use."""
        from pipeq.worker.devices import available_cores

        return self.cores if self.cores is not None else available_cores()

    @property
    def resolved_int8_backend(self) -> str:
        """bitsandbytes on CUDA, torch dynamic quantization on the CPU, unless chosen explicitly."""
        return int8_backend(self.device, self.int8_backend)

    def as_record(self) -> dict[str, Any]:
        """The settings recorded on the worker row (the key and the precision choice have their own columns)."""
        data = asdict(self)
        data.pop("key")
        data.pop("precision_choice")
        data["shadow_fraction"] = self.shadow_share
        return data


def parse_precisions(value: str) -> tuple[str, ...]:
    """``fp32,bf16,int8`` as a tuple of known precisions, in the order given, without repeats."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ConfigurationError("--allow-precision names no precision")
    return tuple(dict.fromkeys(check_precision(name) for name in names))
