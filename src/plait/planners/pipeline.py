"""Pipeline plans from the layer view: group the layers, price every (group range, submesh, configuration)
as a stage with the CostModel (``plait.planners.stage_pricing``), choose stages and micro-batches with the
stage DP, and lower the choice to per-stage programs.

A stage's configuration is its tensor-parallel size inside the submesh (the rest of the submesh is data
parallel; tensor-parallel layers come from the intra-op ILP, ``plait.planners.stage_configs``, when the
planner is given them) and whether it recomputes its layers' activations in backward (Mist weighs this
per stage, Alpa did not): it then keeps only each layer's input per in-flight micro-batch, holds one layer's
activations while that layer's backward runs, and does the forward twice. Its memory check is the bound
``stage_memory`` puts on its lowered 1F1B program with ``stages after it + 1`` micro-batches in flight, so it
is never below what the simulator shows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.cost.memory import check_optimizer
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import RankProgram
from plait.planners.layer_groups import group_layers
from plait.planners.pipeline_lowering import StageWork, lower_pipeline
from plait.planners.schedules import gpipe, one_f_one_b
from plait.planners.stage_configs import ShardedLayers
from plait.planners.stage_dp import StageCandidate, StageError, StageProblem, StageSolution, solve_stages
from plait.planners.stage_pricing import PricedStage, StageConfig, StagePricer, stage_problem
from plait.planners.zero_bubble import zero_bubble

MAX_GROUPS = 16  # layer groups the stage DP sees (Alpa clusters to a few dozen layers at most)


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """What the pipeline search may choose and the memory it must respect."""

    num_groups: int | None = None  # default: min(layers, MAX_GROUPS)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    imbalance: float = 0.5
    memory_fraction: float = 0.9
    optimizer: str = "adamw"
    same_size: bool = False  # every stage on a submesh of one size (what plait.runtime.pipeline runs today)
    min_stages: int = 1
    rank_micro_batch: int | None = None  # each rank's share of a micro-batch, when the caller fixes it
    # the last stage keeps every micro-batch's output until the step ends (torch's schedule.step does unless
    # told return_outputs=False; plait.runtime.pipeline tells it so)
    keep_outputs: bool = False
    tp_sizes: tuple[int, ...] | None = None  # tensor-parallel sizes a stage may use (None: 1 and every size given)


@dataclass(frozen=True, kw_only=True)
class PipelineChoice:
    """The stages (layer ranges and ranks), micro-batching and the DP's predicted step."""

    layer_ranges: tuple[tuple[int, int], ...]
    stage_ranks: tuple[tuple[int, ...], ...]
    num_micro: int
    micro_size: int
    work: tuple[StageWork, ...]
    sync_bytes: tuple[int, ...]
    optimizer_numel: tuple[int, ...]
    step_temp_bytes: tuple[int, ...]
    configs: tuple[StageConfig, ...] = ()  # per stage: tensor-parallel size and recomputation
    solution: StageSolution
    search_s: float
    keep_outputs: bool = False
    sharded: Mapping[int, ShardedLayers] = field(default_factory=dict, repr=False)  # the layers of each tp size used

    @property
    def step_s(self) -> float:
        """The DP's step time (closed form, once-per-step work counted whole)."""
        return self.solution.step_s

    def programs(self, schedule: str = "1f1b") -> tuple[RankProgram, ...]:
        """Per-stage programs of this choice under ``schedule`` (``1f1b``, ``gpipe`` or ``zero-bubble``)."""
        lists = {"1f1b": one_f_one_b, "gpipe": gpipe, "zero-bubble": zero_bubble}
        if schedule not in lists:
            raise PlaitError(f"unknown schedule {schedule!r} for a pipeline choice; choose one of {', '.join(lists)}")
        return lower_pipeline(lists[schedule](len(self.layer_ranges), self.num_micro), self.work, self.stage_ranks,
                              optimizer_numel=self.optimizer_numel, sync_bytes=self.sync_bytes,
                              step_temp_bytes=self.step_temp_bytes, keep_outputs=self.keep_outputs)


def submesh_sizes(cluster: Cluster) -> tuple[int, ...]:
    """Power-of-two slices of one node, then power-of-two counts of whole nodes (Alpa's submesh shapes)."""
    m, n = cluster.devices_per_node, cluster.num_nodes
    inside = [1 << k for k in range(m.bit_length()) if (1 << k) <= m]
    whole = [m * (1 << k) for k in range(1, n.bit_length()) if (1 << k) <= n]
    return tuple(sorted(set(inside + whole)))


