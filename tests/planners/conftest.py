"""Fixtures of the planner tests (helpers live in ``plankit``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from plankit import dense_graph, gpu_cluster

from plait.cluster import Cluster
from plait.graph import ModelGraph


@pytest.fixture
def make_graph() -> Callable[..., ModelGraph]:
    """Factory of dense toy graphs."""
    return dense_graph


@pytest.fixture
def make_cluster() -> Callable[..., Cluster]:
    """Factory of pinned GPU clusters."""
    return gpu_cluster
