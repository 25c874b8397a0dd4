"""The precision registry: each precision a worker serves, how its model loads, and where it runs.

A new precision is one ``Precision`` in ``PRECISIONS``: its name, dtype and description, and hooks
for loading (keyword arguments for ``transformers.pipeline``, a post-load step that names the
quantization) and for the device check of ``--precision auto``. Names in help texts and errors,
and the default ``--allow-precision``, follow from the registry. The hooks live here rather than in
``pipeq/worker/`` so that one entry is the whole precision; the producer imports this module
(through ``routing``) for the names only, so nothing here imports torch, transformers or
bitsandbytes until a worker calls a hook.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeq.errors import ConfigurationError

if TYPE_CHECKING:
    from pipeq.worker.config import WorkerConfig

#: The precision a model's weights are saved in: what a shadow check compares other precisions with.
REFERENCE = "fp32"
#: int8 implementations (``--int8-backend``): bitsandbytes LLM.int8 (CUDA) or torch dynamic quantization (CPU).
INT8_BACKENDS = ("bnb", "dynamic")
#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic, and of int8 dot products (VNNI).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: Task heads kept in full precision under bitsandbytes: often absent from a checkpoint (newly
#: initialised), where quantizing them fails with "'Parameter' object has no attribute 'CB'",
#: and too small for int8 to save anything.
BNB_SKIP_MODULES = ["classifier", "pre_classifier", "score", "qa_outputs", "lm_head", "cls", "pooler"]


def _on_cuda(cfg: WorkerConfig) -> bool:
    return cfg.device.startswith("cuda")


def _no_load_kwargs(cfg: WorkerConfig) -> dict[str, Any]:
    return {}


def _unquantized(pipe: Any, cfg: WorkerConfig) -> str:
    return "none"


def _runs_anywhere(cfg: WorkerConfig) -> str | None:
    return None


def _no_warning(cfg: WorkerConfig) -> str | None:
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them; empty where they cannot be read (not Linux)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class Precision:
    """One precision: its name, the dtype its weights load in, and its load and device-check hooks."""

    #: What jobs and workers call it (``--precision``); part of the queue name.
    name: str
    #: The torch dtype the weights are loaded in, as an attribute name of ``torch``.
    dtype: str
    #: What it is, for help texts.
    description: str
    #: Whether ``--precision auto`` tries it when ``--allow-precision`` is not given.
    auto_default: bool = False
    #: Keyword arguments for ``transformers.pipeline`` (a ``dtype`` here replaces ``dtype`` for the device);
    #: a ``device_map`` replaces ``device``, and a worker's ``--device-map`` replaces that.
    load_kwargs: Callable[[WorkerConfig], dict[str, Any]] = _no_load_kwargs
    #: Runs on the loaded pipeline (it may replace ``pipe.model``); returns the quantization label the store records.
    after_load: Callable[[Any, WorkerConfig], str] = _unquantized
    #: Why the configuration's device cannot run it, None when it can (may import torch: a worker's question).
    unsupported: Callable[[WorkerConfig], str | None] = _runs_anywhere
    #: A warning to log when a worker loads it on a device where it runs but poorly.
    load_warning: Callable[[WorkerConfig], str | None] = _no_warning
    #: Why the device may run it slower than fp32 (it lacks the instructions for it), None when it has them:
    #: a worker started at it measures it against fp32 first and warns when it is slower. Asked in the
    #: worker's parent: it may import torch but never touches CUDA.
    emulated: Callable[[WorkerConfig], str | None] = _runs_anywhere


def int8_backend(device: str, chosen: str | None) -> str:
    """bitsandbytes on CUDA, torch dynamic quantization on the CPU, unless chosen explicitly."""
    if chosen:
        return chosen
    return "bnb" if device.startswith("cuda") else "dynamic"


def bnb_config(*, cpu_offload: bool = False) -> Any:
    """BitsAndBytesConfig for LLM.int8 with the task heads left unquantized.

    ``cpu_offload``: a device map may put modules on the CPU or the disk, where they stay unquantized
    (transformers refuses such a map otherwise).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_skip_modules=list(BNB_SKIP_MODULES),
        llm_int8_enable_fp32_cpu_offload=cpu_offload,
    )


