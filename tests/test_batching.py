"""Cutting a message's inputs into micro-batches: the token budget, the row cap, and the least fill."""

from __future__ import annotations

import random

from pipeq.worker.engines.batched.batching import MIN_FILL_ROWS, Unit, cut_batches


def units(lengths: list[int], keys: tuple[str, ...] = ("input_ids",)) -> list[Unit]:
    return [Unit(item=i, pos=0, inputs=None, n_tokens=n, keys=keys) for i, n in enumerate(lengths)]


def fill(batch: list[Unit]) -> float:
    return sum(u.n_tokens for u in batch) / (len(batch) * max(u.n_tokens for u in batch))


def test_a_long_input_starts_a_new_batch_rather_than_pad_short_ones() -> None:
    lengths = [10] * 6 + [30] * 6
    cut = [[u.n_tokens for u in b] for b in cut_batches(units(lengths), max_tokens=10_000, max_size=64)]
    assert cut == [[10] * 6, [30] * 6]
    # Without a least fill, the budget alone would pad the short rows to the long ones' width.
    mixed = [[u.n_tokens for u in b] for b in cut_batches(units(lengths), max_tokens=10_000, max_size=64, min_fill=0)]
    assert mixed == [lengths]


def test_batches_keep_the_budget_the_row_cap_and_the_least_fill() -> None:
    rng = random.Random(0)
    lengths = [min(512, int(rng.lognormvariate(3.5, 0.9)) + 2) for _ in range(2_000)]
    batches = list(cut_batches(units(lengths), max_tokens=8192, max_size=64))
    assert sorted(u.item for b in batches for u in b) == list(range(len(lengths))), "every unit once"
    for batch in batches:
        assert len(batch) <= 64 and (len(batch) == 1 or len(batch) * max(u.n_tokens for u in batch) <= 8192)
        if len(batch) > MIN_FILL_ROWS:
            assert fill(batch) >= 0.9
    real = sum(lengths)
    padded = sum(len(b) * max(u.n_tokens for u in b) for b in batches)
    assert real / padded >= 0.9


def test_inputs_of_different_keys_never_share_a_batch() -> None:
    both = units([5, 5, 5]) + units([5, 5], keys=("input_ids", "token_type_ids"))
    assert [len(b) for b in cut_batches(both, max_tokens=1_000, max_size=64)] == [3, 2]
