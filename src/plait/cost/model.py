"""The CostModel: the one place every planner and the simulator get times from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from plait.cluster.spec import Cluster
from plait.cost.comm import CollectiveOp, p2p_time, ring_time, tree_time
from plait.graph.model_graph import LayerInfo

# Datasheet peaks are never reached; without a measured profile, assume this fraction.
DEFAULT_MATMUL_EFFICIENCY = {"cuda": 0.6, "cpu": 1.0}
DEFAULT_KERNEL_OVERHEAD_S = {"cuda": 10e-6, "cpu": 5e-6}
ADAMW_BYTES_PER_PARAM = 4 * 4 * 2  # read+write of param, grad, two moments (fp32)


class CostModel:
    """Times of compute, collectives and transfers on one cluster (datasheet numbers, alpha-beta)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        kind = cluster.device.kind
        self.matmul_efficiency = DEFAULT_MATMUL_EFFICIENCY[kind]
        self.kernel_overhead_s = DEFAULT_KERNEL_OVERHEAD_S[kind]

    # ---- compute -----------------------------------------------------------------------------

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        """Roofline time of a block of kernels: the slower of FLOPs and memory traffic, plus launch overhead."""
        device = self.cluster.device
        flop_s = flops / (device.flops_for(dtype) * self.matmul_efficiency)
        mem_s = bytes_moved / device.memory_bandwidth
        return max(flop_s, mem_s) + num_kernels * self.kernel_overhead_s

    def layer_time(
        self, layer: LayerInfo, *, phase: Literal["fwd", "bwd"], batch_scale: float = 1.0, dtype: str = "fp32"
    ) -> float:
        """Forward or backward time of one layer at ``batch_scale`` times the captured batch."""
        if phase == "fwd":
            return self.compute_time(
                layer.fwd_flops * batch_scale, layer.fwd_bytes_moved * batch_scale, dtype=dtype, num_kernels=layer.num_kernels
            )
        return self.compute_time(
            layer.bwd_flops * batch_scale, 2 * layer.fwd_bytes_moved * batch_scale, dtype=dtype, num_kernels=2 * layer.num_kernels
        )

    def optimizer_time(self, num_params: float) -> float:
        """Time of a fused AdamW update of ``num_params`` elements (memory bound)."""
        return self.compute_time(10 * num_params, ADAMW_BYTES_PER_PARAM * num_params, num_kernels=1)

    # ---- communication -----------------------------------------------------------------------

    def collective_time(self, op: CollectiveOp, nbytes: float, group: Sequence[int]) -> float:
        """Time of one collective over the ranks in ``group``; ``nbytes`` is the full tensor size.

        Picks the faster of ring and tree (as NCCL does); a group spanning several nodes runs
        hierarchically: intra-node reduce-scatter, inter-node collective on a 1/d slice, intra-node all-gather.
        """
        n = len(group)
        if n <= 1:
            return 0.0
        nodes: dict[int, int] = {}
        for r in group:
            nodes[self.cluster.node_of(r)] = nodes.get(self.cluster.node_of(r), 0) + 1
        if len(nodes) == 1:
            return self._flat_time(op, nbytes, n, self.cluster.intra_node.latency_s, self.cluster.intra_node.bandwidth)
        per_node = min(nodes.values())
        flat = self._flat_time(op, nbytes, n, self.cluster.inter_node.latency_s, self.cluster.inter_node.bandwidth)
        if per_node <= 1 or op in ("broadcast", "all_to_all"):
            return flat
        return min(flat, self._hierarchical_time(op, nbytes, len(nodes), per_node))

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        """One transfer of ``nbytes`` from ``src`` to ``dst``."""
        link = self.cluster.link_between((src, dst))
        return p2p_time(nbytes, link.latency_s, link.bandwidth)

    def _flat_time(self, op: CollectiveOp, nbytes: float, n: int, latency_s: float, bandwidth: float) -> float:
        return min(ring_time(op, nbytes, n, latency_s, bandwidth), tree_time(op, nbytes, n, latency_s, bandwidth))

    def _hierarchical_time(self, op: CollectiveOp, nbytes: float, num_nodes: int, per_node: int) -> float:
        intra, inter = self.cluster.intra_node, self.cluster.inter_node
        inner = ring_time("reduce_scatter", nbytes, per_node, intra.latency_s, intra.bandwidth)
        outer = self._flat_time(op, nbytes / per_node, num_nodes, inter.latency_s, inter.bandwidth)
        if op == "all_reduce":
            return 2 * inner + outer
        return inner + outer
