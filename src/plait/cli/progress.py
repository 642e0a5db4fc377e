"""Progress output for long commands: a spinner on stderr naming what is being worked on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console


@contextmanager
def planning_progress(enabled: bool = True) -> Iterator[Callable[[str], None] | None]:
    """A callback that shows its latest message next to a spinner on stderr (None when disabled)."""
    if not enabled:
        yield None
        return
    console = Console(stderr=True)
    with console.status("planning ...") as status:
        yield lambda message: status.update(f"planning: {message}")
