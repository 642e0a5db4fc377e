"""Curves fitted to measurements: monotone log-log interpolation and alpha-beta lines."""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class AlphaBeta:
    """``time = alpha + beta * size``: a fixed cost and a per-unit cost (seconds per byte or per FLOP)."""

    alpha: float
    beta: float

    def __call__(self, size: float) -> float:
        return self.alpha + self.beta * size


def fit_alpha_beta(points: Iterable[tuple[float, float]]) -> AlphaBeta:
    """Least squares on relative error of ``time = alpha + beta * size`` with alpha, beta >= 0.

    Relative error weights small and large messages alike (times span orders of magnitude).
    """
    pts = [(float(x), float(t)) for x, t in points if t > 0]
    if not pts:
        raise ValueError("fit_alpha_beta needs at least one point with a positive time")
    if len(pts) == 1:
        x, t = pts[0]
        return AlphaBeta(alpha=t, beta=0.0)
    # Minimise sum ((alpha + beta x - t) / t)^2: normal equations of a 2x2 system.
    saa = sum(1 / t**2 for _, t in pts)
    sab = sum(x / t**2 for x, t in pts)
    sbb = sum(x * x / t**2 for x, t in pts)
    sa = sum(1 / t for _, t in pts)
    sb = sum(x / t for x, t in pts)
    det = saa * sbb - sab * sab
    if det > 0:
        alpha = (sa * sbb - sb * sab) / det
        beta = (saa * sb - sab * sa) / det
        if alpha >= 0 and beta >= 0:
            return AlphaBeta(alpha=alpha, beta=beta)
    # The unconstrained optimum is infeasible: best of the two one-parameter fits.
    only_alpha = AlphaBeta(alpha=sa / saa, beta=0.0)
    only_beta = AlphaBeta(alpha=0.0, beta=sb / sbb if sbb > 0 else 0.0)
    return min((only_alpha, only_beta), key=lambda f: _relative_sse(f, pts))


def _relative_sse(f: AlphaBeta, pts: list[tuple[float, float]]) -> float:
    return sum(((f(x) - t) / t) ** 2 for x, t in pts)


def isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return [m for m, c in blocks for _ in range(int(c))]


class LogLogCurve:
    """Time as a function of size through measured points, monotone non-decreasing in size.

    Between points: linear in (log size, log time). Repeated sizes are merged by their median time, and
    the times are made non-decreasing by isotonic regression (pool adjacent violators), so a bigger job
    never takes less time and one noisy small-size point does not lift every larger one.
    Outside the points: ``below`` and ``above`` say how to extend (``"rate"`` keeps the end point's
    time per unit of size; ``"flat"`` keeps its time).
    """

    def __init__(self, points: Iterable[tuple[float, float]], *, below: str = "rate", above: str = "rate") -> None:
        merged: dict[float, list[float]] = {}
        for size, t in points:
            if size <= 0 or t <= 0:
                raise ValueError(f"curve points need positive size and time, got ({size}, {t})")
            merged.setdefault(float(size), []).append(float(t))
        if not merged:
            raise ValueError("a curve needs at least one point")
        sizes = sorted(merged)
        times = isotonic([statistics.median(merged[s]) for s in sizes])
        self.sizes = sizes
        self.times = times
        self._log_sizes = [math.log(s) for s in sizes]
        self._log_times = [math.log(t) for t in times]
        self.below = below
        self.above = above

    def __call__(self, size: float) -> float:
        if size <= 0:
            return 0.0 if self.below == "rate" else self.times[0]
        if size <= self.sizes[0]:
            return self._extend(size, 0, self.below)
        if size >= self.sizes[-1]:
            return self._extend(size, -1, self.above)
        x = math.log(size)
        i = bisect.bisect_right(self._log_sizes, x)
        x0, x1 = self._log_sizes[i - 1], self._log_sizes[i]
        y0, y1 = self._log_times[i - 1], self._log_times[i]
        return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))

    def _extend(self, size: float, end: int, how: str) -> float:
        if how == "flat":
            return self.times[end]
        return self.times[end] * size / self.sizes[end]

    def rate(self, size: float) -> float:
        """Size per second at ``size`` (e.g. FLOP/s for a FLOPs curve)."""
        t = self(size)
        return size / t if t > 0 else math.inf


class MessageCurve:
    """Time of a collective by message size: the measured table, with alpha-beta beyond it.

    Inside the measured sizes the (monotone) table is interpolated linearly in size, which is exact
    wherever the times follow ``alpha + beta * size``; below the smallest size the time stays at the
    smallest one's (latency bound); above the largest it grows by the fitted per-byte cost ``beta``
    from the largest measured time, so the curve stays continuous.
    """

    def __init__(self, points: Iterable[tuple[float, float]]) -> None:
        pts = list(points)
        self.table = LogLogCurve(pts, below="flat", above="flat")
        self.fit = fit_alpha_beta(pts)
        beta = self.fit.beta
        if beta <= 0 and len(self.table.sizes) >= 2:
            (s0, s1), (t0, t1) = self.table.sizes[-2:], self.table.times[-2:]
            beta = (t1 - t0) / (s1 - s0)
        self.beta = beta

    def __call__(self, nbytes: float) -> float:
        sizes, times = self.table.sizes, self.table.times
        if nbytes >= sizes[-1]:
            return times[-1] + self.beta * (nbytes - sizes[-1])
        if nbytes <= sizes[0]:
            return times[0]
        i = bisect.bisect_right(sizes, nbytes)
        x0, x1, y0, y1 = sizes[i - 1], sizes[i], times[i - 1], times[i]
        return y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0)
