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
@click.option("--passes", "max_passes", type=click.IntRange(min=0), default=None,
              help="Print each pipeline rank's passes in order with their start times, at most this many per rank "
                   "(F3 / B3: micro-batch 3; F3.s1: its token slice 1). Default: 32 for token-sliced plans, none else.")
def sim(plan_file: str, timeline: str | None, profile: str | None, max_passes: int | None) -> None:
    """Simulate PLAN_FILE (from `plait plan --out`): step time, overlap, peak memory, timeline image (the pipeline
    passes labelled on it, F3.s1 for token slice 1 of micro-batch 3)."""
    from plait.cost import CostModel
    from plait.sim import draw_timeline, simulate
    from plait.sim.timeline import pass_rows

    plan = load_plan(plan_file)
    result = simulate(plan, CostModel(plan.cluster, profile))
    console = console_for_tables()
    console.print(summary_table(plan, result))
    limit = max_passes if max_passes is not None else 32 if plan.schedule.is_token_sliced else 0
    rows = pass_rows(result, max_passes=limit) if limit else []
    if rows:
        table = Table(title="passes per rank (start times)", show_header=False)
        table.add_column("ranks", style="bold")
        table.add_column("passes")
        for ranks, text in rows:
            table.add_row(ranks, text)
        console.print(table)
    if timeline:
        click.echo(f"timeline written to {draw_timeline(result, timeline)}")
