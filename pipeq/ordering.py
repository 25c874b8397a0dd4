"""The order a job's items run in: longest first across the whole job, so every message holds texts of
one length.

Each item gets an ``order_key`` when it is stored: the class of its size (characters of its text, a
cheap and monotone stand-in for its token count) in the high bits, reversed so the longest sort first,
and its index in the low bits, so keys are unique within a job and one class keeps input order. The
publish window walks a job by this key (``items`` has an index on ``(job_id, order_key)``), so the order
costs no sort at submit and no memory in the job's size. Results are still read back by index.

A size class is the size with 6 significant bits (a step of at most 1/32 of the size): texts within
3% of each other's length share a class, which costs nothing in padding, and a job's keys then grow
in a few hundred places at once instead of at random, so the index stays in the store's cache
while a large job is stored (random keys doubled SQLite's insert time).
"""

from __future__ import annotations

#: Bits of the key that hold the item's index (jobs are capped far below 2**32 items).
INDEX_BITS = 32
#: Bits of a size kept in its class after its leading one (sizes below ``2 ** (CLASS_BITS + 1)`` are exact).
CLASS_BITS = 5
#: Sizes at or above this sort together (as the longest); texts are capped far below it.
SIZE_CAP = (1 << 30) - 1


def size_class(size: int) -> int:
    """``size`` rounded down to its leading one and ``CLASS_BITS`` bits after it, as a number that grows with it."""
    size = min(max(size, 0), SIZE_CAP)
    shift = size.bit_length() - CLASS_BITS - 1
    if shift <= 0:
        return size
    return ((shift + 1) << CLASS_BITS) | ((size >> shift) & ((1 << CLASS_BITS) - 1))


#: One above the largest size class.
CLASSES = size_class(SIZE_CAP) + 1
#: A key above every item's: the window's end once it has passed the last item.
KEY_END = CLASSES << INDEX_BITS


def order_key(size: int, idx: int) -> int:
    """The key of item ``idx`` of ``size`` characters: longer items first, then input order."""
    return ((CLASSES - 1 - size_class(size)) << INDEX_BITS) | idx


def key_index(key: int) -> int:
    """The item index a key was made from."""
    return key & ((1 << INDEX_BITS) - 1)
