"""Turn what a pipeline returns into plain JSON values (numpy and torch scalars included)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Recursively convert numpy/torch values to Python ones; NaN/inf become None (JSON has neither)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    tolist = getattr(value, "tolist", None)  # torch.Tensor without importing torch here
    if callable(tolist):
        return to_jsonable(tolist())
    if hasattr(value, "to_dict"):  # pandas objects in table outputs
        return to_jsonable(value.to_dict())
    return str(value)
