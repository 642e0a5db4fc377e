"""``--sync auto``: per parameter, the synchronizer kind with the least predicted time (an AutoSync-like greedy).

The parameters are taken largest first (a Linear's bias after the weights). For each, the builder prices every
kind it may take, all-reduce, the parameter server (on the least-loaded server so far) and SFB (a Linear weight
with known rows; its bias follows it), by the cost entries of ``plait.cost.sync_cost`` applied to everything
chosen so far plus this parameter, and keeps the cheapest. The time it minimises is the sum of the entries: one
fused all-reduce of the all-reduced bytes, the SFB exchange and rebuild, the parameter server's push, the busiest
server's sum, step and answers, and the pull, and the local optimizer step over the parameters the servers do not
update. The entries do not see that the wait-free all-reduce overlaps the backward pass while the server and SFB
run after it;
``sync_lowering.apply_sync`` therefore also simulates the all-reduce plan and keeps the faster of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from plait.cost import CostModel
from plait.cost.sync_cost import (
    ServerLoads,
    SFBLayerSize,
    allreduce_steps,
    chain_time,
    ps_steps,
    sfb_steps,
)
from plait.errors import PlaitError
from plait.graph.model_graph import DTYPE_BYTES, ParamInfo
from plait.plan.ir import SyncSpec
from plait.planners.sync_strategies import SyncContext, least_loaded

AUTO_KINDS = ("allreduce", "ps", "sfb")


@dataclass(frozen=True)
class Tally:
    """What has been chosen so far: all-reduced elements, SFB layers, server loads, the local optimizer's share."""

    allreduce_bytes: int = 0
    sfb: tuple[SFBLayerSize, ...] = ()
    loads: tuple[int, ...] = ()
    numel: tuple[int, ...] = ()
    shards: tuple[int, ...] = ()
    local_numel: int = 0
    local_tensors: int = 0

    def add(self, p: ParamInfo, kind: str, *, server: int = 0, layer: SFBLayerSize | None = None) -> Tally:
        """This tally with ``p`` synchronised by ``kind``."""
        if kind == "ps":
            return replace(self, loads=_bump(self.loads, server, p.nbytes), numel=_bump(self.numel, server, p.numel),
                           shards=_bump(self.shards, server, 1))
        local = replace(self, local_numel=self.local_numel + p.numel, local_tensors=self.local_tensors + 1)
        if kind == "sfb":
            return replace(local, sfb=(*local.sfb, layer) if layer is not None else local.sfb)
        return replace(local, allreduce_bytes=local.allreduce_bytes + p.nbytes)

    def seconds(self, cost: CostModel, group: Sequence[int], dtype: str) -> float:
        """The predicted synchronisation time of the tally (see the module docstring)."""
        t = cost.optimizer_time(self.local_numel, num_tensors=self.local_tensors)
        if self.allreduce_bytes:  # one fused bucket, priced per byte
            ring = bool(self.sfb) or any(self.loads)  # mixed with PS or SFB: the runtime's ring (sync_cost)
            steps = allreduce_steps("auto", [(self.allreduce_bytes,)], elem_bytes=1, ring=ring, num_workers=len(group))
            t += chain_time(steps, cost, group, dtype=dtype)
        if self.sfb:
            t += chain_time(sfb_steps(self.sfb, len(group), DTYPE_BYTES.get(dtype, 4)), cost, group, dtype=dtype)
        loads = ServerLoads(bytes=self.loads, numel=self.numel, shards=self.shards)
        return t + chain_time(ps_steps(loads, cost=cost, group=group), cost, group, dtype=dtype)


def _bump(values: tuple[int, ...], at: int, by: int) -> tuple[int, ...]:
    return tuple(v + by if i == at else v for i, v in enumerate(values))


@dataclass(frozen=True, kw_only=True)
class AutoSync:
    """Per parameter the kind (of ``kinds``; ``auto:kinds=ps+sfb`` on the command line) with the least predicted time by
    the cost entries (greedy, largest first)."""

    name: ClassVar[str] = "auto"
    kinds: tuple[str, ...] = field(default=AUTO_KINDS)

    def __post_init__(self) -> None:
        kinds = tuple(self.kinds.split("+")) if isinstance(self.kinds, str) else tuple(self.kinds)  # "ps+sfb"
        bad = [k for k in kinds if k not in AUTO_KINDS]
        if bad or not kinds:
            raise PlaitError(f"auto sync: kinds {bad or '()'} not among {', '.join(AUTO_KINDS)}")
        object.__setattr__(self, "kinds", kinds)

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """The greedy choice, parameter by parameter."""
        cost, group = ctx.cost_model, ctx.group
        n = ctx.num_workers
        tally = Tally(loads=(0,) * n, numel=(0,) * n, shards=(0,) * n)
        chosen: dict[str, SyncSpec] = {}
        sfb_modules: set[str] = set()
        for p in _order(ctx):
            module = p.name.rpartition(".")[0]
            if module in sfb_modules and ctx.sfb_ready(p.name):
                chosen[p.name] = SyncSpec(kind="sfb", axes=ctx.axes)
                tally = tally.add(p, "sfb")
                continue
            options = self._options(ctx, p, tally)
            kind, server, layer = min(options, key=lambda o: tally.add(p, o[0], server=o[1], layer=o[2])
                                      .seconds(cost, group, ctx.dtype))
            tally = tally.add(p, kind, server=server, layer=layer)
            chosen[p.name] = self._spec(ctx, kind, server)
            if kind == "sfb":
                sfb_modules.add(module)
        return {p.name: chosen[p.name] for p in ctx.graph.params}

    def _options(self, ctx: SyncContext, p: ParamInfo, tally: Tally) -> list[tuple[str, int, SFBLayerSize | None]]:
        """(kind, server, SFB layer) for every kind ``p`` may take."""
        out: list[tuple[str, int, SFBLayerSize | None]] = []
        if "allreduce" in self.kinds:
            out.append(("allreduce", 0, None))
        if "ps" in self.kinds and ctx.num_workers > 1:
            out.append(("ps", least_loaded(tally.loads), None))
        if "sfb" in self.kinds and ctx.sfb_ready(p.name) and p.name.endswith(".weight"):
            m, n = p.shape
            bias = any(q.name == p.name[: -len("weight")] + "bias" for q in ctx.graph.params)
            out.append(("sfb", 0, SFBLayerSize(rows=ctx.rows(p.name), out_features=m, in_features=n, bias=bias)))
        return out or [("allreduce", 0, None)]

    @staticmethod
    def _spec(ctx: SyncContext, kind: str, server: int) -> SyncSpec:
        if kind == "ps":
            return SyncSpec(kind="ps", axes=ctx.axes, servers=(server,))
        return SyncSpec(kind="sfb" if kind == "sfb" else "allreduce", axes=ctx.axes)


def _order(ctx: SyncContext) -> list[ParamInfo]:
    """Largest first; biases (and other vectors) of a Linear after every weight, so they can follow an SFB weight."""
    ranked = sorted(enumerate(ctx.graph.params), key=lambda ip: (ip[1].name.endswith(".bias"), -ip[1].nbytes, ip[0]))
    return [p for _, p in ranked]
