"""Explain a choice: one CandidateReport per option (why it won or lost), and the no-feasible-plan message."""

from __future__ import annotations

import math
from collections.abc import Sequence

from plait.cluster import Cluster
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import CandidateReport, Plan, Prediction
from plait.plan.table import fmt_bytes, fmt_seconds
from plait.planners.candidates import Scored


def _pred(plan: Plan | None) -> Prediction:
    assert plan is not None and plan.predicted is not None
    return plan.predicted


def _accumulation(plan: Plan) -> str:
    b = plan.batch
    text = f"{b.num_micro} micro-batches of {b.micro_size}" if b.num_micro > 1 else f"micro-batch {b.micro_size}"
    return text + (", recomputation" if any(layer.recompute for layer in plan.layers) else "")


def _why_slower(loser: Plan, winner: Plan) -> str:
    lp, wp = _pred(loser), _pred(winner)
    gap = lp.step_s - wp.step_s
    if gap <= 1e-12 * max(1.0, wp.step_s):
        return "as fast as the chosen plan; the first one listed wins ties"
    head = f"slower by {fmt_seconds(gap)} ({gap / wp.step_s:+.1%})"
    if loser.batch.num_micro > winner.batch.num_micro:
        return f"{head}: needs {loser.batch.num_micro} micro-batches to fit"
    if lp.exposed_comm_s - wp.exposed_comm_s >= lp.compute_s - wp.compute_s:
        return f"{head}: more exposed communication ({fmt_seconds(lp.exposed_comm_s)} vs {fmt_seconds(wp.exposed_comm_s)})"
    return f"{head}: more compute ({fmt_seconds(lp.compute_s)} vs {fmt_seconds(wp.compute_s)})"


def winner_of(scored: Sequence[Scored]) -> Scored | None:
    """The fastest option that fits (the first one on ties), or None."""
    fitting = [s for s in scored if s.fits]
    return min(fitting, key=lambda s: _pred(s.plan).step_s) if fitting else None


def explain(scored: Sequence[Scored], limit: int) -> tuple[CandidateReport, ...]:
    """A report per scored option with a short note: chosen, why it lost, or why it does not fit."""
    best = winner_of(scored)
    reports = []
    for s in scored:
        if s.plan is None:
            note, step, micro, num_micro = s.reason, 0.0, 0, 1
        else:
            step, micro, num_micro = _pred(s.plan).step_s, s.plan.batch.micro_size, s.plan.batch.num_micro
            if s is best:
                recomputed = any(layer.recompute for layer in s.plan.layers)
                note = "chosen: fastest that fits" + (f" ({_accumulation(s.plan)})" if num_micro > 1 or recomputed else "")
            elif not s.fits:
                note = f"does not fit: needs {fmt_bytes(s.peak_bytes)} > {fmt_bytes(limit)} even with {_accumulation(s.plan)}"
            else:
                assert best is not None and best.plan is not None
                note = _why_slower(s.plan, best.plan)
        reports.append(
            CandidateReport(
                name=s.option.name, family=s.option.family, fits=s.fits, step_s=step,
                peak_memory_bytes=s.peak_bytes, memory_limit_bytes=limit, note=note, micro_size=micro, num_micro=num_micro,
            )
        )
    return tuple(reports)


def _devices_needed(s: Scored, limit: int) -> str:
    """How many devices a sharded option would need, from its shardable state (parameters and optimizer
    state; the sharded gradients at the peak count as fixed, so the figure errs high) and the rest."""
    if s.plan is None or s.option.kind != "fsdp" or s.option.mesh is not None:
        return ""
    p = _pred(s.plan)
    n = s.plan.mesh.size
    static = p.memory.params + p.memory.optimizer
    dynamic = s.peak_bytes - static
    if dynamic >= limit:
        return (
            f"; its activations ({fmt_bytes(p.memory.activations)}) and gathered layers ({fmt_bytes(p.memory.buffers)}) "
            "alone exceed the limit, whatever the device count"
        )
    return f"; would fit on about {math.ceil(static * n / (limit - dynamic))} such devices"


def infeasible_message(graph: ModelGraph, cluster: Cluster, scored: Sequence[Scored], limit: int, fraction: float) -> str:
    """Why no plan fits: the smallest memory each candidate needs against the limit, and what to try."""
    if all(s.plan is None for s in scored):
        return _none_applies(graph, cluster, scored)
    lines = [
        f"{graph.name} ({graph.num_params / 1e6:,.1f} M parameters) fits no plan on {cluster.name}: "
        f"the limit is {fmt_bytes(limit)} per device ({fraction:.0%} of {fmt_bytes(cluster.device.memory_bytes)})."
    ]
    for s in scored:
        if s.plan is None:
            lines.append(f"  - {s.option.name}: {s.reason}")
            continue
        lines.append(
            f"  - {s.option.name}: needs {fmt_bytes(s.peak_bytes)} at least (with {_accumulation(s.plan)})"
            + _devices_needed(s, limit)
        )
    lines.append(
        "Try more devices or a bigger cluster (sharded plans divide parameters, gradients and optimizer state "
        "by the device count), a smaller micro-batch or sequence length, devices with more memory, "
        "or a higher memory fraction."
    )
    return "\n".join(lines)


def _none_applies(graph: ModelGraph, cluster: Cluster, scored: Sequence[Scored]) -> str:
    lines = [f"No candidate plan applies to {graph.name} on {cluster.name}:"]
    lines += [f"  - {s.option.name}: {s.reason}" for s in scored]
    lines.append(
        "Search every family (--family all), or try another mesh (--mesh) or a smaller batch per device "
        "(a model axis pays off when the layers are large against the batch)."
    )
    return "\n".join(lines)
