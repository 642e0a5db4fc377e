"""Plan quality at scale: plait's pipeline planner against the configurations of the Megatron-LM scaling study.

The ten GPT configurations of Table 1 of "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC'21, arXiv:2104.04473): sequence 2,048, vocabulary 51,200, mixed precision with activation
recomputation, the paper's global batch sizes and its tensor- and pipeline-parallel sizes on DGX-A100 nodes of
8 GPUs; data parallelism is GPUs / (TP x PP). The sequence, vocabulary and GPU counts are also in the
Megatron-LM README's scaling section; the parameter counts agree with the paper's formula
``12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h))`` (checked in tests/planners/test_plan_quality_scaling.py).

For each row both sides are built and predicted by the same machinery, in bf16 compute with fp32 master
weights and AdamW, under the same memory limit (0.9 x 80 GB):

- Megatron-LM's configuration, made by hand: its TP size with Megatron's layout inside a node (QKV and fc1
  column-split, proj and fc2 row-split, vocabulary-parallel embedding and head: ``plan_quality.megatron_layout``),
  PP stages with the transformer blocks split evenly (the embedding with the first stage, the head with the
  last, as Megatron-LM places them), DP over the rest, one sample per rank and micro-batch, every layer
  recomputed, 1F1B; each stage is priced by ``StagePricer`` (its boundary whole or as TP slices, the faster:
  Megatron-LM's scatter-gather) and the ``PipelineChoice`` is lowered and simulated by ``build_pipeline_plan``;
- plait's own plan: ``plan_pipeline_full`` (the intra-op ILP per TP size, then the stage search over stages of
  one submesh shape, the best few simulated; 1F1B or zero-bubble, the faster that fits).

Every number is a prediction of plait's cost model and simulator (nothing here runs on GPUs); the step times
are not the paper's measurements. TFLOP/s per GPU are model FLOPs (forward and backward, recomputation not
counted) per step over the step time and the GPUs.

    python bench/plan_quality.py --scaling --json out/plan_quality_scaling.json
    python bench/plan_quality.py --scaling --scaling-rows 1,2,5
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from plan_quality import _git_state, megatron_layout  # noqa: E402  (the hand layout of bench/plan_quality.py)

from plait.cluster import Cluster, load_cluster
from plait.cost import CostModel
from plait.graph import capture
from plait.graph.model_graph import ModelGraph
from plait.models import GPT, GPTConfig, lm_batch, lm_loss
from plait.plan.ir import MeshSpec, Plan, PrecisionPolicy
from plait.plan.table import model_flops_per_step
from plait.planners.data_parallel import resolve_precision
from plait.planners.intra_op.planner import given_layout
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineChoice, PipelineOptions, assign_ranks
from plait.planners.pipeline_lowering import stage_memory
from plait.planners.pipeline_plan import build_pipeline_plan, plan_pipeline_full
from plait.planners.stage_configs import ShardedLayers
from plait.planners.stage_dp import StageCandidate, StageError, StageSolution, stage_step
from plait.planners.stage_pricing import StageConfig, StagePricer

MEMORY_FRACTION = 0.9
VOCAB, SEQ = 51200, 2048


@dataclass(frozen=True)
class ScalingRow:
    """One configuration of the scaling study (Table 1 of the paper)."""

    params_b: float  # billions, as the paper names the model
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int

    @property
    def dp(self) -> int:
        """Data-parallel size: the GPUs left over by tensor and pipeline parallelism."""
        return self.gpus // (self.tp * self.pp)

    @property
    def config(self) -> GPTConfig:
        """The zoo GPT of these sizes (its head is not tied to the embedding, unlike the paper's)."""
        return GPTConfig(vocab_size=VOCAB, seq_len=SEQ, num_layers=self.layers, num_heads=self.heads, hidden=self.hidden)

    @property
    def cluster(self) -> str:
        """DGX-A100 nodes of 8 GPUs."""
        return f"dgx-a100:{self.gpus // 8}"

    @property
    def label(self) -> str:
        """Short name."""
        return f"{self.params_b:g}B"


SCALING_ROWS: tuple[ScalingRow, ...] = (
    ScalingRow(1.7, 24, 2304, 24, 1, 1, 32, 512),
    ScalingRow(3.6, 32, 3072, 30, 2, 1, 64, 512),
    ScalingRow(7.5, 32, 4096, 36, 4, 1, 128, 512),
    ScalingRow(18.4, 48, 6144, 40, 8, 1, 256, 1024),
    ScalingRow(39.1, 64, 8192, 48, 8, 2, 512, 1536),
    ScalingRow(76.1, 80, 10240, 60, 8, 4, 1024, 1792),
    ScalingRow(145.6, 96, 12288, 80, 8, 8, 1536, 2304),
    ScalingRow(310.1, 128, 16384, 96, 8, 16, 1920, 2160),
    ScalingRow(529.6, 128, 20480, 105, 8, 35, 2520, 2520),
    ScalingRow(1008.0, 160, 25600, 128, 8, 64, 3072, 3072),
)


def paper_params(row: ScalingRow) -> float:
    """The paper's parameter count of a row: ``12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h))``."""
    h, n = row.hidden, row.layers
    return 12 * n * h * h * (1 + 13 / (12 * h) + (VOCAB + SEQ) / (12 * n * h))


@dataclass
class Captured:
    """A row's model captured once on the meta device, and what both sides share."""

    graph: ModelGraph
    source: ModelSource
    cluster: Cluster
    cost: CostModel
    precision: PrecisionPolicy
    capture_s: float


def capture_row(row: ScalingRow) -> Captured:
    """The layer view (bf16 autocast, batch 1) and the source for the joint graph."""
    t0 = time.perf_counter()
    cfg = row.config
    with torch.device("meta"):
        model = GPT(cfg)
    batch = lm_batch(cfg, 1, device="meta")
    graph = capture(model, batch, name=f"gpt-{row.label}", loss_fn=lm_loss, with_ops=False, autocast="bf16")
    source = ModelSource(model=model, example_batch=batch, batch_size=1, loss_fn=lm_loss, name=graph.name, autocast="bf16")
    cluster = load_cluster(row.cluster)
    return Captured(graph=graph, source=source, cluster=cluster, cost=CostModel(cluster),
                    precision=resolve_precision("bf16", cluster), capture_s=time.perf_counter() - t0)


def megatron_sharded(cap: Captured, tp: int, num_layers: int) -> dict[int, ShardedLayers]:
    """Megatron-LM's layout on a ``tp``-way axis as the pricer's tensor-parallel layers (none for tp = 1)."""
    if tp == 1:
        return {}
    joint = cap.source.joint(1)
    solved = given_layout(joint, MeshSpec(shape=(tp,), axes=("tp",)), ("tp",),
                          *megatron_layout(joint, num_layers, vocab_parallel=True))
    return {tp: ShardedLayers(tp=tp, graph=cap.source.graph(1), joint=joint, solved=solved, joint_batch=1,
                              compute_dtype=cap.precision.compute_dtype)}


def megatron_ranges(row: ScalingRow) -> list[tuple[int, int]]:
    """Layer-view ranges of Megatron-LM's stages: blocks split evenly, the embedding (layer 0) with the first
    stage and the head (the last layer) with the last."""
    per = row.layers // row.pp
    bounds = [1 + per * s for s in range(row.pp + 1)]
    bounds[0], bounds[-1] = 0, row.layers + 2
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def megatron_choice(row: ScalingRow, cap: Captured, sharded: dict[int, ShardedLayers]) -> PipelineChoice:
    """Megatron-LM's configuration as a PipelineChoice, every stage priced by ``StagePricer``."""
    pricer = StagePricer(graph=cap.graph, cluster=cap.cluster, cost=cap.cost, optimizer="adamw", sharded=sharded,
                         compute_dtype=cap.precision.compute_dtype)
    config = StageConfig(row.tp, True)
    num_micro, devices = row.batch // row.dp, row.tp * row.dp
    ranges = megatron_ranges(row)
    limit = MEMORY_FRACTION * cap.cluster.device.memory_bytes
    priced, stages = [], []
    for a, b in ranges:
        last = b == len(cap.graph.layers)
        split = 1 if last else pricer.send_split(b - 1, 1, row.tp)
        p = pricer.price(a, b, 1, config, last=last, send_split=split)
        memory = stage_memory(p.work, input_bytes=p.input_bytes, num_micro=num_micro, step_temp_bytes=p.step_temp_bytes)
        in_flight = memory.max_in_flight(limit - p.param_bytes * 4, cap=row.pp)
        priced.append(p)
        stages.append(StageCandidate(start=a, stop=b, submesh=0, config=1, time_s=pricer.time_s(p.work),
                                     max_after=max(0, in_flight - 1), once_s=pricer.once_s(p, row.dp, num_micro)))
    solution = StageSolution(stages=tuple(stages), step_s=stage_step(stages, num_micro), t_max_tried=0, t_max_total=0,
                             solve_s=0.0)
    return PipelineChoice(
        layer_ranges=tuple(ranges), stage_ranks=assign_ranks([devices] * row.pp, cap.cluster),
        num_micro=num_micro, micro_size=row.dp, work=tuple(p.work for p in priced),
        sync_bytes=tuple(p.param_bytes for p in priced), optimizer_numel=tuple(p.param_numel for p in priced),
        step_temp_bytes=tuple(p.step_temp_bytes for p in priced), configs=tuple(p.config for p in priced),
        solution=solution, search_s=0.0, sharded=sharded)


def memory_bound(choice: PipelineChoice) -> int:
    """The most memory the planner's fit check gives any stage of ``choice``: its parameters, gradients and AdamW
    state plus ``stage_memory``'s bound with 1F1B's ``stages after it + 1`` micro-batches in flight (never below
    the simulated peak)."""
    stages, m = len(choice.work), choice.num_micro
    out = 0
    for s, work in enumerate(choice.work):
        bound = stage_memory(work, input_bytes=choice.work[s - 1].boundary_bytes if s else 0, num_micro=m,
                             step_temp_bytes=choice.step_temp_bytes[s], keep_outputs=choice.keep_outputs)
        out = max(out, choice.sync_bytes[s] * 4 + bound.peak(min(stages - s, m)))
    return out


def megatron_plan(row: ScalingRow, cap: Captured) -> tuple[Plan, int]:
    """Megatron-LM's configuration, lowered to 1F1B programs and simulated, and the planner's memory bound of it."""
    choice = megatron_choice(row, cap, megatron_sharded(cap, row.tp, row.layers))
    plan = build_pipeline_plan(cap.graph, cap.cluster, choice, global_batch=row.batch, cost=cap.cost, schedule="1f1b",
                               precision=cap.precision)
    return plan, memory_bound(choice)


def plait_plan(row: ScalingRow, cap: Captured, memory_fraction: float = MEMORY_FRACTION) -> Plan:
    """plait's own pipeline plan (stages of one submesh shape, what its runtime runs)."""
    options = PipelineOptions(same_size=True, memory_fraction=memory_fraction)
    return plan_pipeline_full(cap.graph, cap.cluster, global_batch=row.batch, cost=cap.cost, options=options,
                              precision=cap.precision, source=cap.source)


def describe(plan: Plan, limit: float) -> dict[str, Any]:
    """The choices and predictions of a pipeline plan, for the table and the JSON."""
    assert plan.predicted is not None
    first = plan.stages[0]
    mesh = first.stage_mesh
    tp = mesh.axis_size("tp") if "tp" in mesh.axes else 1
    step = plan.predicted.step_s
    peak = max(plan.predicted.peak_memory_bytes)
    recompute = sorted({s.recompute for s in plan.stages})
    return {
        "tp": tp, "pp": len(plan.stages), "dp": mesh.axis_size("dp"), "num_micro": plan.batch.num_micro,
        "rank_micro": plan.batch.micro_size, "schedule": plan.schedule.kind,
        "recompute": "all" if recompute == [True] else "none" if recompute == [False] else "some",
        "sliced_boundaries": sum(1 for s in plan.stages if s.send_placements),
        "layers_per_stage": [len(s.layers) for s in plan.stages],
        "step_s": step, "tflops_per_gpu": model_flops_per_step(plan) / step / plan.world_size / 1e12,
        "peak_bytes": peak, "fits": peak <= limit, "bubble": plan.predicted.bubble_fraction,
    }


@dataclass
class ScalingResult:
    """Both sides of one row."""

    row: ScalingRow
    megatron: dict[str, Any]
    plait: dict[str, Any] | None
    plait_note: str
    relaxed: dict[str, Any] | None  # plait's plan within the memory Megatron-LM's configuration needs, when none fits
    capture_s: float
    megatron_s: float
    plait_s: float

    @property
    def ratio(self) -> float | None:
        """plait's predicted throughput over Megatron-LM's configuration's (>= 1: plait is no worse)."""
        ours = self.plait or self.relaxed
        return None if ours is None else float(self.megatron["step_s"] / ours["step_s"])

    def record(self) -> dict[str, Any]:
        """The JSON record."""
        return dict(asdict(self), ratio=self.ratio, label=self.row.label)


def run_scaling_row(row: ScalingRow) -> ScalingResult:
    """Build, plan and predict both sides of ``row``."""
    cap = capture_row(row)
    limit = MEMORY_FRACTION * cap.cluster.device.memory_bytes
    t0 = time.perf_counter()
    hand, bound = megatron_plan(row, cap)
    megatron = dict(describe(hand, limit), bound_bytes=bound)
    t1 = time.perf_counter()
    ours: dict[str, Any] | None = None
    relaxed: dict[str, Any] | None = None
    note = ""
    try:
        ours = describe(plait_plan(row, cap), limit)
    except StageError as exc:  # compare within the memory Megatron-LM's configuration needs by the same check
        note = str(exc).splitlines()[0]
        needs = max(bound, megatron["peak_bytes"]) * (1 + 1e-9)
        relaxed = describe(plait_plan(row, cap, memory_fraction=needs / cap.cluster.device.memory_bytes), needs)
    t2 = time.perf_counter()
    return ScalingResult(row=row, megatron=megatron, plait=ours, plait_note=note, relaxed=relaxed,
                         capture_s=cap.capture_s, megatron_s=t1 - t0, plait_s=t2 - t1)


def _side(d: dict[str, Any]) -> str:
    rc = {"all": ", recompute", "some": ", recompute some", "none": ""}[d["recompute"]]
    sliced = ", sliced" if d["sliced_boundaries"] else ""
    return (f"TP{d['tp']} PP{d['pp']} DP{d['dp']}, {d['num_micro']} x {d['rank_micro']}/rank, "
            f"{d['schedule']}{rc}{sliced}")


def scaling_table(results: list[ScalingResult]) -> str:
    """The rows as a Markdown table."""
    head = ("| model | GPUs | batch | Megatron-LM config | step s | TFLOP/s/GPU | peak (bound) GB | plait's plan | step s "
            "| TFLOP/s/GPU | peak GB | plait / Megatron | plan s |")
    lines = [head, "|" + "---|" * 13]
    for r in results:
        m = r.megatron
        ours = r.plait or r.relaxed
        needs = max(m["peak_bytes"], m["bound_bytes"]) / 1e9
        mark = "" if r.plait else f" (within Megatron-LM's {needs:.0f} GB)"
        plait_cells = ("no plan | - | - | -" if ours is None else
                       f"{_side(ours)}{mark} | {ours['step_s']:.3f} | {ours['tflops_per_gpu']:.1f} | {ours['peak_bytes'] / 1e9:.1f}")
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        lines.append(f"| {r.row.label} | {r.row.gpus} | {r.row.batch} | {_side(m)} | {m['step_s']:.3f} | "
                     f"{m['tflops_per_gpu']:.1f} | {m['peak_bytes'] / 1e9:.1f} ({m['bound_bytes'] / 1e9:.1f}){'' if m['fits'] else ' over'} | "
                     f"{plait_cells} | {ratio} | {r.plait_s:.0f} |")
    return "\n".join(lines)


def main(spec: str | None, out: str | None) -> None:
    """The Megatron-LM scaling study: plan and predict each row, print the table, write JSON."""
    picked = [int(i) for i in spec.split(",")] if spec else list(range(1, len(SCALING_ROWS) + 1))
    results = []
    for i in picked:
        row = SCALING_ROWS[i - 1]
        t0 = time.perf_counter()
        print(f"[{i}/{len(SCALING_ROWS)}] GPT {row.label} on {row.cluster}, batch {row.batch}", flush=True)
        results.append(run_scaling_row(row))
        print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(scaling_table(results))
    worse = [r.row.label for r in results if r.ratio is None or r.ratio < 1 - 1e-9]
    relaxed = [r.row.label for r in results if r.plait is None]
    print(f"plait's plan predicted at least as fast as Megatron-LM's configuration on {len(results) - len(worse)} of "
          f"{len(results)} rows" + (f"; not on {', '.join(worse)}" if worse else "")
          + (f"; on {', '.join(relaxed)} no plan fits {MEMORY_FRACTION} x 80 GB and plait's plan is the one within the "
             f"memory Megatron-LM's configuration needs" if relaxed else ""))
    for r in results:
        if r.plait is None:
            m = r.megatron
            print(f"{r.row.label}: no plan fits {MEMORY_FRACTION} x device memory ({r.plait_note}); Megatron-LM's "
                  f"configuration peaks at {m['peak_bytes'] / 1e9:.1f} GB (planner's bound {m['bound_bytes'] / 1e9:.1f} GB); "
                  f"the row shows plait's plan within that memory")
    if out:
        record = {"rows": [r.record() for r in results], "precision": "bf16", "memory_fraction": MEMORY_FRACTION,
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                              "commit": _git_state()}}
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
