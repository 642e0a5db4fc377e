"""Pipeline stages with tensor parallelism inside each stage on 4 gloo ranks (2 stages x 2-way tp, Megatron layout
of gpt-tiny): sequence-sharded or replicated boundaries, GPipe, 1F1B and interleaved 1F1B, each match one plain
process after 3 AdamW steps; a sharded boundary sends half the sequence and the receiver all-gathers it."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
from planrun import OPT, data_of, model_parts, reference
from torch.distributed.tensor import DTensor
from tpkit import gpt_layout

from plait.errors import PlaitError
from plait.plan.placement import PARTIAL, REPLICATE, Placement, shard
from plait.runtime import init_distributed, run_ranks, teardown
from plait.runtime.collectives import CollectiveCounter
from plait.runtime.pipeline import build_pipeline_rank
from plait.runtime.pipeline_tp import Boundary, StageSharding, check_stage_sharding

STEPS, GLOBAL_BATCH, MICRO, TP = 3, 8, 4, 2
LAYERS = ["embed", "blocks.0", "blocks.1", "head"]  # gpt-tiny's layer view
SEQ, HIDDEN = 64, 64  # gpt-tiny's sequence length and hidden size
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6
COUNTED_STEP = 1  # step 0 also runs torch's shape inference


def megatron_sharding(model: torch.nn.Module, sent: Placement, needed: Placement, num_stages: int) -> StageSharding:
    """gpt-tiny's Megatron layout (column-split qkv/fc1/vocabulary, row-split proj/fc2) and every boundary sending
    ``sent`` to a receiver that needs ``needed``."""
    placements, pins = gpt_layout(model, attention="heads")
    boundaries = [Boundary(sent=(sent,), needed=(needed,))] * (num_stages - 1)
    return StageSharding(placements=placements, pins=pins, boundaries=boundaries)


def train_rank(stage_layers: list[list[str]], pp: int, dp: int, schedule: str, sent: Placement,
               needed: Placement) -> dict[str, Any]:
    """One rank: losses, full parameters of its stages, the counted step's collectives, the shapes its stages got."""
    init_distributed()
    build, _, loss = model_parts("gpt-tiny")
    torch.manual_seed(0)
    model = build()
    sharding = megatron_sharding(model, sent, needed, len(stage_layers))
    rank = build_pipeline_rank(model, stage_layers, pp=pp, dp=dp, schedule=schedule, num_micro=MICRO, loss=loss,
                               tp=TP, sharding=sharding)
    received: set[tuple[int, ...]] = set()
    for stage in rank.stages:
        stage.submod.register_forward_pre_hook(lambda _m, args: received.add(tuple(args[0].shape)), prepend=True)
    opt = torch.optim.AdamW(list(rank.params.values()), **OPT)
    data = data_of("gpt-tiny", GLOBAL_BATCH)
    losses, counter = [], CollectiveCounter(rank.mesh)
    for step in range(STEPS):
        opt.zero_grad()
        with counter if step == COUNTED_STEP else nullcontext():
            got = rank.step(data(step))
        opt.step()
        losses.append(None if got is None else float(got))
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in rank.params.items()}
    teardown()
    return {"losses": losses, "params": params, "counts": dict(counter.counts), "received": received,
            "stages": [stage.stage_index for stage in rank.stages]}


TWO = [LAYERS[:2], LAYERS[2:]]
FOUR = [[name] for name in LAYERS]  # 4 virtual stages on 2 physical ones
CASES = [
    # stage layers, pipeline stages, data-parallel replicas, schedule, placement each boundary sends, placement the
    # receiver needs; every stage is 2-way tensor parallel
    (TWO, 2, 1, "gpipe", shard(1), REPLICATE),
    (TWO, 2, 1, "1f1b", shard(1), REPLICATE),
    (FOUR, 2, 1, "interleaved-1f1b", shard(1), REPLICATE),
    (TWO, 2, 1, "1f1b", REPLICATE, REPLICATE),
    # sequence-sharded into the receiver's first layer norm: its weights get pending-sum gradients, summed over tp
    (TWO, 2, 1, "1f1b", shard(1), shard(1)),
    ([LAYERS], 1, 2, "gpipe", REPLICATE, REPLICATE),  # DTensor gradients averaged over dp
]


def expected_gathers(stages: list[int], num_stages: int, sharded: bool) -> int:
    """All-gathers on tp per step: each sharded boundary is gathered by its receiver in forward and its gradient by
    the sender in backward; the last stage gathers the column-split logits for the loss. One each per micro-batch."""
    crossings = sum((s > 0) + (s < num_stages - 1) for s in stages) if sharded else 0
    return MICRO * (crossings + (num_stages - 1 in stages))


@pytest.mark.parametrize(("stage_layers", "pp", "dp", "schedule", "sent", "needed"), CASES, ids=lambda v: str(v))
def test_tensor_parallel_stages_match_one_process(stage_layers: list[list[str]], pp: int, dp: int, schedule: str,
                                                  sent: Placement, needed: Placement) -> None:
    results = run_ranks(train_rank, pp * dp * TP, stage_layers, pp, dp, schedule, sent, needed, timeout_s=600)
    ref_losses, ref_params = reference("gpt-tiny", GLOBAL_BATCH, STEPS)
    last = [r for r in results if r["losses"][0] is not None]
    assert len(last) == dp * TP  # every tp rank of the last stage computes its replica's whole loss
    # the tp ranks of a replica agree; the mean over the replicas is the global batch's loss
    assert [sum(r["losses"][k] for r in last) / len(last) for k in range(STEPS)] == pytest.approx(ref_losses, rel=LOSS_RTOL)
    seen: set[str] = set()
    for r in results:
        for name, p in r["params"].items():
            torch.testing.assert_close(p, ref_params[name], rtol=0, atol=PARAM_ATOL, msg=lambda m, n=name: f"{n}: {m}")
            seen.add(name)
    assert seen == set(ref_params)
    micro = GLOBAL_BATCH // dp // MICRO
    piece = (micro, SEQ // TP, HIDDEN) if sent.is_shard else (micro, SEQ, HIDDEN)
    for r in results:  # what crossed: tokens into stage 0, else this rank's piece of the boundary tensor
        tokens = {(micro, SEQ)} if 0 in r["stages"] else set()
        assert r["received"] == tokens | ({piece} if max(r["stages"]) > 0 else set())
        gathers = r["counts"].get(("all_gather", ("tp",)), 0)
        if needed.is_replicate:  # (a sharded input leaves the gathers to DTensor inside the receiver's layers)
            assert gathers == expected_gathers(r["stages"], len(stage_layers), sent.is_shard)


def test_stage_sharding_errors_are_clear() -> None:
    build = model_parts("gpt-tiny")[0]
    model = build()
    with pytest.raises(PlaitError, match=r"tensor-parallel sizes \[2, 4\].*not supported yet"):
        check_stage_sharding(StageSharding(), TWO, [2, 4], model)
    with pytest.raises(PlaitError, match="1 boundaries for 4 stages"):
        check_stage_sharding(StageSharding(boundaries=[Boundary()]), FOUR, 2, model)
    with pytest.raises(PlaitError, match="must be one Shard"):
        check_stage_sharding(StageSharding(boundaries=[Boundary(sent=(PARTIAL,))]), TWO, 2, model)
    with pytest.raises(PlaitError, match="no parameter of the stages' layers"):
        check_stage_sharding(StageSharding(placements={"blocks.7.mlp.fc1.weight": (shard(0),)}), TWO, 2, model)
    assert check_stage_sharding(megatron_sharding(model, shard(1), REPLICATE, 2), TWO, (2, 2), model) == 2
