"""``plait sim``: simulate a plan file: step time, overlap, peak memory per device, timeline image."""

from __future__ import annotations

import click
from rich.table import Table

from plait.plan import Plan, load_plan
from plait.plan.table import console_for_tables, fmt_bytes, fmt_seconds, pipeline_text, throughput_text
from plait.sim import SimResult


def _rank_ranges(ranks: list[int]) -> str:
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def summary_table(plan: Plan, result: SimResult) -> Table:
    """Predicted step, overlap and peak memory per device (ranks with the same peak share a row)."""
    p = result.prediction
    mesh = " x ".join(f"{a}={s}" for a, s in zip(plan.mesh.axes, plan.mesh.shape, strict=True))
    table = Table(title=f"plait sim: {plan.model.name} on {plan.cluster.name} (mesh {mesh})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("step", fmt_seconds(p.step_s))
    table.add_row("compute", f"{fmt_seconds(p.compute_s)} busy")
    table.add_row("communication", f"{fmt_seconds(p.comm_s)} busy, {fmt_seconds(p.exposed_comm_s)} exposed")
    table.add_row("overlap", f"{p.overlap:.0%} of communication hidden behind compute")
    if plan.is_pipeline:
        table.add_row("pipeline", pipeline_text(plan))
    table.add_row("throughput", throughput_text(plan, p))
    limit = plan.cluster.device.memory_bytes
    by_peak: dict[int, list[int]] = {}
    for rank, peak in enumerate(p.peak_memory_bytes):
        by_peak.setdefault(peak, []).append(rank)
    for peak, ranks in sorted(by_peak.items(), reverse=True):
        table.add_row(f"peak memory, ranks {_rank_ranges(ranks)}", f"{fmt_bytes(peak)} of {fmt_bytes(limit)} ({peak / limit:.0%})")
    m = p.memory
    table.add_row(
        "memory at peak",
        f"params {fmt_bytes(m.params)}, grads {fmt_bytes(m.grads)}, optimizer {fmt_bytes(m.optimizer)}, "
        f"activations {fmt_bytes(m.activations)}, buffers {fmt_bytes(m.buffers)}",
    )
    if plan.predicted and abs(plan.predicted.step_s - p.step_s) > 1e-9 * max(1.0, p.step_s):
        table.add_row("when planned", f"{fmt_seconds(plan.predicted.step_s)} (the cost model has changed since)")
    return table


@click.command()
@click.argument("plan_file", type=click.Path(dir_okay=False))
@click.option("--timeline", type=click.Path(dir_okay=False), help="Write the per-rank timeline PNG here.")
@click.option("--profile", type=click.Path(dir_okay=False), help="A measured profile JSON for the cost model.")
def sim(plan_file: str, timeline: str | None, profile: str | None) -> None:
    """Simulate PLAN_FILE (from `plait plan --out`): step time, overlap, peak memory, timeline image."""
    from plait.cost import CostModel
    from plait.sim import draw_timeline, simulate

    plan = load_plan(plan_file)
    result = simulate(plan, CostModel(plan.cluster, profile))
    console_for_tables().print(summary_table(plan, result))
    if timeline:
        click.echo(f"timeline written to {draw_timeline(result, timeline)}")
