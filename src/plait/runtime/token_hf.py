"""Token slicing of a Hugging Face GPT-2 or Llama through the model's own past-key-values path.

A Hugging Face causal LM already runs a slice after cached tokens: given a ``Cache`` it takes positions (GPT-2's
learned positions, Llama's rotary angles) from the cached length and builds the causal mask offset by it. plait
passes, inside a token cell, a ``DynamicCache`` whose ``update`` hands the layer's keys and values to the slice
state (``SliceState.extend``: earlier slices as leaves that collect gradients, this slice's own tensors in its
graph) and keeps detached copies only so that the cache reports its length to the model. The model's base
(``model.base_model``) gets the cache through a forward pre-hook, so the user's loss calls the model as usual.

Only GPT-2 and Llama are enabled (both tested against the unsliced model); other architectures are refused,
and so is gradient checkpointing (Hugging Face turns the cache off under it). These models run token-sliced in
one process (``TokenSlicer``, ``sliced_step``); the token pipeline refuses them, since plait's pipeline stages
chain the layer view's modules and a Hugging Face model's blocks take masks and positions from its base model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from plait.errors import PlaitError
from plait.runtime.token_state import SliceState

SUPPORTED = ("gpt2", "llama")  # config.model_type values whose past-key-values path is tested


def attach_hf_cache(model: nn.Module, state: SliceState) -> tuple[str, ...]:
    """Feed ``model``'s attention a slice cache inside token cells; the name of the module given the cache."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise PlaitError(f"token slicing of Hugging Face models supports {', '.join(SUPPORTED)}; {type(model).__name__} "
                         f"(model_type {kind!r}) is not enabled: its cache (sliding windows, recurrent state, "
                         f"cross-attention) is untested here")
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(model, flag, False):
        raise PlaitError("Hugging Face models turn their key/value cache off under gradient checkpointing; token "
                         "slicing needs it: call model.gradient_checkpointing_disable()")
    base = getattr(model, "base_model", model)
    params = inspect.signature(base.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    if name not in params:
        raise PlaitError(f"{type(base).__name__}.forward takes no key/value cache; token slicing cannot feed it")
    caches: dict[int, Any] = {}
    cache_class = _sliced_cache_class()

    def give_cache(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        cell = state.active
        if cell is None:
            return args, kwargs
        if cell.start == 0 or cell.micro not in caches:
            caches[cell.micro] = cache_class(state, config)
        cache = caches[cell.micro]
        if cache.get_seq_length() != cell.start:
            raise PlaitError(f"the Hugging Face cache of micro-batch {cell.micro} holds {cache.get_seq_length()} "
                             f"tokens, the slice starts at {cell.start}; run the slices of a sequence in order")
        kwargs = {**kwargs, name: cache, "use_cache": True}
        return args, kwargs

    base.register_forward_pre_hook(give_cache, with_kwargs=True)
    return (_module_name(model, base),)


def _sliced_cache_class() -> type:
    """A ``DynamicCache`` whose ``update`` returns the slice state's keys and values (made on first use, so that
    importing plait does not import transformers)."""
    from transformers import DynamicCache

    class SlicedCache(DynamicCache):
        """Keys and values of the earlier slices from the slice state; detached copies for the cached length."""

        def __init__(self, state: SliceState, config: Any) -> None:
            super().__init__(config=config)
            self.slice_state = state

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            """Record this slice's keys and values; the whole prefix's for the attention."""
            super().update(key_states.detach(), value_states.detach(), layer_idx, *args, **kwargs)
            keys, values, _ = self.slice_state.extend(f"hf.{layer_idx}", key_states, value_states, dim=-2)
            return keys, values

    return SlicedCache


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return ""
