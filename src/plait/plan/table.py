"""A readable summary of a Plan for the console: the chosen plan, then every candidate the planner weighed."""

from __future__ import annotations

import io

from rich.console import Console, Group
from rich.table import Table

from plait.plan.ir import CandidateReport, Plan, Prediction, SyncSpec
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
    if plan.is_pipeline:
        sizes = sorted({len(s.ranks) for s in plan.stages})
        if sizes == [1]:
            return "none (one rank per stage)"
        return f"inside each stage: replicate over its {'/'.join(str(n) for n in sizes)} ranks, gradients all-reduced after the last backward"
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


SYNC_NAMES = {"allreduce": "all-reduce", "reduce_scatter": "reduce-scatter", "ps": "parameter server", "sfb": "SFB",
              "none": "none"}
MAX_SYNC_ROWS = 4


def sync_spec_text(spec: SyncSpec) -> str:
    """One SyncSpec as short text (bucket aside): ``parameter server over dp, 2 shards on dim 0 (ranks 0,1), staleness 2``."""
    parts = [SYNC_NAMES.get(spec.kind, spec.kind) + (f" over {'/'.join(spec.axes)}" if spec.axes else "")]
    if spec.compress == "powersgd":
        parts.append(f"PowerSGD rank {spec.compress_rank}" + ("" if spec.error_feedback else " without error feedback"))
    elif spec.compress is not None:
        parts.append(f"{spec.compress} compressed")
    if spec.kind == "ps":
        shards = f"{spec.num_shards} shard{'s' if spec.num_shards != 1 else ''}"
        if spec.num_shards > 1:
            shards += f" on dim {spec.shard_dim}"
        parts.append(shards + (f" (ranks {','.join(str(r) for r in spec.servers)})" if spec.servers else ""))
        parts.append("synchronous" if spec.staleness == 0 else f"staleness {spec.staleness}")
    return ", ".join(parts)


def sync_text(plan: Plan) -> str:
    """How gradients meet: each distinct SyncSpec (bucket aside) with the number of parameters using it."""
    counts: dict[str, int] = {}
    for p in plan.params:
        text = sync_spec_text(p.sync)
        counts[text] = counts.get(text, 0) + 1
    rows = [f"{text} ({n} parameter{'s' if n != 1 else ''})" for text, n in counts.items()]
    if len(rows) > MAX_SYNC_ROWS:
        rows = [*rows[:MAX_SYNC_ROWS], f"{len(rows) - MAX_SYNC_ROWS} more kinds"]
    return "; ".join(rows)


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


def model_flops_per_step(plan: Plan) -> float:
    """The model's forward and backward FLOPs over one step's global batch (recomputation not counted)."""
    per_sample = sum(layer.fwd_flops + layer.bwd_flops for layer in plan.model.layers) / max(1, plan.model.batch_size)
    return per_sample * plan.batch.global_size


def throughput_text(plan: Plan, p: Prediction) -> str:
    """Predicted model TFLOP/s per device and the model FLOPs utilisation (MFU) of the compute dtype's peak."""
    dtype = plan.precision.compute_dtype
    peak = plan.cluster.device.flops_for(dtype)
    per_device = model_flops_per_step(plan) / max(p.step_s, 1e-12) / plan.world_size
    mfu = f", MFU {per_device / peak:.1%} of the {dtype} peak {fmt_flops(peak)}" if peak > 0 else ""
    return f"{fmt_flops(per_device)} per device{mfu}"


def fmt_flops(rate: float) -> str:
    """FLOP/s as TFLOP/s (GFLOP/s below one TFLOP/s)."""
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.2f} GFLOP/s"


def pipeline_text(plan: Plan) -> str:
    """Stages, schedule, micro-batches and the predicted bubble."""
    sizes = sorted({len(s.ranks) for s in plan.stages})
    per = f"{sizes[0]} ranks each" if len(sizes) == 1 else f"{'/'.join(str(n) for n in sizes)} ranks"
    bubble = f", bubble {plan.predicted.bubble_fraction:.0%} of the step" if plan.predicted else ""
    n, pp = plan.schedule.num_microbatches, plan.num_pipeline_ranks
    chunks = f" x {len(plan.stages) // pp} model chunks" if len(plan.stages) > pp else ""
    text = f"{pp} stages{chunks} ({per}), {plan.schedule.kind}, {n} micro-batch{'es' if n != 1 else ''}{bubble}"
    tokens = token_slicing_text(plan)
    return f"{text}; {tokens}" if tokens else text


