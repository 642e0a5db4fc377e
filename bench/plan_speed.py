"""Planning speed: the intra-op planner (capture, ILP and exact propagation on big GPTs, and the whole search) and
the pipeline planner (GPT-39B on 64 A100s, GPT-1T on 3,072), with the time of every pass.

    python bench/plan_speed.py --json out/plan_speed.json
    python bench/plan_speed.py --pipeline       # the pipeline rows only
    python bench/plan_speed.py --replan         # elastic re-plan: GPT-13B from 64 to 48 A100s (--replan pipeline: one family)

Rows: a 24-layer GPT (gpt2-medium) on 8 devices (dgx-a100:1) and the 96-layer GPT-175B config on a
64-device 2-D mesh (dgx-a100:8, dp=8 x tp=8). For each: the time to capture the layer view and the joint
forward+backward graph on fake tensors, to build and solve the ILP (its size), to propagate the choice
and lower and simulate the plan; plus, for the 24-layer GPT, ``plait.plan``'s whole search over every
data-parallel and intra-op candidate. Nothing is allocated: models are built on the meta device.

Pipeline rows run the steps of ``plan_pipeline_full`` one by one and time each: capture of the layer view (bf16
autocast, meta device) and of the joint forward+backward graph, the intra-op ILP once per tensor-parallel size
(2, 4, 8), the stage search (grouping, pricing of the stage candidates, the stage DPs, the full price of the
shortlisted pipelines and their simulation) and the final lowering and simulation under 1F1B and zero-bubble.
GPT-39B is the zoo's ``gpt-39b`` (Alpa's largest GPT) at global batch 512; GPT-1T is the Megatron-LM scaling
study's largest row (``bench/plan_quality_scaling.py``) at its batch of 3,072. When no pipeline fits the memory
limit the search ends with that answer; the row then also times a search under the memory Megatron-LM's
configuration of that row needs by the planner's own memory check (its simulated peak or the bound the planner
checks, whichever is larger), which ends in a plan.

Re-plan rows (``--replan``) time an elastic resize as ``plait run --elastic`` runs it: the launcher's ``Replanner``
is warmed on the running plan (the model's captures and the stages' tensor-parallel ILPs for GPT-13B's recorded
request at its own 64 A100s; the launcher runs it while the job trains, reported apart), then re-plans the request
for 48 A100s from its cache (timed, pass by pass: the layer view and the
stages' tensor-parallel ILPs come from the cache, the stage search and the weighing of every candidate run again),
and, for comparison, without the cache; the two plans' JSON must agree but for their timings.

The peer planners cannot run here (no GPUs, other frameworks); their published search times are printed
beside for scale: Alpa about 40 minutes for GPT-39B on 64 GPUs (compile and profile every stage-mesh
candidate; its stage DP alone takes seconds), Aceso about 99 s for GPT-1.3B on 4 GPUs (Aceso, EuroSys'24).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import plait  # noqa: E402
from plait.cluster import load_cluster  # noqa: E402
from plait.cost import CostModel  # noqa: E402
from plait.graph import capture  # noqa: E402
from plait.models import GPT, GPT_CONFIGS, GPTConfig, lm_batch, lm_loss, zoo_model  # noqa: E402
from plait.plan import MeshSpec  # noqa: E402
from plait.plan.table import model_flops_per_step  # noqa: E402
from plait.planners.data_parallel import resolve_precision  # noqa: E402
from plait.planners.intra_op.planner import build_intra_op_plan  # noqa: E402
from plait.planners.intra_op.source import ModelSource  # noqa: E402
from plait.planners.pipeline import PipelineOptions, plan_pipeline  # noqa: E402
from plait.planners.pipeline_plan import SCHEDULES, build_pipeline_plan, fastest_that_fits, sharded_layers  # noqa: E402
from plait.planners.stage_configs import tensor_parallel_sizes  # noqa: E402
from plait.planners.stage_dp import StageError  # noqa: E402

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


@dataclass
class PipelineRow:
    """One timed pipeline planning, pass by pass (seconds), and what it chose."""

    model: str
    devices: int
    global_batch: int
    memory_fraction: float
    capture_s: float  # the layer view
    joint_s: float  # the joint forward+backward graph (what the ILP reads)
    ilp_s: float  # one ILP per tensor-parallel size
    group_s: float
    pricing_s: float
    dp_s: float
    search_other_s: float
    choices_s: float  # full prices of the shortlisted pipelines
    shortlist_sim_s: float  # their lowering and simulation
    lower_sim_s: float  # the chosen pipeline under 1F1B and zero-bubble
    total_s: float
    problems: int = 0
    candidates: int = 0
    answer: str = ""  # the plan, or why none fits
    step_s: float | None = None
    tflops_per_gpu: float | None = None


def measure_pipeline(model: str, cfg: GPTConfig, cluster_spec: str, global_batch: int, *,
                     memory_fraction: float = 0.9) -> PipelineRow:
    """Plan ``cfg`` as a pipeline on ``cluster_spec`` (stages of one submesh shape) and time every pass."""
    cluster = load_cluster(cluster_spec)
    cost = CostModel(cluster)
    precision = resolve_precision("bf16", cluster)
    t0 = time.perf_counter()
    with torch.device("meta"):
        module = GPT(cfg)
    batch = lm_batch(cfg, 1, device="meta")
    graph = capture(module, batch, name=model, loss_fn=lm_loss, with_ops=False, autocast="bf16")
    t1 = time.perf_counter()
    source = ModelSource(model=module, example_batch=batch, batch_size=1, loss_fn=lm_loss, name=model, autocast="bf16")
    source.joint(1)
    t2 = time.perf_counter()
    sharded = sharded_layers(source, cluster, cost, tp_sizes=tensor_parallel_sizes(cluster), joint_batch=1,
                             precision=precision, optimizer="adamw")
    t3 = time.perf_counter()
    options = PipelineOptions(same_size=True, memory_fraction=memory_fraction)
    row = PipelineRow(model=model, devices=cluster.world_size, global_batch=global_batch, memory_fraction=memory_fraction,
                      capture_s=t1 - t0, joint_s=t2 - t1, ilp_s=t3 - t2, group_s=0.0, pricing_s=0.0, dp_s=0.0,
                      search_other_s=0.0, choices_s=0.0, shortlist_sim_s=0.0, lower_sim_s=0.0, total_s=0.0)
    try:
        choice = plan_pipeline(graph, cluster, global_batch=global_batch, cost=cost, options=options, sharded=sharded)
    except StageError as exc:
        row.total_s = time.perf_counter() - t0
        row.pricing_s = row.total_s - (t3 - t0)  # the search, which ended without a plan
        row.answer = f"no plan fits: {str(exc).splitlines()[0]}"
        return row
    t4 = time.perf_counter()
    limit = memory_fraction * cluster.device.memory_bytes
    plan = fastest_that_fits([build_pipeline_plan(graph, cluster, choice, global_batch=global_batch, cost=cost, schedule=s,
                                                  precision=precision) for s in SCHEDULES], limit)
    t5 = time.perf_counter()
    parts = dict(choice.searched)
    assert plan.predicted is not None
    mesh = plan.stages[0].stage_mesh
    row.group_s, row.pricing_s, row.dp_s = parts["group_layers"], parts["stage_pricing"], parts["stage_dp"]
    row.search_other_s, row.choices_s = parts["search_other"], parts["build_choices"]
    row.shortlist_sim_s, row.lower_sim_s = parts["simulate_shortlist"], t5 - t4
    row.problems, row.candidates = int(parts["problems"]), int(parts["candidates"])
    row.total_s = t5 - t0
    row.step_s = plan.predicted.step_s
    row.tflops_per_gpu = model_flops_per_step(plan) / plan.predicted.step_s / plan.world_size / 1e12
    row.answer = (f"{len(plan.stages)} stages x ({' x '.join(f'{a}={n}' for a, n in zip(mesh.axes, mesh.shape, strict=True))}), "
                  f"{plan.batch.num_micro} micro-batches, {plan.schedule.kind}")
    return row


def pipeline_rows(quick: bool) -> list[PipelineRow]:
    """GPT-39B on 64 A100s; GPT-1T on 3,072 (without ``quick``), and under Megatron-LM's memory if none fits."""
    rows = [measure_pipeline("gpt-39b", GPT_CONFIGS["gpt-39b"], "dgx-a100:8", 512)]
    if quick:
        return rows
    sys.path.insert(0, str(Path(__file__).parent))
    import plan_quality_scaling as scaling

    row = scaling.SCALING_ROWS[-1]
    rows.append(measure_pipeline("gpt-1t", row.config, row.cluster, row.batch))
    if rows[-1].step_s is None:
        cap = scaling.capture_row(row)
        plan, bound = scaling.megatron_plan(row, cap)
        assert plan.predicted is not None
        needs = max(bound, *plan.predicted.peak_memory_bytes) * (1 + 1e-6) / cap.cluster.device.memory_bytes
        rows.append(measure_pipeline("gpt-1t", row.config, row.cluster, row.batch, memory_fraction=round(needs + 5e-4, 3)))
    return rows


