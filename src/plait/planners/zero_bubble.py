"""A zero-bubble pipeline schedule (ZB-H1 of "Zero Bubble Pipeline Parallelism", ICLR'24): the backward of
each micro-batch is split into the gradient of its input (``I``, which the previous stage waits for) and the
gradient of its weights (``W``, which nobody waits for), and the ``W`` passes fill the time a stage would
otherwise wait.

The lists come from a list scheduler over unit pass times (``F = I = W``, the paper's assumption): whenever a
stage is free it runs, by priority, an ``I`` whose output gradient has arrived, else an ``F`` whose input has
arrived while it holds fewer than ``p - i`` micro-batches (1F1B's memory: a micro-batch is held from its
``F`` until its ``W``), else a pending ``W``. Any order the scheduler makes respects the pipeline's
dependencies, so the simulator and the runtime can run the lists whatever the real pass times are.
"""

from __future__ import annotations

import heapq

from plait.planners.schedules import Action, Schedule, check_schedule_size


def zero_bubble(num_stages: int, num_micro: int) -> Schedule:
    """Per stage, the ``F``/``I``/``W`` order of the zero-bubble schedule (see the module docstring)."""
    check_schedule_size(num_stages, num_micro)
    p, m = num_stages, num_micro
    done: dict[tuple[str, int, int], float] = {}  # (kind, micro, stage) -> end time
    acts: list[list[Action]] = [[] for _ in range(p)]
    next_f = [0] * p
    next_i = [0] * p
    pending_w: list[list[int]] = [[] for _ in range(p)]
    clock = [0.0] * p
    events = [(0.0, s) for s in range(p)]
    heapq.heapify(events)
    while events:
        now, s = heapq.heappop(events)
        if now < clock[s] or len(acts[s]) == 3 * m:
            continue
        action = _pick(s, p, m, now, done, next_f, next_i, pending_w)
        if action is None:
            later = [t for t in done.values() if t > now]
            if later:
                heapq.heappush(events, (min(later), s))
            continue
        end = now + 1.0
        done[(action.kind, action.micro, s)] = end
        clock[s] = end
        acts[s].append(action)
        heapq.heappush(events, (end, s))
        for other in (s - 1, s + 1):  # a neighbour may be waiting for this pass
            if 0 <= other < p and clock[other] <= end:
                heapq.heappush(events, (end, other))
    return tuple(tuple(a) for a in acts)


def _pick(s: int, p: int, m: int, now: float, done: dict[tuple[str, int, int], float], next_f: list[int],
          next_i: list[int], pending_w: list[list[int]]) -> Action | None:
    """The pass stage ``s`` runs at ``now``, by priority I, F, W; None when none is ready."""
    i = next_i[s]
    if i < next_f[s] and (s == p - 1 or done.get(("I", i, s + 1), float("inf")) <= now):
        next_i[s] += 1
        pending_w[s].append(i)
        return Action("I", i)
    f = next_f[s]
    held = f - (next_i[s] - len(pending_w[s]))  # forwards whose W has not run
    if f < m and held < p - s and (s == 0 or done.get(("F", f, s - 1), float("inf")) <= now):
        next_f[s] += 1
        return Action("F", f)
    if pending_w[s]:
        return Action("W", pending_w[s].pop(0))
    return None
