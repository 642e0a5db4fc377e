"""Price every stage candidate of the pipeline DP: a layer-group range on a submesh under a configuration
(tensor-parallel size inside the stage, activation recomputation), on the CostModel.

A stage of layers ``[a, b)`` on ``d`` devices with tensor-parallel size ``t`` runs ``d / t`` data-parallel
replicas; each rank takes ``micro_size / (d / t)`` samples of every micro-batch through the layers' per-rank
work (``LayerWork``: the replicated layer view for ``t = 1``, the intra-op ILP's sharding for ``t > 1``, see
``plait.planners.stage_configs``). Its time per micro-batch is the forward and backward compute, the
tensor-parallel collectives they wait for, and the boundary activation sent on and its gradient sent back
(between nodes when the cluster has several, which errs slow). Once per step it all-reduces its gradients
over its data-parallel ranks and runs the optimizer on its local parameters. Its memory is its local
parameters, gradients and optimizer state plus the bound ``stage_memory`` puts on its lowered program with
the micro-batches its schedule keeps in flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.cost.memory import OPTIMIZER_STATES, step_temporaries
from plait.cost.work import LayerWork, layer_work
from plait.graph.model_graph import LayerInfo, ModelGraph
from plait.planners.pipeline_lowering import StageWork, stage_memory
from plait.planners.stage_configs import ShardedLayers, comms_of
from plait.planners.stage_dp import StageCandidate, StageProblem


@dataclass(frozen=True)
class StageConfig:
    """How a stage runs its layers: ``tp`` tensor-parallel ranks per replica, recomputation or not."""

    tp: int = 1
    recompute: bool = False


@dataclass(frozen=True)
class PricedStage:
    """A candidate's work per micro-batch and what it holds and does once per step, per rank."""

    work: StageWork
    config: StageConfig
    param_bytes: int  # local parameters (gradients as many)
    param_numel: int  # what its optimizer updates
    step_temp_bytes: int
    input_bytes: int  # the activation it receives per micro-batch (the previous stage's boundary)
    num_layers: int


