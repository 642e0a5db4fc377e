"""Price stage candidates of the pipeline DP: a layer range on a submesh under a configuration (tensor-parallel
size inside the stage, activation recomputation), on the CostModel.

A stage of layers ``[a, b)`` on ``d`` devices with tensor-parallel size ``t`` runs ``d / t`` data-parallel
replicas; each rank takes ``micro_size / (d / t)`` samples of every micro-batch through the layers' per-rank
work (``LayerWork``: the replicated layer view for ``t = 1``, the intra-op ILP's sharding for ``t > 1``, see
``plait.planners.stage_configs``). Its time per micro-batch is the forward and backward compute (in the compute
dtype), the tensor-parallel collectives they wait for, and the boundary activation sent on and its gradient
sent back (between nodes when the cluster has several, which errs slow): whole, or, from a tensor-parallel
stage to one of the same size, as ``t`` slices that the receiver all-gathers inside its submesh (Megatron-LM's
scatter-gather, SC'21 §4.1), whichever is faster. Once per step it all-reduces its gradients over its
data-parallel ranks and runs the optimizer on its local parameters. Its memory is its local parameters,
gradients and optimizer state plus the bound ``stage_memory`` puts on its lowered program with the
micro-batches its schedule keeps in flight.

``plait.planners.stage_candidates`` prices every candidate of a search with these functions, once per distinct
layer composition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.cost.comm import CollectiveOp
from plait.cost.memory import step_temporaries
from plait.cost.work import PIPELINE_PASS_KERNELS, PIPELINE_TP_PASS_KERNELS, LayerWork, layer_work
from plait.graph.model_graph import LayerInfo, ModelGraph
from plait.planners.pipeline_lowering import StageWork
from plait.planners.stage_configs import ShardedLayers, comms_of


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
    compute_dtype: str | None = None  # the dtype layers compute in (None: the graph's)
    _works: dict[tuple[int, int], tuple[LayerWork, ...]] = field(default_factory=dict, repr=False)
    _params: dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict, repr=False)
    _comm_s: dict[tuple[str, float, int], float] = field(default_factory=dict, repr=False)

    @property
    def dtype(self) -> str:
        """The dtype the stages compute in."""
        return self.compute_dtype or self.graph.dtype

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
                self._works[tp, micro] = layer_work(self.graph, micro_batch=micro, compute_dtype=self.dtype)
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

    def price(self, start: int, stop: int, micro: int, config: StageConfig, *, last: bool, send_split: int = 1) -> PricedStage:
        """Layers ``[start, stop)`` of the layer view at ``micro`` samples per rank under ``config``, its boundary
        sent as ``send_split`` slices."""
        works = self.works(config.tp, micro)[start:stop]
        nbytes, numel, largest = (v[start:stop] for v in self.local_params(config.tp))
        scale = micro / self.graph.batch_size
        work = stage_work(works, self.graph.layers[start:stop], scale, last=last, recompute=config.recompute, tp=config.tp,
                          local_param_bytes=nbytes if config.tp > 1 else None)
        if send_split > 1 and not last:
            work = replace(work, send_split=send_split)
        temp = step_temporaries(self.optimizer, max(largest, default=0), sum(nbytes),
                                foreach=self.cluster.device.kind == "cuda")
        return PricedStage(work=work, config=config, param_bytes=sum(nbytes), param_numel=sum(numel), step_temp_bytes=temp,
                           input_bytes=works[0].input_bytes, num_layers=stop - start)

    def time_s(self, work: StageWork) -> float:
        """Forward + backward of one micro-batch on one rank with their collectives, plus the boundary both ways."""
        cost, dtype = self.cost, self.dtype
        fwd = cost.compute_time(work.fwd_flops, work.fwd_bytes_moved, dtype=dtype,
                                num_kernels=work.num_kernels + work.pass_kernels)
        bwd = cost.compute_time(work.bwd_flops, work.bwd_bytes_moved, dtype=dtype,
                                num_kernels=work.bwd_kernels + work.pass_kernels)
        comms = sum(self.collective_s(c.collective, c.nbytes, work.tp) for c in (*work.fwd_comms, *work.bwd_comms))
        return fwd + bwd + comms + self.boundary_s(work.boundary_bytes, work.send_split, work.tp)

    def collective_s(self, op: CollectiveOp, nbytes: float, tp: int) -> float:
        """A collective over the first ``tp`` ranks (priced once per op and size: repeated layers repeat them)."""
        key = (op, nbytes, tp)
        if key not in self._comm_s:
            self._comm_s[key] = self.cost.collective_time(op, nbytes, tuple(range(tp)))
        return self._comm_s[key]

    def boundary_s(self, nbytes: int, split: int, tp: int) -> float:
        """The boundary activation sent on and its gradient sent back: whole, or as ``split`` slices, each then
        all-gathered over a ``tp``-rank group (the receiver's; counted on the sender for both directions, which
        is exact for a chain of like stages)."""
        if not nbytes:
            return 0.0
        cluster = self.cluster
        far = cluster.devices_per_node if cluster.num_nodes > 1 else min(1, cluster.world_size - 1)
        if split == 1:
            return 2 * self.cost.p2p_time(nbytes, 0, far)
        gather = self.cost.collective_time("all_gather", nbytes, tuple(range(tp)))
        return 2 * (self.cost.p2p_time(-(-nbytes // split), 0, far) + gather)

    def send_split(self, layer: int, micro: int, tp: int) -> int:
        """How the output of ``layer`` crosses to a next stage of the same tensor-parallel size ``tp``: ``tp``
        slices when that is faster than whole and a dim after the batch divides by ``tp``, else 1."""
        if tp == 1 or layer >= len(self.graph.layers) - 1:
            return 1
        shape = self.graph.layers[layer].output_shape
        if not any(size % tp == 0 for size in shape[1:]):
            return 1
        nbytes = self.works(tp, micro)[layer].output_bytes
        return tp if self.boundary_s(nbytes, tp, tp) < self.boundary_s(nbytes, 1, tp) else 1

    def once_s(self, priced: PricedStage, data_parallel: int, num_micro: int) -> float:
        """Once per step: the gradient all-reduce over the data-parallel replicas, the optimizer, the outputs' merge."""
        ranks = tuple(range(0, data_parallel * priced.config.tp, priced.config.tp))
        sync = self.cost.collective_time("all_reduce", priced.param_bytes, ranks) if data_parallel > 1 else 0.0
        step = self.cost.optimizer_time(priced.param_numel, num_tensors=priced.num_layers)
        merge = 0.0
        if self.keep_outputs and priced.work.final_output_bytes:
            merge = self.cost.compute_time(0.0, 2.0 * num_micro * priced.work.final_output_bytes, dtype=self.dtype,
                                           num_kernels=1)
        return sync + step + merge


