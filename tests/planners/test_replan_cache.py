"""Re-planning from a ReplanCache: the same plan as a cold re-plan, without capturing the model or solving the
stages' intra-op ILPs again (issue 10, re-plan speed)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import plait.graph
import plait.planners.intra_op.source as source_module
import plait.planners.stage_configs as stage_configs
from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.plan.io import plan_to_json
from plait.plan.ir import Plan
from plait.planners.replan_cache import ReplanCache, batch_rows, cost_key
from plait.planners.request import PlanRequest, Replanner, replan
from plait.runtime.elastic_launch import ElasticRun

# two nodes of two A100s: a resize to 2 devices keeps the node's kind, so the tensor-parallel ILPs stay valid
PAIRS = """\
name: a100-pairs:2
num_nodes: 2
devices_per_node: 2
device:
  name: A100-SXM4-80GB
  kind: cuda
  peak_tflops: {bf16: 312, fp32: 19.5}
  memory_gb: 80
  memory_bandwidth_gb_s: 2039
links:
  intra_node: {latency_us: 8, bandwidth_gb_s: 300}
  inter_node: {latency_us: 12, bandwidth_gb_s: 25}
"""
TIMINGS = ("created", "search_s", "passes")  # what two plannings of one request may differ in


@pytest.fixture
def pairs(tmp_path: Path) -> str:
    """The path of the two-node cluster YAML."""
    path = tmp_path / "pairs.yaml"
    path.write_text(PAIRS)
    return str(path)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often the model is captured (layer view, joint graph; also counted per batch size, ``capture@2``) and the
    stages' ILP is solved: the real functions, counted."""
    counts: Counter[str] = Counter()

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            if name != "stage ilp":
                counts[f"{name}@{batch_rows(args[1])}"] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(plait.graph, "capture", counted("capture", plait.graph.capture))  # auto.plan's layer view
    monkeypatch.setattr(source_module, "capture", counted("capture", source_module.capture))
    monkeypatch.setattr(source_module, "capture_joint", counted("joint", source_module.capture_joint))
    monkeypatch.setattr(stage_configs, "solve_model_axes", counted("stage ilp", stage_configs.solve_model_axes))
    return counts


def same_plan(a: Plan, b: Plan) -> bool:
    """Whether two plans' JSON agree in everything but their planning times."""
    def strip(plan: Plan) -> dict[str, Any]:
        raw = json.loads(plan_to_json(plan))
        raw["provenance"] = {k: v for k, v in raw["provenance"].items() if k not in TIMINGS}
        return raw  # type: ignore[no-any-return]
    return strip(a) == strip(b)


def test_cached_replan_is_the_cold_replan(pairs: str, calls: Counter[str]) -> None:
    """Every family, 4 -> 2 devices at 2 samples per rank, as the elastic launcher runs it: its Replanner warmed on the
    running plan, then the resize. The re-plan is the cold re-plan's plan, captures nothing at 2 per rank and solves no
    stage ILP (the intra-op candidate dp=1 x tp=2 captures at 8 per rank, which no earlier planning needed)."""
    first = PlanRequest(model="gpt-tiny", cluster=pairs, micro_batch=2).plan()
    replanner = Replanner()
    calls.clear()
    replanner.warm(first)
    assert calls["stage ilp"] == 1 and calls["joint@2"] == 1 and replanner.cache.made == 1  # tp=2: one ILP
    calls.clear()
    cached = replanner(first, 2)
    assert calls["stage ilp"] == 0 and calls["capture@2"] == 0 and calls["joint@2"] == 0, calls
    assert replanner.cache.reused == 1 and replanner.last is not None and replanner.last.plan is cached
    cold = replan(first, 2)
    assert calls["stage ilp"] == 1 and calls["capture@2"] >= 1  # the counters count: a cold re-plan solves and captures
    assert cached.world_size == 2 and same_plan(cached, cold.plan)


def test_first_planning_fills_the_cache(pairs: str, calls: Counter[str]) -> None:
    """A job planned with the cache (``PlanRequest.plan(cache=...)``) re-plans from it: 4 -> 2 -> 4 devices capture
    nothing and solve no ILP, and give the cold plans."""
    cache = ReplanCache()
    plan = PlanRequest(model="gpt-tiny", cluster=pairs, micro_batch=2, family="pipeline").plan(cache=cache)
    assert calls["joint"] == 1 and calls["stage ilp"] == 1
    calls.clear()
    two = replan(plan, 2, cache=cache).plan
    back = replan(two, 4, cache=cache).plan
    assert two.world_size == 2 and back.world_size == 4 and sum(calls.values()) == 0, calls
    assert cache.made == 1 and cache.reused == 2
    assert same_plan(two, replan(plan, 2).plan) and same_plan(back, replan(two, 4).plan)


def test_other_per_rank_batch_captures_again(pairs: str) -> None:
    """A resize that changes the per-rank batch (global batch 8: 2 per rank on 4 devices, 4 on 2) captures at the new
    size, and the plan is still the cold one."""
    cache = ReplanCache()
    first = PlanRequest(model="gpt-tiny", cluster=pairs, batch=8, family="pipeline").plan(cache=cache)
    cached = replan(first, 2, cache=cache)
    assert cache.made == 2 and cache.reused == 0
    assert same_plan(cached.plan, replan(first, 2).plan)


def test_cost_key_ignores_only_the_node_count(pairs: str) -> None:
    """More or fewer nodes of one kind share the key; another node size, device or profile does not."""
    a100 = load_cluster("dgx-a100:8")
    assert cost_key(CostModel(a100)) == cost_key(CostModel(load_cluster("dgx-a100:6")))
    assert cost_key(CostModel(load_cluster(pairs))) != cost_key(CostModel(a100))
    assert cost_key(CostModel(load_cluster("dgx-h100:8"))) != cost_key(CostModel(a100))
    assert cost_key(CostModel(a100, "h200")) != cost_key(CostModel(a100))
    assert cost_key(CostModel(load_cluster("local:2"))) != cost_key(CostModel(load_cluster("local:4")))


def test_launcher_warms_a_replanner(tmp_path: Path, pairs: str) -> None:
    """ElasticRun warms a replan that has ``warm`` (in a thread, on the running plan) unless told not to."""
    from plait.plan.io import save_plan

    plan_path = save_plan(PlanRequest(model="gpt-tiny", cluster=pairs, micro_batch=2, family="pipeline").plan(),
                          tmp_path / "plan.json")
    warmed: list[int] = []

    class Probe:
        def __call__(self, plan: Plan, nproc: int) -> Plan:
            raise AssertionError("no resize here")

        def warm(self, plan: Plan) -> None:
            warmed.append(plan.world_size)

    for warm, expected in ((True, [4]), (False, [])):
        warmed.clear()
        job = ElasticRun("train.py", plan=plan_path, out_dir=tmp_path / "out", replan=Probe(), warm=warm)
        job._start_warming()
        if job._warming is not None:
            job._warming.join(timeout=30)
        assert warmed == expected
