"""What each layer's backward holds at once besides the saved activations: its backward workspace.

``BackwardMemory`` follows, in order, the storages the backward pass makes (each op's new outputs) and
their deaths (a weak reference on each storage), and which tensors reach a parameter as its fresh
gradient (a hook on each parameter). Replaying these events afterwards gives, per layer, the most bytes
held at once above what was live when the layer's backward began (the gradient of its output), in two
parts: gradients of activations, which scale with the batch, and fresh parameter gradients, which do not.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch

_BEGIN, _END, _NEW, _DIED = 0, 1, 2, 3
_BEGIN_OF_PASS = object()  # the layer key before the first op


@dataclass
class Workspace:
    """The most one layer's backward held at once above its start (mutable accumulator)."""

    activation_grads: int = 0  # gradients of activations and other batch-sized temporaries
    param_grads: int = 0  # fresh parameter gradients before they are added into the parameters'


class BackwardMemory:
    """Records a backward pass's storages and replays them into per-layer workspaces (see the module docstring)."""

    def __init__(self) -> None:
        self._events: list[tuple[int, int | None, int]] = []  # (kind, layer or storage number, bytes)
        # live storages by address: (number, weak reference); an address is reused once its storage dies
        self._live: dict[int, tuple[int, weakref.ref[torch.UntypedStorage]]] = {}
        self._param_grads: set[int] = set()  # numbers of the storages that were fresh parameter gradients

    def op(self, layer: int | None, outputs: Iterable[torch.Tensor]) -> None:
        """One backward op of ``layer`` (an index; ``None`` outside every layer) made ``outputs``."""
        self._events.append((_BEGIN, layer, 0))
        for t in outputs:
            storage = t.untyped_storage()
            key = int(storage._cdata)
            if key not in self._live:
                number, nbytes = len(self._events), storage.nbytes()
                self._live[key] = (number, weakref.ref(storage, partial(self._died, key, number, nbytes)))
                self._events.append((_NEW, number, nbytes))
        self._events.append((_END, layer, 0))

    def param_grad(self, grad: torch.Tensor) -> None:
        """A parameter hook's view of a fresh gradient (it is added into the parameter's after)."""
        held = self._live.get(int(grad.untyped_storage()._cdata))
        if held is not None:
            self._param_grads.add(held[0])

    def _died(self, key: int, number: int, nbytes: int, _ref: object = None) -> None:
        held = self._live.get(key)
        if held is not None and held[0] == number:
            del self._live[key]
            self._events.append((_DIED, number, nbytes))

    def workspaces(self) -> dict[int | None, Workspace]:
        """Per layer, the most its backward held at once above what was live when it began."""
        out: dict[int | None, Workspace] = {}
        live = [0, 0]  # activation gradients, parameter gradients
        base = [0, 0]
        current: object = _BEGIN_OF_PASS
        for kind, what, nbytes in self._events:
            if kind == _BEGIN and what != current:
                current, base = what, list(live)
            elif kind in (_NEW, _DIED):
                live[what in self._param_grads] += nbytes if kind == _NEW else -nbytes
            elif kind == _END:
                ws = out.setdefault(what, Workspace())
                ws.activation_grads = max(ws.activation_grads, live[0] - base[0])
                ws.param_grads = max(ws.param_grads, live[1] - base[1])
        return out