def pipeline_table(rows: list[PipelineRow]) -> str:
    """The pipeline rows as a Markdown table (seconds per pass)."""
    head = ("| model | GPUs | batch | memory | capture | joint graph | ILPs | stage pricing | stage DP | other search | "
            "shortlist (price + simulate) | lower + simulate | **total** | DPs / candidates | answer |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        memory = f"{r.memory_fraction:g} x 80 GB"
        lines.append(f"| {r.model} | {r.devices} | {r.global_batch} | {memory} | {r.capture_s:.1f} | {r.joint_s:.1f} | "
                     f"{r.ilp_s:.1f} | {r.pricing_s:.1f} | {r.dp_s:.1f} | {r.group_s + r.search_other_s:.1f} | "
                     f"{r.choices_s:.1f} + {r.shortlist_sim_s:.1f} | {r.lower_sim_s:.1f} | **{r.total_s:.1f}** | "
                     f"{r.problems} / {r.candidates} | {r.answer} |")
    return "\n".join(lines)


@dataclass
class ReplanRow:
    """One timed elastic resize as the launcher runs it: its Replanner warmed on the running plan (while the job trains,
    before any resize), then the cached re-plan for another device count, and a cold one beside."""

    model: str
    family: str
    old_devices: int
    new_devices: int
    global_batch: int
    warm_s: float  # Replanner.warm on the running plan: the captures and stage ILPs a re-plan reuses
    seconds: float  # the cached re-plan (what a resize waits for)
    passes: dict[str, float]  # of the cached re-plan
    answer: str
    cold_s: float | None = None  # the same re-plan without a cache
    same_as_cold: bool | None = None  # the cached re-plan's plan JSON equals the cold one's (but for its timings)


def measure_replan(model: str, cluster: str, batch: int, new_devices: int, family: str, *, cold: bool = True) -> ReplanRow:
    """What ``plait run --elastic`` does: warm its ``Replanner`` on the running plan, then re-plan the plan's request
    for ``new_devices`` devices from the cache (timed, pass by pass); with ``cold``, the same re-plan without it."""
    from plait.plan.layout import layout_name
    from plait.planners.request import PlanRequest, Replanner, replan, with_request

    request = PlanRequest(model=model, cluster=cluster, batch=batch, family=family)
    old = request.load_cluster().world_size
    # the running plan only lends its recorded request to the re-plan: a stand-in carries it
    running = with_request(_stand_in_plan(batch, old), request)
    row = ReplanRow(model=model, family=family, old_devices=old, new_devices=new_devices, global_batch=batch, warm_s=0.0,
                    seconds=0.0, passes={}, answer="")
    replanner = Replanner()
    t0 = time.perf_counter()
    try:
        replanner.warm(running)
        row.warm_s = time.perf_counter() - t0
        with timed_passes(row.passes):
            new = replanner(running, new_devices)
    except Exception as exc:  # noqa: BLE001 - the row says why
        row.answer = f"failed: {str(exc).splitlines()[0]}"
        return row
    assert replanner.last is not None
    row.seconds, row.answer = replanner.last.seconds, layout_name(new)
    if cold:
        done = replan(running, new_devices)
        row.cold_s, row.same_as_cold = done.seconds, _without_timings(done.plan) == _without_timings(new)
    return row


@contextmanager
def timed_passes(passes: dict[str, float]) -> Iterator[None]:
    """Time a re-plan's passes: ``plait.plan``'s own (capture, choose), each family's candidates, and the pipeline
    candidate's (its tensor-parallel ILPs, stage search, lowering and simulation) by calling the real functions
    through timing wrappers."""
    import plait.planners.auto as auto
    import plait.planners.pipeline_plan as pipeline_plan

    score, full, choose = auto.score, pipeline_plan.plan_pipeline_full, auto.plan

    def timed_score(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = score(*args, **kwargs)
        key = f"{args[2].family} candidates"
        passes[key] = passes.get(key, 0.0) + time.perf_counter() - t0
        return out

    def timed_full(*args: Any, **kwargs: Any) -> plait.Plan:
        plan = full(*args, **kwargs)
        assert plan.provenance is not None
        passes.update({f"pipeline {k}": v for k, v in plan.provenance.passes.items() if k != "token_slicing"})
        return plan

    def timed_plan(*args: Any, **kwargs: Any) -> plait.Plan:
        plan = choose(*args, **kwargs)
        assert plan.provenance is not None
        passes.update({k: v for k, v in plan.provenance.passes.items() if k != "score_candidates"})
        return plan

    auto.score, pipeline_plan.plan_pipeline_full, auto.plan = timed_score, timed_full, timed_plan
    try:
        yield
    finally:
        auto.score, pipeline_plan.plan_pipeline_full, auto.plan = score, full, choose


def _without_timings(plan: plait.Plan) -> dict[str, Any]:
    """The plan's JSON without its planning times (what two plannings of one request may differ in)."""
    from plait.plan.io import plan_to_json

    raw = json.loads(plan_to_json(plan))
    raw["provenance"] = {k: v for k, v in raw["provenance"].items() if k not in ("created", "search_s", "passes")}
    return raw  # type: ignore[no-any-return]


def _stand_in_plan(batch: int, devices: int) -> plait.Plan:
    """A small data-parallel plan with ``batch`` (only its provenance, which gets the request, matters)."""
    from plait.cluster import local_cluster
    from plait.planners import build_dp_plan

    zm = zoo_model("mlp-tiny")
    with torch.device("meta"):
        module = zm.build()
    graph = capture(module, zm.make_batch(2, device="meta"), name="mlp-tiny", loss_fn=zm.loss)
    return build_dp_plan(graph, local_cluster(2), kind="replicate", global_batch=batch)


def replan_rows(families: list[str], *, cold: bool = True) -> list[ReplanRow]:
    """GPT-13B (``gpt3-13b``, batch 512) re-planned from 64 A100s (dgx-a100:8) to 48 (dgx-a100:6)."""
    return [measure_replan("gpt3-13b", "dgx-a100:8", 512, 48, f, cold=cold) for f in families]


PASS_ORDER = ("capture", "data parallel candidates", "intra-op candidates", "pipeline candidates",
              "pipeline tensor_parallel_ilp", "pipeline stage_dp", "pipeline lower_and_simulate", "choose")


def replan_table(rows: list[ReplanRow]) -> str:
    """The re-plan rows as a Markdown table (the cached re-plan's passes; the pipeline's are inside its candidates)."""
    lines = ["| model | family | devices | batch | launcher warm-up s | cached re-plan passes (s) | **re-plan s** "
             "| cold re-plan s | same plan as cold | answer |", "|" + "---|" * 10]
    for r in rows:
        order = [k for k in PASS_ORDER if k in r.passes] + [k for k in r.passes if k not in PASS_ORDER]
        passes = ", ".join(f"{k.replace('pipeline ', 'pipeline: ')} {r.passes[k]:.2f}" for k in order)
        cold = f"{r.cold_s:.1f}" if r.cold_s is not None else "-"
        same = {None: "-", True: "yes", False: "**no**"}[r.same_as_cold]
        lines.append(f"| {r.model} | {r.family} | {r.old_devices} -> {r.new_devices} | {r.global_batch} | {r.warm_s:.1f} "
                     f"| {passes} | **{r.seconds:.2f}** | {cold} | {same} | {r.answer} |")
    return "\n".join(lines)


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
    p.add_argument("--quick", action="store_true", help="the 24-layer GPT and GPT-39B only, without the whole search")
    p.add_argument("--pipeline", action="store_true", help="the pipeline rows only")
    p.add_argument("--replan", nargs="?", const="all", default=None, metavar="FAMILIES",
                   help="only the elastic re-plan rows: GPT-13B from 64 to 48 A100s, for these comma-separated plan "
                        "families of the request (default all)")
    p.add_argument("--no-cold", action="store_true", help="with --replan: skip the cold re-plan beside the cached one")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.replan is not None:
        replanned = replan_rows(a.replan.split(","), cold=not a.no_cold)
        print(replan_table(replanned))
        print("target: re-planning GPT-13B from 64 to 48 A100s < 5 s (the cached re-plan an elastic launcher runs: its "
              "Replanner warmed on the running plan keeps the captures and the stages' tensor-parallel ILPs)")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"replan_rows": [asdict(r) for r in replanned]}, indent=1) + "\n")
        return
    rows: list[Row] = []
    if not a.pipeline:
        rows.append(measure("gpt2-medium", "dgx-a100:1", (1, 8), 8, search=not a.quick))
        if not a.quick:
            rows.append(measure("gpt3-175b", "dgx-a100:8", (8, 8), 64, search=False))
        print(table(rows))
        print(f"targets: 24-layer GPT on 8 devices < 10 s; GPT-175B on 64 devices < 60 s. Published peers: {PUBLISHED}")
    piped = pipeline_rows(a.quick)
    print(pipeline_table(piped))
    print("targets: GPT-39B on 64 A100s <= 60 s; GPT-1T on 3,072 A100s <= 300 s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"rows": [asdict(r) for r in rows], "pipeline_rows": [asdict(r) for r in piped], "published": PUBLISHED}
        a.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
