"""Token slicing (TeraPipe): the DP against brute force, its pruning, the pipeline formula, its speed, the slice
cost model and the profiling fit."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import cast

import numpy as np
import pytest
import torch

from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph import LayerInfo, ModelGraph, capture
from plait.models import GPTConfig
from plait.models.gpt import Block
from plait.plan import BatchSpec, Instr, MeshSpec, Plan, RankProgram
from plait.plan.placement import REPLICATE
from plait.planners.token_cost import SliceCost, TokenWork, fit_context, profiled_cost, token_work
from plait.planners.token_slicing import (
    SlicingError,
    cost_table,
    pipeline_time,
    slice_tokens,
    solve_joint,
    solve_slicing,
    whole_sequences,
)
from plait.planners.token_slicing_brute import brute_joint, brute_slicing, compositions, slice_times
from plait.sim import simulate


def random_table(rng: np.random.Generator, n: int) -> np.ndarray:
    """Independent random slice times (no structure at all)."""
    return rng.uniform(0.1, 2.0, (n + 1, n + 1))


def attention_table(n: int, *, fixed: float, per_token: float, per_pair: float, micro: int = 1) -> np.ndarray:
    """TeraPipe's shape: a fixed cost per slice, work per token and per query-key pair."""
    return cost_table(lambda b, tok, ctx: fixed + b * (per_token * tok + per_pair * tok * (tok + ctx)), micro, n)


def flow_shop(times: Sequence[float], num_stages: int) -> float:
    """Makespan of cells run in order through ``num_stages`` stages, each taking its cell's time on every stage."""
    done = [0.0] * num_stages
    for t in times:
        for k in range(num_stages):
            done[k] = max(done[k], done[k - 1] if k else 0.0) + t
    return done[-1]


# ---- the DP against brute force -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force_on_random_costs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 14 if seed < 3 else int(rng.integers(1, 15))
    table = random_table(rng, n)
    for k in sorted({1, 2, int(rng.integers(3, 17)), 16}):
        found = solve_slicing(table, k)
        best, _ = brute_slicing(table, k)
        assert found.total_s == pytest.approx(best, rel=1e-12)
        units = found.slices[0][1]
        assert sum(units) == n
        assert found.total_s == pytest.approx(pipeline_time(slice_times(table, units), k))


@pytest.mark.parametrize(("fixed", "per_token", "per_pair"), [(0.5, 1.0, 0.05), (0.0, 1.0, 0.3), (3.0, 0.2, 0.01)])
def test_dp_equals_brute_force_on_attention_costs(fixed: float, per_token: float, per_pair: float) -> None:
    table = attention_table(14, fixed=fixed, per_token=per_token, per_pair=per_pair)
    for k in (1, 2, 4, 8, 16):
        found = solve_slicing(table, k)
        assert found.total_s == pytest.approx(brute_slicing(table, k)[0], rel=1e-12)


def test_later_slices_are_shorter_when_attention_weighs() -> None:
    found = solve_slicing(attention_table(14, fixed=4.0, per_token=1.0, per_pair=0.3), 4)
    units = found.slices[0][1]
    assert len(units) > 1 and units[0] > units[-1]
    assert list(units) == sorted(units, reverse=True)


@pytest.mark.parametrize("seed", range(6))
def test_joint_dp_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n, batch = int(rng.integers(2, 7)), int(rng.integers(1, 5))
    sizes = sorted({1, *rng.choice(np.arange(1, batch + 1), size=rng.integers(1, batch + 1)).tolist()})
    fixed = rng.uniform(0.0, 2.0)
    tables = {}
    for b in sizes:  # a larger micro-batch amortises the fixed cost; some noise breaks ties
        noise = rng.uniform(0.0, 0.2, (n + 1, n + 1))
        tables[b] = attention_table(n, fixed=fixed, per_token=1.0, per_pair=0.2, micro=b) + noise
    for k in (1, 3, 8):
        found = solve_joint(tables, batch, k)
        best, picks = brute_joint(tables, batch, k)
        assert found.total_s == pytest.approx(best, rel=1e-12)
        assert sum(b for b, _ in found.slices) == batch
        assert found.num_cells == len(found.times) == sum(len(s) for _, s in found.slices)


def test_micro_batches_of_one_size_may_share_their_slicing() -> None:
    rng = np.random.default_rng(7)
    tables = {b: random_table(rng, 4) * b for b in (1, 2)}
    for k in (1, 2, 5):
        shared = brute_joint(tables, 3, k)[0]
        assert shared == pytest.approx(brute_joint(tables, 3, k, shared=False)[0])
        assert solve_joint(tables, 3, k).total_s == pytest.approx(shared)


