"""The simulator: execute a Plan's instruction programs against the CostModel."""

from plait.sim.engine import SimResult, SimulationError, instruction_time, simulate
from plait.sim.trace import Event, ProgramTrace

__all__ = ["Event", "ProgramTrace", "SimResult", "SimulationError", "draw_timeline", "instruction_time", "simulate"]


def draw_timeline(result: SimResult, path: str, *, title: str | None = None, max_lanes: int = 8) -> str:
    """Write a per-rank timeline PNG (compute and communication lanes); see ``plait.sim.timeline``."""
    from plait.sim.timeline import draw_timeline as _draw

    return _draw(result, path, title=title, max_lanes=max_lanes)
