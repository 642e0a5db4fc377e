"""The stage candidates of a pipeline search, priced in bulk: which layer ranges may be stages (Alpa's imbalance
tolerance, and reachability for pipelines of a known stage count), and the price of each (range, submesh,
configuration), computed once per distinct range signature (``plait.planners.stage_ranges``) with the scalar
pricing of ``plait.planners.stage_pricing``. Candidates stay arrays; only the chosen stages become objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plait.cost.memory import OPTIMIZER_STATES
from plait.planners.pipeline_lowering import stage_memory
from plait.planners.stage_pricing import PricedStage, StageConfig, StagePricer
from plait.planners.stage_ranges import LayerArrays, distinct
from plait.planners.stage_tables import StageTable


@dataclass(frozen=True)
class Candidates:
    """Priced stage candidates as arrays: the DP's view (group ranges) and how to rebuild each one's stage."""

    table: StageTable  # start/stop in layer groups
    submesh: np.ndarray  # the DP's submesh index
    first_layer: np.ndarray
    stop_layer: np.ndarray
    config: np.ndarray  # index into the pricer's configs()
    send_split: np.ndarray
    rank_micro: np.ndarray

    def __len__(self) -> int:
        return len(self.first_layer)

    def price(self, pricer: StagePricer, i: int) -> PricedStage:
        """The full price (its StageWork and once-per-step work) of candidate ``i``."""
        a, b = int(self.first_layer[i]), int(self.stop_layer[i])
        return pricer.price(a, b, int(self.rank_micro[i]), pricer.configs()[int(self.config[i])],
                            last=b == len(pricer.graph.layers), send_split=int(self.send_split[i]))


def concat(parts: Sequence[Candidates]) -> Candidates:
    """The candidates of every part, in order."""
    t = [p.table for p in parts]
    cat = np.concatenate
    table = StageTable(cat([x.start for x in t]), cat([x.stop for x in t]), cat([x.devices for x in t]),
                       cat([x.time_s for x in t]), cat([x.once_s for x in t]), cat([x.max_after for x in t]))
    return Candidates(table=table, submesh=cat([p.submesh for p in parts]), first_layer=cat([p.first_layer for p in parts]), stop_layer=cat([p.stop_layer for p in parts]),
                      config=cat([p.config for p in parts]), send_split=cat([p.send_split for p in parts]),
                      rank_micro=cat([p.rank_micro for p in parts]))


def group_ranges(flops: np.ndarray, share: float, imbalance: float | None, num_stages: int | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The group ranges ``[a, b)`` a stage may take: all of them, or (``imbalance`` given) those whose FLOPs are
    within a factor ``1 + imbalance`` of ``share`` (the stage's fair part of the model's FLOPs: Alpa's imbalance
    tolerance); with ``num_stages``, only ranges some pipeline of exactly that many allowed ranges uses.
    ``flops``: per group."""
    G = len(flops)
    a, b = np.triu_indices(G + 1, k=1)
    if imbalance is not None:
        prefix = np.concatenate([[0.0], np.cumsum(flops)])
        work = prefix[b] - prefix[a]
        slack = 1e-9 * prefix[-1]
        keep = (work <= (1 + imbalance) * share + slack) & (work >= share / (1 + imbalance) - slack)
        a, b = a[keep], b[keep]
    if num_stages is not None:
        keep = _reachable(a, b, G, num_stages)
        a, b = a[keep], b[keep]
    return a, b


def _reachable(a: np.ndarray, b: np.ndarray, num_groups: int, num_stages: int) -> np.ndarray:
    """Which ranges lie on some chain of exactly ``num_stages`` of the ranges from group 0 to the end."""
    G, S = num_groups, num_stages
    mask = (1 << S) - 1
    ahead = [0] * (G + 1)  # bit j: groups [0, k) are covered by j ranges
    ahead[0] = 1
    order = np.argsort(a, kind="stable")
    for i in order:  # by start: every range into a has been seen when a is reached
        ahead[b[i]] |= (ahead[a[i]] << 1) & mask
    behind = [0] * (G + 1)  # bit m: groups [k, G) are covered by m ranges
    behind[G] = 1
    for i in np.argsort(-b, kind="stable"):
        behind[a[i]] |= (behind[b[i]] << 1) & mask
    # a range with j stages before it needs S - 1 - j after it: compare with the after-sets bit-reversed
    flipped = [int(format(m, f"0{S}b")[::-1], 2) for m in behind]
    return np.array([bool(ahead[int(x)] & flipped[int(y)]) for x, y in zip(a, b, strict=True)], dtype=bool)


