"""The token pipeline with tensor parallelism inside its stages, on 4 gloo ranks: 2 stages x 2-way tp (Megatron
layout of gpt-tiny, QKV split by heads), sliced, matches one plain unsliced process (losses and parameters after 3
AdamW steps); each tp rank caches only its own heads' keys and values."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from planrun import model_parts, reference, train_pipeline_steps
from torch.distributed.tensor import DTensor
from tpkit import gpt_layout

from plait.errors import PlaitError
from plait.plan.placement import REPLICATE, Placement, shard
from plait.runtime import init_distributed, run_ranks, teardown
from plait.runtime.pipeline_tp import Boundary, StageSharding
from plait.runtime.token_pipeline import build_token_pipeline_rank, check_token_pipeline

STEPS, GLOBAL_BATCH, TP = 3, 4, 2
LAYERS = ["embed", "blocks.0", "blocks.1", "head"]  # gpt-tiny's layer view (64 tokens, 2 heads of 32)
TWO = [LAYERS[:2], LAYERS[2:]]
HEADS, HEAD_SIZE = 2, 32
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6  # as the other pipeline tests (fp32, AdamW amplifies rounding)
SLICING = [(1, [20, 20, 14, 10]), (2, [1, 31, 32]), (1, [64])]  # per replica: uneven, one-token and whole slices


def megatron(model: torch.nn.Module, sent: Placement) -> StageSharding:
    """gpt-tiny's Megatron layout (QKV and fc1 column split, proj and fc2 row split, logits column split), the
    boundary sending ``sent`` to a receiver that needs it replicated."""
    placements, pins = gpt_layout(model, attention="heads")
    return StageSharding(placements=placements, pins=pins, boundaries=[Boundary(sent=(sent,), needed=(REPLICATE,))])


def train_rank(sent: Placement) -> dict[str, Any]:
    """One rank: its losses (None off the last stage), its stage's full parameters, the local shapes it cached."""
    init_distributed()
    try:
        build, _, loss = model_parts("gpt-tiny")
        torch.manual_seed(0)
        model = build()
        rank = build_token_pipeline_rank(model, TWO, dp=1, slicing=SLICING, loss=loss, tp=TP,
                                         sharding=megatron(model, sent))
        cached: set[tuple[int, ...]] = set()
        extend = rank.slicer.state.extend

        def record(layer: str, keys: torch.Tensor, values: torch.Tensor, dim: int = -2) -> Any:
            cached.add(tuple(keys.to_local().shape) if isinstance(keys, DTensor) else tuple(keys.shape))
            return extend(layer, keys, values, dim)

        rank.slicer.state.extend = record
        out = train_pipeline_steps(rank, "gpt-tiny", GLOBAL_BATCH, STEPS)
        params = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in out["params"].items()}
        return {**out, "params": params, "cached": cached}
    finally:
        teardown()


@pytest.mark.parametrize("sent", [REPLICATE, shard(2)], ids=["2x1-tp2", "2x1-tp2-hidden-split"])
def test_tensor_parallel_token_stages_match_one_unsliced_process(sent: Placement) -> None:
    results = run_ranks(train_rank, len(TWO) * TP, sent, timeout_s=300)
    ref_losses, ref_params = reference("gpt-tiny", GLOBAL_BATCH, STEPS)
    last = [r for r in results if r["losses"][0] is not None]
    assert len(last) == TP  # every tp rank of the last stage computes the whole loss
    for r in last:
        assert r["losses"] == pytest.approx(ref_losses, rel=LOSS_RTOL)
    seen: set[str] = set()
    for r in results:
        for name, value in r["params"].items():
            torch.testing.assert_close(value, ref_params[name], rtol=0, atol=PARAM_ATOL)
            seen.add(name)
        # each tp rank caches its own head's keys: (rows, heads / tp, slice length, head size)
        lengths = {(rows, n) for rows, slices in SLICING for n in slices}
        assert r["cached"] == {(rows, HEADS // TP, n, HEAD_SIZE) for rows, n in lengths}
    assert seen == set(ref_params)


def test_bad_tensor_parallel_token_pipelines_are_clear_errors() -> None:
    model = model_parts("gpt-tiny")[0]()

    def check(world: int, tp: int, sharding: StageSharding | None, dp: int = 1) -> None:
        check_token_pipeline(model, TWO, dp=dp, world=world, slicing=[(1, [64])], tp=tp, sharding=sharding)

    with pytest.raises(PlaitError, match="2 stages x 1 data-parallel x 2 tensor-parallel ranks need 4 ranks, the job "
                                         "has 8"):
        check(8, 2, None)
    with pytest.raises(PlaitError, match="need 0 ranks"):
        check(4, 0, None)
    with pytest.raises(PlaitError, match="blocks.0.attn has 2 heads.*must divide the heads"):
        check(6, 3, megatron(model, REPLICATE))
    with pytest.raises(PlaitError, match=r"splits a token cell's rows or tokens"):
        check(4, 2, megatron(model, shard(1)))
    with pytest.raises(PlaitError, match="1 boundaries for 4 stages"):  # the micro-batch pipeline's own checks
        check_token_pipeline(model, [[n] for n in LAYERS], dp=1, world=8, slicing=[(1, [64])], tp=2,
                             sharding=megatron(model, REPLICATE))
    check(4, 2, megatron(model, shard(2)))
    check(8, 2, None, dp=2)  # all replicated: any tp size
