"""Cut preprocessed inputs into micro-batches by length and a token budget."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Unit:
    """One forward row: a preprocessed input (or one chunk of it, for ChunkPipeline tasks)."""

    item: int  # position of the item in the message being processed
    pos: int  # position of this chunk among the item's chunks
    inputs: Any  # what the pipeline's preprocess returned
    n_tokens: int
    keys: tuple[str, ...]


def token_length(inputs: Any) -> int:
    """Tokens in one preprocessed input (its ``input_ids`` width), 1 when it has none."""
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        shape = getattr(ids, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[-1])
        if isinstance(ids, list):
            return len(ids[0]) if ids and isinstance(ids[0], list) else len(ids)
    return 1


#: Least share of a batch's padded tokens that are real: a longer input that would pad the batch below it
#: starts the next batch instead. A forward pass costs about its padded tokens, so a batch cut a little
#: smaller runs faster than one that pads its short rows to a long one's width.
MIN_FILL = 0.9
#: Rows a batch holds at least before ``MIN_FILL`` may cut it (fewer would waste the device's width).
MIN_FILL_ROWS = 4


def cut_batches(
    units: Sequence[Unit], *, max_tokens: int, max_size: int, min_fill: float = MIN_FILL
) -> Iterator[list[Unit]]:
    """Sort by length and cut so that rows x longest row stays within ``max_tokens`` and the batch's real
    tokens stay at least ``min_fill`` of its padded ones (once it holds ``MIN_FILL_ROWS``).

    Units with different input keys never share a batch (they could not be collated). A single
    unit longer than the budget still gets a batch of its own.
    """
    ordered = sorted(units, key=lambda u: (u.keys, u.n_tokens))
    batch: list[Unit] = []
    real = 0
    for unit in ordered:
        if batch:
            rows, widest = len(batch) + 1, max(batch[-1].n_tokens, unit.n_tokens)
            if (
                unit.keys != batch[-1].keys
                or rows > max_size
                or rows * widest > max_tokens
                or (len(batch) >= MIN_FILL_ROWS and real + unit.n_tokens < min_fill * rows * widest)
            ):
                yield batch
                batch, real = [], 0
        batch.append(unit)
        real += unit.n_tokens
    if batch:
        yield batch


def padded_tokens(batch: Sequence[Unit]) -> int:
    return len(batch) * max(u.n_tokens for u in batch)
