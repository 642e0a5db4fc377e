"""Sharding rules DTensor lacks on the CPU, registered once with ``register_sharding``.

torch 2.13 has DTensor strategies for the CUDA attention kernels but none for the CPU flash-attention
kernel that ``F.scaled_dot_product_attention`` picks on the CPU, so a tensor-parallel attention fails
there with ``NotImplementedError: ... does not have a sharding strategy registered``. ``ensure_rules()``
adds them; it needs no process group and is safe to call from planners and the runtime alike.

The attention rules accept, on each mesh axis: everything replicated; batch (dim 0) sharded; or heads
(dim 1) sharded, with an attention mask split alike or replicated where it broadcasts over that dim.
Grouped-query attention (fewer key/value heads than query heads) is covered by the head split because
query head ``i`` reads key/value head ``i // group``: a contiguous split of both head dims keeps every
query head on the rank of its key/value head whenever the number of key/value heads divides evenly
over the axis.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

aten = torch.ops.aten
CPU_FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default
CPU_FLASH_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_lock = threading.Lock()
_registered = False

Rule = tuple[list[Any], list[Any]]  # (output placements, input placements) on one mesh axis


def ensure_rules() -> None:
    """Register plait's extra DTensor sharding rules (idempotent, thread-safe)."""
    global _registered
    with _lock:
        if _registered:
            return
        from torch.distributed.tensor.experimental import register_sharding

        register_sharding(CPU_FLASH)(_cpu_flash_rules)
        register_sharding(CPU_FLASH_BACKWARD)(_cpu_flash_backward_rules)
        _registered = True


def _mask_placement(mask: Any, dim: int | None) -> Any:
    """The placement a mask needs when ``dim`` of q/k/v is split (None: none is): alike unless broadcast."""
    from torch.distributed.tensor import Replicate, Shard

    at = (
        None if dim is None else dim + len(mask.shape) - 4
    )  # the mask broadcasts against (batch, heads, query, key)
    return Shard(at) if at is not None and at >= 0 and mask.shape[at] > 1 else Replicate()


def _rules(num_outputs: int, num_inputs: int, mask: Any) -> list[Rule]:
    """Replicate all; shard dim 0 (batch) of everything; shard dim 1 (heads) of everything.

    DTensor does not redistribute keyword arguments, so a rule that would move the mask is left out: the
    mask must already have, on every mesh axis, the placement the rule gives it (a replicated mask that
    broadcasts over the split dim qualifies).
    """
    from torch.distributed.tensor import Replicate, Shard

    rules: list[Rule] = []
    for dim in (None, 0, 1):
        split = Replicate() if dim is None else Shard(dim)
        masks = []
        if mask is not None:
            needed = _mask_placement(mask, dim)
            if any(p != needed for p in mask.placements):
                continue
            masks = [needed]
        rules.append(([split] * num_outputs, [split] * num_inputs + masks))
    return rules


def _cpu_flash_rules(
    query: Any,
    key: Any,
    value: Any,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    attn_mask: Any = None,
    scale: float | None = None,
) -> Sequence[Rule]:
    """(output, logsumexp) from (query, key, value[, attn_mask]); logsumexp is (batch, heads, query)."""
    return _rules(2, 3, attn_mask)


def _cpu_flash_backward_rules(
    grad_out: Any,
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    logsumexp: Any,
    dropout_p: float,
    is_causal: bool,
    *,
    attn_mask: Any = None,
    scale: float | None = None,
) -> Sequence[Rule]:
    """(grad_query, grad_key, grad_value) from (grad_out, query, key, value, out, logsumexp[, attn_mask])."""
    return _rules(3, 6, attn_mask)
