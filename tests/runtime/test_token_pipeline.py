"""The token pipeline on real gloo ranks: a sliced GPT training step on 4 stages, and on 2 stages x 2-way data
parallelism, matches one plain unsliced process (losses and parameters after 3 AdamW steps)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from planrun import assert_pipeline_matches, model_parts, train_pipeline_steps

from plait.errors import PlaitError
from plait.runtime import init_distributed, run_ranks, teardown
from plait.runtime.token_pipeline import build_token_pipeline_rank, check_token_pipeline

STEPS = 3
LAYERS = ["embed", "blocks.0", "blocks.1", "head"]  # gpt-tiny's layer view (64 tokens)
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6  # as the micro-batch pipeline's tests (fp32, AdamW amplifies rounding)


def train_rank(stage_layers: list[list[str]], dp: int, slicing: list[tuple[int, list[int]]], global_batch: int
               ) -> dict[str, Any]:
    init_distributed()
    try:
        build, _, loss = model_parts("gpt-tiny")
        torch.manual_seed(0)
        model = build()
        rank = build_token_pipeline_rank(model, stage_layers, dp=dp, slicing=slicing, loss=loss)
        return train_pipeline_steps(rank, "gpt-tiny", global_batch, STEPS)
    finally:
        teardown()


def assert_matches_one_process(results: list[dict[str, Any]], dp: int, global_batch: int) -> None:
    """The last stage's losses (mean over replicas) and every stage's parameters against one plain process."""
    assert_pipeline_matches(results, dp, "gpt-tiny", global_batch, STEPS, loss_rtol=LOSS_RTOL, param_atol=PARAM_ATOL)


CASES = [
    # stages, dp, slicing per replica, global batch
    ([[n] for n in LAYERS], 1, [(1, [20, 20, 14, 10]), (2, [1, 31, 32]), (1, [64])], 4),
    ([LAYERS[:2], LAYERS[2:]], 2, [(2, [40, 16, 8])], 4),
]


@pytest.mark.parametrize(("stage_layers", "dp", "slicing", "global_batch"), CASES, ids=["4x1", "2x2-dp"])
def test_sliced_pipeline_matches_one_unsliced_process(stage_layers: list[list[str]], dp: int,
                                                      slicing: list[tuple[int, list[int]]], global_batch: int) -> None:
    results = run_ranks(train_rank, len(stage_layers) * dp, stage_layers, dp, slicing, global_batch, timeout_s=300)
    assert_matches_one_process(results, dp, global_batch)


def test_bad_token_pipelines_are_clear_errors() -> None:
    build = model_parts("gpt-tiny")[0]
    model = build()
    stages = [LAYERS[:2], LAYERS[2:]]

    def check(stage_layers: list[list[str]], world: int, slicing: list[tuple[int, list[int]]], dp: int = 1) -> None:
        check_token_pipeline(model, stage_layers, dp=dp, world=world, slicing=slicing)

    with pytest.raises(PlaitError, match="need 4 ranks, the job has 3"):
        check(stages, 3, [(1, [64])], dp=2)
    with pytest.raises(PlaitError, match="at least one layer"):
        check([LAYERS, []], 2, [(1, [64])])
    with pytest.raises(PlaitError, match="empty token slice"):
        check(stages, 2, [(1, [32, 0, 32])])
    with pytest.raises(PlaitError, match="sum to 60 tokens, the sequence has 64"):
        check(stages, 2, [(1, [64]), (1, [30, 30])])
    hf = model_parts("hf-gpt2-tiny")[0]()
    with pytest.raises(PlaitError, match="Hugging Face model"):
        check_token_pipeline(hf, stages, dp=1, world=2, slicing=[(1, [64])])
