"""Intra-op configurations for pipeline stages: the model's layers sharded over a tensor-parallel axis as the
intra-op ILP chooses, priced per layer so that any layer range on any submesh can be a stage.

For each tensor-parallel size ``t`` (a power of two, at most a node's devices) the ILP chooses placements for
the whole model on a 1-D model axis of ``t`` ranks once, at one per-rank micro-batch; ``intra_op_work`` then
gives every layer's work on one rank at any micro-batch: FLOPs, memory traffic, saved activations, the
tensor-parallel collectives its forward and backward wait for, and its parameters' local bytes. A stage of
layers ``[a, b)`` on ``d`` devices with tensor-parallel size ``t`` runs ``d / t`` data-parallel replicas of
those layers. Restricting the whole-model choice to a layer range is how plait gives each stage its own
intra-op plan (Alpa solves one ILP per stage and submesh; with repeated layers sharing one decision the
choice inside a range is the same, and the ILP is solved once per tensor-parallel size instead of once per
stage candidate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from plait.cluster.spec import Cluster
from plait.cost.work import Comm, LayerWork
from plait.graph.joint import JointGraph
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import MeshSpec, PrecisionPolicy
from plait.planners.intra_op.costs import DataParallel
from plait.planners.intra_op.dtensor_bridge import Placements
from plait.planners.intra_op.planner import IntraOpOptions, Solved, solve_model_axes
from plait.planners.intra_op.source import ModelSource
from plait.planners.intra_op.work import intra_op_work, local_bytes_of


@dataclass
class ShardedLayers:
    """The model's layers on a ``tp``-way model axis under one ILP choice; works per micro-batch, made once each."""

    tp: int
    graph: ModelGraph
    joint: JointGraph
    solved: Solved
    joint_batch: int
    compute_dtype: str
    _works: dict[int, tuple[LayerWork, ...]] = field(default_factory=dict)

    @property
    def placements(self) -> dict[str, Placements]:
        """Each parameter's placements on the model axis (unlisted: replicated)."""
        return self.solved.params

    def works(self, micro_batch: int) -> tuple[LayerWork, ...]:
        """Every layer's work on one rank for a per-rank micro-batch of ``micro_batch`` samples."""
        if micro_batch not in self._works:
            self._works[micro_batch] = intra_op_work(
                self.graph, self.joint, self.solved.propagation, self.solved.params, axes=("tp",), mesh_shape=(self.tp,),
                micro_batch=micro_batch, joint_batch=self.joint_batch, compute_dtype=self.compute_dtype)
        return self._works[micro_batch]

    def param_bytes(self) -> tuple[int, ...]:
        """Per layer, the bytes of its parameters one rank holds."""
        local = {p.name: local_bytes_of(p.shape, p.dtype, self.solved.params.get(p.name), (self.tp,))
                 for p in self.graph.params}
        return tuple(sum(local[p.name] for p in self.graph.params_of(layer.index)) for layer in self.graph.layers)

    def largest_param_bytes(self) -> tuple[int, ...]:
        """Per layer, the bytes of its largest local parameter (the optimizer's temporaries follow it)."""
        local = {p.name: local_bytes_of(p.shape, p.dtype, self.solved.params.get(p.name), (self.tp,))
                 for p in self.graph.params}
        return tuple(max((local[p.name] for p in self.graph.params_of(layer.index)), default=0)
                     for layer in self.graph.layers)

    def param_numel(self) -> tuple[int, ...]:
        """Per layer, the parameter elements one rank holds (what its optimizer updates)."""
        sizes = {p.name: p.nbytes // max(1, p.numel) for p in self.graph.params}
        local = {p.name: local_bytes_of(p.shape, p.dtype, self.solved.params.get(p.name), (self.tp,)) // sizes[p.name]
                 for p in self.graph.params}
        return tuple(sum(local[p.name] for p in self.graph.params_of(layer.index)) for layer in self.graph.layers)


def tensor_parallel_sizes(cluster: Cluster, limit: int | None = None) -> tuple[int, ...]:
    """Powers of two from 2 up to a node's devices (tensor parallelism stays inside a node)."""
    top = min(cluster.devices_per_node, limit or cluster.devices_per_node)
    return tuple(1 << k for k in range(1, top.bit_length()) if (1 << k) <= top)


def shard_layers(source: ModelSource, cluster: Cluster, cost: object, *, tp: int, joint_batch: int,
                 precision: PrecisionPolicy, optimizer: str, options: IntraOpOptions | None = None) -> ShardedLayers:
    """The ILP's choice for the whole model on a ``tp``-way model axis, captured at ``joint_batch`` samples per rank."""
    joint = source.joint(joint_batch)
    mesh = MeshSpec(shape=(tp,), axes=("tp",))
    solved = solve_model_axes(joint, mesh, ("tp",), cost, dp=DataParallel(), precision=precision, optimizer=optimizer,
                              options=options or IntraOpOptions())
    return ShardedLayers(tp=tp, graph=source.graph(joint_batch), joint=joint, solved=solved, joint_batch=joint_batch,
                         compute_dtype=precision.compute_dtype)


def comms_of(works: Sequence[LayerWork], phase: str) -> tuple[Comm, ...]:
    """The tensor-parallel collectives of these layers' forward (``fwd``) or backward (``bwd``), in order."""
    return tuple(c for w in works for c in (w.tp_fwd if phase == "fwd" else w.tp_bwd))
