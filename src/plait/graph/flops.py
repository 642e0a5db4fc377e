"""FLOPs of one aten op: FlopCounterMode's registered formulas plus the CPU flash-attention kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter

aten = torch.ops.aten

FlopFormula = Callable[..., int]


def _cpu_flash_fwd(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return int(flop_counter.sdpa_flop(query, key, value, out_val=None))


def _cpu_flash_bwd(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any
) -> int:
    return int(flop_counter.sdpa_backward_flop(grad_out, query, key, value, out_val=None))


# Torch's registry covers the CUDA attention kernels; fake CPU tensors dispatch to the CPU flash kernel,
# which has no formula there and no decomposition, so without these entries attention would count 0.
FLOP_FORMULAS: dict[Any, FlopFormula] = {
    **flop_counter.flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
}


def has_formula(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` has a FLOP formula (otherwise it counts 0 or is decomposed first)."""
    return func.overloadpacket in FLOP_FORMULAS


def op_flops(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one call of ``func`` (0 for ops without a formula: elementwise ops count no FLOPs)."""
    formula = FLOP_FORMULAS.get(func.overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))
