"""A readable summary of a Plan for the console: the chosen plan, then every candidate the planner weighed."""

from __future__ import annotations

import io

from rich.console import Console, Group
from rich.table import Table

from plait.plan.ir import CandidateReport, Plan, Prediction
from plait.plan.layout import shard_axis_of
from plait.plan.placement import placements_text

MB = 1e6
GB = 1e9


def fmt_bytes(n: float) -> str:
    """Bytes as GB (or MB below one GB), decimal units as on datasheets."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def fmt_seconds(s: float) -> str:
    """A duration in ms below 10 s, else in s."""
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def data_parallel_text(plan: Plan) -> str:
    """How the batch is split and how gradients meet, read from the placements: buckets, FSDP2 units or none."""
    dp_axes = plan.data_parallel_axes
    if not dp_axes or plan.dp_degree == 1:
        return "none (every rank sees the whole batch)"
    over = " x ".join(f"{a}={plan.mesh.axis_size(a)}" for a in dp_axes)
    axis = shard_axis_of(plan)
    if axis is None:
        sizes = [b.nbytes for b in plan.buckets]
        if len(sizes) == 1:
            return f"replicate over {over}: 1 gradient bucket of {fmt_bytes(sizes[0])}"
        spread = f" ({fmt_bytes(min(sizes))} to {fmt_bytes(max(sizes))})" if sizes else ""
        return f"replicate over {over}: {len(sizes)} gradient buckets{spread}"
    replicated = [a for a in dp_axes if a != axis]
    where = f"shard over {axis}={plan.mesh.axis_size(axis)}"
    if replicated:
        where = f"replicate over {', '.join(f'{a}={plan.mesh.axis_size(a)}' for a in replicated)}, {where}"
    reshard = ", reshard after forward" if all(u.reshard_after_forward for u in plan.shard_units) else ""
    return f"FSDP2 ({where}): {len(plan.shard_units)} units{reshard}"


def precision_text(plan: Plan) -> str:
    """``fp32`` or ``bf16 compute, fp32 parameters, fp32 gradient reduction``."""
    p = plan.precision
    if not p.mixed and p.reduce_dtype == p.param_dtype:
        return p.param_dtype
    return f"{p.compute_dtype} compute, {p.param_dtype} parameters, {p.reduce_dtype} gradient reduction"


def recompute_text(plan: Plan) -> str:
    """Which layers recompute their forward in backward."""
    names = [layer.name for layer in plan.layers if layer.recompute]
    if not names:
        return "none"
    return "every layer" if len(names) == len(plan.layers) else ", ".join(names)


def _prediction_rows(table: Table, p: Prediction) -> None:
    table.add_row(
        "predicted step",
        f"{fmt_seconds(p.step_s)} (compute {fmt_seconds(p.compute_s)}, comm {fmt_seconds(p.comm_s)}, "
        f"exposed {fmt_seconds(p.exposed_comm_s)}, overlap {p.overlap:.0%})",
    )
    m = p.memory
    table.add_row(
        "predicted memory",
        f"{fmt_bytes(max(p.peak_memory_bytes))} peak per device = params {fmt_bytes(m.params)} + grads "
        f"{fmt_bytes(m.grads)} + optimizer {fmt_bytes(m.optimizer)} + activations {fmt_bytes(m.activations)} "
        f"+ buffers {fmt_bytes(m.buffers)}",
    )


def _head(plan: Plan) -> Table:
    head = Table(title=f"plait plan: {plan.model.name} on {plan.cluster.name}", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    head.add_row("mesh", " x ".join(f"{a}={s}" for a, s in zip(plan.mesh.axes, plan.mesh.shape, strict=True)))
    head.add_row("data parallel", data_parallel_text(plan))
    b = plan.batch
    head.add_row("batch", f"global {b.global_size} = micro {b.micro_size} x {b.num_micro} micro-batches x dp {plan.dp_degree}")
    head.add_row("precision", precision_text(plan))
    head.add_row("recomputation", recompute_text(plan))
    head.add_row("parameters", f"{plan.model.num_params / 1e6:,.2f} M ({fmt_bytes(plan.model.param_bytes)}, {plan.model.dtype}), optimizer {plan.optimizer}")
    if plan.programs:
        head.add_row("program", f"{sum(len(p.instrs) for p in plan.programs)} instructions in {len(plan.programs)} program(s)")
    if plan.predicted:
        _prediction_rows(head, plan.predicted)
    if plan.provenance:
        pv = plan.provenance
        head.add_row("planned by", f"{pv.planner} {pv.version} in {pv.search_s:.2f} s")
    return head


def candidates_table(candidates: tuple[CandidateReport, ...]) -> Table:
    """Every candidate with its predicted step time and memory, whether it fits, and why it won or lost."""
    table = Table(title="candidates")
    for col in ("candidate", "fits", "micro x accum", "step", "peak memory", "limit", "note"):
        table.add_column(col)
    for c in candidates:
        scored = c.micro_size > 0
        table.add_row(
            c.name,
            "yes" if c.fits else "no",
            f"{c.micro_size} x {c.num_micro}" if scored else "-",
            fmt_seconds(c.step_s) if scored else "-",
            fmt_bytes(c.peak_memory_bytes) if scored else "-",
            fmt_bytes(c.memory_limit_bytes),
            c.note,
            style="bold" if c.note.startswith("chosen") else None,
        )
    return table


def _relative(name: str, layer: str) -> str:
    return name[len(layer) + 1 :] if layer and name.startswith(f"{layer}.") else name


def _layer_of(name: str, layers: list[str]) -> str:
    """The layer-view layer a parameter or module belongs to (the longest layer name it starts with)."""
    best = ""
    for layer in layers:
        if (name == layer or name.startswith(f"{layer}.")) and len(layer) > len(best):
            best = layer
    return best


def _layer_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """Per layer: its parameters split on the model axes, and its pinned outputs, as short text."""
    index = [plan.mesh.axes.index(a) for a in plan.model_axes]
    layers = [layer.name for layer in plan.layers]
    split: dict[str, list[str]] = {name: [] for name in layers}
    pinned: dict[str, list[str]] = {name: [] for name in layers}
    for p in plan.params:
        mine = [p.placements[i] for i in index]
        if any(not x.is_replicate for x in mine):
            layer = _layer_of(p.name, layers)
            split.setdefault(layer, []).append(f"{_relative(p.name, layer)} {placements_text(mine)}")
    for a in plan.activations:
        mine = [a.placements[i] for i in index]
        if a.port == "output":
            layer = _layer_of(a.module, layers)
            pinned.setdefault(layer, []).append(f"{_relative(a.module, layer) or 'out'} {placements_text(mine)}")
    return [(name, ", ".join(split.get(name, [])) or "-", ", ".join(pinned.get(name, [])) or "-") for name in layers]


def placements_table(plan: Plan) -> Table:
    """The model-axis placements per layer; consecutive layers alike (repeated blocks) share a row."""
    axes = ", ".join(f"{a}={plan.mesh.axis_size(a)}" for a in plan.model_axes)
    table = Table(title=f"placements on the model axes ({axes}); everything else replicated there")
    for col in ("layers", "split parameters", "pinned outputs"):
        table.add_column(col)
    rows = _layer_rows(plan)
    k = 0
    while k < len(rows):
        j = k
        while j + 1 < len(rows) and _alike(rows[j + 1], rows[k]):
            j += 1
        label = rows[k][0] if j == k else f"{rows[k][0]} .. {rows[j][0]} ({j - k + 1})"
        table.add_row(label, rows[k][1], rows[k][2])
        k = j + 1
    return table


def _alike(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    return a[1:] == b[1:] and a[0].rsplit(".", 1)[0] == b[0].rsplit(".", 1)[0]


def plan_table(plan: Plan) -> Group:
    """Rich renderables: the chosen plan, its placements per layer, then every candidate the planner weighed."""
    parts: list[Table] = [_head(plan)]
    if plan.model_axes and any(plan.mesh.axis_size(a) > 1 for a in plan.model_axes):
        parts.append(placements_table(plan))
    if plan.candidates:
        parts.append(candidates_table(plan.candidates))
    return Group(*parts)


def console_for_tables(min_width: int = 150) -> Console:
    """A console at least ``min_width`` wide when output is not a terminal (pipes, files, CI logs)."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, min_width))


def plan_text(plan: Plan, width: int = 120) -> str:
    """The plan table as plain text."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(plan_table(plan))
    return console.export_text()
