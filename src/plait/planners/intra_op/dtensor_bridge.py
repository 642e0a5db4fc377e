"""DTensor's sharding-propagation registry, used at plan time on a mesh that has no process group.

Three questions, answered by the same code DTensor runs when the plan executes:

* ``op_strategies``: every (output placements, input placements) a node admits, for the ILP;
* ``propagate``: the output placements DTensor picks for given input placements, and the inputs it
  redistributes first (the greedy choice it makes at run time), for the exact prediction of a plan;
* ``transforms``: the collectives a redistribution from one placement to another issues.

DTensor's strategy functions are private and change between torch releases; this module is the only
place plait reaches into them. The rules DTensor lacks (``plait.dtensor_rules``) are registered first.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import product
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy, TupleStrategy
from torch.utils._pytree import tree_flatten, tree_unflatten

from plait.cost.comm import CollectiveOp
from plait.graph.model_graph import TensorMeta as PlaitMeta
from plait.plan.placement import Placement

TORCH_DTYPES = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool, "int8": torch.int8, "uint8": torch.uint8,
}
Placements = tuple[Placement, ...]


class UnsupportedOpError(Exception):
    """DTensor has no sharding rule for an op (it would fail at run time too)."""


@dataclass(frozen=True)
class Strategy:
    """One way to run a node: placements of each output and of each tensor input (``None``: not a tensor)."""

    outputs: tuple[Placements | None, ...]
    inputs: tuple[Placements, ...]


@dataclass(frozen=True)
class Transform:
    """One collective of a redistribution: its kind, the mesh dimension and the bytes it works on."""

    collective: CollectiveOp
    mesh_dim: int
    nbytes: int


@cache
def planning_mesh(shape: tuple[int, ...], axes: tuple[str, ...]) -> DeviceMesh:
    """A DeviceMesh of ``shape`` seen from rank 0, without process groups (planning only)."""
    _ensure_rules()
    mesh = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    return DeviceMesh("cpu", mesh, mesh_dim_names=axes, _init_backend=False, _rank=0)


def _ensure_rules() -> None:
    from plait.dtensor_rules import ensure_rules

    ensure_rules()


def _contiguous(shape: Sequence[int]) -> tuple[int, ...]:
    stride, out = 1, []
    for size in reversed(shape):
        out.append(stride)
        stride *= max(1, size)
    return tuple(reversed(out))


def spec_of(mesh: DeviceMesh, meta: PlaitMeta, placements: Placements) -> DTensorSpec:
    """The DTensorSpec of a tensor of ``meta`` (contiguous) with ``placements`` on ``mesh``."""
    shape = torch.Size(meta.shape)
    dims = tuple(p.to_dtensor() for p in placements)
    return DTensorSpec(mesh, dims, tensor_meta=TensorMeta(shape, _contiguous(meta.shape), TORCH_DTYPES.get(meta.dtype, torch.float32)))


def placements_of(spec: DTensorSpec) -> Placements:
    """plait placements of a DTensorSpec (strided shards read as shards of their dim)."""
    return tuple(Placement("shard", int(getattr(p, "dim", 0))) if hasattr(p, "split_factor") else Placement.from_dtensor(p)
                 for p in spec.placements)


@cache
def _propagator() -> Any:
    """DTensor's propagator (its registries shared), whose output shapes are cached per op and input shapes.

    An op's output shapes do not depend on its inputs' placements; DTensor finds them by running the op
    on fake tensors each time. Planning asks about many placements of the same op, so the answer is
    kept. The runtime's propagator is left untouched.
    """
    shared = DTensor._op_dispatcher.sharding_propagator
    planning = copy.copy(shared)  # the same registries, its own methods
    compute = shared._propagate_tensor_meta_non_cached
    shapes: dict[Any, Any] = {}

    def cached(schema: OpSchema) -> Any:
        key = (schema.op, _shape_key(schema.args_schema), _shape_key(tuple(schema.kwargs_schema.items())))
        if key not in shapes:
            _make_room(shapes)
            shapes[key] = compute(schema)
        return shapes[key]

    planning._propagate_tensor_meta_non_cached = cached  # type: ignore[assignment]
    return planning


def _shape_key(value: Any) -> Any:
    if isinstance(value, DTensorSpec):
        meta = value.tensor_meta
        return ("t", tuple(meta.shape), tuple(meta.stride), meta.dtype) if meta is not None else ("t",)
    if isinstance(value, list | tuple):
        return tuple(_shape_key(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _schema_info(op: Any) -> Any:
    prop = _propagator()
    return prop.op_to_schema_info.get(op) or prop.op_to_schema_info_for_single_dim_strategy.get(op)


def make_schema(op: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> OpSchema:
    """An OpSchema as DTensor's dispatcher builds it (args holding DTensorSpecs or OpStrategies)."""
    info = _schema_info(op)
    needs_pytree = (info is not None and info.needs_pytree) or any(
        isinstance(a, list | tuple) and any(isinstance(x, DTensorSpec | OpStrategy) for x in a) for a in args
    )
    if needs_pytree:
        leaves, tree = tree_flatten(list(args))
        args = tuple(tree_unflatten(leaves, tree))
    return OpSchema(op, tuple(args), dict(kwargs), schema_info=info)