@dataclass
class StagePricer:
    """Per-layer works for every tensor-parallel size, and the prices of layer ranges built from them."""

    graph: ModelGraph
    cluster: Cluster
    cost: CostModel
    optimizer: str
    keep_outputs: bool = False
    sharded: Mapping[int, ShardedLayers] | None = None  # tp size -> the ILP's layers (t = 1 is the layer view)
    allowed: tuple[int, ...] | None = None  # the sizes stages may use (None: all of them)
    _works: dict[tuple[int, int], tuple[LayerWork, ...]] = field(default_factory=dict, repr=False)
    _params: dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict, repr=False)

    def tp_sizes(self) -> tuple[int, ...]:
        """The tensor-parallel sizes stages may use: 1 and every size the pricer has layers for, if allowed."""
        return tuple(t for t in (1, *sorted(self.sharded or {})) if self.allowed is None or t in self.allowed)

    def configs(self) -> tuple[StageConfig, ...]:
        """Every configuration a stage may take; a candidate's ``config`` indexes this."""
        return tuple(StageConfig(tp, r) for tp in self.tp_sizes() for r in (False, True))

    def works(self, tp: int, micro: int) -> tuple[LayerWork, ...]:
        """Every layer's per-rank work at ``micro`` samples per rank under tensor-parallel size ``tp`` (made once)."""
        if (tp, micro) not in self._works:
            if tp == 1:
                self._works[tp, micro] = layer_work(self.graph, micro_batch=micro, compute_dtype=self.graph.dtype)
            else:
                assert self.sharded is not None
                self._works[tp, micro] = self.sharded[tp].works(micro)
        return self._works[tp, micro]

    def local_params(self, tp: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Per layer: local parameter bytes, elements, and the largest local parameter's bytes (made once)."""
        if tp not in self._params:
            self._params[tp] = self._local_params(tp)
        return self._params[tp]

    def _local_params(self, tp: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if tp == 1:
            layers = self.graph.layers
            largest = tuple(max((p.nbytes for p in self.graph.params_of(i)), default=0) for i in range(len(layers)))
            return tuple(layer.param_bytes for layer in layers), tuple(layer.num_params for layer in layers), largest
        assert self.sharded is not None
        sharded = self.sharded[tp]
        return sharded.param_bytes(), sharded.param_numel(), sharded.largest_param_bytes()

    def price(self, start: int, stop: int, micro: int, config: StageConfig, *, last: bool) -> PricedStage:
        """Layers ``[start, stop)`` of the layer view at ``micro`` samples per rank under ``config``."""
        works = self.works(config.tp, micro)[start:stop]
        nbytes, numel, largest = (v[start:stop] for v in self.local_params(config.tp))
        scale = micro / self.graph.batch_size
        work = stage_work(works, self.graph.layers[start:stop], scale, last=last, recompute=config.recompute, tp=config.tp)
        temp = step_temporaries(self.optimizer, max(largest, default=0), sum(nbytes),
                                foreach=self.cluster.device.kind == "cuda")
        return PricedStage(work=work, config=config, param_bytes=sum(nbytes), param_numel=sum(numel), step_temp_bytes=temp,
                           input_bytes=works[0].input_bytes, num_layers=stop - start)

    def time_s(self, work: StageWork) -> float:
        """Forward + backward of one micro-batch on one rank with their collectives, plus the boundary both ways."""
        cluster, cost, dtype = self.cluster, self.cost, self.graph.dtype
        far = cluster.devices_per_node if cluster.num_nodes > 1 else min(1, cluster.world_size - 1)
        transfer = cost.p2p_time(work.boundary_bytes, 0, far) if work.boundary_bytes else 0.0
        fwd = cost.compute_time(work.fwd_flops, work.fwd_bytes_moved, dtype=dtype, num_kernels=work.num_kernels)
        bwd = cost.compute_time(work.bwd_flops, work.bwd_bytes_moved, dtype=dtype, num_kernels=work.bwd_kernels)
        group = tuple(range(work.tp))
        comms = sum(cost.collective_time(c.collective, c.nbytes, group) for c in (*work.fwd_comms, *work.bwd_comms))
        return fwd + bwd + comms + 2 * transfer

    def once_s(self, priced: PricedStage, data_parallel: int, num_micro: int) -> float:
        """Once per step: the gradient all-reduce over the data-parallel replicas, the optimizer, the outputs' merge."""
        ranks = tuple(range(0, data_parallel * priced.config.tp, priced.config.tp))
        sync = self.cost.collective_time("all_reduce", priced.param_bytes, ranks) if data_parallel > 1 else 0.0
        step = self.cost.optimizer_time(priced.param_numel, num_tensors=priced.num_layers)
        merge = 0.0
        if self.keep_outputs and priced.work.final_output_bytes:
            merge = self.cost.compute_time(0.0, 2.0 * num_micro * priced.work.final_output_bytes, dtype=self.graph.dtype,
                                           num_kernels=1)
        return sync + step + merge


def stage_work(works: Sequence[LayerWork], layers: Sequence[LayerInfo], scale: float, *, last: bool, recompute: bool,
               tp: int = 1) -> StageWork:
    """One rank's work on one micro-batch through ``works`` (the last stage sends nothing on and keeps its
    output); with ``recompute`` each layer keeps only its input and runs its forward (and its collectives) again."""
    fwd_flops = sum(w.fwd_flops for w in works)
    fwd_bytes = sum(w.fwd_bytes_moved for w in works)
    kernels = sum(w.num_kernels for w in works)
    output = works[-1].output_bytes
    again = tuple(c for w in works for c in w.tp_recompute) if recompute else ()
    return StageWork(
        fwd_flops=fwd_flops,
        bwd_flops=sum(w.bwd_flops for w in works) + (fwd_flops if recompute else 0.0),
        fwd_bytes_moved=fwd_bytes, num_kernels=kernels,
        bwd_bytes_moved=(3 if recompute else 2) * fwd_bytes, bwd_kernels=(3 if recompute else 2) * kernels,
        activation_bytes=sum(w.input_bytes if recompute else w.activation_bytes for w in works),
        transient_bytes=backward_temporaries(layers, works, scale, recompute=recompute),
        boundary_bytes=0 if last else output,
        final_output_bytes=output if last else 0,
        tp=tp, fwd_comms=comms_of(works, "fwd"), bwd_comms=again + comms_of(works, "bwd"),
    )


def backward_temporaries(layers: Sequence[LayerInfo], works: Sequence[LayerWork], scale: float, *, recompute: bool) -> int:
    """Bytes a stage's backward holds while it runs besides its saved activations and the gradients of its
    input and output: the most of any layer's backward workspace (the loss's gradients on the last stage's,
    counted whole even when the layer is sharded, which errs high) plus the gradient flowing into that layer
    from the next one in the stage, and with recomputation the activations of the layer being recomputed.
    Activation sizes scale with the micro-batch, parameter gradients do not."""
    inner = [float(w.output_bytes) for w in works[:-1]] + [0.0]
    most = max(layer.bwd_workspace_bytes * scale + layer.bwd_param_grad_bytes + flowing
               for layer, flowing in zip(layers, inner, strict=True))
    again = max(w.activation_bytes for w in works) if recompute else 0.0
    return int(most + again)


def stage_problem(pricer: StagePricer, groups: Sequence[tuple[int, int]], sizes: Sequence[int], micro_size: int,
                  num_micro: int, *, limit: float, rank_micro_batch: int | None = None,
                  ) -> tuple[StageProblem, dict[StageCandidate, PricedStage]]:
    """Every (group range, submesh, configuration) that splits the micro-batch evenly and fits, priced."""
    states = OPTIMIZER_STATES[pricer.optimizer]
    configs = pricer.configs()
    cands: list[StageCandidate] = []
    priced_of: dict[StageCandidate, PricedStage] = {}
    for a in range(len(groups)):
        for b in range(a + 1, len(groups) + 1):
            start, stop = groups[a][0], groups[b - 1][1]
            for m, d in enumerate(sizes):
                for k, config in enumerate(configs):
                    if d % config.tp or config.tp > pricer.cluster.devices_per_node:
                        continue
                    replicas = d // config.tp
                    if micro_size % replicas or rank_micro_batch not in (None, micro_size // replicas):
                        continue
                    priced = pricer.price(start, stop, micro_size // replicas, config, last=b == len(groups))
                    cand = _candidate(pricer, priced, a, b, m, k, replicas, num_micro, limit, states, len(groups))
                    if cand is not None:
                        cands.append(cand)
                        priced_of[cand] = priced
    problem = StageProblem(num_layers=len(groups), submesh_devices=tuple(sizes), num_devices=pricer.cluster.world_size,
                           num_micro=num_micro, candidates=tuple(cands))
    return problem, priced_of


def _candidate(pricer: StagePricer, priced: PricedStage, a: int, b: int, m: int, k: int, replicas: int, num_micro: int,
               limit: float, states: int, num_groups: int) -> StageCandidate | None:
    """The stage candidate, with the most stages that may follow it before it runs out of memory; None if it
    cannot hold one micro-batch."""
    work = priced.work
    static = priced.param_bytes * (2 + states)
    memory = stage_memory(work, input_bytes=priced.input_bytes, num_micro=num_micro, step_temp_bytes=priced.step_temp_bytes,
                          keep_outputs=pricer.keep_outputs)
    in_flight = memory.max_in_flight(limit - static, cap=num_groups + 1)
    if in_flight < 1:
        return None
    return StageCandidate(start=a, stop=b, submesh=m, config=k, time_s=pricer.time_s(work), max_after=in_flight - 1,
                          once_s=pricer.once_s(priced, replicas, num_micro))
