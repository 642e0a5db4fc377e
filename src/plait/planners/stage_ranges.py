"""Layer ranges as arrays: per-layer quantities of one (tensor-parallel size, per-rank micro-batch), their prefix
sums and range maxima, and a signature of every range ``[a, b)`` that determines its stage's price.

Two ranges with the same signature have the same forward and backward work, collectives' time, saved and
transient memory, boundary, parameters and optimizer temporaries (``stage_work`` and ``StagePricer.price``
depend on a range only through these sums, maxima and end values), so a search prices one range per
distinct signature. Repeated layers (a transformer's blocks) make the distinct signatures few: for a GPT,
about three per range length (with or without the embedding, with or without the head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plait.cost.work import Comm
from plait.planners.stage_pricing import StagePricer, layer_workspace

SUM_FIELDS = ("fwd_flops", "bwd_flops", "fwd_bytes", "kernels", "activation", "input", "param_bytes", "param_numel",
              "fwd_comm_s", "bwd_comm_s", "again_comm_s")
MAX_FIELDS = ("largest_param", "activation", "comm_temp", "workspace_flowing")


@dataclass(frozen=True)
class LayerArrays:
    """Per-layer quantities of one (tp, micro) with prefix sums (``sums[k]``: layers ``0..k-1``) and range maxima
    (``maxes[f, a, b]``: the most of field ``f`` over layers ``a..b-1``; ``-inf`` when empty)."""

    sums: np.ndarray  # (L + 1, len(SUM_FIELDS))
    maxes: np.ndarray  # (len(MAX_FIELDS), L + 1, L + 1)
    workspace: np.ndarray  # per layer: its backward workspace plus fresh parameter gradients
    input_bytes: np.ndarray
    output_bytes: np.ndarray
    send_split: np.ndarray  # per layer: how its output crosses to a like stage (``StagePricer.send_split``)

    @property
    def num_layers(self) -> int:
        """Layers of the view."""
        return len(self.workspace)

    def signature(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """One row per range ``[a[i], b[i])``: everything its stage's price depends on (see the module docstring)."""
        L = self.num_layers
        sums = self.sums[b] - self.sums[a]
        maxes = self.maxes[:, a, b].T.copy()
        inner = self.maxes[MAX_FIELDS.index("workspace_flowing"), a, b - 1]  # layers before the stage's last one
        transient = np.maximum(np.where(np.isfinite(inner), inner, 0.0), self.workspace[b - 1])
        maxes[:, MAX_FIELDS.index("workspace_flowing")] = transient
        ends = np.stack([self.input_bytes[a], self.output_bytes[b - 1], self.send_split[b - 1], (b == L).astype(float),
                         (b - a).astype(float)], axis=1)
        return np.concatenate([sums, maxes, ends], axis=1)


def layer_arrays(pricer: StagePricer, tp: int, micro: int) -> LayerArrays:
    """The arrays of every layer's work at ``micro`` samples per rank under tensor-parallel size ``tp``."""
    works = pricer.works(tp, micro)
    nbytes, numel, largest = pricer.local_params(tp)
    layers = pricer.graph.layers
    scale = micro / pricer.graph.batch_size
    group = tuple(range(tp))

    def comm_s(comms: Sequence[Comm]) -> float:
        return sum(pricer.cost.collective_time(c.collective, c.nbytes, group) for c in comms)

    per_layer = np.array([
        [w.fwd_flops, w.bwd_flops, w.fwd_bytes_moved, w.num_kernels, w.activation_bytes, w.input_bytes, nbytes[i],
         numel[i], comm_s(w.tp_fwd), comm_s(w.tp_bwd), comm_s(w.tp_recompute)]
        for i, w in enumerate(works)], dtype=float)
    local = nbytes if tp > 1 else [None] * len(layers)
    workspace = np.array([layer_workspace(layer, w, scale, local[i], model_last=i == len(layers) - 1)
                          for i, (layer, w) in enumerate(zip(layers, works, strict=True))], dtype=float)
    output = np.array([w.output_bytes for w in works], dtype=float)
    max_fields = np.array([
        [largest[i], w.activation_bytes, max((c.temp_bytes for c in (*w.tp_fwd, *w.tp_bwd, *w.tp_recompute)), default=0),
         workspace[i] + output[i]]
        for i, w in enumerate(works)], dtype=float)
    sums = np.concatenate([np.zeros((1, len(SUM_FIELDS))), np.cumsum(per_layer, axis=0)])
    maxes = np.stack([range_max(max_fields[:, f]) for f in range(len(MAX_FIELDS))])
    return LayerArrays(sums=sums, maxes=maxes, workspace=workspace,
                       input_bytes=np.array([w.input_bytes for w in works], dtype=float), output_bytes=output,
                       send_split=np.array([pricer.send_split(i, micro, tp) for i in range(len(works))], dtype=float))


def range_max(x: np.ndarray) -> np.ndarray:
    """``out[a, b] = max(x[a:b])`` for ``a < b`` (``-inf`` otherwise), shape ``(L + 1, L + 1)``."""
    L = len(x)
    out = np.full((L + 1, L + 1), -np.inf)
    upper = np.where(np.arange(L)[None, :] >= np.arange(L)[:, None], x[None, :], -np.inf)
    out[:L, 1:] = np.maximum.accumulate(upper, axis=1)
    return out


def distinct(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first row of each distinct signature and, per row, which distinct one it is. Values are compared
    to 11 significant digits of their column's largest (prefix sums leave rounding noise in the last bits)."""
    if not len(rows):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    scale = np.max(np.abs(rows), axis=0)
    scale[scale == 0] = 1.0
    keys = np.round(rows / scale, 11)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)
