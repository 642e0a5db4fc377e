"""Round-number cost model and hand-written plans for the simulator tests."""

from __future__ import annotations

from collections.abc import Sequence

from plait.cluster import load_cluster
from plait.graph import LayerInfo, ModelGraph, ParamInfo
from plait.plan import BatchSpec, Instr, MeshSpec, Plan, RankProgram, shard


class UnitCost:
    """Times in whole seconds: a compute instruction takes ``flops`` s, a collective ``nbytes`` s,
    the optimizer ``numel`` s, a transfer ``nbytes`` s."""

    def __init__(self, *, overlaps_comm: bool = True) -> None:
        self.overlaps_comm = overlaps_comm

    def at_concurrency(self, level: int) -> UnitCost:
        return self

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        return flops

    def optimizer_time(self, num_params: float, *, num_tensors: int = 0) -> float:
        return num_params

    def collective_time(self, op: str, nbytes: float, group: Sequence[int]) -> float:
        return nbytes

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        return nbytes


class SharedCoreCost(UnitCost):
    """UnitCost on CPU ranks (one lane) that share ``cores`` cores of a node: with ``level`` ranks computing at
    once, compute and the optimizer take ``max(1, level / cores)`` times their UnitCost seconds."""

    def __init__(self, cores: int, level: int = 1) -> None:
        super().__init__(overlaps_comm=False)
        self.cores, self.level = cores, level
        self.cores_per_node = cores  # collectives stretch when busy ranks outnumber the cores

    def at_concurrency(self, level: int) -> SharedCoreCost:
        return SharedCoreCost(self.cores, level)

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        return flops * max(1.0, self.level / self.cores)

    def optimizer_time(self, num_params: float, *, num_tensors: int = 0) -> float:
        return num_params * max(1.0, self.level / self.cores)


def tiny_graph() -> ModelGraph:
    layer = LayerInfo(index=0, name="fc", kind="Linear", fwd_flops=1, bwd_flops=2, num_params=4, param_bytes=16,
                      activation_bytes=8, output_bytes=8, output_shape=(2, 2), fwd_bytes_moved=0, num_kernels=1)
    return ModelGraph(name="tiny", dtype="fp32", batch_size=2, input_shapes=((2, 2),), layers=(layer,),
                      params=(ParamInfo(name="fc.weight", shape=(2, 2), dtype="fp32", layer=0),))


def hand_plan(*programs: tuple[Sequence[int], Sequence[Instr]]) -> Plan:
    """A replicated plan on ``dgx-a100:1`` whose programs are given by hand."""
    world = max(r for ranks, _ in programs for r in ranks) + 1
    return Plan(
        model=tiny_graph(),
        cluster=load_cluster("dgx-a100:1"),
        mesh=MeshSpec(shape=(world,), axes=("dp",)),
        batch=BatchSpec(global_size=2 * world, micro_size=2, placements=(shard(0),)),
        params=(),
        programs=tuple(RankProgram(ranks=tuple(r), instrs=tuple(i)) for r, i in programs),
    )


def comp(name: str, seconds: float, *deps: int, alloc: int = 0, free: int = 0) -> Instr:
    """A compute instruction that takes ``seconds`` under UnitCost."""
    return Instr(op="compute", stream="compute", name=name, flops=seconds, deps=deps, alloc_bytes=alloc, free_bytes=free)


def coll(name: str, seconds: int, *deps: int, group: tuple[int, ...] = (0,), alloc: int = 0, free: int = 0) -> Instr:
    """An all-reduce that takes ``seconds`` under UnitCost."""
    return Instr(op="collective", stream="comm", name=name, collective="all_reduce", nbytes=seconds, group=group,
                 deps=deps, alloc_bytes=alloc, free_bytes=free)
