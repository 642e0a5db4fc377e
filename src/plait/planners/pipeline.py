"""Pipeline plans from the layer view: group the layers, price every (group range, submesh) as a stage with
the CostModel, choose stages and micro-batches with the stage DP, and lower the choice to 1F1B programs.

This first planner gives each stage data parallelism over its submesh (Alpa's ``data_parallel_only``
logical mesh): each rank runs ``micro_size / d`` samples of every micro-batch through the stage's layers,
and the stage all-reduces its gradients once per step. Each stage may also recompute its layers'
activations in backward (configuration 1; Mist weighs this per stage, Alpa did not): it then keeps only each
layer's input per in-flight micro-batch, holds one layer's activations while that layer's backward runs, and
does the forward twice. A stage's time per micro-batch is its layers' forward and backward on the CostModel
plus the boundary activation sent on and its gradient sent back (between nodes when the cluster has
several, which errs slow). Its memory is its layers' parameters, gradients and optimizer state plus the
bound ``stage_memory`` puts on its lowered 1F1B program with ``stages after it + 1`` micro-batches in flight
(saved activations, kept outputs, receive buffers, the backward's workspace and gradients, the optimizer's
temporaries), so the check is never below what the simulator shows. Intra-op configurations per stage come
next (docs/pipeline.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.cost.memory import OPTIMIZER_STATES, check_optimizer, step_temporaries
from plait.errors import PlaitError
from plait.graph.model_graph import LayerInfo, ModelGraph
from plait.plan.ir import RankProgram
from plait.planners.layer_groups import group_layers
from plait.planners.pipeline_lowering import StageWork, lower_pipeline, stage_memory
from plait.planners.schedules import gpipe, one_f_one_b
from plait.planners.stage_dp import StageCandidate, StageError, StageProblem, StageSolution, solve_stages

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
    solution: StageSolution
    search_s: float
    keep_outputs: bool = False

    @property
    def step_s(self) -> float:
        """The DP's step time (closed form, once-per-step work counted whole)."""
        return self.solution.step_s

    def programs(self, schedule: str = "1f1b") -> tuple[RankProgram, ...]:
        """Per-stage programs of this choice under ``schedule`` (``1f1b`` or ``gpipe``), for the simulator."""
        lists = {"1f1b": one_f_one_b, "gpipe": gpipe}
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
                  options: PipelineOptions = PipelineOptions()) -> PipelineChoice:
    """The fastest pipeline that fits (see the module docstring); ``StageError`` when none does."""
    t0 = time.perf_counter()
    check_optimizer(options.optimizer)
    layers = graph.layers
    groups = group_layers([float(layer.fwd_flops + layer.bwd_flops) for layer in layers],
                          [float(layer.output_bytes) for layer in layers[:-1]],
                          options.num_groups or min(len(layers), MAX_GROUPS), imbalance=options.imbalance)
    sizes = submesh_sizes(cluster)
    best: tuple[StageSolution, int, dict[StageCandidate, StageWork]] | None = None
    for num_micro in options.micro_batches:
        if global_batch % num_micro:
            continue
        problem, works = _stage_problem(graph, cluster, cost, groups, sizes, global_batch // num_micro, num_micro, options)
        for sub in _subproblems(problem, options):
            try:
                solution = solve_stages(sub)
            except StageError:
                continue
            if best is None or solution.step_s < best[0].step_s:
                best = (solution, num_micro, works)
    if best is None:
        raise StageError(f"no pipeline of {graph.name} fits {cluster.name} with micro-batch counts "
                         f"{list(options.micro_batches)} dividing the global batch {global_batch}")
    solution, num_micro, works = best
    stages = solution.stages
    ranges = tuple((groups[s.start][0], groups[s.stop - 1][1]) for s in stages)
    return PipelineChoice(
        layer_ranges=ranges,
        stage_ranks=assign_ranks([sizes[s.submesh] for s in stages], cluster),
        num_micro=num_micro, micro_size=global_batch // num_micro,
        work=tuple(works[s] for s in stages),
        sync_bytes=tuple(sum(layer.param_bytes for layer in layers[a:b]) for a, b in ranges),
        optimizer_numel=tuple(sum(layer.num_params for layer in layers[a:b]) for a, b in ranges),
        step_temp_bytes=tuple(_step_temporaries(graph, cluster, options.optimizer, a, b) for a, b in ranges),
        solution=solution, search_s=time.perf_counter() - t0, keep_outputs=options.keep_outputs,
    )


def _step_temporaries(graph: ModelGraph, cluster: Cluster, optimizer: str, start: int, stop: int) -> int:
    """What the optimizer step over layers ``[start, stop)``'s parameters allocates for a moment."""
    sizes = [p.nbytes for p in graph.params if start <= p.layer < stop]
    return step_temporaries(optimizer, max(sizes, default=0), sum(sizes), foreach=cluster.device.kind == "cuda")


def _subproblems(problem: StageProblem, options: PipelineOptions) -> list[StageProblem]:
    """The problem as it is, or one per submesh size (``same_size``); stages fewer than ``min_stages`` are
    ruled out by size: a stage may take at most ``devices / min_stages`` devices."""
    cap = problem.num_devices // max(1, options.min_stages)
    usable = [m for m, d in enumerate(problem.submesh_devices) if d <= cap]
    groups = [[m] for m in usable] if options.same_size else [usable]
    out = []
    for allowed in groups:
        cands = tuple(c for c in problem.candidates if c.submesh in allowed)
        out.append(replace(problem, candidates=cands))
    return out


def _stage_problem(graph: ModelGraph, cluster: Cluster, cost: CostModel, groups: Sequence[tuple[int, int]],
                   sizes: Sequence[int], micro_size: int, num_micro: int,
                   options: PipelineOptions) -> tuple[StageProblem, dict[StageCandidate, StageWork]]:
    """Every (group range, submesh) that splits the micro-batch evenly, priced on the CostModel."""
    limit = options.memory_fraction * cluster.device.memory_bytes
    states = OPTIMIZER_STATES[options.optimizer]
    cands: list[StageCandidate] = []
    works: dict[StageCandidate, StageWork] = {}
    for a in range(len(groups)):
        for b in range(a + 1, len(groups) + 1):
            layers = graph.layers[groups[a][0]:groups[b - 1][1]]
            params = sum(layer.param_bytes for layer in layers)
            temp = _step_temporaries(graph, cluster, options.optimizer, groups[a][0], groups[b - 1][1])
            for m, d in enumerate(sizes):
                if micro_size % d or options.rank_micro_batch not in (None, micro_size // d):
                    continue
                once = cost.collective_time("all_reduce", params, tuple(range(d))) + cost.optimizer_time(
                    sum(layer.num_params for layer in layers), num_tensors=len(layers))
                static = params * (2 + states)
                scale = (micro_size // d) / graph.batch_size
                for recompute in (False, True):
                    work = _stage_work(graph, layers, scale, last=b == len(groups), recompute=recompute)
                    memory = stage_memory(work, input_bytes=int(_input_bytes(graph, layers[0]) * scale),
                                          num_micro=num_micro, step_temp_bytes=temp, keep_outputs=options.keep_outputs)
                    in_flight = memory.max_in_flight(limit - static, cap=len(groups) + 1)
                    if in_flight < 1:
                        continue
                    merge = _merge_time(cost, work, num_micro, graph.dtype) if options.keep_outputs else 0.0
                    cand = StageCandidate(start=a, stop=b, submesh=m, config=int(recompute),
                                          time_s=_stage_time(cost, work, cluster, graph.dtype), max_after=in_flight - 1,
                                          once_s=once + merge)
                    cands.append(cand)
                    works[cand] = work
    problem = StageProblem(num_layers=len(groups), submesh_devices=tuple(sizes), num_devices=cluster.world_size,
                           num_micro=num_micro, candidates=tuple(cands))
    return problem, works


def _stage_work(graph: ModelGraph, layers: Sequence[LayerInfo], scale: float, *, last: bool, recompute: bool) -> StageWork:
    """One rank's work on one micro-batch through ``layers``, at ``scale`` x the captured batch (the last
    stage sends nothing on and keeps its output); with ``recompute`` each layer keeps only its input and runs
    forward again."""
    fwd_flops = sum(layer.fwd_flops for layer in layers) * scale
    fwd_bytes = sum(layer.fwd_bytes_moved for layer in layers) * scale
    kernels = sum(layer.num_kernels for layer in layers)
    saved = sum(layer.activation_bytes for layer in layers) * scale
    inputs = sum(_input_bytes(graph, layer) for layer in layers) * scale
    output = int(layers[-1].output_bytes * scale)
    return StageWork(
        fwd_flops=fwd_flops,
        bwd_flops=sum(layer.bwd_flops for layer in layers) * scale + (fwd_flops if recompute else 0.0),
        fwd_bytes_moved=fwd_bytes, num_kernels=kernels,
        bwd_bytes_moved=(3 if recompute else 2) * fwd_bytes, bwd_kernels=(3 if recompute else 2) * kernels,
        activation_bytes=int(inputs if recompute else saved),
        transient_bytes=_backward_temporaries(layers, scale, recompute=recompute),
        boundary_bytes=0 if last else output,
        final_output_bytes=output if last else 0,
    )


def _backward_temporaries(layers: Sequence[LayerInfo], scale: float, *, recompute: bool) -> int:
    """Bytes a stage's backward holds while it runs besides its saved activations and the gradients of its
    input and output: the most of any layer's backward workspace (the loss's gradients on the last stage's)
    plus the gradient flowing into that layer from the next one in the stage, and with recomputation the
    activations of the layer being recomputed. Activation sizes scale with the micro-batch, parameter
    gradients do not."""
    inner = [layer.output_bytes * scale for layer in layers[:-1]] + [0.0]
    most = max(layer.bwd_workspace_bytes * scale + layer.bwd_param_grad_bytes + flowing
               for layer, flowing in zip(layers, inner, strict=True))
    again = max(layer.activation_bytes for layer in layers) * scale if recompute else 0.0
    return int(most + again)


def _input_bytes(graph: ModelGraph, layer: LayerInfo) -> int:
    """A layer's input: the previous layer's output (the model's input, not counted, for the first)."""
    return graph.layers[layer.index - 1].output_bytes if layer.index > 0 else 0


def _merge_time(cost: CostModel, work: StageWork, num_micro: int, dtype: str) -> float:
    """The last stage's concatenation of its micro-batches' outputs at the end of the step (torch's schedule)."""
    if not work.final_output_bytes:
        return 0.0
    return cost.compute_time(0.0, 2.0 * num_micro * work.final_output_bytes, dtype=dtype, num_kernels=1)


def _stage_time(cost: CostModel, work: StageWork, cluster: Cluster, dtype: str) -> float:
    """Forward + backward of one micro-batch on one rank, plus the boundary sent on and its gradient back."""
    far = cluster.devices_per_node if cluster.num_nodes > 1 else min(1, cluster.world_size - 1)
    transfer = cost.p2p_time(work.boundary_bytes, 0, far) if work.boundary_bytes else 0.0
    fwd = cost.compute_time(work.fwd_flops, work.fwd_bytes_moved, dtype=dtype, num_kernels=work.num_kernels)
    bwd = cost.compute_time(work.bwd_flops, work.bwd_bytes_moved, dtype=dtype, num_kernels=work.bwd_kernels)
    return fwd + bwd + 2 * transfer
