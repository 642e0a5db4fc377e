"""Memory per device of a data-parallel plan: parameters, gradients, optimizer state, activations, buffers.

It follows what plait's runtime does. Replicated: every rank holds all parameters; gradients live as
views of the flat bucket buffers (no second copy); AdamW keeps two moments per element in the
parameter's dtype (fp32 for fp32 models) and one 4-byte step counter per tensor. FSDP2 (``fully_shard``
per layer, reshard after forward): every rank holds a dim-0 shard of each parameter (padded up to a
multiple of the shard degree), of its gradient and of the optimizer state, and gathers one unit at a
time. Hybrid shards inside a replica group and replicates across groups: per device it is FSDP2 with
the shard degree of the shard axis.
"""

from __future__ import annotations

from collections.abc import Sequence

from plait.errors import PlaitError
from plait.graph.model_graph import DTYPE_BYTES, ModelGraph, ParamInfo
from plait.plan.ir import DataParallelKind, MemoryEstimate

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "sgd_nomomentum": 0}
STEP_COUNTER_BYTES = {"adamw": 4, "adam": 4}  # a 0-dim fp32 ``step`` tensor per parameter
# FSDP2 inside the first units' backward holds: the unit's unsharded parameters, the next unit's
# all-gather output and its unsharded parameters (both alive during the prefetch's copy-out), the unit's
# unsharded gradients and their copy in the reduce-scatter input buffer.
FSDP_UNITS_LIVE_BACKWARD = 5
# The single-tensor (CPU) AdamW step makes two temporaries of the parameter it updates; the foreach
# (CUDA) step one temporary of all parameters at once.
ADAMW_TEMPORARIES = 2


def check_optimizer(optimizer: str) -> None:
    """Raise a PlaitError naming the known optimizers when ``optimizer`` is not one of them."""
    if optimizer not in OPTIMIZER_STATES:
        raise PlaitError(f"unknown optimizer {optimizer!r}; plait knows {', '.join(OPTIMIZER_STATES)}")


def sharded_bytes(param: ParamInfo, shard_degree: int) -> int:
    """Bytes of one rank's dim-0 shard (FSDP2 pads dim 0 up to a multiple of the shard degree)."""
    if shard_degree <= 1 or not param.shape:
        return param.nbytes
    rows = -(-param.shape[0] // shard_degree)
    inner = param.numel // param.shape[0] if param.shape[0] else 0
    return rows * inner * DTYPE_BYTES.get(param.dtype, 4)


def optimizer_bytes(graph: ModelGraph, param_bytes: int, optimizer: str) -> int:
    """Optimizer state for ``param_bytes`` of parameters (states in the parameter dtype) plus step counters."""
    return OPTIMIZER_STATES[optimizer] * param_bytes + STEP_COUNTER_BYTES.get(optimizer, 0) * len(graph.params)


def boundary_bytes(graph: ModelGraph, micro_batch: int) -> int:
    """The largest layer output and the gradient flowing back into it, at ``micro_batch``."""
    largest_output = max((layer.output_bytes for layer in graph.layers), default=0)
    return 2 * int(largest_output * micro_batch / graph.batch_size)


def step_temporaries(optimizer: str, largest: int, total: int, *, foreach: bool) -> int:
    """Bytes the optimizer step allocates for a moment (``largest`` / ``total``: per-device parameter bytes)."""
    if OPTIMIZER_STATES[optimizer] < 2:
        return 0
    return total if foreach else ADAMW_TEMPORARIES * largest


def memory_estimate(
    graph: ModelGraph,
    *,
    kind: DataParallelKind,
    shard_degree: int,
    micro_batch: int,
    optimizer: str = "adamw",
    unit_bytes: Sequence[int] | None = None,
    device_kind: str = "cpu",
) -> MemoryEstimate:
    """Bytes one device holds at its peak during a step (see the module docstring).

    ``params``, ``grads`` and ``optimizer`` are the state between steps; ``activations`` the captured
    saved-for-backward bytes scaled to ``micro_batch``. ``buffers`` is what else lives at the peak, the
    largest of three moments (minus the state and activations counted already):

    * end of forward: the activations and the largest layer output with the gradient flowing back into
      it (sharded plans free their gradients before forward: ``zero_grad(set_to_none=True)``);
    * early backward: replicated, the largest parameter's fresh gradient before it is added into its
      bucket view; sharded, ``FSDP_UNITS_LIVE_BACKWARD`` units (``unit_bytes``, default one per layer)
      plus the all-gather input shard, while the activations are still alive;
    * the optimizer step: its temporaries (``device_kind="cuda"`` selects the foreach AdamW).

    The bucket size does not change the replicated total: the buckets are the gradients.
    """
    check_optimizer(optimizer)
    activations = int(graph.activation_bytes * micro_batch / graph.batch_size)
    boundary = boundary_bytes(graph, micro_batch)
    foreach = device_kind == "cuda"
    if kind == "replicate":
        params = graph.param_bytes
        largest = max((p.nbytes for p in graph.params), default=0)
        step = step_temporaries(optimizer, largest, params, foreach=foreach)
        return MemoryEstimate(
            params=params,
            grads=params,
            optimizer=optimizer_bytes(graph, params, optimizer),
            activations=activations,
            buffers=graph.buffer_bytes + max(largest + boundary, step - activations),
        )
    n = max(1, shard_degree)
    shard = sum(sharded_bytes(p, n) for p in graph.params)
    units = list(unit_bytes) if unit_bytes is not None else [layer.param_bytes for layer in graph.layers]
    unit = max(units, default=0)
    largest_shard = max((sharded_bytes(p, n) for p in graph.params), default=0)
    forward_end = activations + boundary
    backward = activations + FSDP_UNITS_LIVE_BACKWARD * unit + -(-unit // n)
    step = shard + step_temporaries(optimizer, largest_shard, shard, foreach=foreach)
    return MemoryEstimate(
        params=shard,
        grads=shard,
        optimizer=optimizer_bytes(graph, shard, optimizer),
        activations=activations,
        buffers=graph.buffer_bytes + max(0, max(forward_end, backward, step) - activations - shard),
    )