_CHOICES: dict[Any, tuple[Any, tuple[DTensorSpec, ...] | None] | str] = {}
_CACHE_LIMIT = 100_000  # entries; a long-lived process planning many models starts afresh past it


def _make_room(cache: dict[Any, Any]) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()


def propagate(op: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, tuple[DTensorSpec, ...] | None]:
    """DTensor's choice for ``op`` on inputs with these specs: the output spec(s), and the specs the tensor
    inputs are redistributed to first (None when none moves). Remembered per schema: repeated layers ask
    the same questions."""
    schema = make_schema(op, args, kwargs)
    try:
        key: Any = schema
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _CHOICES:
        found = _CHOICES[key]
        if isinstance(found, str):
            raise UnsupportedOpError(found)
        return found
    try:
        out = _propagator().propagate_op_sharding_non_cached(schema)
    except NotImplementedError as exc:
        message = str(exc).splitlines()[0]
        if key is not None:
            _make_room(_CHOICES)
            _CHOICES[key] = message
        raise UnsupportedOpError(message) from None
    redistributed = out.redistribute_schema.args_spec if out.needs_redistribute and out.redistribute_schema else None
    result = (out.output_spec, redistributed)
    if key is not None:
        _make_room(_CHOICES)
        _CHOICES[key] = result
    return result


def _strategy_of(op: Any, schema: OpSchema) -> Any:
    """DTensor's full strategy list for ``op`` (what ``propagate`` chooses from)."""
    from torch.distributed.tensor._ops.single_dim_strategy import _expand_single_dim_strategy_to_mesh
    from torch.distributed.tensor._utils import try_find_mesh_from_args

    prop = _propagator()
    single = prop.op_single_dim_strategy_funcs.get(op)
    func = prop.op_strategy_funcs.get(op)
    if single is None and func is None:
        raise UnsupportedOpError(f"{op} has no sharding strategy (DTensor would decompose or refuse it)")
    plain = OpSchema(op, tuple(_first_spec(a) for a in schema.args_schema),
                     {k: _first_spec(v) for k, v in schema.kwargs_schema.items()}, schema_info=schema.schema_info)
    out_meta = prop._propagate_tensor_meta_non_cached(plain)
    if single is not None:
        mesh = try_find_mesh_from_args(op, plain.args_schema)
        expanded = _expand_single_dim_strategy_to_mesh(mesh, schema, single, out_meta)
        return expanded(op, schema.args_meta, schema.kwargs_meta)
    return func(schema)


def _first_spec(value: Any) -> Any:
    if isinstance(value, OpStrategy):
        return value.strategies[0].output_spec
    if isinstance(value, list | tuple):
        return type(value)(_first_spec(v) for v in value)
    return value


