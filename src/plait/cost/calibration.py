"""Lookups a CostModel reads from a measured profile: matmul curves, per-rank rates, collective tables."""

from __future__ import annotations

from dataclasses import dataclass

from plait.cost.comm import CollectiveOp, link_from_fit
from plait.cost.curves import LogLogCurve, MessageCurve
from plait.cost.profile import MatmulPoint, Profile, RankRates

# A dtype without its own curve borrows one with the same tensor-core peak.
DTYPE_TWINS = {"fp16": "bf16", "bf16": "fp16"}


@dataclass(frozen=True, kw_only=True)
class ScaledRates:
    """Per-rank rates at the wanted concurrency (scaled from the nearest measured level when needed)."""

    op_s: float
    kernel_s: float
    copy_bandwidth: float
    elementwise_bandwidth: float
    adamw_param_s: float | None
    adamw_tensor_s: float | None


class Calibration:
    """A profile read for ranks of which ``concurrency`` compute at the same time on one machine.

    A CPU rank's throughput depends on how many ranks share the cores: levels the profile measured are
    used as they are; another level borrows the nearest measured one below it (or the smallest) and scales
    time by the change of each rank's core share, ``min(1, cores / concurrency)``. GPUs do not share.
    """

    def __init__(self, profile: Profile, *, concurrency: int = 1) -> None:
        self.profile = profile
        self.concurrency = max(1, concurrency)
        self.rates = self._scaled_rates()
        self._matmul = {dtype: self._matmul_curve(dtype) for dtype in profile.dtypes()}
        self._comm = self._comm_curves()
        self._sync = {p.group_size: p.seconds for p in profile.sync}

    # ---- levels ------------------------------------------------------------------------------

    def _share(self, level: int) -> float:
        if self.profile.device.kind != "cpu":
            return 1.0
        return min(1.0, self.profile.device.num_devices / level)

    def _nearest_level(self, levels: list[int]) -> tuple[int, float]:
        """The measured level to read and the time factor that turns its times into ours."""
        below = [c for c in levels if c <= self.concurrency]
        level = max(below) if below else min(levels)
        return level, self._share(level) / self._share(self.concurrency)

    def _scaled_rates(self) -> ScaledRates:
        by_level: dict[int, RankRates] = {r.concurrent: r for r in self.profile.rates}
        level, slow = self._nearest_level(sorted(by_level))
        r = by_level[level]
        return ScaledRates(
            op_s=r.op_s * slow,
            kernel_s=r.kernel_s * slow,
            copy_bandwidth=r.copy_bandwidth / slow,
            elementwise_bandwidth=r.elementwise_bandwidth / slow,
            adamw_param_s=None if r.adamw_param_s is None else r.adamw_param_s * slow,
            adamw_tensor_s=None if r.adamw_tensor_s is None else r.adamw_tensor_s * slow,
        )

    # ---- compute -----------------------------------------------------------------------------

    def _matmul_curve(self, dtype: str) -> LogLogCurve:
        points: list[MatmulPoint] = [p for p in self.profile.matmul if p.dtype == dtype]
        level, slow = self._nearest_level(sorted({p.concurrent for p in points}))
        return LogLogCurve([(p.flops, p.seconds * slow) for p in points if p.concurrent == level])

    def _curve(self, dtype: str) -> LogLogCurve | None:
        """The matmul curve of ``dtype``, else of its twin; ``None`` when neither was measured."""
        return self._matmul.get(dtype) or self._matmul.get(DTYPE_TWINS.get(dtype, ""))

    def matmul_time(self, flops: float, *, dtype: str, gemm_flops: float) -> float | None:
        """Seconds for ``flops`` done by GEMMs of ``gemm_flops`` each; ``None`` when ``dtype`` was not measured."""
        curve = self._curve(dtype)
        if curve is None:
            return None
        if flops <= 0:
            return 0.0
        return flops / curve.rate(max(gemm_flops, 1.0))

    # ---- communication -----------------------------------------------------------------------

    def _comm_curves(self) -> dict[tuple[str, int], MessageCurve]:
        tables: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for c in self.profile.collectives:
            tables.setdefault((c.op, c.group_size), []).append((float(c.nbytes), c.seconds))
        return {key: MessageCurve(points) for key, points in tables.items()}

    def sync_time(self, n: int) -> float:
        """Extra time of a blocking collective among ``n`` computing ranks (nearest measured group size; 0 if none)."""
        if not self._sync:
            return 0.0
        nearest = min(self._sync, key=lambda size: (abs(size - n), size))
        return self._sync[nearest]

    def measured_group_sizes(self, op: str) -> list[int]:
        """Group sizes with a measured table for ``op`` (``"p2p"`` for point-to-point)."""
        return sorted(n for o, n in self._comm if o == op)

    def collective_time(self, op: str, n: int, nbytes: float) -> float | None:
        """Measured (interpolated) time of ``op`` on ``n`` local ranks; ``None`` when not measured."""
        curve = self._comm.get((op, n))
        return None if curve is None else curve(nbytes)

    def link(self, op: CollectiveOp | None = None) -> tuple[float, float] | None:
        """``(latency_s, bandwidth)`` of the local link, inferred from the largest measured group of ``op``.

        With ``op=None`` the point-to-point fit (latency = alpha, bandwidth = 1/beta).
        """
        if op is None:
            curve = self._comm.get(("p2p", 2))
            if curve is None:
                return None
            return curve.fit.alpha, (1.0 / curve.fit.beta if curve.fit.beta > 0 else float("inf"))
        sizes = self.measured_group_sizes(op)
        if not sizes:
            return None
        n = sizes[-1]
        fit = self._comm[(op, n)].fit
        return link_from_fit(op, n, fit.alpha, fit.beta)
