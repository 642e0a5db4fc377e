"""The pipeline search's loops: which submeshes, tensor-parallel sizes and micro-batchings are tried, each priced
in bulk (``plait.planners.stage_candidates``) and solved by the stage DP, keeping the few best pipelines.

Pipelines of one submesh size ``d`` (what the runtime runs) have exactly ``devices / d`` stages, so ``d`` is a
power-of-two slice of a node or any whole number of nodes that divides the cluster (Megatron-LM's 35 stages of 9
nodes on 315 nodes), and ranges are kept only if some pipeline of that many stages can use them. Every rank
takes a power of two of samples per micro-batch (or what the caller fixed). Pipelines of mixed sizes use
Alpa's submesh sizes and a given list of micro-batch counts. Each DP is bounded by the ``keep``-th best step
found so far, so a submesh shape that cannot enter the shortlist stops after its first feasible ``t_max``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from plait.cluster.spec import Cluster
from plait.planners.stage_candidates import Block, Candidates, concat, group_ranges, price_block
from plait.planners.stage_dp import solve_table
from plait.planners.stage_pricing import StagePricer
from plait.planners.stage_ranges import LayerArrays, layer_arrays

DEFAULT_MICRO_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # micro-batch counts of mixed-size pipelines
MAX_RANK_MICRO = 64  # the most samples per rank and micro-batch the search tries


@dataclass(frozen=True)
class Found:
    """One solved problem's pipeline: the DP's step, the micro-batching and the chosen candidates."""

    step_s: float
    num_micro: int
    micro_size: int
    cands: Candidates
    picks: tuple[int, ...]
    t_max_tried: int
    t_max_total: int


@dataclass
class Shortlist:
    """The ``keep`` fastest pipelines found (by the DP's step)."""

    keep: int
    found: list[Found] = field(default_factory=list)

    def bound(self) -> float:
        """A new pipeline must be faster than this to enter."""
        return self.found[-1].step_s if len(self.found) >= self.keep else float("inf")

    def add(self, found: Found) -> None:
        """Enter ``found`` if it is among the ``keep`` fastest."""
        self.found.append(found)
        self.found.sort(key=lambda f: f.step_s)
        del self.found[self.keep:]


@dataclass
class Search:
    """What every problem of one search shares."""

    pricer: StagePricer
    cluster: Cluster
    starts: np.ndarray  # each group's first layer, then the layer count
    group_flops: np.ndarray
    global_batch: int
    limit: float
    imbalance: float | None
    shortlist: Shortlist
    pricing_s: float = 0.0  # time spent pricing candidates
    dp_s: float = 0.0  # time spent in the stage DP
    problems: int = 0  # DPs run
    candidates: int = 0  # candidates priced into them
    _arrays: dict[tuple[int, int], LayerArrays] = field(default_factory=dict)
    _ranges: dict[tuple[float, int | None], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        """Layer groups the DP sees."""
        return len(self.group_flops)

    def arrays(self, tp: int, micro: int) -> LayerArrays:
        """The layer arrays of (tp, micro), made once."""
        if (tp, micro) not in self._arrays:
            self._arrays[tp, micro] = layer_arrays(self.pricer, tp, micro)
        return self._arrays[tp, micro]

    def ranges(self, share: float, num_stages: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The group ranges a stage with this fair share of FLOPs may take (in a pipeline of ``num_stages``)."""
        key = (share, num_stages)
        if key not in self._ranges:
            self._ranges[key] = group_ranges(self.group_flops, share, self.imbalance, num_stages)
        return self._ranges[key]

    def block(self, block: Block, share: float, num_stages: int | None, max_stages: int) -> Candidates:
        """The priced candidates of one (submesh, tp, micro)."""
        t0 = time.perf_counter()
        ga, gb = self.ranges(share, num_stages)
        cands = price_block(self.pricer, self.arrays(block.tp, block.rank_micro), self.starts, ga, gb, block,
                            limit=self.limit, max_stages=max_stages)
        self.pricing_s += time.perf_counter() - t0
        return cands

    def solve(self, cands: Candidates, num_micro: int, micro_size: int) -> None:
        """Solve one problem and enter its pipeline into the shortlist if it is fast enough."""
        if not len(cands):
            return
        t0 = time.perf_counter()
        found = solve_table(cands.table, num_layers=self.num_groups, num_devices=self.cluster.world_size,
                            num_micro=num_micro, bound=self.shortlist.bound())
        self.dp_s += time.perf_counter() - t0
        self.problems += 1
        self.candidates += len(cands)
        if found is not None:
            self.shortlist.add(Found(step_s=found.step_s, num_micro=num_micro, micro_size=micro_size, cands=cands,
                                     picks=found.picks, t_max_tried=found.t_max_tried, t_max_total=found.t_max_total))


def same_size_meshes(cluster: Cluster, num_groups: int, min_stages: int) -> list[int]:
    """Submesh sizes for pipelines of one size: power-of-two slices of a node and whole numbers of nodes that
    divide the cluster, with between ``min_stages`` and ``num_groups`` stages."""
    m, n, world = cluster.devices_per_node, cluster.num_nodes, cluster.world_size
    inside = [1 << k for k in range(m.bit_length()) if (1 << k) <= m and world % (1 << k) == 0]
    whole = [m * k for k in range(2, n + 1) if n % k == 0]
    return [d for d in sorted(set(inside + whole)) if max(1, min_stages) <= world // d <= num_groups]


def rank_micros(global_batch: int, replicas: int, counts: Sequence[int], fixed: int | None) -> Iterator[tuple[int, int]]:
    """``(samples per rank, micro-batches)`` for a stage of ``replicas`` data-parallel replicas: the fixed
    share, or the given counts, or every power-of-two share (fewest samples first)."""
    if global_batch % replicas:
        return
    per_replica = global_batch // replicas
    if fixed is not None:
        if per_replica % fixed == 0:
            yield fixed, per_replica // fixed
        return
    if counts:
        for n in sorted(counts, reverse=True):
            if per_replica % n == 0:
                yield per_replica // n, n
        return
    mr = 1
    while mr <= min(per_replica, MAX_RANK_MICRO):
        if per_replica % mr == 0:
            yield mr, per_replica // mr
        mr *= 2


def search_same_size(search: Search, *, min_stages: int, counts: Sequence[int], fixed: int | None) -> None:
    """Every pipeline of one submesh size and tensor-parallel size (see the module docstring)."""
    pricer, cluster = search.pricer, search.cluster
    total = float(search.group_flops.sum())
    for d in same_size_meshes(cluster, search.num_groups, min_stages):
        stages = cluster.world_size // d
        for tp in pricer.tp_sizes():
            if d % tp or tp > cluster.devices_per_node:
                continue
            for mr, num_micro in rank_micros(search.global_batch, d // tp, counts, fixed):
                block = Block(submesh=0, devices=d, tp=tp, rank_micro=mr, num_micro=num_micro, split=tp > 1)
                cands = search.block(block, total / stages, stages, stages)
                if not len(cands):  # nothing holds one micro-batch: more samples per rank will not either
                    break
                search.solve(cands, num_micro, mr * (d // tp))


def search_mixed(search: Search, sizes: Sequence[int], *, min_stages: int, counts: Sequence[int],
                 fixed: int | None) -> None:
    """Pipelines of any submesh sizes (Alpa's), one problem per micro-batch count."""
    pricer, cluster = search.pricer, search.cluster
    world = cluster.world_size
    total = float(search.group_flops.sum())
    cap = world // max(1, min_stages)  # fewer than min_stages stages are ruled out by size
    for num_micro in counts or DEFAULT_MICRO_COUNTS:
        if search.global_batch % num_micro:
            continue
        micro_size = search.global_batch // num_micro
        parts = []
        for m, d in enumerate(sizes):
            if d > cap:
                continue
            for tp in pricer.tp_sizes():
                replicas = d // tp
                if d % tp or tp > cluster.devices_per_node or micro_size % replicas:
                    continue
                if fixed not in (None, micro_size // replicas):
                    continue
                block = Block(submesh=m, devices=d, tp=tp, rank_micro=micro_size // replicas, num_micro=num_micro,
                              split=False)
                parts.append(search.block(block, total * d / world, None, min(search.num_groups, world)))
        if parts:
            search.solve(concat(parts), num_micro, micro_size)
