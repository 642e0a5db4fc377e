"""The ``local:N`` preset: this machine as N CPU ranks with one thread each."""

from __future__ import annotations

import os
from pathlib import Path

from plait.cluster.spec import Cluster, DeviceSpec, LinkSpec

# Used only until `plait profile` has measured this machine; the profile replaces them.
DEFAULT_CORE_FLOPS = 30e9  # fp32 FLOP/s of one core with one thread (a modest AVX2 core)
DEFAULT_MEMORY_BANDWIDTH = 10e9  # bytes/s per core
LOOPBACK = LinkSpec(latency_s=60e-6, bandwidth=1.0e9)  # gloo over loopback TCP, before profiling


def default_profile_path() -> Path:
    """Where ``plait profile`` writes, and ``local:N`` reads, this machine's profile."""
    override = os.environ.get("PLAIT_PROFILE")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "plait" / "profile-local.json"


def num_cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_cluster(num_ranks: int) -> Cluster:
    """This machine as ``num_ranks`` CPU ranks; ranks beyond the core count share cores."""
    share = min(1.0, num_cores() / num_ranks)
    profile = default_profile_path()
    return Cluster(
        name=f"local:{num_ranks}",
        num_nodes=1,
        devices_per_node=num_ranks,
        device=DeviceSpec(
            name="cpu-rank",
            kind="cpu",
            peak_flops={"fp32": DEFAULT_CORE_FLOPS * share, "bf16": DEFAULT_CORE_FLOPS * share / 4},
            memory_bytes=host_memory_bytes() // num_ranks,
            memory_bandwidth=DEFAULT_MEMORY_BANDWIDTH * share,
        ),
        intra_node=LOOPBACK,
        inter_node=LOOPBACK,
        profile=str(profile) if profile.is_file() else None,
        source=f"this machine ({num_cores()} cores); rates from `plait profile` when measured, else defaults",
    )