def candidate_placements(meta: PlaitMeta, mesh_shape: tuple[int, ...], *, partial: bool = True) -> list[Placements]:
    """Every placement tuple a tensor of ``meta`` may take: per axis Replicate, Shard of a dim whose size
    the axis divides, and (``partial``) Partial."""
    per_axis = []
    for size in mesh_shape:
        options = [Placement("replicate")]
        options += [Placement("shard", d) for d, n in enumerate(meta.shape) if n >= size and n % size == 0]
        if partial and meta.dtype in ("fp32", "bf16", "fp16", "fp64"):
            options.append(Placement("partial"))
        per_axis.append(options)
    return [tuple(c) for c in product(*per_axis)]


def op_strategies(op: Any, args: Sequence[Any], kwargs: dict[str, Any], mesh: DeviceMesh,
                  candidates: dict[int, list[Placements]]) -> list[Strategy]:
    """Every strategy DTensor admits for ``op``. ``args``/``kwargs`` hold a ``DTensorSpec`` for each tensor
    input; ``candidates`` maps the position of a tensor input (in flattened order) to the placements its
    producer may give it, so rules that follow their input see every one."""
    counter = iter(range(10**9))
    single = op in _propagator().op_single_dim_strategy_funcs  # expands every combination by itself

    def to_strategy(value: Any) -> Any:
        if isinstance(value, DTensorSpec):
            k = next(counter)
            options = candidates.get(k, [placements_of(value)])
            if single:  # its placeholders become the kinds of sharding the inputs show: show a Shard
                options = [next((c for c in options if any(p.is_shard for p in c)), options[0])]
            specs = [DTensorSpec(mesh, tuple(p.to_dtensor() for p in c), tensor_meta=value.tensor_meta) for c in options]
            return OpStrategy([OpSpec(s) for s in specs])
        if isinstance(value, list | tuple):
            return type(value)(to_strategy(v) for v in value)
        return value

    schema = make_schema(op, [to_strategy(a) for a in args], {k: to_strategy(v) for k, v in kwargs.items()})
    try:
        found = _strategy_of(op, schema)
    except NotImplementedError as exc:
        raise UnsupportedOpError(str(exc).splitlines()[0]) from None
    specs = found.strategies if isinstance(found, OpStrategy) else _tuple_specs(found)
    out: dict[Strategy, None] = {}
    num_inputs = len(schema.args_strategy) + len(schema.kwargs_strategy)
    for spec in specs:
        outputs = spec.output_specs if isinstance(spec.output_specs, tuple) else (spec.output_specs,)
        outs = tuple(placements_of(o) if o is not None else None for o in outputs)
        ins = tuple(placements_of(s) for s in spec.input_specs) if spec.input_specs is not None else (outs[0],) * num_inputs
        out[Strategy(outputs=outs, inputs=ins)] = None  # type: ignore[arg-type]
    return list(out)


def _tuple_specs(found: TupleStrategy) -> list[OpSpec]:
    """A TupleStrategy (one child per output, e.g. ``split``) as OpSpecs over all outputs when the children
    agree on their inputs."""
    children = [c for c in found.children if isinstance(c, OpStrategy)]
    specs = []
    for k in range(len(children[0].strategies)):
        picks = [c.strategies[k] for c in children if k < len(c.strategies)]
        specs.append(OpSpec(tuple(p.output_spec for p in picks), picks[0].input_specs))
    return specs


def transforms(src: DTensorSpec, dst: DTensorSpec) -> list[Transform]:
    """The collectives DTensor issues to redistribute ``src`` to ``dst`` (local chunks and casts are free)."""
    from torch.distributed.tensor._redistribute import _gen_transform_infos_non_cached

    if src.placements == dst.placements:
        return []
    out = []
    width = src.tensor_meta.dtype.itemsize if src.tensor_meta is not None else 4
    for info in _gen_transform_infos_non_cached(src, dst):
        kind = info._comm_type_key()
        if kind is None:
            continue
        nbytes = width
        for s in info.logical_shape:
            nbytes *= int(s)
        out.append(Transform(collective=kind, mesh_dim=info.mesh_dim, nbytes=nbytes))  # type: ignore[arg-type]
    return out