def test_micro_batch_only_is_the_whole_sequence_per_micro_batch() -> None:
    n = 8
    tables = {b: attention_table(n, fixed=1.0, per_token=1.0, per_pair=0.1, micro=b) for b in (1, 2, 4)}
    found = solve_joint({b: whole_sequences(t) for b, t in tables.items()}, 4, 6)
    assert all(s == (n,) for _, s in found.slices)
    splits = {(4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)}
    expect = min(pipeline_time([float(tables[b][n, 0]) for b in split], 6) for split in splits)
    assert found.total_s == pytest.approx(expect)
    assert solve_joint(tables, 4, 6).total_s <= found.total_s


# ---- the pruning ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_pruning_does_not_change_the_optimum(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(10, 33))
    tables = [random_table(rng, n), attention_table(n, fixed=rng.uniform(0, 2), per_token=1.0, per_pair=rng.uniform(0, 0.2))]
    for table, k in itertools.product(tables, (1, 2, 6, 16)):
        pruned, every = solve_slicing(table, k), solve_slicing(table, k, prune=False)
        assert pruned.total_s == pytest.approx(every.total_s, rel=1e-12)
        assert pruned.num_candidates <= every.num_candidates
        assert every.num_candidates == len(np.unique(table[np.isfinite(table) & (np.arange(n + 1)[:, None] >= 1)
                                                           & (np.add.outer(np.arange(n + 1), np.arange(n + 1)) <= n)]))


def test_pruning_evaluates_few_t_max_values() -> None:
    table = attention_table(64, fixed=1.0, per_token=1.0, per_pair=0.05)
    pruned, every = solve_slicing(table, 16), solve_slicing(table, 16, prune=False)
    assert pruned.total_s == pytest.approx(every.total_s)
    assert pruned.num_candidates < every.num_candidates / 4


def test_skipping_near_equal_t_max_costs_at_most_k_minus_1_eps() -> None:
    rng = np.random.default_rng(5)
    for _ in range(5):
        table = random_table(rng, 12)
        for k, eps in itertools.product((2, 8, 16), (0.01, 0.05, 0.2)):
            exact, rough = solve_slicing(table, k), solve_slicing(table, k, eps=eps)
            assert exact.total_s - 1e-12 <= rough.total_s <= exact.total_s + (k - 1) * eps + 1e-12
            assert rough.total_s == pytest.approx(pipeline_time(rough.times, k))


# ---- the pipeline formula ------------------------------------------------------------------------------------------


def test_pipeline_formula_is_the_flow_shop_makespan() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        times = rng.uniform(0.0, 1.0, int(rng.integers(1, 12))).tolist()
        k = int(rng.integers(1, 17))
        assert flow_shop(times, k) == pytest.approx(pipeline_time(times, k), rel=1e-12)
        assert flow_shop(rng.permutation(times).tolist(), k) == pytest.approx(pipeline_time(times, k), rel=1e-12)
    tables = {b: attention_table(10, fixed=0.5, per_token=1.0, per_pair=0.1, micro=b) for b in (1, 2)}
    found = solve_joint(tables, 3, 7)
    assert flow_shop(found.times, 7) == pytest.approx(found.total_s, rel=1e-12)


class SecondsCost:
    """A cost model whose compute instruction takes ``flops`` seconds and whose transfers are free."""

    overlaps_comm = True

    def at_concurrency(self, level: int) -> SecondsCost:
        return self

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        return flops

    def optimizer_time(self, num_params: float, *, num_tensors: int = 0) -> float:
        return 0.0

    def collective_time(self, op: str, nbytes: float, group: Sequence[int]) -> float:
        return 0.0

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        return 0.0


def sliced_pipeline_plan(times: Sequence[float], num_stages: int) -> Plan:
    """One program per stage: per cell, receive it from the stage before, compute it, send it on."""
    programs = []
    for k in range(num_stages):
        instrs: list[Instr] = []
        for j, t in enumerate(times):
            deps: tuple[int, ...] = ()
            if k:
                instrs.append(Instr(op="recv", stream="comm", name=f"act {k - 1}>{k} c{j}", group=(k - 1, k)))
                deps = (len(instrs) - 1,)
            instrs.append(Instr(op="compute", stream="compute", name=f"cell {j}", flops=t, num_kernels=1, deps=deps))
            if k < num_stages - 1:
                instrs.append(Instr(op="send", stream="comm", name=f"act {k}>{k + 1} c{j}", group=(k, k + 1),
                                    deps=(len(instrs) - 1,)))
        programs.append(RankProgram(ranks=(k,), instrs=tuple(instrs)))
    layer = LayerInfo(index=0, name="fc", kind="Linear", fwd_flops=1, bwd_flops=2, num_params=0, param_bytes=0,
                      activation_bytes=0, output_bytes=8, output_shape=(1, 2), fwd_bytes_moved=0, num_kernels=1)
    graph = ModelGraph(name="cells", dtype="fp32", batch_size=1, input_shapes=((1, 2),), layers=(layer,), params=())
    return Plan(model=graph, cluster=load_cluster("dgx-a100:1"), mesh=MeshSpec(shape=(num_stages,), axes=("pp",)),
                batch=BatchSpec(global_size=1, micro_size=1, placements=(REPLICATE,)), params=(), programs=tuple(programs))


