"""The timeline image: a PNG with one compute and one comm lane per drawn program."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.image as mpimg
from simkit import UnitCost, coll, comp

from plait.plan import Plan
from plait.sim import draw_timeline, simulate


def test_draws_a_png_per_program(tmp_path: Path, plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    programs = [((r,), [comp("fwd", 1 + r), coll("x", 2, 0, group=(0, 1, 2)), comp("opt", 1, 1)]) for r in range(3)]
    result = simulate(plan_of(*programs), unit_cost)  # type: ignore[arg-type]
    path = draw_timeline(result, str(tmp_path / "sub" / "t.png"))
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 1000
    few = draw_timeline(result, str(tmp_path / "few.png"), max_lanes=1, title="one lane")
    assert mpimg.imread(few).shape[0] < image.shape[0]  # fewer lanes, shorter figure
