"""Strategy builders (AutoDist's, plus Poseidon's HybComm): a model's parameters and a cluster -> a SyncSpec each.

A builder reads a ``SyncContext`` (the captured graph, each parameter's role, the data-parallel group and the
per-worker batch) and returns one ``SyncSpec`` per parameter; ``plait.planners.sync_lowering`` puts them into a
plan, buckets the all-reduced ones and lowers them for the simulator. ``sync_builder("name:key=value,...")``
makes one by name (``SYNC_BUILDERS``). Every builder is pure: the same inputs give the same specs.

- ``allreduce``: every parameter all-reduced (``compress``: fp16, bf16 or powersgd with ``rank``).
- ``ps``: every parameter on the parameter server, whole, the j-th on rank j mod n (round-robin).
- ``ps-load-balancing``: every parameter whole on the server with the fewest bytes so far (greedy, in order).
- ``partitioned-ps``: a tensor larger than ``min_bytes`` (default: an even server's share of all bytes) is cut
  into ``num_shards`` pieces along dim 0 (default: one per rank), each on the least-loaded server holding no
  other piece of it; the rest as in ``ps-load-balancing``.
- ``parallax``: embedding tables on load-balanced servers, every other parameter all-reduced.
- ``hybcomm``: a Linear layer's weight (and bias) by SFB when Poseidon's rule says its factors move fewer
  bytes than the parameter server, 2K(P1-1)(M+N) <= 2MN(P1+P2-2)/P2; everything else load-balanced PS.
- ``auto``: per parameter the kind with the least predicted time by the cost entries (``sync_auto``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, ClassVar, Literal, Protocol

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.cost.sync_cost import hybcomm_prefers_sfb, split_sizes
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph, ParamInfo
from plait.plan.ir import SyncCompression, SyncSpec

RoleKind = Literal["linear", "embedding", "other"]


@dataclass(frozen=True, kw_only=True)
class ParamRole:
    """What a parameter is to the synchronizers: its module, the module's kind, and a Linear's rows per example."""

    name: str
    module: str
    kind: RoleKind = "other"
    rows_per_example: float = 0.0  # rows a Linear multiplies per example (its tokens, for sequences)


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _uses_from_ops(graph: ModelGraph) -> dict[str, list[tuple[RoleKind, str, float]]]:
    """Per parameter, each op that reads it: (kind, module, rows): aten.linear's weight/bias, aten.embedding's table."""
    names = {p.name for p in graph.params}
    uses: dict[str, list[tuple[RoleKind, str, float]]] = {}
    for op in graph.ops:
        for i, source in enumerate(op.input_nodes):
            if source not in names:
                continue
            kind: RoleKind = "other"
            rows = 0.0
            if op.target.startswith("aten.linear") and i in (1, 2) and op.outputs and op.outputs[0].shape:
                kind, rows = "linear", op.outputs[0].numel / op.outputs[0].shape[-1]
            elif op.target.startswith("aten.embedding") and i == 0:
                kind = "embedding"
            uses.setdefault(source, []).append((kind, op.module, rows))
    return uses


def _role_from_layer(graph: ModelGraph, p: ParamInfo) -> ParamRole:
    """A parameter's role from the layer view: known only when its module is a layer (Linear, Embedding)."""
    module, leaf = _split(p.name)
    layer = graph.layers[p.layer] if 0 <= p.layer < len(graph.layers) else None
    if layer is None or layer.name != module or leaf not in ("weight", "bias"):
        return ParamRole(name=p.name, module=module)
    if layer.kind == "Linear" and layer.output_shape:
        rows = 1.0
        for s in layer.output_shape[:-1]:
            rows *= s
        return ParamRole(name=p.name, module=module, kind="linear", rows_per_example=rows / graph.batch_size)
    if layer.kind in ("Embedding", "EmbeddingBag") and leaf == "weight":
        return ParamRole(name=p.name, module=module, kind="embedding")
    return ParamRole(name=p.name, module=module)