@pytest.mark.parametrize("num_stages", [1, 2, 5, 8])
def test_pipeline_formula_holds_in_the_simulator(num_stages: int) -> None:
    found = solve_slicing(attention_table(12, fixed=0.3, per_token=1.0, per_pair=0.2), num_stages)
    result = simulate(sliced_pipeline_plan(found.times, num_stages), cast(CostModel, SecondsCost()))
    assert result.prediction.step_s == pytest.approx(found.total_s, rel=1e-9)


# ---- speed ------------------------------------------------------------------------------------------------------------


def gpt_block_work(hidden: int) -> TokenWork:
    """A GPT block's work by the textbook formulas (fp16): 24 h^2 FLOPs per token forward, 4 h per query-key pair."""
    return TokenWork(fwd_flops=(0.0, 24.0 * hidden**2, 4.0 * hidden), bwd_flops=(0.0, 48.0 * hidden**2, 10.0 * hidden),
                     fwd_bytes=(24.0 * hidden**2, 80.0 * hidden, 0.0), num_kernels=11, boundary_bytes=2.0 * hidden,
                     dtype="fp16")


@pytest.mark.parametrize("num_stages", [4, 48])
def test_dp_for_2048_tokens_at_granularity_8_is_fast(num_stages: int) -> None:
    cost = SliceCost(work=gpt_block_work(12288), cost=CostModel(load_cluster("p3.16xlarge:48")), num_layers=2, tp=8)
    table = cost.table(1, 256, 8)
    t0 = time.perf_counter()
    found = solve_slicing(table, num_stages, granularity=8)
    assert time.perf_counter() - t0 < 5.0
    assert found.search_s < 5.0
    assert sum(found.slices[0][1]) == 2048 and all(s % 8 == 0 for s in found.slices[0][1])
    assert found.total_s < pipeline_time([float(table[256, 0])], num_stages)


# ---- the slice cost model ------------------------------------------------------------------------------------------


def test_token_work_of_a_captured_gpt_block_is_the_textbook_count() -> None:
    h, graphs = 64, []
    for s in (16, 32, 64):
        with torch.device("meta"):
            block = Block(GPTConfig(seq_len=s, num_layers=1, num_heads=2, hidden=h))
        graphs.append(capture(block, (torch.empty(2, s, h, device="meta"),), with_ops=False))
    work = token_work(graphs)
    assert work.fwd_flops[1] == pytest.approx(24 * h * h)  # QKV, proj, fc1, fc2 per token
    assert work.fwd_flops[2] == pytest.approx(4 * h)  # QK^T and AV per query-key pair
    assert abs(work.fwd_flops[0]) < 1e-3 * h * h
    assert work.bwd_flops[1] == pytest.approx(2 * work.fwd_flops[1])
    assert work.boundary_bytes == 4 * h  # fp32 hidden state per token
    assert work.fwd_bytes[0] > 12 * h * h * 4 * 0.9  # the weights are read once per slice


def test_slice_cost_is_the_cost_model_and_grows_with_context() -> None:
    cost = CostModel(load_cluster("p3.16xlarge:4"))
    work = gpt_block_work(4096)
    stage = SliceCost(work=work, cost=cost, num_layers=3, dtype="fp16")
    tok, ctx = 256, 1024
    flops = 3 * (work.fwd_flops[1] * tok + work.fwd_flops[2] * tok * (tok + ctx))
    moved = 3 * (work.fwd_bytes[0] + work.fwd_bytes[1] * tok)
    expect = cost.compute_time(flops, moved, dtype="fp16", num_kernels=33)
    bwd = 3 * (work.bwd_flops[1] * tok + work.bwd_flops[2] * tok * (tok + ctx))
    expect += cost.compute_time(bwd, 2 * moved, dtype="fp16", num_kernels=66)
    expect += 2 * cost.p2p_time(tok * work.boundary_bytes, 7, 8)
    assert float(stage(1, np.array([tok]), np.array([ctx]))[0]) == pytest.approx(expect, rel=1e-12)
    times = stage(1, np.full(5, 64), np.array([0, 256, 512, 1024, 2048]))
    assert np.all(np.diff(times) > 0)
    skip = SliceCost(work=work, cost=cost, num_layers=3, dtype="fp16", causal_skip=True)
    assert np.all(skip(1, np.full(5, 64), np.array([0, 256, 512, 1024, 2048])) < times)
    sharded = SliceCost(work=work, cost=cost, num_layers=3, dtype="fp16", tp=8)
    one = (np.array([tok]), np.array([ctx]))
    assert sharded.compute_s(1, *one)[0] < stage.compute_s(1, *one)[0]
    assert SliceCost(work=work, cost=cost, last_stage=True).boundary_s(1, one[0])[0] == 0.0


