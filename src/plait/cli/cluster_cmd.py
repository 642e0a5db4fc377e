"""``plait cluster``: print a cluster preset or file."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from plait.cluster import load_cluster, preset_names


@click.command()
@click.argument("spec", required=False)
def cluster(spec: str | None) -> None:
    """Show cluster SPEC (a preset NAME:K or a YAML file); without SPEC, list the presets."""
    console = Console()
    if spec is None:
        console.print("presets: " + ", ".join(preset_names()) + "  (write NAME:K for K nodes; local:N is N CPU ranks)")
        return
    c = load_cluster(spec)
    table = Table(title=c.name, show_header=False)
    table.add_row("nodes x devices", f"{c.num_nodes} x {c.devices_per_node} ({c.world_size} ranks)")
    table.add_row("device", f"{c.device.name} ({c.device.kind}), {c.device.memory_bytes / 1e9:.1f} GB, {c.device.memory_bandwidth / 1e9:.0f} GB/s")
    table.add_row("peak", ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in c.device.peak_flops.items()))
    table.add_row("intra-node", f"{c.intra_node.bandwidth / 1e9:.3g} GB/s, {c.intra_node.latency_s * 1e6:.0f} us")
    table.add_row("inter-node", f"{c.inter_node.bandwidth / 1e9:.3g} GB/s, {c.inter_node.latency_s * 1e6:.0f} us")
    table.add_row("profile", c.profile or "none (datasheet numbers)")
    table.add_row("source", c.source)
    console.print(table)
