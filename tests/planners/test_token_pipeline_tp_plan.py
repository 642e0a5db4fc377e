"""Token slicing on tensor-parallel stages (issue 8): the pipeline planner keeps the stages' tp (and the intra-op
ILP's placements) when it slices tokens, prices each slice's share and tp collectives, lowers them per slice pass
for the simulator, and places the boundaries as the token runtime sends them."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from importlib import resources
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from plait.cluster import Cluster, load_cluster
from plait.cluster.load import cluster_from_dict
from plait.cost import CostModel
from plait.cost.work import Comm
from plait.graph import capture
from plait.models import GPT, GPTConfig, lm_batch, lm_loss
from plait.plan import Plan
from plait.plan.placement import REPLICATE, shard
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineOptions
from plait.planners.pipeline_plan import plan_pipeline_full
from plait.planners.pipeline_tokens import token_send_placements, token_slicing
from plait.planners.token_cost import SliceComm, SliceCost, TokenWork, slice_comms
from plait.planners.token_slicing_lowering import TokenStageWork, lower_token_pipeline
from plait.sim import simulate

# 2,048 tokens through two blocks at batch 1 on two nodes of two A100s, stages forced to 2-way tp inside a node:
# slicing wins, and each slice's boundary crosses the slow link as tp halves (Shard(2)), all-gathered over NVLink
TP_CFG = GPTConfig(vocab_size=512, seq_len=2048, num_layers=2, num_heads=8, hidden=1024)


def two_by_two() -> Cluster:
    """Two DGX A100 nodes of two GPUs each."""
    raw = yaml.safe_load(resources.files("plait.cluster.presets").joinpath("dgx-a100.yaml").read_text())
    raw.update(num_nodes=2, devices_per_node=2, name="a100-2x2")
    return cluster_from_dict(raw, where="test")


def work(hidden: int = 64) -> TokenWork:
    return TokenWork(fwd_flops=(0.0, 24.0 * hidden**2, 4.0 * hidden), bwd_flops=(0.0, 48.0 * hidden**2, 8.0 * hidden),
                     fwd_bytes=(1e4, 80.0 * hidden, 0.0), num_kernels=11, boundary_bytes=4.0 * hidden, dtype="fp32")


def plan_tp(**kw: Any) -> Plan:
    with torch.device("meta"):
        model = GPT(TP_CFG)
    batch = lm_batch(TP_CFG, 1, device="meta")
    graph = capture(model, batch, loss_fn=lm_loss, with_ops=False, name="gpt")
    cluster = two_by_two()
    source = ModelSource(model=model, example_batch=batch, batch_size=1, loss_fn=lm_loss, name="gpt")
    options = PipelineOptions(same_size=True, min_stages=2, tp_sizes=(2,), **kw)
    return plan_pipeline_full(graph, cluster, global_batch=1, cost=CostModel(cluster), options=options, source=source)


@pytest.fixture(scope="module")
def tp_plans() -> tuple[Plan, Plan]:
    """The planner's sliced plan on 2 stages x 2-way tp, and the same search without token slicing."""
    sliced = plan_tp()
    with token_slicing(False):
        unsliced = plan_tp()
    return sliced, unsliced


# ---- pricing and lowering -----------------------------------------------------------------------------------------


