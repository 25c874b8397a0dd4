"""Which device a worker runs on: CUDA devices asked about in a spawned process, the CPU's model name, and
how many of the host's cores this process may use.

Light on purpose: ``pipeq worker`` asks before it imports the model stack, so a mistyped flag fails in
a second, not after seconds of importing transformers. The worker's parent process later forks Celery
pool children; a parent that touched the CUDA runtime would break them, so CUDA is asked about in a
freshly spawned process that hands back plain results (``in_subprocess``).
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import pickle
import platform
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pipeq.errors import ConfigurationError

T = TypeVar("T")


#: Runs ``fn(*args)`` in a spawned process and returns its (picklable) result.
Runner = Callable[..., Any]


def _logging_as(formatter: logging.Formatter | None, levels: dict[str, int], filters: list[Any]) -> None:
    """A spawned process logs as its parent: the root handler's format on stderr, the loggers' levels
    and the warnings filters the parent set (a fresh interpreter has none of them)."""
    if formatter is not None:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        logging.getLogger().handlers[:] = [handler]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    warnings.resetwarnings()
    for action, message, category, module, lineno in filters:
        pattern, where = (getattr(x, "pattern", x) or "" for x in (message, module))  # a regex, a string or None
        warnings.filterwarnings(action, pattern, category, where, lineno, append=True)


def _parent_logging() -> tuple[logging.Formatter | None, dict[str, int], list[Any]]:
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    try:
        pickle.dumps(formatter)
    except Exception:  # a formatter holding a stream or a lock (a test runner's): its format alone
        formatter = logging.Formatter(getattr(formatter, "_fmt", None), getattr(formatter, "datefmt", None))
    levels = {"": root.level}
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return formatter, levels, list(warnings.filters)


@contextmanager
def spawned_process() -> Iterator[Runner]:
    """A freshly spawned process for several calls in a row: it imports torch and transformers once
    (seconds), where a process per call would import them again for each. It logs as this process does."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=1, mp_context=context, initializer=_logging_as, initargs=_parent_logging()
    ) as pool:

        def run(fn: Callable[..., T], *args: Any) -> T:
            try:
                return pool.submit(fn, *args).result()
            except BrokenProcessPool as exc:
                raise ConfigurationError(f"the measuring process died: {exc}") from None

        yield run


def in_subprocess(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a freshly spawned process and return its (picklable) result."""
    with spawned_process() as run:
        result: T = run(fn, *args)
        return result


@functools.cache
def cuda_devices() -> tuple[tuple[str, int], ...]:
    """The name and memory (bytes) of each CUDA device torch sees (index order), asked once, in a spawned process.

    Asking in the worker's parent would poison its prefork pool: once the parent has touched the CUDA
    runtime (``torch.cuda.is_available()`` does), a forked child cannot initialise CUDA at all.
    """
    import torch

    if not torch.backends.cuda.is_built():  # a CPU build of torch: no need to ask
        return ()
    return in_subprocess(_cuda_devices_here)


def _cuda_devices_here() -> tuple[tuple[str, int], ...]:
    import torch

    return tuple(
        (str(torch.cuda.get_device_name(i)), int(torch.cuda.get_device_properties(i).total_memory))
        for i in range(torch.cuda.device_count())
    )


def cuda_device_names() -> tuple[str, ...]:
    return tuple(name for name, _ in cuda_devices())


def cuda_device_memory(device: str) -> int | None:
    """Total memory of a CUDA device in bytes; None for one torch does not see."""
    devices, index = cuda_devices(), cuda_index(device)
    return devices[index][1] if index < len(devices) else None


def cuda_device_count() -> int:
    return len(cuda_device_names())


def cuda_index(device: str) -> int:
    """0 for ``cuda``, N for ``cuda:N``."""
    return int(device.partition(":")[2] or 0)


def device_name(device: str) -> str:
    """The CPU's model name or the CUDA device's name (from the one spawned lookup, for CUDA).

    Raises ConfigurationError for a CUDA device torch does not see.
    """
    if not device.startswith("cuda"):
        return _cpu_name()
    names, index = cuda_device_names(), cuda_index(device)
    if index >= len(names):
        seen = f"{len(names)} CUDA device(s)" if names else "no CUDA device"
        raise ConfigurationError(f"device {device} asked for, but torch sees {seen}")
    return names[index]


def device_name_here(device: str) -> str:
    if not device.startswith("cuda"):
        return _cpu_name()
    import torch

    return str(torch.cuda.get_device_name(device))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "cpu"


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: the CPUs it may run on (a container's ``--cpuset-cpus``, ``taskset``),
    fewer where a CPU quota (a container's ``--cpus``, Kubernetes' CPU limit; cgroup v2 or v1) allows less.

    ``os.cpu_count()`` is the host's count: a worker limited to 4 of 64 cores that sized its threads and
    children by it would run 16 times too many threads.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of this process's cgroup CPU quota (``cpu.max``, or v1's ``cfs_quota_us``); None: no quota."""
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "400000 100000"
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 when there is none
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def worker_cores(device: str) -> int | None:
    """The cores a worker on ``device`` should size itself by: on a host of several CUDA devices, one device's
    share of the cores it may use (one worker per GPU is the layout to expect); else None, all of them."""
    if not device.startswith("cuda"):
        return None
    gpus = cuda_device_count()
    return max(1, available_cores() // gpus) if gpus > 1 else None
