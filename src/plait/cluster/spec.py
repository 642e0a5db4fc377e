"""Cluster description: nodes x devices, per-device rates and per-level links."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator (or one CPU rank): peak rates and memory."""

    name: str
    kind: DeviceKind
    peak_flops: Mapping[str, float]  # dtype name ("bf16", "fp32", ...) -> FLOP/s
    memory_bytes: int
    memory_bandwidth: float  # bytes/s, read + write

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; falls back to fp32 when the dtype has no entry."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops["fp32"]


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A network level: per-message latency and per-device bandwidth in one direction."""

    latency_s: float
    bandwidth: float  # bytes/s per device, one direction


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """A homogeneous cluster of ``num_nodes`` nodes with ``devices_per_node`` devices each."""

    name: str
    num_nodes: int
    devices_per_node: int
    device: DeviceSpec
    intra_node: LinkSpec
    inter_node: LinkSpec
    profile: str | None = None  # path of a measured profile JSON (``plait profile``) or a packaged one
    source: str = ""  # where the numbers come from
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def world_size(self) -> int:
        """Total number of devices (ranks)."""
        return self.num_nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        """Node index that holds ``rank`` (ranks are numbered node-major)."""
        return rank // self.devices_per_node

    def link_between(self, ranks: tuple[int, ...] | list[int]) -> LinkSpec:
        """The slowest link a group of ranks must cross."""
        nodes = {self.node_of(r) for r in ranks}
        return self.inter_node if len(nodes) > 1 else self.intra_node