def test_slice_cost_prices_the_given_tp_collectives_and_boundary() -> None:
    cost = CostModel(load_cluster("local:4"))
    comms = (SliceComm("all_reduce", 256.0),)
    tokens = np.array([64, 128])
    cell = SliceCost(work=work(), cost=cost, tp=2, fwd_comms=comms, bwd_comms=comms * 2, send_split=1)
    want = [3 * cost.collective_time("all_reduce", 256.0 * 2 * t, (0, 1)) for t in (64, 128)]
    assert cell.comms_s(2, tokens) == pytest.approx(want)
    assert cell.boundary_s(2, tokens) == pytest.approx([2 * cost.p2p_time(2 * t * 256.0, 0, 2) for t in (64, 128)])
    split = replace(cell, send_split=2).boundary_s(2, tokens)
    gathered = [2 * (cost.p2p_time(t * 256.0, 0, 2) + cost.collective_time("all_gather", 2 * t * 256.0, (0, 1)))
                for t in (64, 128)]
    assert split == pytest.approx(gathered)
    plain = SliceCost(work=work(), cost=cost)
    assert replace(plain, fwd_comms=comms).comms_s(2, tokens) == pytest.approx([0.0, 0.0])  # no tp: no collectives
    assert slice_comms((Comm(collective="all_reduce", nbytes=4096, axes=("tp",), temp_bytes=8192),), 2, 16) == (
        SliceComm("all_reduce", 128.0, 256.0),)


def test_the_lowering_emits_each_slice_pass_tp_collectives() -> None:
    comm = (SliceComm("all_reduce", 256.0, 256.0),)
    stages = [TokenStageWork(work=work(), micro=2, activation_bytes=1000, transient_bytes=100, tp=2, send_split=2,
                             fwd_comms=comm * 2, bwd_comms=comm) for _ in range(2)]
    programs = lower_token_pipeline(stages, [32, 16], [(0, 1), (2, 3)], num_micro=1, sync_bytes=[64, 64])
    for k, program in enumerate(programs):
        instrs = program.instrs
        for j, tokens in enumerate((32, 16)):
            fwd = [i for i in instrs if i.name.startswith(f"tp fwd v{k} mb0 s{j} #")]
            bwd = [i for i in instrs if i.name.startswith(f"tp bwd v{k} mb0 s{j} #")]
            assert len(fwd) == 2 and len(bwd) == 1
            assert all(i.nbytes == 256 * 2 * tokens and i.group == program.ranks and i.axes == ("tp",)
                       for i in fwd + bwd)
        compute = [i for i in instrs if i.op == "compute"]
        assert compute[0].flops == pytest.approx((24.0 * 64**2 * 32 + 4.0 * 64 * 32 * 33 / 2) * 2 / 2)  # its 1/tp
        assert not any(i.name.startswith("grad sync") for i in instrs)  # one dp rank: nothing to all-reduce
        assert sum(i.alloc_bytes for i in instrs) == sum(i.free_bytes for i in instrs)
    receiver = programs[1].instrs
    recv = next(i for i in receiver if i.op == "recv")
    assert recv.nbytes == 2 * 32 * 256 // 2  # its half of the slice's boundary
    gather = receiver[receiver.index(recv) + 1]
    assert gather.collective == "all_gather" and gather.nbytes == 2 * 32 * 256 and gather.group == (2, 3)


def test_token_boundaries_split_after_the_tokens_or_cross_whole() -> None:
    assert token_send_placements((1, 2048, 64), 2) == (REPLICATE, shard(2))
    assert token_send_placements((1, 2048, 63), 2) == ()
    assert token_send_placements((1, 2048, 64), 1) == ()


# ---- the planner --------------------------------------------------------------------------------------------------


def test_the_planner_slices_tensor_parallel_stages_when_that_wins(tp_plans: tuple[Plan, Plan]) -> None:
    plan, unsliced = tp_plans
    cuts = plan.schedule.token_slices
    assert cuts and len(cuts) > 1 and sum(cuts) == TP_CFG.seq_len
    assert plan.schedule.unsliced_step_s == pytest.approx(unsliced.predicted.step_s)
    assert plan.predicted.step_s < unsliced.predicted.step_s
    # the same stages, meshes and placements as the unsliced tensor-parallel plan: the Trainer applies them alike
    assert (plan.mesh.shape, plan.mesh.axes) == ((2, 1, 2), ("pp", "dp", "tp")) == (unsliced.mesh.shape, unsliced.mesh.axes)
    assert [(s.layers, s.ranks, s.stage_mesh) for s in plan.stages] == [(s.layers, s.ranks, s.stage_mesh)
                                                                         for s in unsliced.stages]
    assert plan.params == unsliced.params and plan.activations == unsliced.activations
    assert any(any(p.is_shard for p in param.placements) for param in plan.params)
    # the unsliced plan splits its boundary on the tokens; the token runtime takes a split after them
    assert unsliced.stages[0].send_placements == (REPLICATE, shard(1))
    assert [s.send_placements for s in plan.stages] == [(REPLICATE, shard(2)), ()]
    from plait.runtime.pipeline_apply import check_pipeline_plan

    check_pipeline_plan(plan, SimpleNamespace(world_size=4, device=torch.device("cpu")))  # type: ignore[arg-type]