def assign_ranks(sizes: Sequence[int], cluster: Cluster) -> tuple[tuple[int, ...], ...]:
    """Contiguous rank blocks for stages of these sizes, largest first so every block stays aligned (a
    slice of one node never straddles two); returned in stage order."""
    if sum(sizes) != cluster.world_size:
        raise PlaitError(f"stage sizes {list(sizes)} do not add up to the cluster's {cluster.world_size} devices")
    blocks: dict[int, tuple[int, ...]] = {}
    offset = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        blocks[i] = tuple(range(offset, offset + sizes[i]))
        offset += sizes[i]
    return tuple(blocks[i] for i in range(len(sizes)))


def plan_pipeline(graph: ModelGraph, cluster: Cluster, *, global_batch: int, cost: CostModel,
                  options: PipelineOptions = PipelineOptions(),
                  sharded: Mapping[int, ShardedLayers] | None = None) -> PipelineChoice:
    """The fastest pipeline that fits (see the module docstring); ``sharded`` gives the tensor-parallel layers
    stages may use (by tp size); ``StageError`` when none fits."""
    t0 = time.perf_counter()
    check_optimizer(options.optimizer)
    layers = graph.layers
    groups = group_layers([float(layer.fwd_flops + layer.bwd_flops) for layer in layers],
                          [float(layer.output_bytes) for layer in layers[:-1]],
                          options.num_groups or min(len(layers), MAX_GROUPS), imbalance=options.imbalance)
    sizes = submesh_sizes(cluster)
    pricer = StagePricer(graph=graph, cluster=cluster, cost=cost, optimizer=options.optimizer,
                         keep_outputs=options.keep_outputs, sharded=sharded, allowed=options.tp_sizes)
    limit = options.memory_fraction * cluster.device.memory_bytes
    best: tuple[StageSolution, int, dict[StageCandidate, PricedStage]] | None = None
    for num_micro in options.micro_batches:
        if global_batch % num_micro:
            continue
        problem, priced = stage_problem(pricer, groups, sizes, global_batch // num_micro, num_micro, limit=limit,
                                        rank_micro_batch=options.rank_micro_batch)
        for sub in _subproblems(problem, options, pricer.configs()):
            try:
                solution = solve_stages(sub)
            except StageError:
                continue
            if best is None or solution.step_s < best[0].step_s:
                best = (solution, num_micro, priced)
    if best is None:
        raise StageError(f"no pipeline of {graph.name} fits {cluster.name} with micro-batch counts "
                         f"{list(options.micro_batches)} dividing the global batch {global_batch}")
    solution, num_micro, priced = best
    chosen = [priced[s] for s in solution.stages]
    return PipelineChoice(
        layer_ranges=tuple((groups[s.start][0], groups[s.stop - 1][1]) for s in solution.stages),
        stage_ranks=assign_ranks([sizes[s.submesh] for s in solution.stages], cluster),
        num_micro=num_micro, micro_size=global_batch // num_micro,
        work=tuple(p.work for p in chosen),
        sync_bytes=tuple(p.param_bytes for p in chosen),
        optimizer_numel=tuple(p.param_numel for p in chosen),
        step_temp_bytes=tuple(p.step_temp_bytes for p in chosen),
        configs=tuple(p.config for p in chosen),
        solution=solution, search_s=time.perf_counter() - t0, keep_outputs=options.keep_outputs,
        sharded=dict(sharded or {}),
    )


def _subproblems(problem: StageProblem, options: PipelineOptions, configs: Sequence[StageConfig]) -> list[StageProblem]:
    """The problem as it is, or one per stage mesh (``same_size``: one submesh size and tensor-parallel size,
    what the runtime runs); stages fewer than ``min_stages`` are ruled out by size: a stage may take at most
    ``devices / min_stages`` devices."""
    cap = problem.num_devices // max(1, options.min_stages)
    usable = [c for c in problem.candidates if problem.submesh_devices[c.submesh] <= cap]
    if not options.same_size:
        return [replace(problem, candidates=tuple(usable))]
    shapes = sorted({(c.submesh, configs[c.config].tp) for c in usable})
    return [replace(problem, candidates=tuple(c for c in usable if (c.submesh, configs[c.config].tp) == shape))
            for shape in shapes]
