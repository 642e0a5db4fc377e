"""Where parameter-server shards live: cut each parameter into k pieces along a dim and name each piece's server.

A ``ps`` SyncSpec says it: ``num_shards`` pieces along ``shard_dim`` (``torch.tensor_split``: the first pieces are
one longer when the size does not divide), piece i served by group position ``servers[i]``; with no ``servers``,
the j-th parameter's piece i goes to position (j + i) mod the group size (round-robin).

Pure functions over names and shapes, shared by the workers and the servers (both sides must agree on the
order in which a server's shards are packed into one message) and by tests that predict the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from plait.errors import PlaitError
from plait.plan.ir import SyncSpec

ShardKey = tuple[str, int]  # (parameter name, shard index)


def shard_of(t: torch.Tensor, spec: SyncSpec, index: int) -> torch.Tensor:
    """Shard ``index`` of ``t`` (a view; ``torch.tensor_split``, so the first pieces are one longer when uneven)."""
    return t.tensor_split(spec.num_shards, dim=spec.shard_dim)[index]


def check_spec(name: str, shape: torch.Size, spec: SyncSpec, size: int) -> None:
    """Raise ``PlaitError`` naming the parameter when its spec does not fit its shape or the group."""
    if spec.num_shards > 1 and not 0 <= spec.shard_dim < len(shape):
        raise PlaitError(f"parameter {name!r} of shape {tuple(shape)} has no dim {spec.shard_dim} to shard along")
    if spec.num_shards > 1 and spec.num_shards > shape[spec.shard_dim]:
        raise PlaitError(f"parameter {name!r}: {spec.num_shards} shards along dim {spec.shard_dim} "
                         f"of size {shape[spec.shard_dim]} would leave shards empty")
    bad = [s for s in spec.servers if not 0 <= s < size]
    if bad:
        raise PlaitError(f"parameter {name!r}: servers {bad} are not positions in a group of {size} ranks")


def shard_owners(names: Sequence[str], specs: Mapping[str, SyncSpec], size: int) -> dict[ShardKey, int]:
    """The group position serving each shard (explicit servers, else round-robin over the parameters' order)."""
    owners: dict[ShardKey, int] = {}
    for j, name in enumerate(names):
        spec = specs[name]
        for i in range(spec.num_shards):
            owners[(name, i)] = spec.servers[i] if spec.servers else (j + i) % size
    return owners


def server_layouts(names: Sequence[str], specs: Mapping[str, SyncSpec], size: int) -> dict[int, list[ShardKey]]:
    """Per serving position, its shards in message order (parameters in ``names`` order, then shard index)."""
    layouts: dict[int, list[ShardKey]] = {}
    for key, server in shard_owners(names, specs, size).items():
        layouts.setdefault(server, []).append(key)
    return dict(sorted(layouts.items()))


def pack(tensors: Mapping[str, torch.Tensor | None], like: Mapping[str, torch.Tensor], specs: Mapping[str, SyncSpec],
         layout: Sequence[ShardKey]) -> torch.Tensor:
    """One flat message of the shards in ``layout`` (a missing tensor counts as zeros shaped like ``like``)."""
    parts = []
    for name, i in layout:
        t = tensors.get(name)
        source = t if t is not None else torch.zeros_like(like[name])
        parts.append(shard_of(source, specs[name], i).reshape(-1))
    return torch.cat(parts)


def unpack_into(flat: torch.Tensor, targets: Mapping[str, torch.Tensor], specs: Mapping[str, SyncSpec],
                layout: Sequence[ShardKey]) -> None:
    """Copy a flat message back into the shards of ``targets`` (in place, no autograd)."""
    offset = 0
    with torch.no_grad():
        for name, i in layout:
            view = shard_of(targets[name], specs[name], i)
            view.copy_(flat[offset : offset + view.numel()].view(view.shape))
            offset += view.numel()
