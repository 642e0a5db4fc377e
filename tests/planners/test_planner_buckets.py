"""Gradient order and bucket packing, against a brute-force oracle."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.graph import ModelGraph
from plait.planners import gradient_order, make_buckets, pack_greedy


def fewest_groups(sizes: list[int], cap: int) -> int:
    """Brute force: the fewest contiguous groups where every group fits the cap or is a single item."""

    @functools.cache
    def best(start: int) -> int:
        if start == len(sizes):
            return 0
        options = []
        for end in range(start + 1, len(sizes) + 1):
            if end - start > 1 and sum(sizes[start:end]) > cap:
                break
            options.append(1 + best(end))
        return min(options)

    return best(0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=100), min_size=0, max_size=12), st.integers(min_value=1, max_value=150))
def test_greedy_packing_is_contiguous_capped_and_minimal(sizes: list[int], cap: int) -> None:
    groups = pack_greedy(sizes, cap)
    assert [i for g in groups for i in g] == list(range(len(sizes)))  # every item once, in order
    for g in groups:
        assert len(g) == 1 or sum(sizes[i] for i in g) <= cap
    assert len(groups) == fewest_groups(sizes, cap)


def test_hand_example() -> None:
    # cap 10: [4, 5] fill to 9, 3 would overflow; 12 exceeds the cap alone; [3] closes before it; [6, 4] hits 10.
    assert pack_greedy([4, 5, 3, 12, 6, 4, 1], 10) == [[0, 1], [2], [3], [4, 5], [6]]
    with pytest.raises(ValueError):
        pack_greedy([1], 0)


def test_gradient_order_is_reverse_layers_then_reverse_registration(make_graph: Callable[..., ModelGraph]) -> None:
    graph = make_graph(num_layers=3)
    names = [p.name for p in gradient_order(graph)]
    assert names == [
        "layers.2.fc.bias", "layers.2.fc.weight",
        "layers.1.fc.bias", "layers.1.fc.weight",
        "layers.0.fc.bias", "layers.0.fc.weight",
    ]


def test_buckets_cover_parameters_and_know_when_ready(make_graph: Callable[..., ModelGraph]) -> None:
    graph = make_graph(num_layers=4, hidden=256)  # weight 262144 B, bias 1024 B
    buckets = make_buckets(graph, 300_000)
    # each bucket: a bias and the next weight... bias(2)+weight(2) = 263168; + bias(1) fits, weight(1) does not
    assert [b.params for b in buckets][:2] == [
        ("layers.3.fc.bias", "layers.3.fc.weight", "layers.2.fc.bias"),
        ("layers.2.fc.weight", "layers.1.fc.bias"),
    ]
    assert [b.ready_after_layer for b in buckets] == [2, 1, 0, 0]
    assert sorted(n for b in buckets for n in b.params) == sorted(p.name for p in graph.params)
    assert [b.nbytes for b in buckets] == [263168 + 1024, 263168, 263168, 262144]
    assert [b.index for b in buckets] == list(range(len(buckets)))


def test_one_huge_bucket_when_cap_is_large(make_graph: Callable[..., ModelGraph]) -> None:
    graph = make_graph(num_layers=4)
    (only,) = make_buckets(graph, 1 << 30)
    assert only.nbytes == graph.param_bytes and only.ready_after_layer == 0
