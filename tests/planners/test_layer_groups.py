"""Layer grouping for pipeline stages: exact against enumeration, and what it prefers."""

from __future__ import annotations

import itertools
import random

import pytest

from plait.errors import PlaitError
from plait.planners.layer_groups import group_layers, grouping_score


def brute(flops: list[float], cuts: list[float], groups: int, imbalance: float) -> tuple[float, float, float]:
    n = len(flops)
    splits = []
    for inner in itertools.combinations(range(1, n), groups - 1):
        edges = (0, *inner, n)
        splits.append(list(zip(edges[:-1], edges[1:], strict=True)))
    heaviest = min(max(sum(flops[a:b]) for a, b in ranges) for ranges in splits)
    bound = max((1 + imbalance) * sum(flops) / groups, heaviest)
    return min(grouping_score(flops, cuts, r) for r in splits if all(sum(flops[a:b]) <= bound * (1 + 1e-12) for a, b in r))


def test_equals_enumeration_on_random_chains() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 10)
        groups = rng.randint(1, n)
        flops = [rng.choice([1.0, 2.0, 5.0, rng.uniform(0.1, 4)]) for _ in range(n)]
        cuts = [float(rng.choice([1, 2, 3, 8])) for _ in range(n - 1)]
        imbalance = rng.choice([0.0, 0.2, 1.0])
        ranges = group_layers(flops, cuts, groups, imbalance=imbalance)
        assert len(ranges) == groups and ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a < b and b == c for (a, b), (c, _) in zip(ranges, ranges[1:], strict=False))
        assert grouping_score(flops, cuts, ranges) == pytest.approx(brute(flops, cuts, groups, imbalance))


def test_cuts_where_the_tensor_is_small() -> None:
    # Equal layers; the tensor after layer 2 is small (a bottleneck): two groups cut there, not in the middle.
    flops = [1.0] * 6
    cuts = [8.0, 8.0, 1.0, 8.0, 8.0]
    assert group_layers(flops, cuts, 2, imbalance=0.5) == ((0, 3), (3, 6))
    cuts = [8.0, 1.0, 8.0, 8.0, 8.0]  # small after layer 1: 2 vs 4 layers is within 1.5 x the average of 3
    assert group_layers(flops, cuts, 2, imbalance=0.5) == ((0, 2), (2, 6))
    assert group_layers(flops, cuts, 2, imbalance=0.0) == ((0, 3), (3, 6))  # balance first when asked


def test_bad_requests_are_clear_errors() -> None:
    with pytest.raises(PlaitError, match="cannot group 3 layers into 4"):
        group_layers([1.0, 1.0, 1.0], [1.0, 1.0], 4)
    with pytest.raises(PlaitError, match="one entry per cut"):
        group_layers([1.0, 1.0, 1.0], [1.0], 2)
