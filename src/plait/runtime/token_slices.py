"""Token-sliced execution of a causal transformer (TeraPipe, ICML'21), in one process or as a pipeline stage.

``TokenSlicer(model)`` makes ``model`` slice-aware in place: the zoo GPT's attention and position embedding are
swapped for modules sharing their parameters (``plait.runtime.token_modules``); a Hugging Face GPT-2 or Llama
gets a key/value cache fed through its own past-key-values path (``plait.runtime.token_hf``). Outside a cell the
model computes as before. Inside ``with slicer.cell(cell):`` it runs tokens ``[cell.start, cell.start +
cell.length)`` of micro-batch ``cell.micro``, attending to the cached keys and values of that micro-batch's
earlier slices. ``slicer.backward(cell, outputs, grads)`` runs a cell's backward, adding the gradients later
slices sent into its cached keys and values; cells of a micro-batch go backward in reverse order.

``sliced_step`` is the whole model in one process: every cell forward in order, each scaled by its share of the
batch's tokens, then every cell backward in reverse order. The loss must be a mean over tokens (cross-entropy
or MSE with mean reduction), so that the weighted slice losses add up to the unsliced loss; dropout draws
different masks than the unsliced model (equal only in distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from plait.errors import PlaitError
from plait.runtime.token_modules import swap_zoo_modules
from plait.runtime.token_state import Cell, SliceState, Slicing, token_cells

Loss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def is_hf_model(model: nn.Module) -> bool:
    """True for a Hugging Face ``transformers`` model."""
    return type(model).__module__.startswith("transformers.")


class TokenSlicer:
    """Makes ``model`` run token slices (in place; parameters unchanged) and runs their backward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = SliceState()
        if is_hf_model(model):
            from plait.runtime.token_hf import attach_hf_cache

            self.swapped = attach_hf_cache(model, self.state)
            self.hf = True
        else:
            self.swapped = swap_zoo_modules(model, self.state)
            self.hf = False

    def cell(self, cell: Cell) -> AbstractContextManager[None]:
        """Context in which the model runs ``cell``'s tokens (slices of a micro-batch in order)."""
        return self.state.cell(cell)

    def backward(self, cell: Cell, tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        """Backward of ``cell`` from ``tensors`` (its outputs or loss) with ``grads`` (``None`` for a scalar loss)."""
        self.state.backward(cell.micro, cell.start, tensors, grads)

    def reset(self) -> None:
        """Drop every cached key and value and every pending backward."""
        self.state.reset()


def token_share(cell: Cell, batch_size: int, seq_len: int) -> float:
    """The cell's share of the batch's tokens: the weight of its mean-over-tokens loss."""
    return cell.rows * cell.length / (batch_size * seq_len)


class Returns(nn.Module):
    """Stands in for the model inside the user's loss: returns a given output (a stage's, or a cell's)."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The output it was given."""
        return self.output


def sliced_step(slicer: TokenSlicer, loss: Loss, batch: Sequence[torch.Tensor], slicing: Slicing) -> torch.Tensor:
    """Forward and backward of the whole model on ``batch`` (``(inputs, targets)``, both ``(batch, sequence,
    ...)``) cut by ``slicing`` (``[(micro-batch size, [slice lengths])]``); gradients accumulate into the
    parameters as ``loss(model, batch).backward()`` would; returns the batch's loss (detached)."""
    inputs, targets = batch[0], batch[1]
    if inputs.dim() < 2 or targets.shape[:2] != inputs.shape[:2]:
        raise PlaitError("token slicing needs (inputs, targets) of shape (batch, sequence, ...) with one sequence length")
    size, seq_len = inputs.shape[0], inputs.shape[1]
    cells = token_cells(slicing, size, seq_len)
    losses: list[torch.Tensor] = []
    for cell in cells:
        with slicer.cell(cell):
            cell_loss = loss(slicer.model, (cell.take(inputs), cell.take(targets)))
        losses.append(cell_loss * token_share(cell, size, seq_len))
    total = torch.stack([x.detach() for x in losses]).sum()
    for k in reversed(range(len(cells))):
        slicer.backward(cells[k], [losses[k]], [None])
        losses[k] = total  # drop the cell's graph
    return total
