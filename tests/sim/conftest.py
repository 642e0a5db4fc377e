"""Fixtures of the simulator tests (helpers live in ``simkit``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from simkit import UnitCost, hand_plan

from plait.plan import Plan


@pytest.fixture
def unit_cost() -> UnitCost:
    """The round-number cost model."""
    return UnitCost()


@pytest.fixture
def plan_of() -> Callable[..., Plan]:
    """Factory of hand-written plans."""
    return hand_plan
