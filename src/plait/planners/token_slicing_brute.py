"""Brute force for the token-slicing DP (tests only): every composition of the units, every split of the batch.

``brute_slicing`` scores every composition of ``n`` units (``2 ** (n - 1)`` of them) with
``sum + (K - 1) * max``. ``brute_joint`` scores every split of the batch into micro-batch sizes (a multiset: the
pipeline formula does not depend on order) and every slicing of every micro-batch. With ``shared=True`` the
micro-batches of one size share a slicing, which loses nothing: replacing each one's slicing by the one of least
sum among them lowers no max and raises no sum. ``shared=False`` enumerates them independently (tiny cases).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Mapping

import numpy as np

from plait.planners.token_slicing import SlicingError

BRUTE_FORCE_LIMIT = 5_000_000  # combinations scored before giving up


def compositions(n: int) -> Iterator[tuple[int, ...]]:
    """Every ordered list of positive integers summing to ``n``."""
    for mask in range(2 ** (n - 1)):
        cuts, last = [], 0
        for i in range(1, n):
            if mask >> (i - 1) & 1:
                cuts.append(i - last)
                last = i
        cuts.append(n - last)
        yield tuple(cuts)


def slice_times(table: np.ndarray, cuts: tuple[int, ...]) -> list[float]:
    """The time of each slice of ``cuts`` (units) under ``table[l, c]``."""
    out, context = [], 0
    for length in cuts:
        out.append(float(table[length, context]))
        context += length
    return out


def partitions(total: int, sizes: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Every multiset of ``sizes`` summing to ``total``, as a non-increasing tuple."""
    if total == 0:
        yield ()
        return
    for i, b in enumerate(sizes):
        if b <= total:
            for rest in partitions(total - b, sizes[i:]):
                yield (b, *rest)


def brute_slicing(table: np.ndarray, num_stages: int) -> tuple[float, tuple[int, ...]]:
    """The least ``sum + (K - 1) * max`` over every slicing of one sequence, and that slicing (units)."""
    total, picks = brute_joint({1: table}, 1, num_stages)
    return total, picks[0][1]


def brute_joint(tables: Mapping[int, np.ndarray], batch: int, num_stages: int, *,
                shared: bool = True) -> tuple[float, tuple[tuple[int, tuple[int, ...]], ...]]:
    """The least pipeline time over every micro-batch split and slicing, and the choice (sizes, units)."""
    n = np.asarray(next(iter(tables.values()))).shape[0] - 1
    comps = list(compositions(n))
    scored = {b: [(sum(ts), max(ts)) for ts in (slice_times(np.asarray(t), c) for c in comps)] for b, t in tables.items()}
    sizes = tuple(sorted(tables, reverse=True))
    best: tuple[float, tuple[tuple[int, tuple[int, ...]], ...]] = (np.inf, ())
    visited = 0
    for split in partitions(batch, sizes):
        owners = list(Counter(split).items()) if shared else [(b, 1) for b in split]
        for choice in itertools.product(range(len(comps)), repeat=len(owners)):
            visited += 1
            if visited > BRUTE_FORCE_LIMIT:
                raise SlicingError(f"brute force scored more than {BRUTE_FORCE_LIMIT} combinations; use a smaller case")
            total_sum = sum(count * scored[b][c][0] for (b, count), c in zip(owners, choice, strict=True))
            slowest = max(scored[b][c][1] for (b, _), c in zip(owners, choice, strict=True))
            total = total_sum + (num_stages - 1) * slowest
            if total < best[0]:
                picks = tuple((b, comps[c]) for (b, count), c in zip(owners, choice, strict=True) for _ in range(count))
                best = (total, picks)
    if not np.isfinite(best[0]):
        raise SlicingError("no slicing of the batch has finite times")
    return best
