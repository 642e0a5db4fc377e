"""The two-level cluster `plait profile --nnodes N` measures: node 0's profile plus the links inside and
between nodes, written as a cluster YAML that ``load_cluster`` reads.

The intra-node link is the point-to-point table among node 0's ranks 0 and 1; the inter-node link comes from
messages from node 0's ranks to node 1's (``bench_links``). A link's bandwidth is the slope of one-way time
between the smallest and the largest message, and its latency the smallest message's time (``fit_link``).
A token-bucket shaper lets its burst through at line rate, which makes a shaped link look faster by about
burst / largest message: keep the burst small next to the largest message.
The cluster's ``inter_node`` bandwidth is per rank with every rank of a node crossing at once, as the presets
hold it (a node's NIC shared by its devices); the one-pair bandwidth (the link's own) is in ``link``.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plait.cluster.local import host_memory_bytes
from plait.cluster.spec import Cluster, DeviceSpec, LinkSpec
from plait.cost.profile import Profile
from plait.fileio import atomic_write
from plait.profiling.config import ProfileConfig, ProfilingError
from plait.profiling.launch import run_ranks
from plait.profiling.run import assemble, check_device, tiny_block_kernels
from plait.runtime.nodes import NodeSpec

GB = 1e9


@dataclass(frozen=True, kw_only=True)
class LinkPoint:
    """One message size across the inter-node link: one-way seconds until all of ``pairs`` pairs sending at once are done."""

    pairs: int
    nbytes: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class MeasuredCluster:
    """What `plait profile --nnodes N` measured: node 0's profile, the link table and the cluster they give."""

    profile: Profile
    cluster: Cluster
    link: LinkSpec  # the inter-node link with one pair of ranks alone on it
    link_points: tuple[LinkPoint, ...]


def fit_link(points: Sequence[tuple[float, float]]) -> LinkSpec:
    """A link from one-way ``(nbytes, seconds)`` points: latency the smallest message's time; bandwidth the
    slope between the smallest and the largest message when the transfer is most of the largest one's time,
    else (a fast link, its times mostly latency and scheduler noise) the largest one's size over its time."""
    by_size: dict[float, list[float]] = {}
    for nbytes, seconds in points:
        by_size.setdefault(float(nbytes), []).append(float(seconds))
    sizes = sorted(by_size)
    if not sizes:
        raise ProfilingError("no link measurements to fit; profile with at least one message size")
    times = [statistics.median(by_size[s]) for s in sizes]
    bandwidth = sizes[-1] / times[-1]
    if len(sizes) >= 2 and times[-1] - times[0] > times[-1] / 2:
        bandwidth = (sizes[-1] - sizes[0]) / (times[-1] - times[0])
    return LinkSpec(latency_s=times[0], bandwidth=bandwidth)


def link_points(results: Sequence[dict[str, Any]]) -> tuple[LinkPoint, ...]:
    """The senders' link rows as points: a call of all pairs lasts from its first start to its last end
    (the senders share node 0's clock); the mean over calls."""
    spans: dict[tuple[int, int], list[list[list[float]]]] = {}
    for rank in results:
        for row in rank.get("links", []):
            spans.setdefault((row["pairs"], row["nbytes"]), []).append(row["spans"])
    points = []
    for (pairs, nbytes), senders in sorted(spans.items()):
        calls = zip(*senders, strict=True)  # the same call on every sender
        windows = [max(end for _, end in call) - min(start for start, _ in call) for call in calls]
        points.append(LinkPoint(pairs=pairs, nbytes=nbytes, seconds=statistics.fmean(windows)))
    return tuple(points)


def _intra_link(profile: Profile) -> LinkSpec | None:
    points = [(c.nbytes, c.seconds) for c in profile.collectives if c.op == "p2p" and c.group_size == 2]
    return fit_link(points) if points else None


def _device(profile: Profile, nproc: int) -> DeviceSpec:
    """One rank as the cluster's device: best GEMM rate per dtype and copy bandwidth with every rank busy."""
    level = max(profile.concurrency_levels())
    peak: dict[str, float] = {}
    for p in profile.matmul:
        if p.concurrent == level:
            peak[p.dtype] = max(peak.get(p.dtype, 0.0), p.rate)
    peak.setdefault("fp32", max(peak.values()))
    (rates,) = [r for r in profile.rates if r.concurrent == level]
    cpu = profile.device.kind == "cpu"
    return DeviceSpec(
        name="cpu-rank" if cpu else profile.device.name,
        kind=profile.device.kind,
        peak_flops=peak,
        memory_bytes=host_memory_bytes() // nproc if cpu else profile.device.memory_bytes,
        memory_bandwidth=rates.copy_bandwidth,
    )


