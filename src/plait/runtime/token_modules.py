"""Slice-aware stand-ins for the zoo's causal attention and position embedding, swapped into a model in place.

``swap_zoo_modules`` replaces every ``plait.models.gpt.Attention`` (used by the zoo GPTs and the zoo's
``transformer-tiny``) by a ``SlicedAttention`` and every ``plait.models.gpt.Embedding`` by a ``SlicedEmbedding``.
The stand-ins hold the original modules' own submodules (``qkv``, ``proj``; ``tok``, ``pos``), so parameter
names and objects are unchanged and an optimizer built before the swap still holds them. Outside a token cell
they compute exactly what the originals do; inside one (``SliceState.cell``) attention attends to the cached
keys and values of the earlier slices of the same sequence with its causal mask offset by the slice's first
token, and the position embedding starts at that token.

What cannot be sliced is refused with the reason (``check_sliceable``): ``nn.MultiheadAttention`` (no way to
give it the earlier slices' keys and values apart from the queries' own), and any other module whose class
name says it is attention but that plait does not know (it may look at the whole sequence, or derive positions
from it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.errors import PlaitError
from plait.models.gpt import Attention, Embedding, attention_heads
from plait.runtime.token_state import SliceState


class SlicedAttention(nn.Module):
    """``plait.models.gpt.Attention`` that, inside a token cell, attends to the earlier slices' cached keys/values."""

    def __init__(self, original: Attention, state: SliceState, layer: str) -> None:
        super().__init__()
        self.qkv = original.qkv
        self.proj = original.proj
        self.num_heads = original.num_heads
        self.dropout = original.dropout
        self.layer = layer
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of ``x``; inside a cell, over the cached prefix and ``x``."""
        t = x.shape[1]
        q, k, v = attention_heads(self.qkv, self.num_heads, x)
        p = self.dropout if self.training else 0.0
        offset = 0
        if self.state.active is not None:
            k, v, offset = self.state.extend(self.layer, k, v, dim=2)
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            mask = self.state.memo(("causal", t, offset, q.dtype, x.device),
                                   lambda: offset_causal_mask(t, offset, q.dtype, x.device))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


class SlicedEmbedding(nn.Module):
    """``plait.models.gpt.Embedding`` whose positions start at the running cell's first token."""

    def __init__(self, original: Embedding, state: SliceState) -> None:
        super().__init__()
        self.tok = original.tok
        self.pos = original.pos
        self.drop = original.drop
        self.state = state

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token plus position embedding of the tokens ``idx`` (positions offset inside a cell)."""
        cell = self.state.active
        start = 0 if cell is None else cell.start
        if start + idx.shape[1] > self.pos.num_embeddings:
            raise PlaitError(f"tokens {start}..{start + idx.shape[1]} exceed the model's {self.pos.num_embeddings} "
                             f"positions")
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        return self.drop(self.tok(idx) + self.pos(positions))


def offset_causal_mask(length: int, offset: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``(length, offset + length)`` mask: query ``i`` (token ``offset + i``) sees keys ``0 .. offset + i``
    (0 there, -inf elsewhere)."""
    seen = torch.ones(length, offset + length, dtype=torch.bool, device=device).tril(diagonal=offset)
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


def check_sliceable(model: nn.Module) -> None:
    """``PlaitError`` naming a module of ``model`` that token slicing cannot run correctly, and why."""
    for name, module in model.named_modules():
        where = name or "the model"
        if isinstance(module, nn.MultiheadAttention):
            raise PlaitError(f"{where} is an nn.MultiheadAttention, which cannot attend to the cached keys and "
                             f"values of earlier slices; token slicing supports plait's zoo GPT attention "
                             f"(plait.models.gpt.Attention) and Hugging Face GPT-2 / Llama models")
        known = isinstance(module, Attention | SlicedAttention)
        if not known and "attention" in type(module).__name__.lower():
            raise PlaitError(f"{where} ({type(module).__name__}) is an attention plait cannot slice: token slicing "
                             f"needs causal attention that takes cached keys and values (plait.models.gpt.Attention, "
                             f"or a whole Hugging Face GPT-2 / Llama model)")


def swap_zoo_modules(model: nn.Module, state: SliceState) -> tuple[str, ...]:
    """Replace the zoo's attention and embedding modules of ``model`` in place by slice-aware ones sharing their
    parameters; the names of the replaced modules. ``PlaitError`` if there is nothing to slice or it cannot be."""
    check_sliceable(model)
    if any(isinstance(m, SlicedAttention | SlicedEmbedding) for m in model.modules()):
        raise PlaitError("the model is already token-sliced; make one TokenSlicer per model")
    if isinstance(model, Attention | Embedding):
        raise PlaitError("token slicing swaps a model's attention modules: give the model that holds them")
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention):
            _replace(model, name, SlicedAttention(module, state, name))
        elif isinstance(module, Embedding):
            _replace(model, name, SlicedEmbedding(module, state))
        else:
            continue
        swapped.append(name)
    if not any(isinstance(m, SlicedAttention) for m in model.modules()):
        raise PlaitError(f"{type(model).__name__} has no causal attention plait can slice (plait.models.gpt.Attention); "
                         f"token slicing is for causal transformers")
    return tuple(swapped)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
