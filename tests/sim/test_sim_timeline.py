"""The timeline image: a PNG with one compute and one comm lane per drawn program."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import matplotlib.image as mpimg
from simkit import UnitCost, coll, comp

from plait.plan import Plan
from plait.sim import draw_timeline, simulate
from plait.sim.timeline import span_label


def test_draws_a_png_per_program(tmp_path: Path, plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    programs = [((r,), [comp("fwd", 1 + r), coll("x", 2, 0, group=(0, 1, 2)), comp("opt", 1, 1)]) for r in range(3)]
    result = simulate(plan_of(*programs), unit_cost)  # type: ignore[arg-type]
    path = draw_timeline(result, str(tmp_path / "sub" / "t.png"))
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 1000
    few = draw_timeline(result, str(tmp_path / "few.png"), max_lanes=1, title="one lane")
    assert mpimg.imread(few).shape[0] < image.shape[0]  # fewer lanes, shorter figure


def test_collectives_are_told_apart_by_the_mesh_axes_they_span(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    tp, dp = replace(coll("all_reduce attn", 1), axes=("tp",)), replace(coll("all_reduce bucket 0", 2, 0), axes=("dp",))
    result = simulate(plan_of(((0,), [comp("fwd", 1), tp, dp])), unit_cost)  # type: ignore[arg-type]
    comm = [e for e in result.traces[0].events if e.stream == "comm"]
    assert [e.axes for e in comm] == [("tp",), ("dp",)]
    assert [span_label(e) for e in comm] == ["all_reduce (tp)", "all_reduce (dp)"]