def _describe(name: str, link: LinkSpec) -> str:
    return f"{name}: {link.bandwidth / GB:.3g} GB/s, {link.latency_s * 1e6:.0f} us"


def two_level_cluster(cfg: ProfileConfig, profile: Profile, points: Sequence[LinkPoint],
                      profile_path: str | None = None) -> tuple[Cluster, LinkSpec]:
    """The cluster of ``cfg.nnodes`` nodes x ``cfg.nproc`` ranks these measurements describe, and the
    inter-node link with one pair of ranks alone on it."""
    alone = fit_link([(p.nbytes, p.seconds) for p in points if p.pairs == 1]) if points else None
    shared = fit_link([(p.nbytes, p.seconds) for p in points if p.pairs == cfg.nproc]) if points else None
    if alone is None or shared is None:
        raise ProfilingError("a two-level cluster needs the link between two nodes: profile with --nnodes 2 or more")
    intra = _intra_link(profile) or alone  # one rank per node: no intra-node traffic to price
    prov = profile.provenance
    notes = (_describe("intra-node, one pair of ranks", intra), _describe("inter-node, one pair of ranks alone", alone),
             _describe(f"inter-node, per rank with all {cfg.nproc} ranks of a node crossing at once", shared))
    cluster = Cluster(
        name=f"measured:{cfg.nnodes}x{cfg.nproc}",
        num_nodes=cfg.nnodes,
        devices_per_node=cfg.nproc,
        device=_device(profile, cfg.nproc),
        intra_node=intra,
        inter_node=shared,
        profile=profile_path,
        source=f"measured by `plait profile --nnodes {cfg.nnodes} --nproc {cfg.nproc}` on {prov.host or 'this machine'}, "
               f"{prov.date}",
        notes=notes,
    )
    return cluster, alone


def measure_cluster(cfg: ProfileConfig, node: NodeSpec, progress: Callable[[int], None] | None = None,
                    profile_path: str | None = None) -> MeasuredCluster | None:
    """Run this node's share of a (multi-node) profile; on node 0 what it measured, elsewhere None.
    ``profile_path`` is where the caller will save the profile (the cluster refers to it)."""
    if cfg.nnodes != node.nnodes:
        raise ProfilingError(f"the profile is configured for {cfg.nnodes} node(s) but this node is one of {node.nnodes}")
    check_device(cfg)
    kernels = tiny_block_kernels() if node.node_rank == 0 else []
    results = run_ranks(cfg, progress, node)
    if node.node_rank > 0:
        return None
    profile = assemble(cfg, results, kernels)
    points = link_points(results)
    cluster, alone = two_level_cluster(cfg, profile, points, profile_path)
    return MeasuredCluster(profile=profile, cluster=cluster, link=alone, link_points=points)


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    """The YAML form of a cluster (what ``plait.cluster.cluster_from_dict`` reads)."""
    def link(spec: LinkSpec) -> dict[str, float]:
        return {"latency_us": spec.latency_s * 1e6, "bandwidth_gb_s": spec.bandwidth / GB}

    device = cluster.device
    raw: dict[str, Any] = {
        "name": cluster.name,
        "num_nodes": cluster.num_nodes,
        "devices_per_node": cluster.devices_per_node,
        "device": {"name": device.name, "kind": device.kind,
                   "peak_tflops": {k: v / 1e12 for k, v in device.peak_flops.items()},
                   "memory_gb": device.memory_bytes / GB, "memory_bandwidth_gb_s": device.memory_bandwidth / GB},
        "links": {"intra_node": link(cluster.intra_node), "inter_node": link(cluster.inter_node)},
        "source": cluster.source,
        "notes": list(cluster.notes),
    }
    if cluster.profile is not None:
        raw["profile"] = cluster.profile
    return raw


def save_cluster(cluster: Cluster, path: str | os.PathLike[str]) -> Path:
    """Write ``cluster`` as YAML (atomically); ``plait plan --cluster PATH`` and ``load_cluster`` read it."""
    text = "# written by `plait profile`\n" + yaml.safe_dump(cluster_to_dict(cluster), sort_keys=False)
    return atomic_write(path, text)
