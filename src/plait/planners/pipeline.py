"""Pipeline plans from the layer view: group the layers, price every (group range, submesh, configuration)
as a stage with the CostModel (``plait.planners.stage_pricing``), choose stages and micro-batches with the
stage DP, check the few best in the simulator, and lower the choice to per-stage programs.

A stage's configuration is its tensor-parallel size inside the submesh (the rest of the submesh is data
parallel; tensor-parallel layers come from the intra-op ILP, ``plait.planners.stage_configs``, when the
planner is given them) and whether it recomputes its layers' activations in backward (Mist weighs this
per stage, Alpa did not): it then keeps only each layer's input per in-flight micro-batch, holds one layer's
activations while that layer's backward runs, and does the forward twice. Its memory check is the bound
``stage_memory`` puts on its lowered 1F1B program with ``stages after it + 1`` micro-batches in flight, so it
is never below what the simulator shows.

The search (``plait.planners.pipeline_search``) prunes as Alpa does: a stage's FLOPs must lie within a factor
``1 + stage_imbalance`` of its fair share, and a pipeline of one submesh size has exactly ``devices / size``
stages, so only ranges on some chain of that many are priced; recomputation is kept only where it lets more
stages follow. The DP's step is a closed form (once-per-step work counted whole); the ``simulate_top`` best
pipelines are lowered and simulated, and the fastest simulated one is chosen, as the automatic planner
chooses among its candidates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.cost.memory import check_optimizer
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import RankProgram
from plait.planners.layer_groups import group_layers
from plait.planners.pipeline_interleave import can_interleave, interleave
from plait.planners.pipeline_lowering import StageWork, lower_pipeline
from plait.planners.pipeline_search import Found, Search, Shortlist, search_mixed, search_same_size
from plait.planners.schedules import gpipe, interleaved_1f1b, one_f_one_b
from plait.planners.stage_configs import ShardedLayers
from plait.planners.stage_dp import StageCandidate, StageError, StageSolution
from plait.planners.stage_pricing import StageConfig, StagePricer
from plait.planners.zero_bubble import zero_bubble

MAX_GROUPS = 16  # layer groups the DP of mixed-size pipelines sees (Alpa clusters to a few dozen layers at most)
MAX_ONE_SIZE_GROUPS = 256  # pipelines of one submesh size see every layer up to this many


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """What the pipeline search may choose and the memory it must respect."""

    num_groups: int | None = None  # default: every layer (one submesh size), min(layers, MAX_GROUPS) (mixed sizes)
    # micro-batch counts to try; empty: every power-of-two share of samples per rank (one submesh size),
    # or 1, 2, 4, ..., 64 (mixed sizes)
    micro_batches: tuple[int, ...] = ()
    imbalance: float = 0.5  # of the layer groups' FLOPs
    # a stage's FLOPs lie within a factor 1 + stage_imbalance of its fair share (Alpa's imbalance tolerance);
    # None: any range
    stage_imbalance: float | None = 1.0
    memory_fraction: float = 0.9
    optimizer: str = "adamw"
    same_size: bool = False  # every stage on a submesh of one size (what plait.runtime.pipeline runs today)
    min_stages: int = 1
    rank_micro_batch: int | None = None  # each rank's share of a micro-batch, when the caller fixes it
    # the last stage keeps every micro-batch's output until the step ends (torch's schedule.step does unless
    # told return_outputs=False; plait.runtime.pipeline tells it so)
    keep_outputs: bool = False
    tp_sizes: tuple[int, ...] | None = None  # tensor-parallel sizes a stage may use (None: 1 and every size given)
    compute_dtype: str | None = None  # None: the tensor-parallel layers' compute dtype, else the graph's
    simulate_top: int = 3  # the DP's best pipelines checked in the simulator (0: trust the DP's closed form)
    chunks: tuple[int, ...] = (2,)  # model chunks per rank the chosen pipeline is also offered with (interleaved 1F1B)
    # offer the chosen stages token-sliced too (TeraPipe; causal transformers only, ``plait.planners.pipeline_tokens``);
    # None: unless switched off around the planning (``pipeline_tokens.token_slicing(False)``, `--no-token-slicing`)
    token_slicing: bool | None = None


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
    simulated_s: float | None = None  # the simulator's step of its 1F1B programs, when the search ran it
    # seconds per part of the search (and the problems solved and candidates priced)
    searched: tuple[tuple[str, float], ...] = ()
    # model chunks per rank (interleaved 1F1B): ``layer_ranges``, ``work`` and ``configs`` are then per virtual
    # stage ``v`` (on ranks ``stage_ranks[v % p]``), the once-per-step fields per rank group
    chunks: int = 1
    variants: tuple[PipelineChoice, ...] = ()  # the same pipeline with model chunks per rank (interleaved 1F1B)

    @property
    def step_s(self) -> float:
        """The DP's step time (closed form, once-per-step work counted whole)."""
        return self.solution.step_s

    def programs(self, schedule: str = "1f1b") -> tuple[RankProgram, ...]:
        """Per-stage programs of this choice under ``schedule`` (``1f1b``, ``gpipe`` or ``zero-bubble``; with model
        chunks per rank, ``interleaved-1f1b``)."""
        p, m = len(self.stage_ranks), self.num_micro
        lists = {"1f1b": one_f_one_b, "gpipe": gpipe, "zero-bubble": zero_bubble}
        if self.chunks > 1:
            if schedule != "interleaved-1f1b":
                raise PlaitError(f"a pipeline of {self.chunks} model chunks per rank runs 'interleaved-1f1b', not {schedule!r}")
            actions = interleaved_1f1b(p, m, self.chunks)
        elif schedule in lists:
            actions = lists[schedule](p, m)
        else:
            raise PlaitError(f"unknown schedule {schedule!r} for a pipeline choice; choose one of {', '.join(lists)}")
        return lower_pipeline(actions, self.work, self.stage_ranks,
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
    starts, group_flops = _groups(graph, options)
    t_groups = time.perf_counter() - t0
    dtype = options.compute_dtype or next((s.compute_dtype for s in (sharded or {}).values()), None) or graph.dtype
    pricer = StagePricer(graph=graph, cluster=cluster, cost=cost, optimizer=options.optimizer,
                         keep_outputs=options.keep_outputs, sharded=sharded, allowed=options.tp_sizes, compute_dtype=dtype)
    search = Search(pricer=pricer, cluster=cluster, starts=starts, group_flops=group_flops, global_batch=global_batch,
                    limit=options.memory_fraction * cluster.device.memory_bytes, imbalance=options.stage_imbalance,
                    shortlist=Shortlist(keep=max(1, options.simulate_top)))
    if options.same_size:
        search_same_size(search, min_stages=options.min_stages, counts=options.micro_batches,
                         fixed=options.rank_micro_batch)
    else:
        search_mixed(search, submesh_sizes(cluster), min_stages=options.min_stages, counts=options.micro_batches,
                     fixed=options.rank_micro_batch)
    t1 = time.perf_counter()
    if not search.shortlist.found:
        how = (f"micro-batch counts {list(options.micro_batches)}" if options.micro_batches else
               "1, 2, 4, ... samples per rank and micro-batch")
        raise StageError(f"no pipeline of {graph.name} fits {cluster.name} with {how} (global batch {global_batch}) "
                         f"in {options.memory_fraction:g} x device memory; allow more memory, a smaller global batch "
                         f"or more devices")
    choices = [_choice(found, pricer, cluster, options, sharded, t0) for found in search.shortlist.found]
    t2 = time.perf_counter()
    best = choices[0] if options.simulate_top < 1 else _simulated_best(choices, graph, cluster, cost, global_batch,
                                                                        options.optimizer, dtype)
    t3 = time.perf_counter()
    searched = (("group_layers", t_groups), ("stage_pricing", search.pricing_s), ("stage_dp", search.dp_s),
                ("search_other", t1 - t0 - t_groups - search.pricing_s - search.dp_s), ("build_choices", t2 - t1),
                ("simulate_shortlist", t3 - t2), ("problems", float(search.problems)),
                ("candidates", float(search.candidates)))
    variants = tuple(interleave(best, pricer, v) for v in options.chunks if can_interleave(best, len(graph.layers), v))
    return replace(best, search_s=t3 - t0, searched=searched, variants=variants)


def _groups(graph: ModelGraph, options: PipelineOptions) -> tuple[np.ndarray, np.ndarray]:
    """Each layer group's first layer (then the layer count) and FLOPs: every layer its own group for pipelines
    of one submesh size (up to MAX_ONE_SIZE_GROUPS), else ``group_layers``."""
    layers = graph.layers
    flops = [float(layer.fwd_flops + layer.bwd_flops) for layer in layers]
    count = options.num_groups or min(len(layers), MAX_ONE_SIZE_GROUPS if options.same_size else MAX_GROUPS)
    if count >= len(layers):
        return np.arange(len(layers) + 1), np.array(flops)
    groups = group_layers(flops, [float(layer.output_bytes) for layer in layers[:-1]], count, imbalance=options.imbalance)
    starts = np.array([a for a, _ in groups] + [len(layers)])
    return starts, np.array([sum(flops[a:b]) for a, b in groups])


def _choice(found: Found, pricer: StagePricer, cluster: Cluster, options: PipelineOptions,
            sharded: Mapping[int, ShardedLayers] | None, t0: float) -> PipelineChoice:
    """The PipelineChoice of a found pipeline: its stages priced in full."""
    cands, table = found.cands, found.cands.table
    chosen = [cands.price(pricer, i) for i in found.picks]
    stages = tuple(StageCandidate(start=int(table.start[i]), stop=int(table.stop[i]), submesh=int(cands.submesh[i]),
                                  config=int(cands.config[i]), time_s=float(table.time_s[i]),
                                  max_after=int(table.max_after[i]), once_s=float(table.once_s[i])) for i in found.picks)
    solution = StageSolution(stages=stages, step_s=found.step_s, t_max_tried=found.t_max_tried,
                             t_max_total=found.t_max_total, solve_s=0.0)
    return PipelineChoice(
        layer_ranges=tuple((int(cands.first_layer[i]), int(cands.stop_layer[i])) for i in found.picks),
        stage_ranks=assign_ranks([int(table.devices[i]) for i in found.picks], cluster),
        num_micro=found.num_micro, micro_size=found.micro_size,
        work=tuple(p.work for p in chosen),
        sync_bytes=tuple(p.param_bytes for p in chosen),
        optimizer_numel=tuple(p.param_numel for p in chosen),
        step_temp_bytes=tuple(p.step_temp_bytes for p in chosen),
        configs=tuple(p.config for p in chosen),
        solution=solution, search_s=time.perf_counter() - t0, keep_outputs=options.keep_outputs,
        sharded=dict(sharded or {}),
    )


def _simulated_best(choices: Sequence[PipelineChoice], graph: ModelGraph, cluster: Cluster, cost: CostModel,
                    global_batch: int, optimizer: str, dtype: str) -> PipelineChoice:
    """The choice whose lowered 1F1B programs the simulator runs fastest (ties: the DP's order)."""
    from plait.plan.ir import PrecisionPolicy
    from plait.planners.pipeline_plan import build_pipeline_plan  # it imports this module

    precision = PrecisionPolicy(param_dtype=graph.dtype, compute_dtype=dtype, reduce_dtype=graph.dtype)
    timed = []
    for choice in choices:
        plan = build_pipeline_plan(graph, cluster, choice, global_batch=global_batch, cost=cost, optimizer=optimizer,
                                   precision=precision)
        assert plan.predicted is not None
        timed.append(replace(choice, simulated_s=plan.predicted.step_s))
    return min(timed, key=lambda c: c.simulated_s or 0.0)
