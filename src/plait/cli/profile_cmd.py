"""``plait profile``: measure this machine and write the profile the cost model reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from plait.cluster import default_profile_path
from plait.cost.profile import Profile, save_profile

if TYPE_CHECKING:
    from plait.profiling.cluster import MeasuredCluster
    from plait.profiling.config import ProfileConfig
    from plait.runtime.nodes import NodeSpec

DEFAULT_CPU_RANKS = 4


@click.command()
@click.option("--nproc", type=int, default=None,
              help=f"Ranks to measure with, per node (default: {DEFAULT_CPU_RANKS} on CPU, every GPU on CUDA).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Profile file to write (default: the file `local:N` reads).")
@click.option("--quick", is_flag=True, help="Fewer sizes and repeats: well under a minute on a small machine.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="What to measure.")
@click.option("--nnodes", type=int, default=1, show_default=True,
              help="Nodes to measure the link between; run `plait profile` on each, with the same options.")
@click.option("--node-rank", "--node_rank", "node_rank", type=int, default=0, show_default=True,
              help="This node's index, 0 ... nnodes-1; node 0 writes the profile and the cluster.")
@click.option("--master-addr", "--master_addr", "master_addr", default=None,
              help="Address of node 0, reachable from every node (needed with --nnodes > 1).")
@click.option("--master-port", "--master_port", "master_port", type=int, default=None,
              help="Port of node 0's store (default: 29500 across nodes, a free port on one node).")
@click.option("--ifname", default=None, help="Network interface for gloo (default: the one that carries --master-addr).")
@click.option("--cluster-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Across nodes: the two-level cluster YAML to write (default: the profile's path with .cluster.yaml).")
def profile(nproc: int | None, out: Path | None, quick: bool, device: str, nnodes: int, node_rank: int,
            master_addr: str | None, master_port: int | None, ifname: str | None, cluster_out: Path | None) -> None:
    """Measure matmul rates, kernel overhead, memory bandwidth and collectives among N local ranks.

    Across nodes (--nnodes, --node-rank, --master-addr as for `plait run`), node 0's ranks measure as on one
    node, ranks of node 0 and node 1 measure the link between the nodes, and node 0 writes the profile and a
    two-level cluster YAML (intra-node and inter-node links) for `plait plan --cluster`.
    """
    from plait.profiling import default_config, measure_profile
    from plait.runtime.nodes import node_spec

    node = node_spec(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port, ifname=ifname)
    console = Console()
    ranks = nproc if nproc is not None else _default_ranks(device)
    cfg = default_config(device=device, nproc=ranks, quick=quick, nnodes=nnodes)  # type: ignore[arg-type]
    target = out or default_profile_path()
    if nnodes > 1:
        _profile_nodes(console, cfg, node, target, cluster_out or target.with_suffix(".cluster.yaml"))
        return
    console.print(f"profiling {device} with {ranks} rank(s){' (quick)' if quick else ''}; writing {target}")
    with _progress_bar(console, cfg.num_steps) as progress:
        result = measure_profile(cfg, progress=progress)
    save_profile(result, target)
    console.print(summary_table(result))
    console.print(f"wrote {target}")


@contextmanager
def _progress_bar(console: Console, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over ``total`` measurement steps; yields the callback that moves it."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("measuring", total=total)
        yield lambda done: bar.update(task, completed=done)


def _profile_nodes(console: Console, cfg: ProfileConfig, node: NodeSpec, target: Path, cluster_out: Path) -> None:
    """This node's share of a multi-node profile; node 0 writes the profile and the two-level cluster."""
    from plait.profiling.cluster import measure_cluster, save_cluster

    first = node.global_rank(0, cfg.nproc)
    console.print(f"profiling {cfg.device}: node {node.node_rank} of {node.nnodes} runs ranks {first}-{first + cfg.nproc - 1} "
                  f"of {cfg.world_size} (store {node.master_addr}:{node.master_port}, gloo on {node.ifname})")
    with _progress_bar(console, cfg.num_steps) as progress:
        measured = measure_cluster(cfg, node, progress, profile_path=str(target.resolve()))
    if measured is None:
        console.print(f"node {node.node_rank} done; node 0 writes the profile and the cluster")
        return
    notes = (f"measured on node 0 of {cfg.nnodes} ({cfg.nproc} ranks per node); links between nodes: {cluster_out}",)
    save_profile(replace(measured.profile, notes=measured.profile.notes + notes), target)
    save_cluster(measured.cluster, cluster_out)
    console.print(summary_table(measured.profile))
    console.print(link_table(measured))
    console.print(f"wrote {target} and {cluster_out}")


def link_table(measured: MeasuredCluster) -> Table:
    """The links of a measured two-level cluster."""
    table = Table(title=f"links of {measured.cluster.name}")
    for column in ("link", "GB/s", "latency us"):
        table.add_column(column, justify="right")
    c = measured.cluster
    rows = [("intra-node", c.intra_node), ("inter-node, one pair alone", measured.link),
            (f"inter-node per rank, {c.devices_per_node} pairs at once", c.inter_node)]
    for name, link in rows:
        table.add_row(name, f"{link.bandwidth / 1e9:.3g}", f"{link.latency_s * 1e6:.0f}")
    return table


def _default_ranks(device: str) -> int:
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return DEFAULT_CPU_RANKS


def summary_table(result: Profile) -> Table:
    """The headline numbers of a profile, one row per number of ranks computing at once."""
    table = Table(title=f"{result.device.name} ({result.device.kind})")
    for column in ("ranks busy", "best GEMM GFLOP/s", "kernel us", "tiny op us", "copy GB/s", "elementwise GB/s"):
        table.add_column(column, justify="right")
    for rates in result.rates:
        best: dict[str, float] = {}
        for p in result.matmul:
            if p.concurrent == rates.concurrent:
                best[p.dtype] = max(best.get(p.dtype, 0.0), p.rate)
        table.add_row(
            str(rates.concurrent),
            ", ".join(f"{dtype} {rate / 1e9:.0f}" for dtype, rate in best.items()),
            f"{rates.kernel_s * 1e6:.1f}",
            f"{rates.op_s * 1e6:.2f}",
            f"{rates.copy_bandwidth / 1e9:.1f}",
            f"{rates.elementwise_bandwidth / 1e9:.1f}",
        )
    if result.collectives:
        top = max(c.nbytes for c in result.collectives)
        largest = [c for c in result.collectives if c.op == "all_reduce" and c.nbytes == top]
        for c in largest:
            table.caption = (table.caption or "") + f"all_reduce {c.nbytes / 2**20:.1f} MiB on {c.group_size}: {c.seconds * 1e3:.2f} ms  "
    return table
