"""Count the collectives a training step issues, by kind and by the mesh axes their process group spans.

``CollectiveCounter`` is a ``TorchDispatchMode``. It sees DTensor's functional collectives
(``_c10d_functional.all_reduce`` ...: it steps aside for tensor subclasses, so DTensor first lowers its
op to local tensors and collectives), and the c10d ops that ``torch.distributed``'s calls go through
(``c10d.allreduce_``, ``_allgather_base_``, ``_reduce_scatter_base_`` ...: FSDP2 and plait's bucketed
all-reduce). The mode is thread-local state that autograd carries into backward, so collectives issued
by backward hooks count too when ``backward()`` runs inside the block.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch._ops import HigherOrderOperator
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Kind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"]
Phase = Literal["forward", "backward", "after_backward"]

_FUNCTIONAL: dict[str, Kind] = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
}
_C10D: dict[str, Kind] = {
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "allgather_": "all_gather",
    "_allgather_base_": "all_gather",
    "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "alltoall_": "all_to_all",
    "alltoall_base_": "all_to_all",
    "broadcast_": "broadcast",
}


@dataclass(frozen=True, kw_only=True)
class CollectiveEvent:
    """One collective: its kind, the mesh axes of its group, the bytes it moves per rank and the phase."""

    kind: Kind
    axes: tuple[str, ...]  # mesh axis names the group spans; ("ranks 0,2",) for a group no axis set matches
    bytes: (
        int  # this rank's larger buffer, input or output: the full tensor of an all-gather or reduce-scatter
    )
    # "backward" while autograd runs (its hooks, callbacks too); "forward" before it, "after_backward" after
    phase: Phase
    op: str  # the op's name, e.g. "_c10d_functional.all_reduce" or "c10d.allreduce_"


class CollectiveCounter(TorchDispatchMode):
    """``with CollectiveCounter(mesh) as cc:`` run a step; ``cc.counts`` counts by (kind, axes)."""

    def __init__(self, mesh: DeviceMesh | None = None) -> None:
        super().__init__()
        self.events: list[CollectiveEvent] = []
        self._groups = _axis_groups(mesh) if mesh is not None else {}
        self._backward_seen = False

    @property
    def counts(self) -> Counter[tuple[Kind, tuple[str, ...]]]:
        """Number of collectives per (kind, axes)."""
        return Counter((e.kind, e.axes) for e in self.events)

    def by_phase(self, phase: Phase) -> Counter[tuple[Kind, tuple[str, ...]]]:
        """Number of collectives per (kind, axes) issued in ``phase``."""
        return Counter((e.kind, e.axes) for e in self.events if e.phase == phase)

    def bytes_by_key(self) -> Counter[tuple[Kind, tuple[str, ...]]]:
        """Bytes moved per (kind, axes), summed over the collectives."""
        total: Counter[tuple[Kind, tuple[str, ...]]] = Counter()
        for e in self.events:
            total[(e.kind, e.axes)] += e.bytes
        return total

    def __torch_dispatch__(
        self, func: Any, types: Sequence[type], args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        """Record ``func`` if it is a collective on plain tensors, then run it."""
        kwargs = kwargs or {}
        in_backward = torch._C._current_graph_task_id() != -1
        self._backward_seen |= in_backward
        if isinstance(func, HigherOrderOperator):  # (DTensor's random-op wrapper): never a collective
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower the op to local tensors and collectives first
        out = func(*args, **kwargs)
        kind, group = _classify(func, args, kwargs)
        if kind is not None:
            self.events.append(
                CollectiveEvent(
                    kind=kind,
                    axes=self._axes(group),
                    bytes=_bytes(args, out),
                    phase=self._phase(in_backward),
                    op=f"{func.namespace}.{func._schema.name.split('::')[-1]}",
                )
            )
        return out

    def _phase(self, in_backward: bool) -> Phase:
        if in_backward:
            return "backward"
        return "after_backward" if self._backward_seen else "forward"

    def _axes(self, group: dist.ProcessGroup | None) -> tuple[str, ...]:
        ranks = frozenset(dist.get_process_group_ranks(group)) if group is not None else frozenset()
        return self._groups.get(ranks, (f"ranks {','.join(map(str, sorted(ranks)))}",))


def _classify(func: Any, args: Sequence[Any], kwargs: Any) -> tuple[Kind | None, dist.ProcessGroup | None]:
    """The kind of a collective op and its process group; (None, None) for any other op."""
    namespace = getattr(func, "namespace", "")
    name = func._schema.name.split("::")[-1] if hasattr(func, "_schema") else ""
    if namespace == "_c10d_functional" and name in _FUNCTIONAL:
        group_name = _argument(func, args, kwargs, "group_name")
        return _FUNCTIONAL[name], dist.distributed_c10d._resolve_process_group(group_name)
    if namespace == "c10d" and name in _C10D:
        return _C10D[name], dist.ProcessGroup.unbox(_argument(func, args, kwargs, "process_group"))
    return None, None


def _argument(func: Any, args: Sequence[Any], kwargs: Any, name: str) -> Any:
    """The value of the op's argument ``name``, passed by position or keyword."""
    if name in kwargs:
        return kwargs[name]
    return args[[a.name for a in func._schema.arguments].index(name)]


def _bytes(args: Sequence[Any], out: Any) -> int:
    """The bytes of the op's largest tensor argument or result (a list of tensors counts as their sum)."""

    def size(tree: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))

    return max([size(a) for a in args] + [size(out)])


def _axis_groups(mesh: DeviceMesh) -> dict[frozenset[int], tuple[str, ...]]:
    """This rank's group of global ranks for every non-empty set of mesh axes (the smallest set wins ties)."""
    names = mesh.mesh_dim_names or tuple(f"axis{i}" for i in range(mesh.ndim))
    ranks = mesh.mesh
    coords = mesh.get_coordinate()
    groups: dict[frozenset[int], tuple[str, ...]] = {}
    if coords is None:
        return groups
    for k in range(1, mesh.ndim + 1):
        for axes in itertools.combinations(range(mesh.ndim), k):
            index = tuple(slice(None) if d in axes else coords[d] for d in range(mesh.ndim))
            members = frozenset(int(r) for r in ranks[index].flatten().tolist())
            groups.setdefault(members, tuple(names[d] for d in axes))
    return groups
