"""Memory per device of a plan: parameters, gradients, optimizer state, activations, buffers.

It follows what plait's runtime does, reading the plan's placements and precision:

* **State** (held for the whole step): each rank holds its shard of every parameter (the largest shard
  when a split is uneven, as FSDP2 pads dim 0), a gradient of the same shape, and the optimizer's states
  in the parameters' dtype (AdamW: two moments and one 4-byte step counter per tensor). Replicated
  gradients live as views of the flat bucket buffers (no second copy).
* **Activations**: what each layer saves for backward on this rank (``LayerWork``); a recomputed layer
  keeps only its input.
* **Buffers**: module buffers and the input batch (``batch_bytes``) plus the largest of the step's moments (minus the state and activations
  already counted): the end of forward (activations, the largest layer output and the gradient flowing
  back into it); early backward (replicated: the largest fresh gradient before it is added into its
  bucket view; sharded: ``FSDP_UNITS_LIVE_BACKWARD`` gathered units plus the all-gather input shard);
  the optimizer step (its temporaries).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from plait.cost.work import LayerWork
from plait.errors import PlaitError
from plait.graph.model_graph import DTYPE_BYTES
from plait.plan.ir import MemoryEstimate, Plan
from plait.plan.layout import local_numel, shard_axis_of

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


def step_temporaries(optimizer: str, largest: int, total: int, *, foreach: bool) -> int:
    """Bytes the optimizer step allocates for a moment (``largest`` / ``total``: per-device parameter bytes)."""
    if OPTIMIZER_STATES[optimizer] < 2:
        return 0
    return total if foreach else ADAMW_TEMPORARIES * largest


def param_shard_bytes(plan: Plan) -> list[int]:
    """Bytes of this rank's shard of every parameter, stored in the plan's parameter dtype."""
    shapes = {p.name: p.shape for p in plan.model.params}
    width = DTYPE_BYTES.get(plan.precision.param_dtype, 4)
    return [local_numel(shapes[p.name], p.placements, plan.mesh_of(p)) * width for p in plan.params]


def state_bytes(plan: Plan) -> tuple[int, int, int]:
    """Parameters, gradients and optimizer state one rank holds between steps."""
    check_optimizer(plan.optimizer)
    shards = param_shard_bytes(plan)
    params = sum(shards)
    optimizer = OPTIMIZER_STATES[plan.optimizer] * params + STEP_COUNTER_BYTES.get(plan.optimizer, 0) * len(shards)
    return params, params, optimizer


def batch_bytes(plan: Plan) -> int:
    """The input batch a rank holds during a step, at 8 bytes per element (token ids are int64).

    plait's Trainer gets the global batch of a step from the data source on every rank and moves each
    micro-batch to the device: on a CPU rank the whole global batch is in the same memory, on a GPU one
    micro-batch at a time.
    """
    rows = plan.batch.global_size if plan.cluster.device.kind == "cpu" else plan.batch.micro_size
    per_row = sum(prod(shape[1:]) for shape in plan.model.input_shapes)
    return 8 * rows * per_row


def activation_bytes(work: Sequence[LayerWork]) -> int:
    """What the forward of one micro-batch keeps for backward on one rank."""
    return sum(w.input_bytes if w.recompute else w.activation_bytes for w in work)


def memory_estimate(plan: Plan, work: Sequence[LayerWork]) -> MemoryEstimate:
    """Bytes one device holds at its peak during a step (see the module docstring)."""
    params, grads, opt_state = state_bytes(plan)
    activations = activation_bytes(work)
    boundary = 2 * max((w.output_bytes for w in work), default=0)
    shards = param_shard_bytes(plan)
    foreach = plan.cluster.device.kind == "cuda"
    step = step_temporaries(plan.optimizer, max(shards, default=0), sum(shards), foreach=foreach)
    largest_recomputed = max((w.activation_bytes for w in work if w.recompute), default=0)
    dynamic = activations + largest_recomputed
    shard_axis = shard_axis_of(plan)
    if shard_axis is None:
        fresh = max((w.grad_bytes for w in work), default=0)
        moment = max(dynamic + fresh + boundary, step)
        extra = 0
    else:
        unit = max((w.unit_bytes for w in work), default=0)
        n = plan.mesh.axis_size(shard_axis)
        backward = dynamic + FSDP_UNITS_LIVE_BACKWARD * unit + -(-unit // n)
        # sharded plans free their gradients before forward (zero_grad(set_to_none=True))
        moment = max(dynamic + boundary, backward, params + step)
        extra = params
    return MemoryEstimate(
        params=params, grads=grads, optimizer=opt_state, activations=activations,
        buffers=plan.model.buffer_bytes + batch_bytes(plan) + max(0, moment - activations - extra),
    )