def stage_work(works: Sequence[LayerWork], layers: Sequence[LayerInfo], scale: float, *, last: bool, recompute: bool,
               tp: int = 1, local_param_bytes: Sequence[int] | None = None) -> StageWork:
    """One rank's work on one micro-batch through ``works`` (the last stage sends nothing on and keeps its
    output); with ``recompute`` each layer keeps only its input and runs its forward (and its collectives) again.
    ``local_param_bytes``: each layer's parameter bytes on one rank, when they are sharded (tp > 1)."""
    fwd_flops = sum(w.fwd_flops for w in works)
    fwd_bytes = sum(w.fwd_bytes_moved for w in works)
    kernels = sum(w.num_kernels for w in works)
    dispatch_fwd = sum(w.dispatch_fwd for w in works)  # DTensor's host work in tensor-parallel layers
    dispatch_bwd = sum(w.dispatch_bwd for w in works)
    output = works[-1].output_bytes
    again = tuple(c for w in works for c in w.tp_recompute) if recompute else ()
    return StageWork(
        fwd_flops=fwd_flops,
        bwd_flops=sum(w.bwd_flops for w in works) + (fwd_flops if recompute else 0.0),
        fwd_bytes_moved=fwd_bytes, num_kernels=kernels + dispatch_fwd,
        bwd_bytes_moved=(3 if recompute else 2) * fwd_bytes,
        bwd_kernels=(3 if recompute else 2) * kernels + dispatch_bwd + (dispatch_fwd if recompute else 0),
        activation_bytes=sum(w.input_bytes if recompute else w.activation_bytes for w in works),
        transient_bytes=backward_temporaries(layers, works, scale, recompute=recompute, local_param_bytes=local_param_bytes,
                                             last=last),
        boundary_bytes=0 if last else output,
        final_output_bytes=output if last else 0,
        tp=tp, fwd_comms=comms_of(works, "fwd"), bwd_comms=again + comms_of(works, "bwd"),
        pass_kernels=PIPELINE_PASS_KERNELS if tp == 1 else PIPELINE_TP_PASS_KERNELS,
    )


def backward_temporaries(layers: Sequence[LayerInfo], works: Sequence[LayerWork], scale: float, *, recompute: bool,
                         local_param_bytes: Sequence[int] | None = None, last: bool = False) -> int:
    """Bytes a stage's backward holds while it runs besides its saved activations and the gradients of its
    input and output: the most of any layer's backward workspace (``layer_workspace``) plus the gradient flowing
    into that layer from the next one in the stage, and with recomputation the activations of the layer being
    recomputed. ``last``: the stage ends with the model's last layer."""
    inner = [float(w.output_bytes) for w in works[:-1]] + [0.0]
    local = local_param_bytes if local_param_bytes is not None else [None] * len(works)
    ends = [last and i == len(works) - 1 for i in range(len(works))]
    most = max(layer_workspace(layer, w, scale, p, model_last=end) + flowing
               for layer, w, p, end, flowing in zip(layers, works, local, ends, inner, strict=True))
    again = max(w.activation_bytes for w in works) if recompute else 0.0
    return int(most + again)


def layer_workspace(layer: LayerInfo, work: LayerWork, scale: float, local_param_bytes: int | None = None, *,
                    model_last: bool = False) -> float:
    """One rank's backward workspace of a layer and its fresh parameter gradients (activation sizes scale with the
    micro-batch, parameter gradients do not). On a tensor-parallel rank (``local_param_bytes`` given) the fresh
    gradients shrink with the layer's local parameters, and the workspace with its saved activations (the
    gradients of split activations are split as they are); the model's last layer keeps its workspace whole
    (the loss's gradients of the gathered logits)."""
    workspace, grads = layer.bwd_workspace_bytes * scale, float(layer.bwd_param_grad_bytes)
    if local_param_bytes is None:
        return workspace + grads
    if layer.param_bytes:
        grads *= min(1.0, local_param_bytes / layer.param_bytes)
    whole = layer.activation_bytes * scale
    if whole and not model_last:
        workspace *= min(1.0, work.activation_bytes / whole)
    return workspace + grads