def bnb_4bit_config(compute_dtype: Any, *, cpu_offload: bool = False) -> Any:
    """BitsAndBytesConfig for 4-bit NormalFloat weights computed in ``compute_dtype``, task heads left
    unquantized; ``cpu_offload`` as for ``bnb_config``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(BNB_SKIP_MODULES),  # bitsandbytes' skip list for 4-bit as well
        llm_int8_enable_fp32_cpu_offload=cpu_offload,
    )


def quantize_dynamic_int8(model: Any) -> Any:
    """Replace every nn.Linear by a dynamically quantized int8 Linear (int8 weights, activations scaled per batch)."""
    import warnings

    import torch

    engines = torch.backends.quantized.supported_engines
    if "x86" in engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices, once per worker
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # Per-channel weight scales: on all-MiniLM-L6-v2 embeddings they keep cosine to fp32 at 0.97
        # where one scale per tensor gives 0.92, at the same speed.
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False)


def _fp16_unsupported(cfg: WorkerConfig) -> str | None:
    return None if _on_cuda(cfg) else "fp16 runs only on CUDA here"


def _fp16_warning(cfg: WorkerConfig) -> str | None:
    return None if _on_cuda(cfg) else "fp16 on the CPU is slow; bf16 or int8 are the fast CPU precisions"


def _bf16_unsupported(cfg: WorkerConfig) -> str | None:
    import torch

    if _on_cuda(cfg):
        return None if torch.cuda.is_bf16_supported() else "torch reports no bf16 support on this GPU"
    return _bf16_emulated(cfg)  # it runs, emulated and slower than fp32: auto leaves it out unmeasured


def _bf16_emulated(cfg: WorkerConfig) -> str | None:
    if _on_cuda(cfg):
        return None
    import torch

    flags = cpu_flags()
    if flags and not flags & set(BF16_CPU_FLAGS):
        return f"this CPU has no native bf16 (neither {' nor '.join(BF16_CPU_FLAGS)}): torch emulates it"
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        capability = torch.backends.cpu.get_cpu_capability()
        return f"torch runs no native bf16 on this CPU (its kernels use {capability}): it emulates it"
    return None


def _int8_load_kwargs(cfg: WorkerConfig) -> dict[str, Any]:
    if cfg.resolved_int8_backend != "bnb":
        return {}  # dynamic quantization: fp32 weights, quantized after loading
    quantized = {"quantization_config": bnb_config(cpu_offload=cfg.device_map is not None)}
    return {"model_kwargs": quantized, "device_map": {"": cfg.device}}


def _int8_after_load(pipe: Any, cfg: WorkerConfig) -> str:
    if cfg.resolved_int8_backend == "bnb":
        return "bitsandbytes-llm-int8"  # quantized while loading
    places = sorted({str(place) for place in (getattr(pipe.model, "hf_device_map", None) or {}).values()})
    if len(places) > 1:
        raise ConfigurationError(
            f"torch dynamic int8 quantizes a model held whole in the CPU's memory; the device map placed this one "
            f"over {' and '.join(places)}: give cpu more --max-memory, or serve int8 with --int8-backend bnb"
        )
    pipe.model = quantize_dynamic_int8(pipe.model)
    return "torch-dynamic-int8"


def _int8_emulated(cfg: WorkerConfig) -> str | None:
    flags = cpu_flags()
    if cfg.resolved_int8_backend != "dynamic" or _on_cuda(cfg) or not flags or flags & set(VNNI_CPU_FLAGS):
        return None
    return f"this CPU has no VNNI int8 dot products ({', '.join(VNNI_CPU_FLAGS)})"


def _int8_unsupported(cfg: WorkerConfig) -> str | None:
    if cfg.resolved_int8_backend == "bnb":
        if not _on_cuda(cfg) or importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes int8 needs CUDA and the bitsandbytes package"
        return None
    import torch

    if _on_cuda(cfg) or set(torch.backends.quantized.supported_engines) <= {"none"}:
        return "torch dynamic int8 needs the CPU and a quantized engine"
    return None


def _nf4_compute_dtype(cfg: WorkerConfig) -> str:
    """bf16 where the device runs it natively, else fp16 on CUDA and fp32 on the CPU (torch attribute names)."""
    if _bf16_unsupported(cfg) is None:
        return "bfloat16"
    return "float16" if _on_cuda(cfg) else "float32"


def _nf4_load_kwargs(cfg: WorkerConfig) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, _nf4_compute_dtype(cfg))
    # A bitsandbytes model cannot be moved after loading: it loads onto its device through a one-device map.
    quantized = {"quantization_config": bnb_4bit_config(dtype, cpu_offload=cfg.device_map is not None)}
    return {"dtype": dtype, "model_kwargs": quantized, "device_map": {"": cfg.device}}


def _nf4_after_load(pipe: Any, cfg: WorkerConfig) -> str:
    return "bitsandbytes-nf4"  # quantized while loading


def _nf4_unsupported(cfg: WorkerConfig) -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes 4-bit needs the bitsandbytes package (pip install 'pipeq[bnb]')"
    return bnb_4bit_failure("cuda" if _on_cuda(cfg) else "cpu")


@functools.cache
def bnb_4bit_failure(device: str) -> str | None:
    """Why the installed bitsandbytes cannot run a 4-bit layer on ``device`` (``cpu`` or ``cuda``), None when
    it can: one small NF4 Linear is quantized and run there, once a process."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
        with torch.inference_mode():
            layer(torch.ones(1, 64, device=device))
    except Exception as exc:  # whatever the build lacks (no kernels for this device, an old version)
        version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
        return f"bitsandbytes {version} cannot run 4-bit layers on {device}: {type(exc).__name__}: {exc}"
    return None


def _nf4_warning(cfg: WorkerConfig) -> str | None:
    if _on_cuda(cfg):
        return None
    return "bitsandbytes 4-bit on the CPU is for fitting a model in memory; bf16 and int8 are the fast CPU precisions"


#: Every precision pipeq serves, by name, in the order help texts list them and a job without a precision
#: prefers among those live workers serve.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "float32", "full precision, the weights as saved", auto_default=True),
        Precision(
            "fp16", "float16", "half precision, for CUDA", unsupported=_fp16_unsupported, load_warning=_fp16_warning
        ),
        Precision(
            "bf16", "bfloat16", "bfloat16", auto_default=True, unsupported=_bf16_unsupported, emulated=_bf16_emulated
        ),
        Precision(
            "int8",
            "float32",
            "bitsandbytes on CUDA, torch dynamic quantization on the CPU",
            auto_default=True,
            load_kwargs=_int8_load_kwargs,
            after_load=_int8_after_load,
            unsupported=_int8_unsupported,
            emulated=_int8_emulated,
        ),
        # Lossy: --precision auto tries it only where --allow-precision names it.
        Precision(
            "nf4",
            "bfloat16",
            "4-bit NormalFloat weights by bitsandbytes (lossy; computed in bf16 where the device has it)",
            load_kwargs=_nf4_load_kwargs,
            after_load=_nf4_after_load,
            unsupported=_nf4_unsupported,
            load_warning=_nf4_warning,
        ),
    )
}
#: Precisions ``pipeq worker --precision auto`` measures and picks from, unless --allow-precision says otherwise.
DEFAULT_ALLOWED_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.auto_default)
