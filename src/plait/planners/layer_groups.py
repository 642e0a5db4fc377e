"""Group a chain of layers into pipeline units: balanced FLOPs, small tensors across the cuts (Alpa's layer
construction, OSDI'22 §5.2, on plait's layer view instead of raw ops).

Given per-layer FLOPs ``f`` and the bytes ``c[i]`` that cross a cut between layer ``i`` and ``i + 1``, split
the chain into exactly ``n`` contiguous groups, each with at most ``bound = max((1 + imbalance) * sum(f) / n,
h)`` FLOPs, where ``h`` is the least heaviest group any split into ``n`` groups has, minimising first the largest tensor across a cut (the slowest stage boundary), then the
total across cuts, then the largest group's FLOPs. A DP over (layers covered, groups used) finds it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from plait.errors import PlaitError

Score = tuple[float, float, float]  # largest cut, total cut, largest group FLOPs


def group_layers(flops: Sequence[float], cut_bytes: Sequence[float], num_groups: int, *,
                 imbalance: float = 0.5) -> tuple[tuple[int, int], ...]:
    """``num_groups`` contiguous ``(start, stop)`` ranges covering the layers (see the module docstring)."""
    n = len(flops)
    if len(cut_bytes) != max(0, n - 1):
        raise PlaitError(f"cut_bytes needs one entry per cut between {n} layers ({max(0, n - 1)}), got {len(cut_bytes)}")
    if not 1 <= num_groups <= n:
        raise PlaitError(f"cannot group {n} layers into {num_groups} groups; ask for 1 to {n}")
    prefix = [0.0]
    for f in flops:
        prefix.append(prefix[-1] + f)
    bound = max((1 + imbalance) * prefix[-1] / num_groups, least_heaviest_group(prefix, num_groups))
    # best[g][k]: score and previous cut of the first k layers in g groups (k = n has no cut after it)
    best: list[list[tuple[Score, int] | None]] = [[None] * (n + 1) for _ in range(num_groups + 1)]
    best[0][0] = ((0.0, 0.0, 0.0), -1)
    for g in range(1, num_groups + 1):
        for k in range(g, n - (num_groups - g) + 1):
            cut = cut_bytes[k - 1] if k < n else 0.0
            for j in range(g - 1, k):
                prev = best[g - 1][j]
                work = prefix[k] - prefix[j]
                if prev is None or work > bound * (1 + 1e-12):
                    continue
                (big, total, heavy), _ = prev
                score = (max(big, cut), total + cut, max(heavy, work))
                if best[g][k] is None or score < best[g][k][0]:  # type: ignore[index]
                    best[g][k] = (score, j)
    ranges = []
    k, g = n, num_groups
    while g > 0:
        entry = best[g][k]
        assert entry is not None
        ranges.append((entry[1], k))
        k, g = entry[1], g - 1
    return tuple(reversed(ranges))


def least_heaviest_group(prefix: Sequence[float], num_groups: int) -> float:
    """The least FLOPs of the heaviest group over all splits into ``num_groups`` (``prefix``: running FLOPs sums)."""
    n = len(prefix) - 1
    inf = float("inf")
    heaviest = [0.0] + [inf] * n  # first k layers in g groups, g growing
    for _ in range(num_groups):
        heaviest = [inf] + [min((max(heaviest[j], prefix[k] - prefix[j]) for j in range(k)), default=inf)
                            for k in range(1, n + 1)]
    return heaviest[n]


def grouping_score(flops: Sequence[float], cut_bytes: Sequence[float], ranges: Sequence[tuple[int, int]]) -> Score:
    """The score ``group_layers`` minimises, of given ranges (for tests and explanations)."""
    cuts = [cut_bytes[stop - 1] for _, stop in ranges[:-1]]
    return (max(cuts, default=0.0), float(sum(cuts)), max(sum(flops[a:b]) for a, b in ranges))
