"""Pipeline stages on real gloo ranks (torch.distributed.pipelining): GPipe, 1F1B and interleaved 1F1B, with and
without data parallelism inside each stage, match one plain process after 3 AdamW steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from planrun import assert_pipeline_matches, model_parts, train_pipeline_steps

from plait.cluster import local_cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph import capture
from plait.planners.pipeline import PipelineOptions, plan_pipeline
from plait.runtime import init_distributed, run_ranks, teardown
from plait.runtime.pipeline import build_pipeline_rank, check_pipeline_layout

STEPS, GLOBAL_BATCH, MICRO = 3, 8, 4
LAYERS = ["embed", "blocks.0", "blocks.1", "head"]  # gpt-tiny's layer view
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6


def train_rank(stage_layers: list[list[str]], pp: int, dp: int, schedule: str, micro: int = MICRO,
               name: str = "gpt-tiny") -> dict[str, Any]:
    init_distributed()
    build, _, loss = model_parts(name)
    torch.manual_seed(0)
    model = build()
    rank = build_pipeline_rank(model, stage_layers, pp=pp, dp=dp, schedule=schedule, num_micro=micro, loss=loss)
    out = train_pipeline_steps(rank, name, GLOBAL_BATCH, STEPS)
    teardown()
    return out


CASES = [
    # stage layers, pipeline ranks, data-parallel ranks per stage, schedule
    ([LAYERS[:2], LAYERS[2:]], 2, 2, "gpipe"),
    ([LAYERS[:2], LAYERS[2:]], 2, 2, "1f1b"),
    ([[name] for name in LAYERS], 2, 2, "interleaved-1f1b"),
    ([[name] for name in LAYERS], 4, 1, "1f1b"),
    ([[name] for name in LAYERS], 4, 1, "gpipe"),
]


def assert_matches_one_process(results: list[dict[str, Any]], dp: int, name: str = "gpt-tiny") -> None:
    """The last stage's losses (mean over the replicas) and every stage's parameters against one process."""
    assert_pipeline_matches(results, dp, name, GLOBAL_BATCH, STEPS, loss_rtol=LOSS_RTOL, param_atol=PARAM_ATOL)


@pytest.mark.parametrize(("stage_layers", "pp", "dp", "schedule"), CASES, ids=lambda v: str(v))
def test_pipeline_matches_one_process(stage_layers: list[list[str]], pp: int, dp: int, schedule: str) -> None:
    assert_matches_one_process(run_ranks(train_rank, pp * dp, stage_layers, pp, dp, schedule, timeout_s=600), dp)


def test_four_ranks_interleaved_run_eight_model_chunks_and_match_one_process() -> None:
    """4 pipeline ranks x 2 model chunks each (interleaved 1F1B) on a GPT of 8 layers."""
    layers = ["embed", *(f"blocks.{i}" for i in range(6)), "head"]
    results = run_ranks(train_rank, 4, [[n] for n in layers], 4, 1, "interleaved-1f1b", 4, "gpt-tiny-deep", timeout_s=600)
    assert_matches_one_process(results, 1, "gpt-tiny-deep")


def test_the_planned_pipeline_runs_and_matches_one_process() -> None:
    """plait's pipeline planner chooses stages and micro-batches for local:4 (at least 2 stages of one size, what
    the runtime runs today); its choice, run on 4 gloo ranks with 1F1B, matches one process."""
    build, make_batch, loss = model_parts("gpt-tiny")
    with torch.device("meta"):
        graph = capture(build(), make_batch(GLOBAL_BATCH, device="meta"), name="gpt-tiny", loss_fn=loss, with_ops=False)
    cluster = local_cluster(4)
    choice = plan_pipeline(graph, cluster, global_batch=GLOBAL_BATCH, cost=CostModel(cluster),
                           options=PipelineOptions(same_size=True, min_stages=2, micro_batches=(2, 4)))
    pp, dp = len(choice.layer_ranges), len(choice.stage_ranks[0])
    assert pp >= 2 and choice.stage_ranks == tuple(tuple(range(p * dp, (p + 1) * dp)) for p in range(pp))
    stage_layers = [[layer.name for layer in graph.layers[a:b]] for a, b in choice.layer_ranges]
    results = run_ranks(train_rank, 4, stage_layers, pp, dp, "1f1b", choice.num_micro, timeout_s=600)
    assert_matches_one_process(results, dp)


def test_bad_layouts_are_clear_errors() -> None:
    def check(stage_layers: list[list[str]], pp: int, schedule: str, *, dp: int = 1, world: int | None = None,
              micro: int = MICRO) -> None:
        check_pipeline_layout(stage_layers, pp=pp, dp=dp, world=pp * dp if world is None else world,
                              schedule=schedule, num_micro=micro)

    with pytest.raises(PlaitError, match="unknown pipeline schedule 'zb'"):
        check([LAYERS], 1, "zb")
    with pytest.raises(PlaitError, match="need 4 ranks, the job has 3"):
        check([LAYERS[:2], LAYERS[2:]], 2, "1f1b", dp=2, world=3)
    with pytest.raises(PlaitError, match="gpipe and 1f1b need one stage per rank"):
        check([[n] for n in LAYERS], 2, "1f1b")
    with pytest.raises(PlaitError, match="a multiple of the 2 ranks for interleaved-1f1b"):
        check([[n] for n in LAYERS], 2, "interleaved-1f1b", micro=3)
    with pytest.raises(PlaitError, match="at least one layer"):
        check([LAYERS, []], 2, "1f1b")
