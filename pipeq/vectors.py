"""How a pooled embedding is stored: a 4-byte header naming its type, then its values, little-endian.

A feature-extraction job with ``pooling`` stores one vector per text in ``items.vector`` (``bytea``
on PostgreSQL, a BLOB on SQLite) instead of JSON text in ``items.output``: 384 float32 values of
all-MiniLM-L6-v2 take 1,540 bytes instead of about 8,400 of JSON, and reading them back is one
``numpy.frombuffer`` instead of parsing 384 numbers.

The header is numpy's name of the type (``<f4`` float32 or ``<f2`` float16) padded to 4 bytes, so
a blob says what it holds wherever it is read (an item, the result cache, a user's own SQL), and
the values stay aligned to their size. No I/O here: the worker encodes, the store carries the
bytes, the producer decodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Storage types a job may choose (``--param dtype=...``): name -> numpy type, little-endian.
DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}
#: The storage type of a job that names none.
DEFAULT_DTYPE = "float32"
#: Bytes of the header in front of a stored vector's values.
HEADER_BYTES = 4
#: Header -> numpy type, for the types above.
_BY_HEADER = {code.encode().ljust(HEADER_BYTES, b"\0"): np.dtype(code) for code in DTYPES.values()}


def _header(code: str) -> bytes:
    return code.encode().ljust(HEADER_BYTES, b"\0")


@dataclass(frozen=True)
class Vector:
    """One stored embedding: its blob (header and values). ``numpy.asarray(v)`` gives its float32 values."""

    blob: bytes

    def __post_init__(self) -> None:
        header = bytes(self.blob[:HEADER_BYTES])
        dtype = _BY_HEADER.get(header)
        if dtype is None or (len(self.blob) - HEADER_BYTES) % dtype.itemsize:
            raise ValueError(f"not a stored vector (header {header!r}, {len(self.blob)} bytes)")

    @classmethod
    def encode(cls, values: Any, dtype: str = DEFAULT_DTYPE) -> Vector:
        """A vector of ``values`` (any 1-D array-like) stored as ``dtype`` (a name of ``DTYPES``).

        Raises ValueError where a value does not fit the type (above 65,504 in float16).
        """
        code = DTYPES[dtype]
        array = np.asarray(values, dtype=np.float32).reshape(-1)
        with np.errstate(over="ignore"):  # an overflow is refused below, with the value that caused it
            stored = array.astype(code)
        if not np.isfinite(stored).all() and np.isfinite(array).all():
            largest = float(np.abs(array).max())
            raise ValueError(f"the vector does not fit {dtype} (largest magnitude {largest:g}); store it as float32")
        return cls(_header(code) + stored.tobytes())

    @classmethod
    def encode_rows(cls, values: Any, dtype: str = DEFAULT_DTYPE) -> list[Vector]:
        """A vector per row of a 2-D array, each what ``encode`` makes of that row; the whole array is
        converted and copied to bytes once.

        Raises ValueError where a row does not fit the type (the first such row's message of ``encode``).
        """
        code = DTYPES[dtype]
        array = np.asarray(values, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(f"encode_rows takes a 2-D array, not {array.ndim}-D")
        with np.errstate(over="ignore"):
            stored = np.ascontiguousarray(array.astype(code))
        if not np.isfinite(stored).all():
            overflow = ~np.isfinite(stored).all(axis=1) & np.isfinite(array).all(axis=1)
            if overflow.any():
                cls.encode(array[int(np.flatnonzero(overflow)[0])], dtype)  # raises, with that row's message
        rows, size = stored.shape[0], stored.shape[1] * stored.dtype.itemsize
        blobs = np.empty((rows, HEADER_BYTES + size), dtype=np.uint8)
        blobs[:, :HEADER_BYTES] = np.frombuffer(_header(code), dtype=np.uint8)
        blobs[:, HEADER_BYTES:] = stored.view(np.uint8).reshape(rows, size)
        joined, width = blobs.tobytes(), HEADER_BYTES + size
        return [cls._trusted(joined[i * width : (i + 1) * width]) for i in range(rows)]

    @classmethod
    def _trusted(cls, blob: bytes) -> Vector:
        """A vector of a blob this module just built (its header and size are right by construction)."""
        vector = object.__new__(cls)
        object.__setattr__(vector, "blob", blob)
        return vector

    @property
    def dtype(self) -> np.dtype[Any]:
        """The stored values' numpy type."""
        return _BY_HEADER[bytes(self.blob[:HEADER_BYTES])]

    @property
    def dim(self) -> int:
        """How many values the vector holds."""
        return (len(self.blob) - HEADER_BYTES) // self.dtype.itemsize

    def array(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The values as a float32 array (float16 ones widened exactly)."""
        return np.frombuffer(self.blob, dtype=self.dtype, offset=HEADER_BYTES).astype(np.float32)

    def tolist(self) -> list[float | None]:
        """The values as Python floats, as a JSON output holds them (NaN and infinity as None)."""
        array = self.array()
        values: list[float | None] = array.tolist()
        if not np.isfinite(array).all():
            values = [v if v is not None and math.isfinite(v) else None for v in values]
        return values

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        array = self.array()
        return array if dtype is None else array.astype(dtype)

    def __len__(self) -> int:
        return self.dim

    def __repr__(self) -> str:
        return f"Vector({self.dim} x {self.dtype.name})"


def as_array(value: Any) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    """A pooled output as a flat float32 array: a ``Vector``, or a flat list of numbers (a JSON output); else None."""
    if isinstance(value, Vector):
        return value.array()
    if isinstance(value, list) and value and all(isinstance(v, int | float) or v is None for v in value):
        return np.asarray([np.nan if v is None else v for v in value], dtype=np.float32)
    return None


def stack(outputs: Sequence[Any], dim: int) -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, Any]]:
    """Outputs as an (n, dim) float32 array and a mask of the rows that hold a vector (the others are NaN).

    Where every output is a stored vector of one type and size (a page of one job), the values are
    read from the joined blobs in one ``frombuffer``: no work per value in Python. Raises ValueError
    for a vector of another size than ``dim``.
    """
    n = len(outputs)
    if n and dim and all(isinstance(o, Vector) for o in outputs):
        first: Vector = outputs[0]
        if first.dim == dim and all(o.blob[:HEADER_BYTES] == first.blob[:HEADER_BYTES] for o in outputs):
            size = len(first.blob)
            if all(len(o.blob) == size for o in outputs):
                joined = b"".join(o.blob for o in outputs)
                rows = np.frombuffer(joined, dtype=first.dtype).reshape(n, size // first.dtype.itemsize)
                skip = HEADER_BYTES // first.dtype.itemsize
                return rows[:, skip:].astype(np.float32), np.ones(n, dtype=bool)
    values = np.full((n, dim), np.nan, dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    for i, output in enumerate(outputs):
        array = as_array(output)
        if array is None:
            continue
        if array.shape[0] != dim:
            raise ValueError(f"a vector of {array.shape[0]} values among vectors of {dim}")
        values[i] = array
        present[i] = True
    return values, present
