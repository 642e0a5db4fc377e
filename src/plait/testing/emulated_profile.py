"""Profile an emulated cluster with `plait profile --nnodes N`, and price plans on it.

``profile_emulated`` runs plait's own multi-node profiler in every node's namespace (node 0 holds the store and
writes the profile and the two-level cluster YAML), so the inter-node link the cost model reads is the one
measured through the tbf-shaped veths. ``shared_machine_cost`` prices plans on that cluster for a machine whose
emulated nodes share its cores: the links come from the emulated cluster, compute and the intra-node tables from
a profile of all the machine's ranks, read at the number of ranks of the *machine* computing at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from plait.cluster.spec import Cluster
from plait.cost.model import CostModel, ProfileRef
from plait.testing.netns import EmulatedCluster, NetnsError


def profile_emulated(cluster: EmulatedCluster, out: str | os.PathLike[str], *, nproc: int, quick: bool = True,
                     port: int = 29541, timeout_s: float = 600.0, argv0: list[str] | None = None) -> Path:
    """Run `plait profile --nnodes N --nproc NPROC` on every node of ``cluster``; node 0 writes the profile at ``out``
    and the two-level cluster next to it (``<out stem>.cluster.yaml``), whose path is returned. ``argv0`` replaces
    the command that starts plait's CLI (tests swap in smaller tables)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    start = argv0 or [sys.executable, "-c", "from plait.cli.main import main; main()"]
    procs: list[tuple[subprocess.Popen[Any], Path]] = []
    for node in reversed(cluster.nodes):  # the others first: node 0's store waits for them
        args = ["profile", "--nproc", str(nproc), "--nnodes", str(len(cluster.nodes)), "--node-rank", str(node.index),
                "--master-addr", cluster.master_addr, "--master-port", str(port), "--ifname", node.ifname,
                "--out", str(out)] + (["--quick"] if quick else [])
        log_path = out.with_name(f"{out.stem}.node{node.index}.log")
        with log_path.open("w") as log:
            procs.append((node.popen([*start, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL),
                          log_path))
    waiters = [threading.Thread(target=_wait, args=(p, timeout_s), daemon=True) for p, _ in procs]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join(timeout_s + 30)
    codes = [p.returncode for p, _ in procs]
    if any(c != 0 for c in codes):
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in procs)
        raise NetnsError(f"`plait profile --nnodes {len(cluster.nodes)}` failed (exit codes {codes}):\n{tails}")
    return out.with_suffix(".cluster.yaml")


def _wait(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SharedMachineCost(CostModel):
    """A CostModel of a cluster whose nodes are emulated on one machine: links from ``cluster`` (as `plait profile
    --nnodes` measured them), compute from ``machine_profile`` (a profile of ``cluster.world_size`` ranks on the
    machine), and ``level`` ranks of a node computing at once read as ``level x num_nodes`` ranks of the machine
    (the nodes run the same SPMD step at the same time on the same cores)."""

    def __init__(self, cluster: Cluster, machine_profile: ProfileRef, *, concurrency: int | None = None) -> None:
        super().__init__(cluster, machine_profile, concurrency=concurrency or cluster.world_size)

    def at_concurrency(self, level: int) -> CostModel:
        """The machine's cost model with ``level`` ranks busy on every node at once."""
        if self.profile is None:
            return self
        levels = self.profile.concurrency_levels()
        busy = min(level * self.cluster.num_nodes, max(levels))
        return CostModel.at_concurrency(self, busy)


def shared_machine_cost(cluster: Cluster, machine_profile: ProfileRef) -> SharedMachineCost:
    """``SharedMachineCost(cluster, machine_profile)``."""
    return SharedMachineCost(cluster, machine_profile)
