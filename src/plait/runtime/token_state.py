"""The bookkeeping of token-sliced execution (TeraPipe, ICML'21): cells, cached keys and values, slice backward.

A sequence of ``L`` tokens is cut into slices ``[c, c + l)``; a batch into micro-batches. A cell is one slice of
one micro-batch. Every attention layer keeps, per micro-batch, the keys and values of the slices already run
(``SliceState.extend``): the cache holds them as detached leaves that require grad, the way a pipeline boundary
holds a received activation, so a later slice's backward accumulates its gradient into the leaves' ``.grad``.
``SliceState.backward`` runs a cell's backward with those accumulated gradients as extra gradients of the
cell's own keys and values, so every graph is backpropagated exactly once. Slices of a micro-batch run forward
in order and backward in reverse order; anything else is a ``PlaitError``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from plait.errors import PlaitError

Slicing = Sequence[tuple[int, Sequence[int]]]  # (micro-batch size, slice lengths in tokens), in pipeline order


@dataclass(frozen=True)
class Cell:
    """One slice of one micro-batch: rows ``[row, row + rows)`` of the batch, tokens ``[start, start + length)``."""

    micro: int
    row: int
    rows: int
    start: int
    length: int

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This cell's part of a ``(batch, sequence, ...)`` tensor."""
        return tensor[self.row:self.row + self.rows, self.start:self.start + self.length]


def token_cells(slicing: Slicing, batch_size: int, seq_len: int) -> list[Cell]:
    """The cells of ``slicing`` in pipeline order (micro-batch by micro-batch, slices in order); ``PlaitError`` if
    the micro-batches do not cover the batch or a micro-batch's slices do not cover the sequence."""
    if not slicing:
        raise PlaitError("a token slicing needs at least one micro-batch: give [(micro-batch size, [slice lengths])]")
    cells: list[Cell] = []
    row = 0
    for micro, (rows, lengths) in enumerate(slicing):
        lengths = [int(n) for n in lengths]
        if rows < 1:
            raise PlaitError(f"micro-batch {micro} has {rows} sequences; every micro-batch needs at least one")
        if not lengths or min(lengths) < 1:
            raise PlaitError(f"micro-batch {micro} has an empty token slice ({lengths}); every slice needs a token")
        if sum(lengths) != seq_len:
            raise PlaitError(f"the slices of micro-batch {micro} ({lengths}) sum to {sum(lengths)} tokens, "
                             f"the sequence has {seq_len}; slices must cover it exactly")
        start = 0
        for length in lengths:
            cells.append(Cell(micro=micro, row=row, rows=rows, start=start, length=length))
            start += length
        row += rows
    if row != batch_size:
        raise PlaitError(f"the micro-batches hold {row} sequences, the batch has {batch_size}; their sizes must sum "
                         f"to the batch")
    return cells


@dataclass
class _Entry:
    """The keys and values one cell made at one attention layer: as computed (in the cell's graph) and as cached."""

    layer: str
    keys: torch.Tensor
    values: torch.Tensor
    cached_keys: torch.Tensor  # detached leaves; later slices' backward accumulate into their .grad
    cached_values: torch.Tensor


@dataclass
class _Micro:
    """One micro-batch's state: the next token it expects, its cells awaiting backward, its caches per layer."""

    next_start: int = 0
    pending: list[tuple[int, list[_Entry]]] = field(default_factory=list)  # (start, entries) in forward order
    cache: dict[str, list[_Entry]] = field(default_factory=dict)