def param_roles(graph: ModelGraph, module: Any = None) -> dict[str, ParamRole]:
    """Each parameter's role: from the graph's ops when it has them (``capture(with_ops=True)``), else from the
    layer view; with the ``nn.Module`` given, a Linear or embedding role also needs that module class. A parameter
    used by several modules or in other ways (a tied weight) is ``other``."""
    uses = _uses_from_ops(graph) if graph.ops else {}
    roles = {}
    for p in graph.params:
        owner, leaf = _split(p.name)
        if not graph.ops:
            role = _role_from_layer(graph, p)
        elif len({(k, m) for k, m, _ in uses.get(p.name, [])}) == 1 and uses[p.name][0][1] == owner:
            kind = uses[p.name][0][0]
            rows = sum(r for _, _, r in uses[p.name]) / graph.batch_size
            role = ParamRole(name=p.name, module=owner, kind=kind, rows_per_example=rows if kind == "linear" else 0.0)
        else:
            role = ParamRole(name=p.name, module=owner)
        roles[p.name] = _checked(role, module, leaf)
    return roles


def _checked(role: ParamRole, module: Any, leaf: str) -> ParamRole:
    """Demote a role the module's class does not confirm (an op on a custom module's own weight)."""
    if module is None or role.kind == "other":
        return role
    from torch import nn

    try:
        sub = module.get_submodule(role.module)
    except AttributeError:
        return ParamRole(name=role.name, module=role.module)
    wanted = nn.Linear if role.kind == "linear" else (nn.Embedding, nn.EmbeddingBag)
    if isinstance(sub, wanted) and leaf in ("weight", "bias"):
        return role
    return ParamRole(name=role.name, module=role.module)


@dataclass(frozen=True, kw_only=True)
class SyncContext:
    """What a builder sees: parameters and their roles, the data-parallel group, the per-worker batch, the costs."""

    graph: ModelGraph
    cluster: Cluster
    axes: tuple[str, ...]
    group: tuple[int, ...]  # the ranks of one data-parallel group (rank 0's)
    examples_per_step: int  # examples each worker runs per step (micro-batch x accumulation)
    roles: Mapping[str, ParamRole] = field(default_factory=dict)
    cost: CostModel | None = None
    dtype: str = "fp32"  # compute dtype: SFB's factors travel in it
    recomputed: frozenset[int] = frozenset()  # layers whose forward runs again in backward (no SFB there)

    @property
    def num_workers(self) -> int:
        """Data-parallel workers P1 (every one also serves shards: P2 = P1)."""
        return len(self.group)

    def role(self, name: str) -> ParamRole:
        """The role of parameter ``name`` (``other`` when unknown)."""
        return self.roles.get(name) or ParamRole(name=name, module=_split(name)[0])

    def rows(self, name: str) -> int:
        """K: the rows parameter ``name``'s Linear multiplies per worker per step (0 when unknown)."""
        return round(self.role(name).rows_per_example * self.examples_per_step)

    def sfb_ready(self, name: str) -> bool:
        """Whether SFB can synchronise this parameter: a Linear's 2-D weight, or a bias, with known rows, in a layer
        that is not recomputed (SFB would capture its input twice)."""
        role, shape = self.role(name), self.shape(name)
        leaf = _split(name)[1]
        return (role.kind == "linear" and self.rows(name) > 0 and self._params[name].layer not in self.recomputed
                and ((leaf == "weight" and len(shape) == 2) or leaf == "bias"))

    def shape(self, name: str) -> tuple[int, ...]:
        """The parameter's shape."""
        return self._params[name].shape

    @cached_property
    def _params(self) -> dict[str, ParamInfo]:
        return {p.name: p for p in self.graph.params}

    @property
    def cost_model(self) -> CostModel:
        """The cost model given, else the cluster's datasheet one."""
        return self.cost or CostModel(self.cluster)


class SyncBuilder(Protocol):
    """A strategy builder: a SyncSpec for every parameter of the context's graph."""

    name: ClassVar[str]

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """One SyncSpec per parameter."""
        ...


