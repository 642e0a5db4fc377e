"""Data-parallel candidates: which options exist and how each is scored (by simulation, under a memory limit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from plait.cluster import Cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import Plan, PrecisionPolicy
from plait.planners.buckets import MiB
from plait.planners.data_parallel import DataParallelKind, build_dp_plan

DEFAULT_BUCKET_SIZES: tuple[int, ...] = (1 * MiB, 4 * MiB, 25 * MiB, 100 * MiB)


@dataclass(frozen=True, kw_only=True)
class Option:
    """One data-parallel choice to score: its kind and bucket cap (sharded kinds: the unit is the bucket)."""

    kind: DataParallelKind
    bucket_bytes: int

    @property
    def name(self) -> str:
        """Short label used in the candidates table."""
        if self.kind == "replicate":
            return f"replicate, bucket {_mib(self.bucket_bytes)}"
        return f"{self.kind}, unit = layer"


@dataclass(frozen=True, kw_only=True)
class Scored:
    """A scored option: its plan at the smallest accumulation that fits (or the leanest one tried)."""

    option: Option
    plan: Plan | None  # None: not applicable
    fits: bool
    peak_bytes: int
    reason: str = ""  # why it is not applicable


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:g} MiB"


def options(cluster: Cluster, bucket_sizes: Sequence[int]) -> list[Option]:
    """Every candidate: replicate per bucket size, fsdp, and hybrid (scored only on >= 2 nodes)."""
    opts = [Option(kind="replicate", bucket_bytes=b) for b in bucket_sizes]
    return opts + [Option(kind="fsdp", bucket_bytes=0), Option(kind="hybrid", bucket_bytes=0)]


def micro_options(global_batch: int, dp_degree: int, micro_batch: int | None) -> list[int]:
    """Accumulation steps to try, fewest first: powers of two (and the largest one) that split the batch."""
    if micro_batch is not None:
        return [0]  # the caller's micro-batch decides
    if global_batch % dp_degree:
        raise PlaitError(
            f"global batch {global_batch} does not split over {dp_degree} data-parallel ranks; "
            f"use a multiple of {dp_degree} (e.g. {dp_degree * max(1, global_batch // dp_degree)})"
        )
    per_rank = global_batch // dp_degree
    counts = [n for n in (1 << k for k in range(per_rank.bit_length())) if per_rank % n == 0]
    return counts + ([per_rank] if counts[-1] != per_rank else [])


def score(
    graph: ModelGraph,
    cluster: Cluster,
    option: Option,
    *,
    global_batch: int,
    micro_batch: int | None,
    cost: CostModel,
    limit: int,
    optimizer: str,
    precision: PrecisionPolicy | None = None,
) -> Scored:
    """Build and simulate ``option`` with the fewest micro-batches whose peak memory fits ``limit``, first
    without and then with activation recomputation."""
    if option.kind == "hybrid" and cluster.num_nodes < 2:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0, reason="not applicable: one node (hybrid replicates across nodes)")
    leanest: Plan | None = None
    for n in micro_options(global_batch, cluster.world_size, micro_batch):
        for recompute in (False, True):
            plan = build_dp_plan(
                graph, cluster, kind=option.kind, global_batch=global_batch, bucket_bytes=option.bucket_bytes or MiB,
                micro_batch=micro_batch, num_micro=n or None, cost=cost, optimizer=optimizer, recompute=recompute,
                precision=precision,
            )
            assert plan.predicted is not None
            peak = max(plan.predicted.peak_memory_bytes)
            if peak <= limit:
                return Scored(option=option, plan=plan, fits=True, peak_bytes=peak)
            if leanest is None or peak <= max(leanest.predicted.peak_memory_bytes):  # type: ignore[union-attr]
                leanest = plan
    assert leanest is not None and leanest.predicted is not None
    return Scored(option=option, plan=leanest, fits=False, peak_bytes=max(leanest.predicted.peak_memory_bytes))