@dataclass(frozen=True, kw_only=True)
class Block:
    """One (submesh, tensor-parallel size, per-rank micro-batch) of a search: what is priced together."""

    submesh: int  # the DP's submesh index
    devices: int
    tp: int
    rank_micro: int
    num_micro: int
    split: bool  # boundaries may cross as tp slices (the next stage has the same tp)


def price_block(pricer: StagePricer, arrays: LayerArrays, starts: np.ndarray, ga: np.ndarray, gb: np.ndarray,
                block: Block, *, limit: float, max_stages: int) -> Candidates:
    """Every group range ``[ga[i], gb[i])`` of ``block`` without and with recomputation, priced once per distinct
    signature; a range that cannot hold one micro-batch is left out, and recomputation is kept only where it
    lets more stages follow (it is slower and holds the same state). ``starts``: each group's first layer, then
    the layer count; ``max_stages``: the most stages a pipeline may have (caps ``max_after``)."""
    a, b = starts[ga], starts[gb]
    rows = arrays.signature(a, b)
    first, inverse = distinct(rows)
    configs = pricer.configs()
    plain, again = configs.index(StageConfig(block.tp, False)), configs.index(StageConfig(block.tp, True))
    prices = np.array([[_price(pricer, int(a[r]), int(b[r]), block, recompute, limit, max_stages,
                               int(arrays.send_split[b[r] - 1]) if block.split else 1,
                               int(arrays.send_split[a[r] - 1]) if block.split and a[r] > 0 else 1)
                        for recompute in (False, True)] for r in first]).reshape(len(first), 2, 3)
    per = prices[inverse]  # (ranges, config, [time, once, in_flight])
    plain_ok = per[:, 0, 2] >= 1
    again_ok = (per[:, 1, 2] >= 1) & ~(plain_ok & (per[:, 0, 2] >= per[:, 1, 2]))
    pick = np.concatenate([np.flatnonzero(plain_ok), np.flatnonzero(again_ok)])
    which = np.concatenate([np.zeros(plain_ok.sum(), dtype=np.int64), np.ones(again_ok.sum(), dtype=np.int64)])
    splits = arrays.send_split[b - 1].astype(np.int64) if block.split else np.ones(len(a), dtype=np.int64)
    splits = np.where(b == arrays.num_layers, 1, splits)
    n = len(pick)
    table = StageTable(start=ga[pick].astype(np.int64), stop=gb[pick].astype(np.int64),
                       devices=np.full(n, block.devices, dtype=np.int64), time_s=per[pick, which, 0],
                       once_s=per[pick, which, 1], max_after=per[pick, which, 2].astype(np.int64) - 1)
    return Candidates(table=table, submesh=np.full(n, block.submesh, dtype=np.int64), first_layer=a[pick].astype(np.int64), stop_layer=b[pick].astype(np.int64),
                      config=np.where(which == 0, plain, again).astype(np.int64), send_split=splits[pick],
                      rank_micro=np.full(n, block.rank_micro, dtype=np.int64))


def _price(pricer: StagePricer, a: int, b: int, block: Block, recompute: bool, limit: float, max_stages: int,
           split: int, input_split: int = 1) -> tuple[float, float, int]:
    """Time per micro-batch, once-per-step time and the most micro-batches it may hold in flight (0: none);
    ``split``/``input_split``: how the stage's output and its input cross (slices need slice-sized buffers)."""
    last = b == len(pricer.graph.layers)
    priced = pricer.price(a, b, block.rank_micro, StageConfig(block.tp, recompute), last=last, send_split=split)
    static = priced.param_bytes * (2 + OPTIMIZER_STATES[pricer.optimizer])
    memory = stage_memory(priced.work, input_bytes=priced.input_bytes, num_micro=block.num_micro,
                          step_temp_bytes=priced.step_temp_bytes, keep_outputs=pricer.keep_outputs, input_split=input_split)
    in_flight = memory.max_in_flight(limit - static, cap=max_stages)
    if in_flight < 1:
        return 0.0, 0.0, 0
    return (pricer.time_s(priced.work), pricer.once_s(priced, block.devices // block.tp, block.num_micro), in_flight)
