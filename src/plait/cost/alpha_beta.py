"""A pure alpha-beta cost model on a named mesh, as Alpa's auto-sharding tests use it.

A collective over mesh axis k of n ranks on B bytes costs alpha_k + beta_k * f * B, with f = 2(n-1)/n for
all-reduce, (n-1)/n for all-gather and reduce-scatter, and (n-1)/n^2 for all-to-all, plus Alpa's small
tie-breakers (prefer reduce-scatter over all-reduce over all-gather). A group spanning several axes runs
as one ring over all its ranks with the largest alpha and beta among them (Alpa's flattened mesh).
Compute, copies and optimizer steps cost nothing, so plans differ only in what they communicate.
It has the interface of ``CostModel`` that planners and the simulator use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from plait.cluster.spec import Cluster
from plait.cost.comm import CollectiveOp
from plait.plan.ir import MeshSpec

TIE_BREAK = {"all_gather": 0.1, "all_reduce": 0.01, "reduce_scatter": 0.001, "all_to_all": 0.001, "broadcast": 0.0}


class AlphaBetaCost:
    """Alpha-beta collective times per named mesh axis; everything else is free."""

    overlaps_comm = True
    synchronous = False

    def __init__(self, cluster: Cluster, mesh: MeshSpec, alpha: Mapping[str, float], beta: Mapping[str, float]) -> None:
        self.cluster, self.mesh = cluster, mesh
        self.alpha, self.beta = dict(alpha), dict(beta)
        missing = [a for a in mesh.axes if a not in self.alpha or a not in self.beta]
        if missing:
            raise ValueError(f"alpha and beta are needed for every mesh axis; missing {missing}")

    @property
    def source(self) -> str:
        """Where the numbers come from, in words."""
        terms = ", ".join(f"{a}: alpha {self.alpha[a]:g}, beta {self.beta[a]:g}" for a in self.mesh.axes)
        return f"alpha-beta model ({terms})"

    def axes_of(self, group: Sequence[int]) -> tuple[str, ...]:
        """The mesh axes along which the ranks of ``group`` differ."""
        coords = [self.mesh.coords(r) for r in group]
        return tuple(a for k, a in enumerate(self.mesh.axes) if len({c[k] for c in coords}) > 1)

    def collective_time(self, op: CollectiveOp, nbytes: float, group: Sequence[int]) -> float:
        """alpha + beta * f(n) * nbytes on the group's axes (see the module docstring)."""
        n = len(group)
        if n <= 1:
            return 0.0
        axes = self.axes_of(group)
        alpha = max(self.alpha[a] for a in axes)
        beta = max(self.beta[a] for a in axes)
        factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
                  "all_to_all": (n - 1) / n**2, "broadcast": 1.0}[op]
        return alpha + beta * factor * nbytes + TIE_BREAK[op]

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        """One message: alpha + beta * nbytes on the axes the two ranks differ on."""
        axes = self.axes_of((src, dst))
        return max(self.alpha[a] for a in axes) + max(self.beta[a] for a in axes) * nbytes

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        """Compute is free in this model."""
        return 0.0

    def optimizer_time(self, num_params: float, *, num_tensors: int = 0) -> float:
        """The optimizer step is free in this model."""
        return 0.0
