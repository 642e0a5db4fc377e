"""Draw a simulated step as a timeline image: per program (set of ranks) a compute lane and a comm lane."""

from __future__ import annotations

import os
from pathlib import Path

from plait.sim.engine import SimResult
from plait.sim.trace import Event, ProgramTrace

# colour per kind of work: forward, backward, optimizer, one per collective family, and buffer copies
COLOURS = {
    "fwd": "#4c72b0",
    "bwd": "#dd8452",
    "step": "#55a868",
    "all_reduce": "#c44e52",
    "all_gather": "#8172b3",
    "reduce_scatter": "#937860",
    "p2p": "#da8bc3",
    "copy": "#8c8c8c",
    "other": "#cccccc",
}


def _kind(event: Event) -> str:
    if event.stream == "compute":
        if event.phase in ("fwd", "bwd", "step"):
            return event.phase
        return "copy" if event.op == "compute" else "other"
    name = event.name.split("[")[0].split(" ")[0]
    if event.op in ("send", "recv"):
        return "p2p"
    return name if name in COLOURS else "other"


LABEL_CHAR = 0.0035  # share of the step's width one character of a pass label needs on the drawn timeline
HATCHES = ("", "//", "..", "xx")  # one per distinct set of mesh axes a collective spans, in order of appearance


def span_label(event: Event) -> str:
    """A span's legend entry: its kind, and for a collective on a mesh the axes it spans."""
    kind = _kind(event)
    return f"{kind} ({','.join(event.axes)})" if event.stream == "comm" and event.axes else kind


def _rank_label(ranks: tuple[int, ...]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return f"{len(ranks)} ranks"


def draw_timeline(result: SimResult, path: str | os.PathLike[str], *, title: str | None = None, max_lanes: int = 8) -> str:
    """Write the timeline PNG to ``path`` and return the path; at most ``max_lanes`` programs are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    traces: list[ProgramTrace] = list(result.traces[:max_lanes])
    step = result.prediction.step_s or 1.0
    unit, scale = ("ms", 1e3) if step < 10 else ("s", 1.0)
    fig_h = 1.2 + 0.9 * len(traces)
    fig, ax = plt.subplots(figsize=(13, fig_h), layout="constrained")
    labels: list[tuple[float, str]] = []
    styles: dict[str, dict[str, str]] = {}  # legend entry -> colour and hatch, in order of appearance
    hatch_of: dict[tuple[str, ...], str] = {}
    for lane, trace in enumerate(traces):
        for sub, stream in enumerate(("compute", "comm")):
            y = lane * 2.5 + (1 - sub)
            labels.append((y + 0.4, f"{_rank_label(trace.ranks)} {stream}"))
            spans = [e for e in trace.events if e.stream == stream and e.end > e.start]
            for e in spans:
                hatch = hatch_of.setdefault(e.axes, HATCHES[len(hatch_of) % len(HATCHES)]) if e.stream == "comm" else ""
                styles.setdefault(span_label(e), {"color": COLOURS[_kind(e)], "hatch": hatch})
            for label in dict.fromkeys(span_label(e) for e in spans):
                mine = [(e.start * scale, e.duration * scale) for e in spans if span_label(e) == label]
                ax.broken_barh(mine, (y, 0.8), facecolors=styles[label]["color"], hatch=styles[label]["hatch"],
                               edgecolor="white", linewidth=0.3)
            for e in spans:  # the pass a span runs, where it is wide enough to read (F3, B3.s1: slice 1 of micro 3)
                if e.label and e.duration >= step * 0.9 * len(e.label) * LABEL_CHAR:
                    ax.text((e.start + e.duration / 2) * scale, y + 0.4, e.label, ha="center", va="center",
                            fontsize=6, color="white", clip_on=True)
    ax.set_yticks([y for y, _ in labels], [text for _, text in labels])
    ax.set_xlabel(f"time ({unit})")
    ax.set_xlim(0, step * scale * 1.02)
    p = result.prediction
    ax.set_title(
        title
        or f"predicted step {p.step_s * scale:.3g} {unit}: compute {p.compute_s * scale:.3g}, "
        f"comm {p.comm_s * scale:.3g}, exposed {p.exposed_comm_s * scale:.3g} {unit} (overlap {p.overlap:.0%})"
    )
    handles = [Patch(facecolor=st["color"], hatch=st["hatch"], edgecolor="white", label=label) for label, st in styles.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    if len(result.traces) > len(traces):
        ax.text(0.0, -0.9, f"{len(result.traces) - len(traces)} more programs not drawn", fontsize=8)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return str(target)


def pass_rows(result: SimResult, *, max_passes: int = 32) -> list[tuple[str, str]]:
    """Per program: its ranks and the passes it runs in order with their start (``F0.s0@0.0ms B0.s0@41.2ms``; at most
    ``max_passes``, then how many more); empty when no instruction names a pass."""
    rows = []
    for trace in result.traces:
        passes = [e for e in trace.events if e.label]
        if not passes:
            continue
        shown = " ".join(f"{e.label}@{e.start * 1e3:.1f}ms" for e in passes[:max_passes])
        more = f" ... ({len(passes) - max_passes} more)" if len(passes) > max_passes else ""
        rows.append((_rank_label(trace.ranks), shown + more))
    return rows