def token_slicing_text(plan: Plan) -> str:
    """``token slicing: 6 slices of [4x224,2x192] tokens per micro-batch, predicted 1.44x faster than micro-batch-only
    pipelining``; empty for an unsliced plan."""
    cuts = plan.schedule.token_slices
    if not cuts:
        return ""
    text = f"token slicing: {len(cuts)} slices of [{run_lengths(cuts)}] tokens per micro-batch"
    base, p = plan.schedule.unsliced_step_s, plan.predicted
    if base and p and p.step_s > 0:
        text += (f", predicted {base / p.step_s:.2f}x faster than micro-batch-only pipelining "
                 f"({fmt_seconds(p.step_s)} vs {fmt_seconds(base)})")
    return text


def run_lengths(values: tuple[int, ...] | list[int]) -> str:
    """``4x224,2x192``: equal neighbours counted."""
    groups: list[list[int]] = []
    for v in values:
        if groups and groups[-1][1] == v:
            groups[-1][0] += 1
        else:
            groups.append([1, v])
    return ",".join(f"{k}x{v}" if k > 1 else str(v) for k, v in groups)


def stages_table(plan: Plan) -> Table:
    """One row per pipeline stage: its layers, ranks, mesh, recomputation and predicted peak memory."""
    table = Table(title="pipeline stages")
    for col in ("stage", "layers", "ranks", "mesh", "recompute", "parameters", "peak memory"):
        table.add_column(col)
    shapes = {p.name: p.numel for p in plan.model.params}
    for s in plan.stages:
        mesh = " x ".join(f"{a}={n}" for a, n in zip(s.stage_mesh.axes, s.stage_mesh.shape, strict=True))
        layers = s.layers[0] if len(s.layers) == 1 else f"{s.layers[0]} .. {s.layers[-1]} ({len(s.layers)})"
        numel = sum(shapes.get(p.name, 0) for p in plan.params if p.stage == s.index)
        peak = max(plan.predicted.peak_memory_bytes[r] for r in s.ranks) if plan.predicted else 0
        ranks = f"{s.ranks[0]}-{s.ranks[-1]}" if len(s.ranks) > 1 else str(s.ranks[0])
        table.add_row(str(s.index), layers, ranks, mesh, "yes" if s.recompute else "no", f"{numel / 1e6:,.2f} M",
                      fmt_bytes(peak) if plan.predicted else "-")
    return table


def _head(plan: Plan) -> Table:
    head = Table(title=f"plait plan: {plan.model.name} on {plan.cluster.name}", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    head.add_row("mesh", " x ".join(f"{a}={s}" for a, s in zip(plan.mesh.axes, plan.mesh.shape, strict=True)))
    if plan.is_pipeline:
        head.add_row("pipeline", pipeline_text(plan))
    head.add_row("data parallel", data_parallel_text(plan))
    if plan.params:
        head.add_row("sync", sync_text(plan))
    b = plan.batch
    head.add_row("batch", f"global {b.global_size} = micro {b.micro_size} x {b.num_micro} micro-batches x dp {plan.dp_degree}")
    head.add_row("precision", precision_text(plan))
    head.add_row("recomputation", recompute_text(plan))
    head.add_row("parameters", f"{plan.model.num_params / 1e6:,.2f} M ({fmt_bytes(plan.model.param_bytes)}, {plan.model.dtype}), optimizer {plan.optimizer}")
    if plan.programs:
        head.add_row("program", f"{sum(len(p.instrs) for p in plan.programs)} instructions in {len(plan.programs)} program(s)")
    if plan.predicted:
        _prediction_rows(head, plan.predicted)
        head.add_row("throughput", throughput_text(plan, plan.predicted))
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
    if plan.is_pipeline:
        parts.append(stages_table(plan))
    if not plan.is_pipeline and plan.model_axes and any(plan.mesh.axis_size(a) > 1 for a in plan.model_axes):
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
