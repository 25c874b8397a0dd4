"""A model larger than one device: the device map and memory limits a worker hands to transformers, and
how the loaded model was placed.

accelerate does the placing (``from_pretrained(device_map=..., max_memory=...)``); this module only
reads ``--device-map`` and ``--max-memory`` into typed values, turns them into load arguments, and sums
up the loaded model's ``hf_device_map`` (modules per device). It imports neither torch nor accelerate
at module level: the CLI checks the flags with it before anything heavy loads.

A model split over several devices runs its layers one device after another (accelerate moves the
activations at each boundary): the map fits the model, it adds no parallelism.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeq.errors import ConfigurationError

#: accelerate's placement strategies, by name (``--device-map``); anything else names a JSON file.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Units ``--max-memory`` takes, in bytes (as accelerate reads them: KB is 1000 bytes, KiB 1024).
MEMORY_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)")
#: Where a device map may put a module: a CUDA device, the CPU, or the disk (read back at each forward pass).
_PLACE = re.compile(r"cuda:\d+|cpu|disk")

#: A device map: accelerate's strategy by name, or module names to places (``cuda:N``, ``cpu``, ``disk``).
DeviceMap = str | dict[str, str]


def device_label(place: Any) -> str:
    """``cuda:N`` for a GPU index or a torch CUDA device, else the place as accelerate writes it (cpu, disk)."""
    if isinstance(place, int):
        return f"cuda:{place}"
    text = str(place)
    if text.isdigit():
        return f"cuda:{text}"
    return "cuda:0" if text == "cuda" else text


def _known_place(value: Any) -> str | None:
    """A place of a device map or a --max-memory device, as ``cuda:N``, ``cpu`` or ``disk``; None if unknown."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    label = device_label(value)
    return label if _PLACE.fullmatch(label) else None


def parse_device_map(value: str) -> DeviceMap:
    """A strategy name as it is, or the JSON file it names read into module names and places.

    Raises ConfigurationError naming ``--device-map`` (and the file and line) for anything else.
    """
    if value in DEVICE_MAP_STRATEGIES:
        return value
    if not os.path.isfile(value):
        raise ConfigurationError(
            f"--device-map {value!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) nor a JSON file"
        )
    try:
        with open(value, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--device-map {value}:{exc.lineno}: not JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"--device-map {value}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigurationError(f"--device-map {value}: expected a JSON object of module names to devices")
    placed: dict[str, str] = {}
    for module, place in data.items():
        label = _known_place(place)
        if label is None:
            raise ConfigurationError(
                f"--device-map {value}: module {module!r} goes to {place!r}; use a GPU index, cuda:N, cpu or disk"
            )
        placed[module] = label
    return placed


def parse_max_memory(values: Sequence[str]) -> dict[str, int]:
    """``--max-memory DEVICE=SIZE`` flags (``0=20GiB``, ``cuda:1=20GiB``, ``cpu=64GiB``) as bytes per device.

    Raises ConfigurationError naming ``--max-memory`` and the value for a bad one or a device given twice.
    """
    limits: dict[str, int] = {}
    for value in values:
        device, sep, size = value.partition("=")
        label = _known_place(device.strip())
        if not sep or label is None or label == "disk":
            raise ConfigurationError(
                f"--max-memory {value!r}: expected DEVICE=SIZE with DEVICE a GPU index, cuda:N or cpu "
                "(e.g. --max-memory 0=20GiB --max-memory cpu=64GiB)"
            )
        if label in limits:
            raise ConfigurationError(f"--max-memory names {label} twice")
        limits[label] = parse_size(size, flag=f"--max-memory {value!r}")
    return limits


def parse_size(text: str, *, flag: str) -> int:
    """``20GiB``, ``1.5GB``, ``512MiB`` or a number of bytes, in bytes; ConfigurationError naming ``flag`` else."""
    text = text.strip()
    if text.isdigit():
        size = int(text)
    else:
        match = _SIZE.fullmatch(text)
        unit = MEMORY_UNITS.get(match.group(2).upper()) if match else None
        if match is None or unit is None:
            units = ", ".join(u.replace("I", "i") for u in MEMORY_UNITS)
            raise ConfigurationError(f"{flag}: size {text!r} is not a number with a unit ({units})")
        size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ConfigurationError(f"{flag}: the size must be more than 0 bytes")
    return size


def named_cuda_devices(device_map: DeviceMap | None, max_memory: dict[str, int] | None) -> list[str]:
    """The CUDA devices a device map or the memory limits name (checked to be seen before anything loads)."""
    places = list(device_map.values()) if isinstance(device_map, dict) else []
    places += list(max_memory or {})
    return sorted({p for p in places if p.startswith("cuda")}, key=lambda p: int(p.partition(":")[2]))


def _accelerate_key(label: str) -> int | str:
    """accelerate's name for a place: the GPU index for ``cuda:N``, else the place itself."""
    return int(label.partition(":")[2]) if label.startswith("cuda:") else label


def load_kwargs(
    device_map: DeviceMap, max_memory: dict[str, int] | None, offload_folder: str | None
) -> tuple[Any, dict[str, Any]]:
    """The ``device_map`` for ``transformers.pipeline`` and what its ``model_kwargs`` gain (``max_memory`` in
    accelerate's keys, ``offload_folder``)."""
    placed: Any = device_map
    if isinstance(device_map, dict):
        placed = {module: _accelerate_key(label) for module, label in device_map.items()}
    extra: dict[str, Any] = {}
    if max_memory:
        extra["max_memory"] = {_accelerate_key(label): size for label, size in max_memory.items()}
    if offload_folder:
        # One folder per process: pool children write the same weights' files otherwise.
        extra["offload_folder"] = os.path.join(offload_folder, f"pid-{os.getpid()}")
    return placed, extra


def placement(model: Any) -> dict[str, int]:
    """How ``model`` is placed: its device map's entries (modules) per device, in the map's order.

    transformers sets ``hf_device_map`` only for a model over more than one device; a model on one
    device is one entry there, as accelerate writes it (``{"": device}``).
    """
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {device_label(getattr(model, "device", "cpu")): 1}
    return dict(Counter(device_label(place) for place in device_map.values()))


def describe(placed: dict[str, int]) -> str:
    """``whole on cpu`` or ``cuda:0 12, cuda:1 14, cpu 2 modules``: a placement in the log."""
    if list(placed.values()) == [1]:
        return f"whole on {next(iter(placed))}"
    return ", ".join(f"{device} {count}" for device, count in placed.items()) + " modules"