def test_sliced_passes_wait_for_the_stage_tp_collectives(tp_plans: tuple[Plan, Plan]) -> None:
    plan, unsliced = tp_plans
    cuts = plan.schedule.token_slices or ()
    for k, (program, whole) in enumerate(zip(plan.programs, unsliced.programs, strict=True)):
        group = program.ranks[:2]
        for phase in ("fwd", "bwd"):  # each slice pass waits for the collectives of a micro-batch pass, scaled
            per_micro = [i for i in whole.instrs if i.name.startswith(f"tp {phase} v{k} mb0 #")]
            assert per_micro
            for j, tokens in enumerate(cuts):
                got = [i for i in program.instrs if i.name.startswith(f"tp {phase} v{k} mb0 s{j} #")]
                assert [i.collective for i in got] == [i.collective for i in per_micro]
                assert [i.nbytes for i in got] == [round(i.nbytes * tokens / sum(cuts)) for i in per_micro]
                assert all(i.group == group and i.axes == ("tp",) for i in got)
        passes = Counter(i.pass_kind for i in program.instrs if i.pass_kind)
        assert passes == {"F": len(cuts), "B": len(cuts)}
        for j, tokens in enumerate(cuts):  # a slice's boundary (and its gradient) arrives as halves, gathered
            kind, label = ("act", f"act 0>1 mb0 s{j}") if k == 1 else ("grad", f"grad 1>0 mb0 s{j}")
            recv = next(i for i in program.instrs if i.op == "recv" and i.name == label)
            gather = next(i for i in program.instrs if i.name == f"gather {label}")
            assert gather.collective == "all_gather" and gather.group == group and gather.nbytes == 2 * recv.nbytes
            assert gather.nbytes == tokens * TP_CFG.hidden * 4, kind


def test_the_simulated_sliced_step_pipelines_slices_through_tp_stages(tp_plans: tuple[Plan, Plan]) -> None:
    plan, _ = tp_plans
    result = simulate(plan, CostModel(plan.cluster))
    first, second = (result.events_of(r) for r in (0, 2))
    n = len(plan.schedule.token_slices or ())

    def pass_of(events: Any, label: str) -> Any:
        return next(e for e in events if e.label == label)

    for j in range(n):  # stage 1 runs slice j once stage 0 sent it; stage 0 runs slice j + 1 meanwhile
        sent = next(e for e in first if e.name == f"act 0>1 mb0 s{j}" and e.op == "send")
        assert pass_of(second, f"F0.s{j}").start >= sent.end - 1e-12
    assert pass_of(first, "F0.s1").start < pass_of(second, "F0.s0").end
    for events in (first, second):  # every pass waits for its collectives before the next one computes
        done = 0.0
        for e in events:  # (a gather before it, the tp collectives of the pass before it)
            if e.op == "compute":
                assert e.start >= done - 1e-12, e.name
            elif e.op == "collective":
                done = max(done, e.end)
        labels = [e.label for e in events if e.label]
        assert labels == [f"F0.s{j}" for j in range(n)] + [f"B0.s{j}" for j in reversed(range(n))]
    assert result.prediction.step_s == pytest.approx(plan.predicted.step_s)
    assert result.prediction.step_s >= max(e.end for e in (*first, *second)) - 1e-12
