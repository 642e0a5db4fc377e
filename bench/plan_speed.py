"""Planning speed of the intra-op planner: capture, ILP and exact propagation on big GPTs, and the whole search.

    python bench/plan_speed.py --json out/plan_speed.json

Rows: a 24-layer GPT (gpt2-medium) on 8 devices (dgx-a100:1) and the 96-layer GPT-175B config on a
64-device 2-D mesh (dgx-a100:8, dp=8 x tp=8). For each: the time to capture the layer view and the joint
forward+backward graph on fake tensors, to build and solve the ILP (its size), to propagate the choice
and lower and simulate the plan; plus, for the 24-layer GPT, ``plait.plan``'s whole search over every
data-parallel and intra-op candidate. Nothing is allocated: models are built on the meta device.

The peer planners cannot run here (no GPUs, other frameworks); their published search times are printed
beside for scale: Alpa about 40 minutes for GPT-39B on 64 GPUs (compile and profile every stage-mesh
candidate; its stage DP alone takes seconds), Aceso about 99 s for GPT-1.3B on 4 GPUs (Aceso, EuroSys'24).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import plait
from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.models import zoo_model
from plait.plan import MeshSpec
from plait.planners.intra_op.planner import build_intra_op_plan
from plait.planners.intra_op.source import ModelSource

PUBLISHED = "Alpa ~2400 s (GPT-39B, 64 GPUs); Aceso ~99 s (GPT-1.3B, 4 GPUs)"


@dataclass
class Row:
    """One measured planning."""

    model: str
    devices: int
    mesh: str
    nodes: int  # joint-graph nodes
    capture_s: float
    ilp_vars: int
    ilp_binaries: int
    ilp_rows: int
    solve_s: float
    plan_s: float  # ILP build + solve + propagation + lowering + simulation
    total_s: float
    step_ms: float
    search_s: float | None = None  # plait.plan over every candidate


def measure(model: str, cluster_spec: str, shape: tuple[int, int], global_batch: int, *, search: bool) -> Row:
    """Plan ``model`` on ``cluster_spec`` for the (dp, tp) mesh ``shape``; optionally time the whole search too."""
    zm = zoo_model(model)
    with torch.device("meta"):
        module = zm.build()
    cluster = load_cluster(cluster_spec)
    mesh = MeshSpec(shape=shape, axes=("dp", "tp"))
    per_rank = global_batch // shape[0]
    t0 = time.perf_counter()
    source = ModelSource(model=module, example_batch=zm.make_batch(per_rank, device="meta"), batch_size=per_rank,
                         loss_fn=zm.loss, name=model)
    graph, joint = source.graph(per_rank), source.joint(per_rank)
    t1 = time.perf_counter()
    plan, solved = build_intra_op_plan(graph, joint, cluster, mesh=mesh, model_axes=("tp",), global_batch=global_batch,
                                       joint_batch=per_rank, cost=CostModel(cluster))
    t2 = time.perf_counter()
    assert solved.solution is not None and plan.predicted is not None
    stats = solved.solution.stats
    row = Row(model=model, devices=mesh.size, mesh=f"dp={shape[0]} x tp={shape[1]}", nodes=len(joint), capture_s=t1 - t0,
              ilp_vars=stats.num_vars, ilp_binaries=stats.num_int_vars, ilp_rows=stats.num_rows, solve_s=stats.solve_s,
              plan_s=t2 - t1, total_s=t2 - t0, step_ms=plan.predicted.step_s * 1e3)
    if search:
        t3 = time.perf_counter()
        plait.plan(module, zm.make_batch(per_rank, device="meta"), cluster, global_batch=global_batch, loss_fn=zm.loss, name=model)
        row.search_s = time.perf_counter() - t3
    return row


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    head = ("| model | devices | mesh | joint nodes | capture s | ILP vars (binary) / rows | solve s | plan s | total s "
            "| predicted step ms | whole search s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        search = f"{r.search_s:.1f}" if r.search_s is not None else "-"
        lines.append(f"| {r.model} | {r.devices} | {r.mesh} | {r.nodes} | {r.capture_s:.1f} | {r.ilp_vars} ({r.ilp_binaries}) / "
                     f"{r.ilp_rows} | {r.solve_s:.2f} | {r.plan_s:.1f} | {r.total_s:.1f} | {r.step_ms:.1f} | {search} |")
    return "\n".join(lines)


def main() -> None:
    """Measure the rows, print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="the 24-layer GPT only, without the whole search")
    a = p.parse_args()
    rows = [measure("gpt2-medium", "dgx-a100:1", (1, 8), 8, search=not a.quick)]
    if not a.quick:
        rows.append(measure("gpt3-175b", "dgx-a100:8", (8, 8), 64, search=False))
    print(table(rows))
    print(f"targets: 24-layer GPT on 8 devices < 10 s; GPT-175B on 64 devices < 60 s. Published peers: {PUBLISHED}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "published": PUBLISHED}, indent=1) + "\n")


if __name__ == "__main__":
    main()
