"""Helpers for plait's tests and benchmarks: an emulated multi-node cluster on one machine."""

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
    "emulated_cluster",
    "list_namespaces",
    "remove_leftovers",
    "tcp_throughput",
]
