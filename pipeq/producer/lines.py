"""Which source line each item of a job came from, kept in a few bytes however large the job.

An item's line is its index plus an offset that changes only where the input skips lines (blank
lines, dropped empty texts, a CSV header or a quoted field over several lines). ``Lines`` keeps
one (index, offset) pair per change, so a ten-million-line JSONL file costs one pair, not a list
of ten million numbers.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right


class Lines:
    """Item index -> source line, noted item by item in index order."""

    def __init__(self) -> None:
        #: Indexes where the offset changes, and the offset from there on (``line - index``).
        self._starts = array("q")
        self._offsets = array("q")

    def note(self, idx: int, line: int) -> None:
        """Record that item ``idx`` (the next one, in order) came from ``line``."""
        offset = line - idx
        if not self._offsets or self._offsets[-1] != offset:
            self._starts.append(idx)
            self._offsets.append(offset)

    def line(self, idx: int) -> int:
        """The source line of item ``idx`` (one that was noted)."""
        run = bisect_right(self._starts, idx) - 1
        if run < 0:
            raise IndexError(f"no line noted for item {idx}")
        return idx + self._offsets[run]

    def __len__(self) -> int:
        """Changes of offset kept (the memory this costs, in pairs of 64-bit numbers)."""
        return len(self._starts)