def least_loaded(loads: Sequence[int], exclude: Sequence[int] = ()) -> int:
    """The position with the fewest bytes (the lowest on ties), skipping ``exclude`` while others remain."""
    choices = [i for i in range(len(loads)) if i not in exclude] or list(range(len(loads)))
    return min(choices, key=lambda i: (loads[i], i))


def _ps(ctx: SyncContext, staleness: int, **placement: Any) -> SyncSpec:
    return SyncSpec(kind="ps", axes=ctx.axes, staleness=staleness, **placement)


def balanced_ps(ctx: SyncContext, params: Sequence[ParamInfo], staleness: int,
                loads: list[int] | None = None) -> dict[str, SyncSpec]:
    """Each parameter whole on the least-loaded server, in order (``loads``: bytes already served, updated)."""
    loads = loads if loads is not None else [0] * ctx.num_workers
    out = {}
    for p in params:
        server = least_loaded(loads)
        loads[server] += p.nbytes
        out[p.name] = _ps(ctx, staleness, servers=(server,))
    return out


@dataclass(frozen=True, kw_only=True)
class AllReduce:
    """Every parameter all-reduced in the wait-free buckets, optionally compressed (fp16, bf16, powersgd of ``rank``)."""

    name: ClassVar[str] = "allreduce"
    compress: SyncCompression | None = None
    rank: int = 1
    error_feedback: bool = True

    def __post_init__(self) -> None:
        self.spec(())

    def spec(self, axes: tuple[str, ...]) -> SyncSpec:
        """The all-reduce SyncSpec this builder gives (validated)."""
        powersgd = self.compress == "powersgd"
        return SyncSpec(kind="allreduce", axes=axes, compress=self.compress, compress_rank=self.rank if powersgd else 1,
                        error_feedback=self.error_feedback if powersgd else True)

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """Every parameter all-reduced."""
        return {p.name: self.spec(ctx.axes) for p in ctx.graph.params}


@dataclass(frozen=True, kw_only=True)
class PS:
    """Every parameter whole on the parameter server, round-robin over the ranks (AutoDist's PS, co-located)."""

    name: ClassVar[str] = "ps"
    staleness: int = 0

    def __post_init__(self) -> None:
        SyncSpec(kind="ps", staleness=self.staleness)

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """Every parameter on server j mod n (the runtime's round-robin, ``servers`` left empty)."""
        return {p.name: _ps(ctx, self.staleness) for p in ctx.graph.params}


@dataclass(frozen=True, kw_only=True)
class PSLoadBalancing(PS):
    """Every parameter whole on the server with the fewest bytes so far (AutoDist's greedy bin packing)."""

    name: ClassVar[str] = "ps-load-balancing"

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """Greedy by bytes, in parameter order."""
        return balanced_ps(ctx, ctx.graph.params, self.staleness)


@dataclass(frozen=True, kw_only=True)
class PartitionedPS(PS):
    """Large tensors cut into shards along dim 0, each shard on the least-loaded server (AutoDist's PartitionedPS)."""

    name: ClassVar[str] = "partitioned-ps"
    num_shards: int | None = None  # default: one shard per rank (at most dim 0's size)
    min_bytes: int | None = None  # default: split tensors above an even server's share of all bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_shards is not None and self.num_shards < 1:
            raise PlaitError(f"partitioned-ps: num_shards must be at least 1, got {self.num_shards}")

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """Split the large tensors, place every shard greedily by bytes."""
        n = ctx.num_workers
        limit = self.min_bytes if self.min_bytes is not None else ctx.graph.param_bytes / n
        loads = [0] * n
        out = {}
        for p in ctx.graph.params:
            along = p.shape[0] if p.shape else 1
            k = min(self.num_shards or n, along) if p.nbytes > limit and along >= 2 else 1
            servers: list[int] = []
            for length in split_sizes(along, k):
                server = least_loaded(loads, exclude=servers)
                loads[server] += p.nbytes * length // along
                servers.append(server)
            out[p.name] = _ps(ctx, self.staleness, num_shards=k, servers=tuple(servers))
        return out


