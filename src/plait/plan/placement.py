"""Placements of a tensor on one mesh axis, as DTensor names them: ``Shard(dim)``, ``Replicate()``, ``Partial()``.

A plan holds one placement per mesh axis for every parameter and for the activations it pins. In JSON a
placement is its DTensor-style text (``"Shard(0)"``); ``Placement.parse`` also reads the short forms
``S(0)``, ``R`` and ``P``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

PlacementKind = Literal["replicate", "shard", "partial"]
_SHARD = re.compile(r"^(?:Shard|S)\((?:dim=)?(-?\d+)\)$")
_REPLICATE = {"Replicate()", "Replicate", "R"}
_PARTIAL = {"Partial()", "Partial", "Partial(sum)", "P"}


@dataclass(frozen=True, order=True)
class Placement:
    """How a tensor lies on one mesh axis: a shard of dimension ``dim``, a full copy, or a pending sum."""

    kind: PlacementKind
    dim: int | None = None  # the tensor dimension split over the axis (``shard`` only)

    def __post_init__(self) -> None:
        if (self.kind == "shard") != (self.dim is not None):
            raise ValueError(f"a {self.kind} placement {'needs' if self.kind == 'shard' else 'takes no'} dim, got {self.dim}")

    def __str__(self) -> str:
        if self.kind == "shard":
            return f"Shard({self.dim})"
        return "Replicate()" if self.kind == "replicate" else "Partial()"

    def __repr__(self) -> str:
        return str(self)

    @property
    def short(self) -> str:
        """``S(0)``, ``R`` or ``P``: for tables."""
        return f"S({self.dim})" if self.kind == "shard" else self.kind[0].upper()

    @property
    def is_shard(self) -> bool:
        """True for ``Shard(dim)``."""
        return self.kind == "shard"

    @property
    def is_replicate(self) -> bool:
        """True for ``Replicate()``."""
        return self.kind == "replicate"

    @property
    def is_partial(self) -> bool:
        """True for ``Partial()`` (a sum not yet reduced)."""
        return self.kind == "partial"

    @classmethod
    def parse(cls, text: str) -> Placement:
        """Read ``Shard(0)``/``Shard(dim=0)``/``S(0)``, ``Replicate()``/``R`` or ``Partial()``/``P``."""
        text = text.strip().replace(" ", "")
        found = _SHARD.match(text)
        if found:
            return cls("shard", int(found.group(1)))
        if text in _REPLICATE:
            return REPLICATE
        if text in _PARTIAL:
            return PARTIAL
        raise ValueError(f"{text!r} is not a placement; write Shard(DIM), Replicate() or Partial()")

    def to_json(self) -> str:
        """The JSON form: the DTensor-style text."""
        return str(self)

    @classmethod
    def from_json(cls, value: Any) -> Placement:
        """Rebuild from ``to_json`` output."""
        if not isinstance(value, str):
            raise TypeError(f"a placement is a string such as 'Shard(0)', got {type(value).__name__} ({value!r})")
        return cls.parse(value)

    def to_dtensor(self) -> Any:
        """The matching ``torch.distributed.tensor`` placement object."""
        from torch.distributed.tensor import Partial, Replicate, Shard

        if self.kind == "shard":
            assert self.dim is not None
            return Shard(self.dim)
        return Replicate() if self.kind == "replicate" else Partial()

    @classmethod
    def from_dtensor(cls, placement: Any) -> Placement:
        """A plait placement from a DTensor ``Shard``, ``Replicate`` or ``Partial`` (sum) object."""
        if placement.is_shard():
            return shard(int(placement.dim))
        if placement.is_replicate():
            return REPLICATE
        if placement.is_partial():
            return PARTIAL
        raise ValueError(f"plait has no placement for DTensor's {placement!r}")


REPLICATE = Placement("replicate")
PARTIAL = Placement("partial")


def shard(dim: int) -> Placement:
    """``Shard(dim)``."""
    return Placement("shard", dim)


def placements_text(placements: Sequence[Placement], axes: Sequence[str] | None = None) -> str:
    """``[S(0), R]`` or, with axis names, ``dp:S(0) tp:R``."""
    if axes is None:
        return "[" + ", ".join(p.short for p in placements) + "]"
    return " ".join(f"{a}:{p.short}" for a, p in zip(axes, placements, strict=True))


def parse_placements(items: Iterable[str]) -> tuple[Placement, ...]:
    """Placements from their texts, one per mesh axis."""
    return tuple(Placement.parse(t) for t in items)
