"""How many pool children (model copies) a worker runs when ``--concurrency`` is not given.

Why: a child's own Python (tokenizing, collating, postprocessing, writing results) costs about the same
per text whatever the model, about 100 µs on one core, while a small model's forward pass on a GPU
costs a fraction of that. One child then keeps the GPU busy a few percent of the time (all-MiniLM-L6-v2
at fp16: 3-7% on an H100 and an H200, benchmarks/RESULTS-GPU.md), and further children, each with its
own interpreter and its own copy of the model, fill that idle time (four ran 2.4x one on the H200).
A large model's forward pass is the bound, and extra copies would only take memory.

The rule, for a CUDA device (a CPU worker runs one child, which uses every core):

* weights of at most ``SMALL_MODEL_BYTES`` on disk (found locally: a model folder, or the hub cache):
  one child per ``CORES_PER_GPU_CHILD`` of the worker's cores (``WorkerConfig.resolved_cores``: the cores
  it may use, over the GPUs the host has, since one worker per GPU is the layout to expect),
  at most ``MAX_GPU_CHILDREN``, and no more than fit
  in ``GPU_MEMORY_SHARE`` of the device's memory at ``2 x weights + GPU_CHILD_OVERHEAD_BYTES`` each
  (the served copy, a shadow check's fp32 copy, the CUDA context and activations);
* larger or unknown weights: one child.

``--concurrency N`` always wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeq import constants as C
from pipeq.worker.config import WorkerConfig
from pipeq.worker.devices import cuda_device_memory

#: Weight files, in the order transformers prefers them.
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class ChildrenChoice:
    """The children a worker runs by default, and why (the worker logs it)."""

    children: int
    reason: str


def weights_bytes(model: str, revision: str | None = None) -> int | None:
    """Bytes of the model's weight files where they are on this machine (a folder, or the hub cache); else None.

    Never downloads: a hub model not cached yet is unknown here (its child downloads it as it loads).
    """
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(str(snapshot_download(model, revision=revision, local_files_only=True)))
        except Exception:  # not cached, offline, a malformed id: unknown, so the cautious default
            return None
    for pattern in _WEIGHT_GLOBS:
        files = [f for f in folder.glob(pattern) if f.is_file()]
        if files:
            return sum(f.stat().st_size for f in files)
    return None


def default_children(device: str, *, cores: int, weights: int | None, device_memory: int | None) -> ChildrenChoice:
    """The rule in the module docstring, on plain figures (``cores``: this GPU's share of the cores the worker
    may use; ``device_memory``: bytes)."""
    if not device.startswith("cuda"):
        return ChildrenChoice(1, "a CPU worker's one child uses every core")
    if weights is None:
        return ChildrenChoice(1, "the model's weights are not on this machine yet, so their size is unknown")
    size = f"{weights / 2**20:,.0f} MiB of weights"
    if weights > C.SMALL_MODEL_BYTES:
        return ChildrenChoice(1, f"{size}: the forward pass bounds this worker, not its Python")
    children = min(C.MAX_GPU_CHILDREN, max(1, cores // C.CORES_PER_GPU_CHILD))
    reason = f"{size} and {cores} cores: one child per {C.CORES_PER_GPU_CHILD} cores, at most {C.MAX_GPU_CHILDREN}"
    if device_memory is not None:
        per_child = 2 * weights + C.GPU_CHILD_OVERHEAD_BYTES
        fit = max(1, int(C.GPU_MEMORY_SHARE * device_memory) // per_child)
        if fit < children:
            children = fit
            reason = f"{size}: as many children as fit in {C.GPU_MEMORY_SHARE:.0%} of {device_memory / 2**30:,.0f} GiB"
    return ChildrenChoice(children, reason)


def choose_children(cfg: WorkerConfig) -> ChildrenChoice:
    """``default_children`` for this worker's device, model and cores (``WorkerConfig.resolved_cores``: on a
    host of several GPUs, its GPU's share); the device's memory is asked in a spawned process."""
    if not cfg.device.startswith("cuda"):
        return default_children(cfg.device, cores=cfg.resolved_cores, weights=None, device_memory=None)
    weights, memory = weights_bytes(cfg.key.model, cfg.key.revision), cuda_device_memory(cfg.device)
    return default_children(cfg.device, cores=cfg.resolved_cores, weights=weights, device_memory=memory)
