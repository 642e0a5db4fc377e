"""Activation recomputation: a layer's forward runs again in backward instead of keeping its activations."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.runtime.tensor_parallel_pins import recompute_context


def _contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    # forward runs as it is; the recomputation in backward re-enters the tensor-parallel root's context
    return nullcontext(), recompute_context()


def _recomputed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)

    return run


def apply_recompute(model: nn.Module, layers: Sequence[str]) -> None:
    """Make each named submodule's forward recompute in backward (non-reentrant activation checkpointing).

    The module keeps its name and parameters (its ``forward`` is replaced on the instance), so plans,
    buckets, FSDP2 units and checkpoints see the same parameter names.
    """
    for name in layers:
        module = model.get_submodule(name)
        module.forward = _recomputed(module.forward)
