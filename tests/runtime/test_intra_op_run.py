"""Intra-op plans made by the planner, run by the Trainer on 4 gloo ranks: they match one plain process after a
few AdamW steps, and a step issues exactly the collectives the plan's program predicts."""

from __future__ import annotations

import pytest
import torch
from planrun import make_plan, planned_collectives, reference, run_plan

from plait.plan import MeshSpec

STEPS = 3
RTOL, ATOL = 1e-5, 1e-6  # losses
PARAM_ATOL = 5e-6  # parameters after 3 AdamW steps (eps 1e-6)

CASES = [
    # model, mesh shape, axes, global batch, data-parallel kinds
    ("gpt-tiny", (4,), ("tp",), 8, ("replicate",)),
    ("gpt-tiny", (2, 2), ("dp", "tp"), 8, ("replicate",)),
    ("gpt-tiny", (2, 2), ("dp", "tp"), 8, ("fsdp",)),
    ("hf-llama-tiny", (2, 2), ("dp", "tp"), 8, ("replicate",)),
]


@pytest.mark.parametrize(("name", "shape", "axes", "batch", "kinds"), CASES, ids=lambda v: str(v))
def test_planned_run_matches_one_process_and_the_plan(name: str, shape: tuple[int, ...], axes: tuple[str, ...], batch: int,
                                                       kinds: tuple[str, ...]) -> None:
    mesh = MeshSpec(shape=shape, axes=axes)
    plan = make_plan(name, mesh, batch, dp_kinds=kinds, force_batch_axis="dp" if "dp" in axes else None)
    assert plan.model_axes == ("tp",) and any(p.placements[-1].is_shard for p in plan.params)
    got = run_plan(name, plan, STEPS)
    losses, params = reference(name, batch, STEPS)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
    for n, p in params.items():
        torch.testing.assert_close(got["params"][n], p, rtol=0, atol=PARAM_ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert got["counts"] == dict(planned_collectives(plan))