@dataclass(frozen=True, kw_only=True)
class Parallax(PS):
    """Embedding tables (sparse-gradient parameters) on load-balanced servers, every other parameter all-reduced."""

    name: ClassVar[str] = "parallax"

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """Embeddings to the parameter server, the rest to all-reduce."""
        sparse = [p for p in ctx.graph.params if ctx.role(p.name).kind == "embedding"]
        out = balanced_ps(ctx, sparse, self.staleness)
        dense = AllReduce().spec(ctx.axes)
        return {p.name: out.get(p.name, dense) for p in ctx.graph.params}


@dataclass(frozen=True, kw_only=True)
class HybComm(PS):
    """Poseidon's HybComm: SFB for a Linear layer whose factors move fewer bytes than PS, load-balanced PS otherwise."""

    name: ClassVar[str] = "hybcomm"

    def chooses_sfb(self, ctx: SyncContext, weight: str) -> bool:
        """The byte rule for one Linear weight, with K its rows per worker and P1 = P2 = the group size."""
        if not (ctx.sfb_ready(weight) and _split(weight)[1] == "weight"):
            return False
        m, n = ctx.shape(weight)
        return hybcomm_prefers_sfb(ctx.rows(weight), m, n, ctx.num_workers, ctx.num_workers)

    def build(self, ctx: SyncContext) -> dict[str, SyncSpec]:
        """SFB layers by the rule (their biases with them), the rest on load-balanced servers."""
        sfb_modules = {_split(p.name)[0] for p in ctx.graph.params if self.chooses_sfb(ctx, p.name)}
        sfb = SyncSpec(kind="sfb", axes=ctx.axes)
        rest = [p for p in ctx.graph.params if _split(p.name)[0] not in sfb_modules or not ctx.sfb_ready(p.name)]
        out = balanced_ps(ctx, rest, self.staleness)
        return {p.name: out.get(p.name, sfb) for p in ctx.graph.params}


SYNC_BUILDERS: dict[str, Any] = {
    "allreduce": AllReduce, "ps": PS, "ps-load-balancing": PSLoadBalancing, "partitioned-ps": PartitionedPS,
    "parallax": Parallax, "hybcomm": HybComm,
}  # "auto" joins at the end of the module (sync_auto builds on this one)


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _value(text: str) -> Any:
    """An option's value: none/null, true/false, an integer, or the text."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        return text.strip()


def sync_builder(text: str) -> SyncBuilder:
    """The builder ``NAME`` or ``NAME:key=value,...`` (e.g. ``allreduce:compress=powersgd,rank=2``, ``ps:staleness=1``;
    AutoDist's spellings such as ``PSLoadBalancing`` work too)."""
    name, _, options = text.partition(":")
    found = {_key(k): k for k in SYNC_BUILDERS}.get(_key(name))
    if found is None:
        raise PlaitError(f"unknown sync strategy {name!r}; choose one of {', '.join(SYNC_BUILDERS)}")
    cls = SYNC_BUILDERS[found]
    kwargs = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, eq, value = item.partition("=")
        allowed = [f.name for f in fields(cls) if f.init]
        if not eq or key.strip() not in allowed:
            raise PlaitError(f"sync strategy {found!r}: {item!r} is not an option; it takes "
                             f"{', '.join(f'{a}=...' for a in allowed) or 'no options'}")
        kwargs[key.strip()] = _value(value)
    try:
        builder: SyncBuilder = cls(**kwargs)
    except TypeError as exc:  # a value of the wrong type, e.g. staleness=abc
        raise PlaitError(f"sync strategy {found!r}: bad option value ({exc})") from None
    return builder


# At the end: sync_auto imports SyncContext and least_loaded from this module.
from plait.planners.sync_auto import AutoSync  # noqa: E402

SYNC_BUILDERS["auto"] = AutoSync
