"""Byte accounting: what one rank hands to the network and takes from it, per training step.

Every synchronizer moves its tensors with point-to-point messages (``isend``/``irecv``), so what it counts is
exactly the payload of the messages it posts: no estimate, no model of a library's algorithm. Bytes a rank
delivers to itself (a worker's push to its own co-located server shard) never reach the network and are not
counted. Counts are attributed to the step (clock) a message belongs to, also when a background thread sends
it, so a step's numbers are exact once that step's messages are done.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping


class ByteCounter:
    """Bytes one rank sent and received, per step; safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[int, list[int]] = {}

    def add(self, step: int, *, sent: int = 0, recv: int = 0) -> None:
        """Count ``sent`` and ``recv`` payload bytes for ``step``."""
        with self._lock:
            tally = self._steps.setdefault(step, [0, 0])
            tally[0] += sent
            tally[1] += recv

    def step(self, step: int) -> dict[str, int]:
        """``{"sent_bytes", "recv_bytes"}`` of one step (zeros for a step without traffic)."""
        with self._lock:
            sent, recv = self._steps.get(step, (0, 0))
        return {"sent_bytes": sent, "recv_bytes": recv}

    def total(self) -> dict[str, int]:
        """``{"sent_bytes", "recv_bytes"}`` over every step so far."""
        with self._lock:
            tallies = list(self._steps.values())
        return {"sent_bytes": sum(t[0] for t in tallies), "recv_bytes": sum(t[1] for t in tallies)}

    @property
    def steps(self) -> list[int]:
        """The steps with traffic, in order."""
        with self._lock:
            return sorted(self._steps)


def merge_counts(named: Mapping[str, dict[str, int]]) -> dict[str, int]:
    """Flat metrics keys ``sync.<name>.sent_bytes`` ... plus the sums ``sync.sent_bytes`` / ``sync.recv_bytes``."""
    out: dict[str, int] = {"sync.sent_bytes": 0, "sync.recv_bytes": 0}
    for name, counts in named.items():
        for key, value in counts.items():
            out[f"sync.{name}.{key}"] = value
            out[f"sync.{key}"] += value
    return out