class SliceState:
    """Which cell runs now, and every micro-batch's cached keys and values (shared by the sliced modules)."""

    def __init__(self) -> None:
        self.active: Cell | None = None
        self.micros: dict[int, _Micro] = {}
        self._entries: list[_Entry] = []  # what the running cell has cached so far
        self._memo: dict[Hashable, Any] = {}  # values the running cell's layers share (its attention mask)

    @contextmanager
    def cell(self, cell: Cell) -> Iterator[None]:
        """Run the sliced modules on ``cell`` inside the block (slices of a micro-batch in order)."""
        if self.active is not None:
            raise PlaitError("a token cell is already running; cells do not nest")
        micro = self.micros.setdefault(cell.micro, _Micro())
        if cell.start == 0 and micro.next_start:
            if micro.pending:
                raise PlaitError(f"micro-batch {cell.micro} still has slices awaiting backward; run their backward "
                                 f"(or reset()) before starting the sequence again")
            micro.cache.clear()  # a forward-only pass before: start afresh
            micro.next_start = 0
        if cell.start != micro.next_start:
            raise PlaitError(f"slices of micro-batch {cell.micro} run in order: expected the slice starting at token "
                             f"{micro.next_start}, got {cell.start}")
        entries: list[_Entry] = []
        self.active = cell
        self._entries = entries
        try:
            yield
        finally:
            self.active = None
            self._memo.clear()
        micro.next_start = cell.start + cell.length
        if torch.is_grad_enabled():
            micro.pending.append((cell.start, entries))

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` once per running cell and ``key`` (e.g. the attention mask every layer of the cell uses)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def extend(self, layer: str, keys: torch.Tensor, values: torch.Tensor, dim: int = -2
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Cache this cell's ``keys`` and ``values`` at ``layer``; the keys and values of the whole prefix (earlier
        slices' cached leaves, then this cell's own tensors) and the offset of this cell's first token."""
        cell = self.active
        if cell is None:
            raise PlaitError("SliceState.extend called outside a token cell")
        cache = self.micros[cell.micro].cache.setdefault(layer, [])
        offset = sum(e.cached_keys.shape[dim] for e in cache)
        if offset != cell.start:
            raise PlaitError(f"layer {layer!r} holds {offset} cached tokens of micro-batch {cell.micro}, the slice "
                             f"starts at {cell.start}; every slice of a sequence must run through every layer")
        grad = torch.is_grad_enabled()
        entry = _Entry(layer=layer, keys=keys, values=values, cached_keys=_leaf(keys, grad),
                       cached_values=_leaf(values, grad))
        full_keys = torch.cat([*(e.cached_keys for e in cache), keys], dim) if cache else keys
        full_values = torch.cat([*(e.cached_values for e in cache), values], dim) if cache else values
        cache.append(entry)
        self._entries.append(entry)
        return full_keys, full_values, offset

    def backward(self, micro: int, start: int, tensors: Sequence[torch.Tensor],
                 grads: Sequence[torch.Tensor | None]) -> None:
        """Backward of the cell of ``micro`` starting at ``start`` (the last one of its micro-batch not yet run
        backward): ``tensors`` with ``grads``, plus the gradients later slices sent into its cached keys/values."""
        state = self.micros.get(micro)
        if state is None or not state.pending or state.pending[-1][0] != start:
            expected = state.pending[-1][0] if state is not None and state.pending else None
            raise PlaitError(f"backward runs the slices of micro-batch {micro} in reverse order: expected the slice "
                             f"starting at token {expected}, got {start}")
        _, entries = state.pending.pop()
        outs, outs_grads = list(tensors), list(grads)
        for e in entries:
            for made, cached in ((e.keys, e.cached_keys), (e.values, e.cached_values)):
                if cached.grad is not None and made.requires_grad:
                    outs.append(made)
                    outs_grads.append(cached.grad)
        live = [(t, g) for t, g in zip(outs, outs_grads, strict=True) if t.requires_grad]
        if live:
            torch.autograd.backward([t for t, _ in live], [g for _, g in live])
        for e in reversed(entries):
            cache = state.cache[e.layer]
            if not cache or cache[-1] is not e:
                raise PlaitError(f"the cache of layer {e.layer!r} changed under a pending backward")
            cache.pop()
        state.next_start = start

    def reset(self) -> None:
        """Forget every micro-batch's cache and pending backward (e.g. after an interrupted step)."""
        if self.active is not None:
            raise PlaitError("cannot reset token slicing while a cell runs")
        self.micros.clear()


def _leaf(tensor: torch.Tensor, grad: bool) -> torch.Tensor:
    """A detached copy-free leaf of ``tensor`` that requires grad when ``grad`` and the tensor does."""
    return tensor.detach().requires_grad_(grad and tensor.requires_grad)
