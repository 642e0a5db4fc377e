"""Intra-op plans made by the planner, run by the Trainer on 4 gloo ranks: they match one plain process after a
few AdamW steps, and a step issues exactly the collectives the plan's program predicts."""

from __future__ import annotations

import pytest
import torch
from planrun import make_plan, planned_collectives, reference, run_plan

from plait.cluster import local_cluster
from plait.cost.alpha_beta import AlphaBetaCost
from plait.plan import MeshSpec, Plan
from plait.planners.intra_op.planner import IntraOpOptions

STEPS = 3
RTOL, ATOL = 1e-5, 1e-6  # losses
PARAM_ATOL = 5e-6  # parameters after 3 AdamW steps (eps 1e-6)

CASES = [
    # model, mesh shape, axes, global batch, data-parallel kinds
    ("gpt-tiny", (4,), ("tp",), 8, ("replicate",)),
    ("gpt-tiny", (2, 2), ("dp", "tp"), 8, ("replicate",)),
    ("gpt-tiny", (2, 2), ("dp", "tp"), 8, ("fsdp",)),
    ("hf-llama-tiny", (2, 2), ("dp", "tp"), 8, ("replicate",)),
    # the vocabulary split: the embedding's masked pending sum meets a Partial pin
    ("gpt-mini", (2, 2), ("dp", "tp"), 4, ("replicate",)),
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


def alpha_beta_plan(name: str, shape: tuple[int, ...], axes: tuple[str, ...], batch: int, **kwargs: object) -> Plan:
    """The plan Alpa's cost model gives (alpha = beta = 1 per byte, compute free, matmuls split on every model axis)."""
    mesh = MeshSpec(shape=shape, axes=axes)
    cost = AlphaBetaCost(local_cluster(mesh.size), mesh, dict.fromkeys(axes, 1.0), dict.fromkeys(axes, 1.0))
    return make_plan(name, mesh, batch, cost=cost, intra_op=IntraOpOptions(replicated_heavy_ops=False), families=("data-parallel", "intra-op"),
                     dp_kinds=("replicate",), **kwargs)


@pytest.mark.parametrize(("name", "batch", "reduces"), [("mlp6-256", 32, 5), ("transformer-tiny", 8, 7)])
def test_alpa_megatron_plans_issue_exactly_their_activation_all_reduces(name: str, batch: int, reduces: int) -> None:
    plan = alpha_beta_plan(name, (1, 4), ("x", "y"), batch)
    got = run_plan(name, plan, STEPS)
    assert got["counts"] == {("all_reduce", ("y",)): reduces}  # L-1 for the MLP, 4L-1 for the transformer layers
    losses, params = reference(name, batch, STEPS)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
    for n, p in params.items():
        torch.testing.assert_close(got["params"][n], p, rtol=0, atol=PARAM_ATOL)


BF16_STEPS = 20
# bf16 compute against the fp32 reference over 20 steps. Measured on gpt-tiny (2,2): losses 2.5e-5 relative,
# parameters 2.1e-3 absolute; one process under the same autocast differs from fp32 by 3.0e-5 and 2.1e-3.
BF16_LOSS_RTOL = 2e-4
BF16_PARAM_ATOL = 5e-3


def test_bf16_mixed_precision_stays_near_the_fp32_reference() -> None:
    plan = make_plan("gpt-tiny", MeshSpec(shape=(2, 2), axes=("dp", "tp")), 8, dp_kinds=("replicate",),
                     force_batch_axis="dp", precision="bf16")
    assert (plan.precision.param_dtype, plan.precision.compute_dtype) == ("fp32", "bf16")
    got = run_plan("gpt-tiny", plan, BF16_STEPS)
    losses, params = reference("gpt-tiny", 8, BF16_STEPS)
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], losses, strict=True))
    param_gap = max(float((got["params"][n] - p).abs().max()) for n, p in params.items())
    assert loss_gap <= BF16_LOSS_RTOL and param_gap <= BF16_PARAM_ATOL, (loss_gap, param_gap)
    assert all(t.dtype == torch.float32 for t in got["params"].values())  # fp32 master weights
