"""The stage DP's inner step on arrays: the least ``sum (t_i + o_i)`` of a pipeline of candidates no slower than
``t_max`` that covers every layer with exactly the given devices (see ``plait.planners.stage_dp``).

Two tables: the general one over (first layer, stages, devices), filled candidate by candidate; and, when every
candidate's submesh has the same size ``d`` (pipelines of one submesh shape), one over (first layer, stages)
with ``devices / d`` stages in every pipeline, filled layer by layer with all the candidates starting there
at once. Both are exact; the tests compare them with brute force and with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StageTable:
    """Stage candidates as arrays, one entry per candidate (what the DP reads)."""

    start: np.ndarray  # first layer (int)
    stop: np.ndarray  # one past the last layer (int)
    devices: np.ndarray  # devices of the candidate's submesh (int)
    time_s: np.ndarray  # one micro-batch through the stage
    once_s: np.ndarray  # once per step
    max_after: np.ndarray  # the most stages that may follow it (int)

    def __len__(self) -> int:
        return len(self.start)

    def take(self, index: np.ndarray) -> StageTable:
        """The candidates at ``index``, in that order."""
        return StageTable(self.start[index], self.stop[index], self.devices[index], self.time_s[index],
                          self.once_s[index], self.max_after[index])


def least_sum(table: StageTable, num_layers: int, num_devices: int, t_max: float) -> tuple[float, list[int]] | None:
    """Least ``sum (t_i + o_i)`` over pipelines of candidates with ``t <= t_max`` and their indices (first stage
    first); None when there is none."""
    sizes = np.unique(table.devices)
    if len(sizes) == 1 and num_devices % int(sizes[0]) == 0:
        return _least_sum_one_size(table, num_layers, num_devices // int(sizes[0]), t_max)
    return _least_sum_general(table, num_layers, num_devices, t_max)


def _least_sum_general(table: StageTable, num_layers: int, num_devices: int,
                       t_max: float) -> tuple[float, list[int]] | None:
    """``best[k, s, d]``: the least sum of ``s`` stages covering layers ``k..L-1`` on exactly ``d`` devices;
    filled from the last layer back, each candidate starting at ``k`` extending the tables at its ``stop``."""
    L, D = num_layers, num_devices
    S = min(L, D)
    best = np.full((L + 1, S + 1, D + 1), np.inf)
    pick = np.full((L + 1, S + 1, D + 1), -1, dtype=np.int64)
    best[L, 0, 0] = 0.0
    usable = np.flatnonzero(table.time_s <= t_max)
    order = usable[np.argsort(-table.start[usable], kind="stable")]  # the last layers first
    cost = table.time_s + table.once_s
    for i in order:
        k, stop, dev = int(table.start[i]), int(table.stop[i]), int(table.devices[i])
        after = min(S - 1, int(table.max_after[i]))  # stages that may follow this one
        rest = best[stop, : after + 1, : D + 1 - dev]  # s' = 0..after stages after it, d' devices
        options = rest + cost[i]
        target = best[k, 1 : after + 2, dev:]
        better = options < target
        if better.any():
            target[better] = options[better]
            pick[k, 1 : after + 2, dev:][better] = i
    sums = best[0, :, D]
    if not np.isfinite(sums).any():
        return None
    s = int(np.argmin(sums))
    total = float(sums[s])
    out = []
    k, d = 0, D
    while s > 0:
        i = int(pick[k, s, d])
        out.append(i)
        k, s, d = int(table.stop[i]), s - 1, d - int(table.devices[i])
    return total, out


def _least_sum_one_size(table: StageTable, num_layers: int, num_stages: int,
                        t_max: float) -> tuple[float, list[int]] | None:
    """``best[k, s]``: the least sum of ``s`` stages covering layers ``k..L-1`` (each on one submesh of the one
    size); a pipeline has exactly ``num_stages`` stages, so the device axis is the stage axis."""
    L, S = num_layers, num_stages
    if S > L:
        return None
    best = np.full((L + 1, S + 1), np.inf)
    pick = np.full((L + 1, S + 1), -1, dtype=np.int64)
    best[L, 0] = 0.0
    usable = np.flatnonzero(table.time_s <= t_max)
    starts = table.start[usable]
    order = usable[np.argsort(starts, kind="stable")]
    bounds = np.searchsorted(table.start[order], np.arange(L + 1))
    cost = table.time_s + table.once_s
    followers = np.arange(S)  # s' = stages after the first one
    for k in range(L - 1, -1, -1):
        idx = order[bounds[k]: bounds[k + 1]]
        if not len(idx):
            continue
        values = best[table.stop[idx], :S] + cost[idx, None]
        values[followers[None, :] > table.max_after[idx, None]] = np.inf
        j = np.argmin(values, axis=0)
        chosen = values[j, followers]
        best[k, 1:] = chosen
        pick[k, 1:] = np.where(np.isfinite(chosen), idx[j], -1)
    if not np.isfinite(best[0, S]):
        return None
    out = []
    k, s = 0, S
    while s > 0:
        i = int(pick[k, s])
        out.append(i)
        k, s = int(table.stop[i]), s - 1
    return float(best[0, S]), out
