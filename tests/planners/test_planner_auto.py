"""The automatic choice on hand-built graphs, against a brute-force search over every fixed plan."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import pytest
import torch
from plankit import candidate_kind, dense_graph, dp_kind, gpu_cluster

from plait.cluster import Cluster, cluster_from_dict
from plait.errors import NoFeasiblePlanError, PlaitError
from plait.graph import ModelGraph
from plait.plan import plan_from_json, plan_text, plan_to_json
from plait.planners import DEFAULT_BUCKET_SIZES, build_dp_plan, micro_options, plan


def cpu_cluster(ranks: int = 4, *, memory_gb: float = 4) -> Cluster:
    """local:4-like numbers, pinned: 15 GFLOP/s per rank, loopback 1 GB/s with 60 us latency."""
    link = {"latency_us": 60, "bandwidth_gb_s": 1.0}
    return cluster_from_dict(
        {"name": f"cpu:{ranks}", "num_nodes": 1, "devices_per_node": ranks,
         "device": {"name": "cpu", "kind": "cpu", "peak_tflops": {"fp32": 0.015}, "memory_gb": memory_gb,
                    "memory_bandwidth_gb_s": 5},
         "links": {"intra_node": link, "inter_node": link}},
        where="test",
    )


def test_small_model_on_four_cpu_ranks_prefers_replicate() -> None:
    chosen = plan(dense_graph(8, 64, 8), None, cpu_cluster())
    assert dp_kind(chosen) == "replicate"
    kinds = [candidate_kind(c.name) for c in chosen.candidates]
    assert kinds == ["replicate"] * len(DEFAULT_BUCKET_SIZES) + ["fsdp", "hybrid"]
    hybrid = chosen.candidates[-1]
    assert not hybrid.fits and "not applicable" in hybrid.note and "one node" in hybrid.note
    fsdp = chosen.candidates[-2]
    assert fsdp.fits and "slower" in fsdp.note and "more exposed communication" in fsdp.note
    assert sum(c.note.startswith("chosen") for c in chosen.candidates) == 1
    assert chosen.predicted is not None and chosen.provenance is not None
    assert set(chosen.provenance.passes) == {"capture", "score_candidates", "choose"}


def test_model_too_big_to_replicate_picks_fsdp() -> None:
    graph = dense_graph(8, 4096, 8)  # 537 MB of fp32 parameters: replicated with AdamW ~2.15 GB
    chosen = plan(graph, None, gpu_cluster(memory_gb=1.5))
    assert dp_kind(chosen) == "fsdp"
    for c in chosen.candidates[: len(DEFAULT_BUCKET_SIZES)]:
        assert not c.fits and c.peak_memory_bytes > c.memory_limit_bytes and "does not fit" in c.note
        assert c.num_micro == 8  # tried down to micro-batch 1 before giving up
    assert chosen.predicted is not None
    assert max(chosen.predicted.peak_memory_bytes) <= int(1.5e9 * 0.9)


def test_hybrid_wins_on_two_nodes_with_slow_inter_node_links() -> None:
    graph = dense_graph(8, 2048, 8)  # replicated state ~537 MB does not fit a 0.5 GB device
    slow = plan(graph, None, gpu_cluster(2, memory_gb=0.5, inter_gb_s=1), precision="fp32")
    assert dp_kind(slow) == "hybrid" and slow.mesh.axes == ("dp_replicate", "dp_shard")
    by_kind = {candidate_kind(c.name): c for c in slow.candidates}
    assert by_kind["fsdp"].step_s > 1.2 * by_kind["hybrid"].step_s
    assert "more exposed communication" in by_kind["fsdp"].note
    fast = plan(graph, None, gpu_cluster(2, memory_gb=0.5, inter_gb_s=300), precision="fp32")
    fast_by_kind = {candidate_kind(c.name): c for c in fast.candidates}
    # with inter-node links as fast as NVLink, sharding over all 8 ranks costs no more than hybrid
    assert fast_by_kind["fsdp"].step_s <= 1.05 * fast_by_kind["hybrid"].step_s


def test_accumulates_micro_batches_when_activations_need_it() -> None:
    graph = dense_graph(4, 256, 8, act_scale=4096)  # 33.5 MB of activations per sample-batch of 8
    chosen = plan(graph, None, cpu_cluster(memory_gb=0.2), global_batch=256)
    assert chosen.batch.num_micro > 1
    assert chosen.batch.micro_size * chosen.batch.num_micro * 4 == 256
    winner = next(c for c in chosen.candidates if c.note.startswith("chosen"))
    assert f"{chosen.batch.num_micro} micro-batches" in winner.note


def _brute_force(graph: ModelGraph, cluster: Cluster, global_batch: int, limit: int) -> float:
    best = float("inf")
    kinds = ["replicate", "fsdp"] + (["hybrid"] if cluster.num_nodes > 1 else [])
    for kind, bucket in itertools.product(kinds, DEFAULT_BUCKET_SIZES):
        for n in micro_options(global_batch, cluster.world_size, None):
            p = build_dp_plan(graph, cluster, kind=kind, global_batch=global_batch, bucket_bytes=bucket, num_micro=n)  # type: ignore[arg-type]
            assert p.predicted is not None
            if max(p.predicted.peak_memory_bytes) <= limit:
                best = min(best, p.predicted.step_s)
    return best


@pytest.mark.parametrize(
    "graph,cluster",
    [
        (dense_graph(6, 1024, 8), gpu_cluster(2, memory_gb=0.3, inter_gb_s=2)),
        (dense_graph(4, 128, 8, act_scale=64), cpu_cluster(memory_gb=0.01)),
        (dense_graph(8, 512, 8), gpu_cluster(1)),
    ],
)
def test_choice_matches_brute_force_over_fixed_plans(graph: ModelGraph, cluster: Cluster) -> None:
    chosen = plan(graph, None, cluster, global_batch=64)
    limit = int(cluster.device.memory_bytes * 0.9)
    assert chosen.predicted is not None
    assert chosen.predicted.step_s == pytest.approx(_brute_force(graph, cluster, 64, limit), rel=1e-12)


def test_no_feasible_plan_lists_each_candidate() -> None:
    graph = dense_graph(8, 4096, 8)
    with pytest.raises(NoFeasiblePlanError) as info:
        plan(graph, None, gpu_cluster(memory_gb=0.4))
    text = str(info.value)
    assert "fits no plan on test-gpu:1" in text and "360.0 MB per device (90% of 400.0 MB)" in text
    for name in ("replicate, bucket 1 MiB", "replicate, bucket 100 MiB", "fsdp, unit = layer", "hybrid, unit = layer"):
        assert name in text
    assert text.count("needs") >= 5 and "not applicable" in text
    assert "would fit on about" in text and "Try more devices" in text
    needed = int(re.search(r"would fit on about (\d+) such devices", text).group(1))  # type: ignore[union-attr]
    bigger = plan(graph, None, gpu_cluster(devices=needed, memory_gb=0.4), global_batch=needed)
    assert dp_kind(bigger) == "fsdp"
    with pytest.raises(NoFeasiblePlanError, match=r"gathered layers \(\d+.\d MB\) alone exceed the limit"):
        plan(graph, None, gpu_cluster(memory_gb=0.2))


def test_plan_json_round_trip_keeps_candidates() -> None:
    chosen = plan(dense_graph(4, 256, 8), None, gpu_cluster(2))
    again = plan_from_json(plan_to_json(chosen))
    assert again == chosen and len(again.candidates) == 6
    text = plan_text(chosen, width=200)
    assert "candidates" in text and "chosen: fastest that fits" in text


def test_bad_options_raise(make_graph: Callable[..., ModelGraph]) -> None:
    with pytest.raises(PlaitError, match="memory_fraction"):
        plan(make_graph(), None, gpu_cluster(), memory_fraction=1.5)
    with pytest.raises(PlaitError, match="multiple of 4"):
        plan(make_graph(), None, gpu_cluster(), global_batch=30)
    with pytest.raises(PlaitError, match="example batch"):
        plan(torch.nn.Linear(2, 2), None, gpu_cluster())
    with pytest.raises(PlaitError, match="unknown cluster preset"):
        plan(make_graph(), None, "nope:2")


def test_plans_a_module_by_capturing_it() -> None:
    from plait.models import zoo_model

    zoo = zoo_model("mlp-tiny")
    with torch.device("meta"):
        model = zoo.build()
    chosen = plan(model, zoo.make_batch(8, device="meta"), gpu_cluster(), loss_fn=zoo.loss, name="mlp-tiny")
    assert chosen.model.name == "mlp-tiny" and chosen.batch.global_size == 8 * 4
    assert {p.name for p in chosen.params} == {n for n, _ in model.named_parameters()}


def test_planners_and_simulator_never_import_the_runtime() -> None:
    import subprocess
    import sys

    code = (
        "import sys, plait.planners, plait.sim, plait.cli.plan_cmd, plait.cli.sim_cmd\n"
        "bad = [m for m in sys.modules if m.startswith(('plait.runtime', 'plait.scheduler'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
