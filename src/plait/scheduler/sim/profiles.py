"""Measured application profiles (Pollux artifact traces): true step times and gradient statistics.

Per model the traces give (see ``data/pollux/README.md``):

- ``placements.csv``: step and sync time per placement string (GPUs per node) and micro-batch; a
  placement is looked up in its lexicographically smallest rotation and interpolated linearly in
  the micro-batch;
- ``scalability.csv``: the same for 6-16 nodes; a placement that is not listed is interpolated
  linearly in (nodes, replicas, micro-batch) over these rows and the per-(nodes, replicas,
  micro-batch) means of the placement rows;
- ``validation-<B>.csv``: per statistical epoch, progress, steps, metric and gradient statistics at
  total batch B, interpolated linearly between the two nearest measured batch sizes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.interpolate import LinearNDInterpolator

from plait.errors import PlaitError
from plait.scheduler.goodput import BatchLimits, FloatArray, GradParams

DATA_PACKAGE = "plait.scheduler"
MAX_SCALABILITY_NODES = 16


class TraceError(PlaitError):
    """An application's traces that are missing or cannot serve a request."""


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    """Per-model settings the artifact uses beyond what the traces imply."""

    max_epochs: int
    max_local_bsz: int | None = None


# Epochs simulated per model and the yolov3 micro-batch cap, as in the published simulator.
APP_SETTINGS: dict[str, AppSettings] = {
    "bert": AppSettings(max_epochs=2),
    "cifar10": AppSettings(max_epochs=100),
    "ncf": AppSettings(max_epochs=10),
    "imagenet": AppSettings(max_epochs=90),
    "deepspeech2": AppSettings(max_epochs=80),
    "yolov3": AppSettings(max_epochs=50, max_local_bsz=8),
}


def data_root() -> Path:
    """The packaged copy of the Pollux artifact data."""
    return Path(str(resources.files(DATA_PACKAGE))) / "data" / "pollux"


def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    with path.open(newline="") as f:
        yield from csv.DictReader(f)


@dataclass(frozen=True, kw_only=True)
class Validation:
    """One ``validation-<B>.csv``: arrays indexed by epoch."""

    progress: FloatArray
    iteration: FloatArray
    metric: FloatArray
    grad_sqr: FloatArray
    grad_var: FloatArray


def canonical_placement(placement: tuple[int, ...]) -> tuple[int, ...]:
    """Drop empty nodes and rotate to the lexicographically smallest form."""
    p = tuple(c for c in placement if c)
    return min(p[i:] + p[:i] for i in range(len(p)))


def packed_placement(num_replicas: int, gpus_per_node: int) -> tuple[int, ...]:
    """GPUs per node of ``num_replicas`` replicas packed onto full nodes (the last one partly filled)."""
    full, rest = divmod(num_replicas, gpus_per_node)
    return (gpus_per_node,) * full + ((rest,) if rest else ())