def test_token_slicing_beats_micro_batch_only_under_one_cost_model() -> None:
    stage = SliceCost(work=gpt_block_work(12288), cost=CostModel(load_cluster("p3.16xlarge:48")), num_layers=2, tp=8)
    sliced = slice_tokens(stage, 2048, 48, granularity=64, batch=2)
    whole = solve_joint({b: whole_sequences(stage.table(b, 32, 64)) for b in (1, 2)}, 2, 48, granularity=64)
    assert sliced.total_s < whole.total_s / 3
    assert all(sum(s) == 2048 for _, s in sliced.slices)


# ---- the profiling fit ---------------------------------------------------------------------------------------------


def test_fit_recovers_known_coefficients_and_predicts_held_out_points() -> None:
    rng = np.random.default_rng(3)
    truth = (2e-6, 5e-7, 3e-9)
    grid = {(b, t): 1e-3 + 1e-5 * b * t + 1e-4 * rng.uniform() for b in (1, 2, 4) for t in range(8, 257, 8)}
    b = rng.choice([1, 2, 4], 200)
    tok = rng.choice(np.arange(8, 257, 8), 200)
    ctx = rng.choice(np.arange(0, 2049, 8), 200)
    base = np.array([grid[(int(x), int(y))] for x, y in zip(b, tok, strict=True)])
    exact = base + truth[0] * b * tok + truth[1] * b * ctx + truth[2] * b * tok * ctx
    fit = fit_context(grid, b, tok, ctx, exact * (1 + rng.normal(0, 1e-4, 200)))
    assert fit.coef == pytest.approx(truth, rel=0.02)
    assert fit.num_holdout == 50 and fit.num_fit == 150
    assert fit.holdout_error < 1e-3 and fit.max_holdout_error < 1e-2
    cost = profiled_cost(grid, fit, num_layers=2)
    t = cost(2, np.array([64]), np.array([512]))[0]
    assert t == pytest.approx(2 * (grid[(2, 64)] + fit.extra_s(2, 64, 512)))
    found = slice_tokens(cost, 256, 4, granularity=8, batch=2, micro_sizes=[1, 2])
    assert sum(b for b, _ in found.slices) == 2


# ---- errors ---------------------------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_plait_error() -> None:
    table = random_table(np.random.default_rng(0), 4)
    with pytest.raises(PlaitError, match="multiple of the granularity"):
        slice_tokens(lambda b, tok, ctx: tok + 0.0 * ctx, 100, 4, granularity=8)
    with pytest.raises(PlaitError, match="num_stages"):
        solve_slicing(table, 0)
    with pytest.raises(PlaitError, match="batch"):
        solve_joint({1: table}, 0, 2)
    with pytest.raises(PlaitError, match="square"):
        solve_slicing(table[:, :3], 2)
    with pytest.raises(PlaitError, match="NaN or negative"):
        solve_slicing(np.where(np.eye(5, dtype=bool), np.nan, table), 2)
    with pytest.raises(PlaitError, match="sizes must lie in"):
        solve_joint({1: table, 3: table}, 2, 2)
    with pytest.raises(PlaitError, match="no split of the batch"):
        solve_joint({2: table}, 3, 2)
    with pytest.raises(PlaitError, match="eps"):
        solve_slicing(table, 2, eps=-1.0)
    with pytest.raises(SlicingError, match="finite"):
        solve_slicing(np.full((5, 5), np.inf), 2)
    with pytest.raises(PlaitError, match="no-context grid"):
        fit_context({(1, 8): 1.0}, [1, 1, 1, 1], [8, 8, 8, 16], [0, 8, 16, 24], [1.0, 1.1, 1.2, 1.3])
    with pytest.raises(PlaitError, match="fewer than 3"):
        fit_context({(1, 8): 1.0}, [1, 1], [8, 8], [0, 8], [1.0, 1.1])
    with pytest.raises(PlaitError, match="three or more sequence lengths"):
        token_work([])
    with pytest.raises(PlaitError, match="num_layers"):
        SliceCost(work=gpt_block_work(64), cost=CostModel(load_cluster("p3.16xlarge:1")), tp=0)


def test_compositions_enumerate_every_slicing() -> None:
    for n in range(1, 9):
        found = list(compositions(n))
        assert len(found) == 2 ** (n - 1) == len(set(found))
        assert all(sum(c) == n for c in found)
