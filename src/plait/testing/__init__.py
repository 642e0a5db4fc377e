"""Helpers for plait's tests and benchmarks: an emulated multi-node cluster on one machine, its profile and a cost
model of it."""

from plait.testing.emulated_profile import SharedMachineCost, profile_emulated, shared_machine_cost
from plait.testing.netns import (
    EmulatedCluster,
    EmuNode,
    LinkShape,
    NamespacesUnavailable,
    NetnsError,
    emulated_cluster,
    list_namespaces,
    remove_leftovers,
    tcp_throughput,
)

__all__ = [
    "EmuNode",
    "EmulatedCluster",
    "LinkShape",
    "NamespacesUnavailable",
    "NetnsError",
    "SharedMachineCost",
    "emulated_cluster",
    "list_namespaces",
    "profile_emulated",
    "remove_leftovers",
    "shared_machine_cost",
    "tcp_throughput",
]
