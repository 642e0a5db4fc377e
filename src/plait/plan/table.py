"""A readable summary of a Plan for the console."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table

from plait.plan.ir import Plan

MB = 1e6
GB = 1e9


def _fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def plan_table(plan: Plan) -> Group:
    """Rich renderables: the chosen plan, then every candidate the planner weighed."""
    dp = plan.data_parallel
    head = Table(title=f"plait plan: {plan.model.name} on {plan.cluster.name}", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    head.add_row("mesh", " x ".join(f"{a}={s}" for a, s in zip(plan.mesh.axes, plan.mesh.shape, strict=True)))
    head.add_row("data parallel", f"{dp.kind} (bucket {_fmt_bytes(dp.bucket_bytes)}, {len(dp.buckets)} buckets)")
    if dp.shard_units:
        head.add_row("shard units", f"{len(dp.shard_units)} modules")
    b = plan.batch
    head.add_row("batch", f"global {b.global_size} = micro {b.micro_size} x accum {b.num_micro} x dp {b.global_size // max(1, b.micro_size * b.num_micro)}")
    head.add_row("parameters", f"{plan.model.num_params / 1e6:.2f} M ({_fmt_bytes(plan.model.param_bytes)})")
    if plan.predicted:
        p = plan.predicted
        head.add_row("predicted step", f"{p.step_s * 1e3:.1f} ms (compute {p.compute_s * 1e3:.1f} ms, comm {p.comm_s * 1e3:.1f} ms, overlap {p.overlap:.0%})")
        head.add_row("predicted memory", f"{_fmt_bytes(max(p.peak_memory_bytes))} peak per device")
    parts: list[Table] = [head]
    if plan.candidates:
        cand = Table(title="candidates")
        for col in ("candidate", "fits", "step (ms)", "peak memory", "limit", "note"):
            cand.add_column(col)
        for c in plan.candidates:
            cand.add_row(c.name, "yes" if c.fits else "no", f"{c.step_s * 1e3:.1f}", _fmt_bytes(c.peak_memory_bytes), _fmt_bytes(c.memory_limit_bytes), c.note)
        parts.append(cand)
    return Group(*parts)


def plan_text(plan: Plan, width: int = 120) -> str:
    """The plan table as plain text."""
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(plan_table(plan))
    return console.export_text()
