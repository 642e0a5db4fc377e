"""Run a pipeline from plait's own per-rank pass lists (the plan's programs) with torch's list-driven pipeline
runtime, for schedules torch has no class for in the plan's form (plait's zero-bubble lists: ``F``, ``I`` and
``W`` passes). torch inserts the sends and receives between the passes.

``torch.distributed.pipelining`` runs a schedule given as per-rank lists of compute actions through
``_PipelineScheduleRuntime`` (its own zero-bubble schedules are built this way). That class and its action
type are private in torch 2.13 (plait pins torch below 2.14), so this module is the one place that names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules

from plait.errors import PlaitError

Pass = tuple[str, int, int]  # (F | B | I | W, micro-batch, virtual stage)
_TYPES = {"F": "FORWARD", "B": "FULL_BACKWARD", "I": "BACKWARD_INPUT", "W": "BACKWARD_WEIGHT"}


def list_runner(stages: Sequence[PipelineStage], num_micro: int, loss_fn: Callable[..., Any],
                passes: Sequence[Sequence[Pass]]) -> Any:
    """A runner whose ``step`` executes ``passes[r]`` on pipeline rank ``r`` in order (every rank gives every
    rank's list: torch places the transfers from the whole pipeline's order)."""
    runtime = torch_schedules._PipelineScheduleRuntime(list(stages), num_micro, loss_fn=loss_fn)
    types = torch_schedules._ComputationType
    order: dict[int, list[Any]] = {}
    for rank, row in enumerate(passes):
        for kind, _, _ in row:
            if kind not in _TYPES:
                raise PlaitError(f"pass kind {kind!r} is not one plait's pipeline runtime runs ({', '.join(_TYPES)})")
        order[rank] = [torch_schedules._Action(stage, types[_TYPES[kind]], micro) for kind, micro, stage in row]
    runtime._prepare_schedule_with_comms(order)
    return runtime
