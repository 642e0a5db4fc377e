"""What the simulator records: executed instructions and per-program timelines."""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.ir import Stream


@dataclass(frozen=True, kw_only=True)
class Event:
    """One executed instruction of a program."""

    index: int  # position in the program
    name: str
    op: str
    stream: Stream
    phase: str
    start: float
    end: float
    alloc_bytes: int = 0
    free_bytes: int = 0
    axes: tuple[str, ...] = ()  # mesh axes a collective spans
    label: str = ""  # the pipeline pass it runs (``F3``, ``B3.s1`` for slice 1 of micro-batch 3), else empty

    @property
    def duration(self) -> float:
        """Seconds the instruction ran."""
        return self.end - self.start


@dataclass(frozen=True, kw_only=True)
class ProgramTrace:
    """The timeline of one program (shared by its ranks) and its memory trace."""

    ranks: tuple[int, ...]
    events: tuple[Event, ...]
    memory: tuple[tuple[float, int], ...]  # (time, live dynamic bytes) after each change
    peak_dynamic_bytes: int