class Application:
    """One model's traces: true throughput per placement and statistics per batch size and epoch."""

    def __init__(self, trace_dir: Path, settings: AppSettings) -> None:
        self.name = trace_dir.name
        self.validation = self._load_validation(trace_dir)
        self._placements = self._load_placements(trace_dir / "placements.csv")
        self._scalability = trace_dir / "scalability.csv"
        self._nd: LinearNDInterpolator | None = None
        self._throughput_cache: dict[tuple[tuple[int, ...], int], tuple[float, float]] = {}
        self._nd_cache: dict[tuple[int, int, int], tuple[float, float]] = {}
        self._grad_cache: dict[tuple[int, int], tuple[float, float]] = {}
        self._gain_cache: dict[tuple[int, int], float] = {}
        all_bsz = np.concatenate([v[0] for v in self._placements.values()])
        self.init_batch_size = min(self.validation)
        self.max_batch_size = max(self.validation)
        self.min_local_bsz = int(all_bsz.min())
        self.max_local_bsz = settings.max_local_bsz or int(all_bsz.max())
        self.max_epochs = settings.max_epochs
        self._progress = np.array([0.0] + [min(float(v.progress[e]) for v in self.validation.values())
                                           for e in range(self.max_epochs)])

    @staticmethod
    def _load_validation(trace_dir: Path) -> dict[int, Validation]:
        out: dict[int, Validation] = {}
        for path in trace_dir.glob("validation-*.csv"):
            rows = list(_read_csv(path))
            cols = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
            out[int(path.stem.split("-")[-1])] = Validation(**cols)
        if not out:
            raise TraceError(f"no validation-*.csv in {trace_dir}; the trace directory is incomplete")
        return dict(sorted(out.items()))

    @staticmethod
    def _load_placements(path: Path) -> dict[str, tuple[FloatArray, FloatArray, FloatArray]]:
        grouped: dict[str, list[tuple[float, float, float]]] = {}
        for r in _read_csv(path):
            grouped.setdefault(r["placement"], []).append(
                (float(r["local_bsz"]), float(r["step_time"]), float(r["sync_time"])))
        out = {}
        for key, rows in grouped.items():
            a = np.array(sorted(rows))
            out[key] = (a[:, 0], a[:, 1], a[:, 2])
        return out

    def limits(self, accumulation: bool = True) -> BatchLimits:
        """The batch limits a job of this model runs under."""
        return BatchLimits(max_batch_size=self.max_batch_size, min_local_bsz=self.min_local_bsz,
                           max_local_bsz=self.max_local_bsz, accumulation=accumulation)

    def cap_local_bsz(self, local_bsz: int, num_replicas: int, accum_steps: int) -> int:
        """``local_bsz`` lowered so that the total batch stays within the largest measured batch."""
        return min(local_bsz, int(self.max_batch_size / (num_replicas * (accum_steps + 1))))

    def progress(self, epoch: int) -> float:
        """Progress (scale-invariant steps) at the end of ``epoch`` epochs."""
        return float(self._progress[epoch])

    def _bracket(self, batch_size: float) -> tuple[int, int]:
        lower = upper = None
        for b in self.validation:
            if b <= batch_size:
                lower = b
            if b >= batch_size:
                upper = b
                break
        if lower is None or upper is None:
            raise TraceError(f"{self.name}: batch size {batch_size} is outside the measured range "
                             f"{self.init_batch_size}..{self.max_batch_size}")
        return lower, upper

    def _interp_batch(self, batch_size: float, column: str, epoch: int) -> float:
        lo, hi = self._bracket(batch_size)
        y_lo = float(getattr(self.validation[lo], column)[epoch])
        if lo == hi:
            return y_lo
        y_hi = float(getattr(self.validation[hi], column)[epoch])
        return ((batch_size - lo) * y_hi + (hi - batch_size) * y_lo) / (hi - lo)

    def grad_stats(self, batch_size: int, epoch: int) -> tuple[float, float]:
        """(grad_sqr, grad_var) measured during ``epoch`` at total batch ``batch_size``."""
        key = (batch_size, epoch)
        if key not in self._grad_cache:
            self._grad_cache[key] = (self._interp_batch(batch_size, "grad_sqr", epoch),
                                     self._interp_batch(batch_size, "grad_var", epoch))
        return self._grad_cache[key]

    def gain(self, batch_size: int, epoch: int) -> float:
        """True AdaScale gain of total batch ``batch_size`` during ``epoch`` (progress per step)."""
        key = (batch_size, epoch)
        hit = self._gain_cache.get(key)
        if hit is None:
            sqr, var = self.grad_stats(batch_size, epoch)
            hit = self._gain_cache[key] = float(GradParams(sqr=sqr, var=var).gain(batch_size / self.init_batch_size))
        return hit

    def iterations(self, batch_size: int, epoch: int) -> float:
        """Optimizer steps at ``batch_size`` needed to finish ``epoch + 1`` epochs."""
        return self._interp_batch(batch_size, "iteration", epoch)

    def throughput(self, placement: tuple[int, ...], local_bsz: int) -> tuple[float, float]:
        """True (step_time, sync_time) in seconds for a placement and micro-batch."""
        key = (placement, local_bsz)
        hit = self._throughput_cache.get(key)
        if hit is None:
            hit = self._throughput_cache[key] = self._throughput(canonical_placement(placement), local_bsz)
        return hit

    def step_time(self, placement: tuple[int, ...], local_bsz: int, accum_steps: int) -> float:
        """True seconds per optimizer step: the synchronising step plus ``accum_steps`` micro-steps without sync."""
        step, sync = self.throughput(placement, local_bsz)
        return step + (step - sync) * accum_steps

    def _throughput(self, placement: tuple[int, ...], local_bsz: int) -> tuple[float, float]:
        name = "".join(map(str, placement))
        if name in self._placements:
            bsz, step, sync = self._placements[name]
            if not bsz[0] <= local_bsz <= bsz[-1]:
                raise TraceError(f"{self.name}: micro-batch {local_bsz} is outside {bsz[0]:g}..{bsz[-1]:g} "
                                 f"measured for placement {name}")
            return float(np.interp(local_bsz, bsz, step)), float(np.interp(local_bsz, bsz, sync))
        point = (min(len(placement), MAX_SCALABILITY_NODES), sum(placement), local_bsz)
        if point not in self._nd_cache:  # only nodes, replicas and micro-batch matter here
            step_t, sync_t = self._interpolator()([point])[0]
            if not np.isfinite(step_t):
                raise TraceError(f"{self.name}: placement {placement} with micro-batch {local_bsz} is outside "
                                 "the measured configurations")
            self._nd_cache[point] = (float(step_t), float(sync_t))
        return self._nd_cache[point]

    def _interpolator(self) -> LinearNDInterpolator:
        if self._nd is None:
            sums: dict[tuple[float, float, float], list[float]] = {}
            for name, (bsz, step, sync) in self._placements.items():
                key2 = (float(len(name)), float(sum(map(int, name))))
                for b, st, sy in zip(bsz, step, sync, strict=True):
                    acc = sums.setdefault((*key2, b), [0.0, 0.0, 0.0])
                    acc[0] += st
                    acc[1] += sy
                    acc[2] += 1
            xs = [list(k) for k in sorted(sums)]
            ys = [[v[0] / v[2], v[1] / v[2]] for _, v in sorted(sums.items())]
            for r in _read_csv(self._scalability):
                xs.append([float(r["num_nodes"]), float(r["num_replicas"]), float(r["local_bsz"])])
                ys.append([float(r["step_time"]), float(r["sync_time"])])
            self._nd = LinearNDInterpolator(np.array(xs), np.array(ys))
        return self._nd


@cache
def load_application(name: str, root: str | None = None) -> Application:
    """The profile of model ``name`` from the packaged traces (or from ``root``/traces)."""
    if name not in APP_SETTINGS:
        raise TraceError(f"unknown application {name!r}; known: {', '.join(sorted(APP_SETTINGS))}")
    base = Path(root) if root else data_root()
    trace_dir = base / "traces" / name
    if not trace_dir.is_dir():
        raise TraceError(f"no traces for {name!r} under {base / 'traces'}")
    return Application(trace_dir, APP_SETTINGS[name])
