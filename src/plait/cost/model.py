"""The CostModel: the one place every planner and the simulator get times from.

Compute (see docs/cost_model.md): a block of ``num_kernels`` kernels doing ``flops`` FLOPs and moving
``bytes_moved`` bytes costs device time ``flops / rate(dtype, flops / num_kernels) + bytes_moved /
traffic_bandwidth`` (the GEMM rate is read at the block's FLOPs per kernel; the traffic moves at the
profile's elementwise rate on a CPU rank, where GELU, softmax, LayerNorm and bias copies run at it, and at
the copy rate on a GPU) and host time
``num_kernels * kernel_s``. A CPU rank does both in one thread (they add); a GPU runs kernels while the
host queues the next ones (the larger wins). Rates come from the cluster's measured profile when it has
one, else from the datasheet with a default efficiency.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from plait.cluster.spec import Cluster
from plait.cost.calibration import Calibration
from plait.cost.comm import CollectiveOp, P2PPattern, flat_time, hierarchical_time, p2p_time
from plait.cost.profile import Profile, ProfileError, load_profile

# Datasheet peaks are never reached; without a measured profile, assume this fraction.
DEFAULT_MATMUL_EFFICIENCY = {"cuda": 0.6, "cpu": 1.0}
DEFAULT_KERNEL_OVERHEAD_S = {"cuda": 10e-6, "cpu": 5e-6}
ADAMW_BYTES_PER_PARAM = 4 * 4 * 2  # read+write of param, grad, two moments (fp32)

ProfileRef = Profile | str | os.PathLike[str]


@lru_cache(maxsize=16)
def _load_cached(ref: str, mtime: float) -> Profile:
    return load_profile(ref)


def resolve_profile(ref: ProfileRef) -> Profile:
    """A Profile object, a packaged name (``h200``) or a path, as a Profile (files are cached by mtime)."""
    if isinstance(ref, Profile):
        return ref
    text = os.fspath(ref)
    path = Path(text)
    return _load_cached(text, path.stat().st_mtime if path.is_file() else 0.0)


class CostModel:
    """Times of compute, collectives and transfers on one cluster, calibrated by a profile when it has one."""

    def __init__(self, cluster: Cluster, profile: ProfileRef | None = None, *, concurrency: int | None = None) -> None:
        self.cluster = cluster
        kind = cluster.device.kind
        ref = profile if profile is not None else cluster.profile
        self.profile: Profile | None = resolve_profile(ref) if ref is not None else None
        if self.profile is not None and self.profile.device.kind != kind:
            raise ProfileError(
                f"profile of {self.profile.device.name} ({self.profile.device.kind}) cannot calibrate cluster "
                f"{cluster.name} of {kind} devices; measure a matching machine with `plait profile --device {kind}`"
            )
        # CPU ranks of one machine compute at the same time (SPMD) and share its cores.
        self.concurrency = concurrency or (cluster.devices_per_node if kind == "cpu" else 1)
        self.calibration = Calibration(self.profile, concurrency=self.concurrency) if self.profile else None
        self.synchronous = kind == "cpu"  # host dispatch and kernel work add up on a CPU rank
        # gloo's communication threads run on the same cores as a CPU rank's compute, so the two take
        # turns; a GPU computes while its copy engines and NCCL kernels move data.
        self.overlaps_comm = kind != "cpu"
        self._levels: dict[int, CostModel] = {self.concurrency: self}
        self.matmul_efficiency = DEFAULT_MATMUL_EFFICIENCY[kind]
        rates = self.calibration.rates if self.calibration else None
        self.kernel_overhead_s = rates.kernel_s if rates else DEFAULT_KERNEL_OVERHEAD_S[kind]
        self.copy_bandwidth = rates.copy_bandwidth if rates else cluster.device.memory_bandwidth
        # Chosen by measurement (docs/cost_model.md): the elementwise rate on CPU ranks, the copy rate on GPUs.
        self.traffic_bandwidth = rates.elementwise_bandwidth if rates and kind == "cpu" else self.copy_bandwidth

    @property
    def source(self) -> str:
        """Where the numbers come from, in words."""
        if self.profile is None:
            return f"datasheet ({self.cluster.source or self.cluster.name}), efficiency {self.matmul_efficiency:g}"
        p = self.profile.provenance
        when = f"{p.date}, " if p.date else ""
        return f"profile of {self.profile.device.name} ({when}torch {p.torch_version}, {p.num_ranks} rank(s))"

    @property
    def cores_per_node(self) -> int | None:
        """The cores a CPU node's ranks share, as the profile measured them (``None`` on GPUs or without one)."""
        if self.profile is None or self.profile.device.kind != "cpu":
            return None
        return self.profile.device.num_devices

    def at_concurrency(self, level: int) -> CostModel:
        """This cost model read for ``level`` ranks of a node computing at once (itself on GPUs or without a profile,
        where the level changes nothing); the simulator reads it per moment on CPU ranks, which share cores."""
        if self.cluster.device.kind != "cpu" or self.calibration is None:
            return self
        if level not in self._levels:
            self._levels[level] = CostModel(self.cluster, self.profile, concurrency=level)
        return self._levels[level]

    # ---- compute -----------------------------------------------------------------------------

    def matmul_time(self, flops: float, *, dtype: str = "fp32", gemm_flops: float | None = None) -> float:
        """Seconds of GEMM work ``flops`` done by GEMMs of ``gemm_flops`` each (default: one GEMM)."""
        if flops <= 0:
            return 0.0
        gemm = flops if gemm_flops is None else gemm_flops
        device = self.cluster.device
        if self.calibration is not None:
            t = self.calibration.matmul_time(flops, dtype=dtype, gemm_flops=gemm)
            if t is not None:
                return t
            base = self.calibration.matmul_time(flops, dtype="fp32", gemm_flops=gemm)
            if base is not None:  # an unmeasured dtype: fp32's curve scaled by the datasheet ratio
                return base * device.flops_for("fp32") / device.flops_for(dtype)
        return flops / (device.flops_for(dtype) * self.matmul_efficiency)

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        """Time of a block of ``num_kernels`` kernels: GEMM rate read at FLOPs per kernel, memory traffic, launches."""
        gemm = flops / max(1, num_kernels)
        device_s = self.matmul_time(flops, dtype=dtype, gemm_flops=gemm) + bytes_moved / self.traffic_bandwidth
        host_s = num_kernels * self.kernel_overhead_s
        return device_s + host_s if self.synchronous else max(device_s, host_s)

    def optimizer_time(self, num_params: float, *, num_tensors: int = 0) -> float:
        """Time of an AdamW step over ``num_params`` elements in ``num_tensors`` tensors (memory bound)."""
        rates = self.calibration.rates if self.calibration else None
        if rates is not None and rates.adamw_param_s is not None:
            return num_params * rates.adamw_param_s + num_tensors * (rates.adamw_tensor_s or 0.0)
        host_s = max(1, num_tensors) * self.kernel_overhead_s
        return ADAMW_BYTES_PER_PARAM * num_params / self.copy_bandwidth + host_s

    # ---- communication -----------------------------------------------------------------------

    def collective_time(self, op: CollectiveOp | P2PPattern, nbytes: float, group: Sequence[int]) -> float:
        """Time of one collective over the ranks in ``group``; ``nbytes`` is the full tensor size.

        Inside a node: the profile's measured table for this op and group size, else the faster of ring
        and tree on the node's link. A group spanning nodes runs flat on the inter-node link or
        hierarchically (intra-node reduce-scatter, inter-node collective on a 1/d slice, intra-node
        all-gather), whichever is faster.
        """
        n = len(group)
        if n <= 1:
            return 0.0
        if op == "p2p_serial" or op == "p2p_ring":  # the sync runtime's own messages (P2P_PATTERNS), not a collective
            return self.p2p_pattern_time(op, nbytes, group)
        nodes = Counter(self.cluster.node_of(r) for r in group)
        if len(nodes) == 1:
            return self._intra_time(op, nbytes, n)
        per_node = min(nodes.values())
        inter = self.cluster.inter_node
        flat = flat_time(op, nbytes, n, inter.latency_s, inter.bandwidth)
        if per_node <= 1 or op in ("broadcast", "all_to_all"):
            return flat
        inner = self._intra_time("reduce_scatter", nbytes, per_node)
        hierarchical = hierarchical_time(
            op, nbytes, num_nodes=len(nodes), per_node=per_node, reduce_scatter_s=inner, inter=(inter.latency_s, inter.bandwidth)
        )
        return min(flat, hierarchical)

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        """One transfer of ``nbytes`` from ``src`` to ``dst``."""
        if self.cluster.node_of(src) == self.cluster.node_of(dst) and self.calibration is not None:
            measured = self.calibration.collective_time("p2p", 2, nbytes)
            if measured is not None:
                return measured
        link = self.cluster.link_between((src, dst))
        return p2p_time(nbytes, link.latency_s, link.bandwidth)

    def p2p_pattern_time(self, pattern: P2PPattern, nbytes: float, group: Sequence[int]) -> float:
        """A pattern of point-to-point messages over ``group``, each priced on the link it crosses (``message_time``).

        ``p2p_serial``: ``group[0]`` exchanges one message of ``nbytes`` with each of ``group[1:]``, one after the
        other (a parameter server receiving its pushes, or sending its answers). ``p2p_ring``: n - 1 ring steps over
        ``group`` in its order; in each step every rank sends a chunk of ``nbytes / n`` to the next at once, so a
        step lasts as long as its slowest hop, and the hops from one node to another share that node's link
        (inside one node: the profile's measured ring step for the group's size, where it has one).
        """
        n = len(group)
        if n <= 1:
            return 0.0
        if pattern == "p2p_serial":
            return sum(self.message_time(nbytes, peer, group[0]) for peer in group[1:])
        chunk = math.ceil(nbytes / n)
        measured = self._ring_step_time(chunk, group)
        if measured is not None:
            return (n - 1) * measured
        hops = [(group[i], group[(i + 1) % n]) for i in range(n)]
        crossing = Counter((self.cluster.node_of(a), self.cluster.node_of(b)) for a, b in hops)
        return (n - 1) * max(self.message_time(chunk, a, b, flows=crossing[(self.cluster.node_of(a), self.cluster.node_of(b))])
                             for a, b in hops)

    def _ring_step_time(self, nbytes: float, group: Sequence[int]) -> float | None:
        """The profile's ring step (every rank sends ``nbytes`` to the next at once) when ``group`` is one node's
        ranks and that group size was measured: the ranks' messages share the node's cores and memory."""
        if self.calibration is None or len({self.cluster.node_of(r) for r in group}) != 1:
            return None
        return self.calibration.collective_time("ring_step", len(group), nbytes)

    def message_time(self, nbytes: float, src: int, dst: int, *, flows: int = 1) -> float:
        """One message of the sync runtime: inside a node ``p2p_time``; between nodes over the node's link (the
        inter-node bandwidth is per rank with all ranks of a node crossing at once, so the link moves
        ``devices_per_node`` times that), shared by the ``flows`` messages crossing it at the same time."""
        if self.cluster.node_of(src) == self.cluster.node_of(dst):
            return self.p2p_time(nbytes, src, dst)
        inter = self.cluster.inter_node
        return inter.latency_s + nbytes * flows / (inter.bandwidth * self.cluster.devices_per_node)

    def intra_link(self, op: CollectiveOp | None = None) -> tuple[float, float]:
        """``(latency_s, bandwidth)`` of the intra-node link as measured for ``op`` (else p2p, else datasheet)."""
        if self.calibration is not None:
            choices: list[CollectiveOp | None] = [op] if op is not None else []
            if op == "all_to_all":
                choices.append("all_gather")  # the same exchange pattern
            for choice in [*choices, None]:
                found = self.calibration.link(choice)
                if found is not None:
                    return found
        return self.cluster.intra_node.latency_s, self.cluster.intra_node.bandwidth

    def _intra_time(self, op: CollectiveOp, nbytes: float, n: int) -> float:
        """Inside one node: the measured table plus the profile's sync cost (a blocking collective among
        computing ranks), else ring/tree on the intra-node link."""
        if self.calibration is not None:
            measured = self.calibration.collective_time(op, n, nbytes)
            if measured is not None:
                return measured + self.calibration.sync_time(n)
        latency, bandwidth = self.intra_link(op)
        return flat_time(op, nbytes, n, latency, bandwidth)
