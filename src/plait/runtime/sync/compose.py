"""Compose synchronizers over one model: each parameter's SyncSpec picks who synchronises it.

``build_model_sync`` groups the parameters by kind (and by compression or staleness) and builds one
synchronizer per group: ``allreduce`` -> ``AllReduceSync`` (buckets from ``SyncSpec.bucket``), ``ps`` ->
``ParameterServerSync``, ``sfb`` -> ``SFBSync`` (the parameter's module must be an ``nn.Linear``; its bias goes
with it when the bias's spec is ``sfb`` too), ``none`` -> nobody. ``reduce_scatter`` is FSDP2's, applied by
``runtime/apply.py``, and is refused here.

A training step with a ``ModelSync``: forward and backward (the micro-batches before the last inside
``no_sync()``), ``finish()``, then the caller's optimizer over ``local_parameters()`` (the parameter servers
have already stepped their own parameters).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import PlaitError
from plait.plan.ir import SyncSpec
from plait.runtime.sync.allreduce import AllReduceSync
from plait.runtime.sync.counter import ByteCounter, merge_counts
from plait.runtime.sync.ps import ParameterServerSync
from plait.runtime.sync.ps_server import OptimizerFn
from plait.runtime.sync.sfb import SFBSync


class Synchronizer(Protocol):
    """What every synchronizer offers: its parameters, a per-step ``finish()``, byte counts and ``close()``."""

    name: str
    kind: str
    updates_parameters: bool
    counter: ByteCounter

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameters it synchronises."""
        ...

    def finish(self) -> None:
        """After the step's last backward: make the gradients (or, for a server, the parameters) ready."""
        ...

    def close(self) -> None:
        """Release threads, hooks and groups (collective)."""
        ...


class ModelSync:
    """The synchronizers of one model, run together once per step; their byte counts as metrics."""

    def __init__(self, model: nn.Module, synchronizers: Sequence[Synchronizer]) -> None:
        self.model = model
        self.synchronizers = list(synchronizers)
        self.step_index = 0
        owned = [n for s in self.synchronizers for n in s.param_names]
        if len(set(owned)) != len(owned):
            raise PlaitError("a parameter is synchronised by two synchronizers; give each parameter one SyncSpec")
        self._server_updated = {n for s in self.synchronizers if s.updates_parameters for n in s.param_names}

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients (all-reduce launches nothing; factors keep adding up)."""
        with ExitStack() as stack:
            for s in self.synchronizers:
                if isinstance(s, AllReduceSync):
                    stack.enter_context(s.no_sync())
            yield

    def finish(self) -> None:
        """Synchronise every parameter of the step (all-reduce, SFB, then parameter-server push and pull)."""
        for s in self.synchronizers:
            s.finish()
        self.step_index += 1

    def local_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters the caller's optimizer must step (all but the parameter servers')."""
        return [p for n, p in self.model.named_parameters() if p.requires_grad and n not in self._server_updated]

    def step_bytes(self, step: int | None = None) -> dict[str, int]:
        """Bytes sent and received in ``step`` (default: the last finished one), per synchronizer and summed."""
        at = self.step_index - 1 if step is None else step
        return merge_counts({s.name: s.counter.step(at) for s in self.synchronizers})

    def total_bytes(self) -> dict[str, int]:
        """Bytes sent and received over every step, per synchronizer and summed."""
        return merge_counts({s.name: s.counter.total() for s in self.synchronizers})

    def close(self) -> None:
        """Close every synchronizer (collective; parameter servers hand out their final shards first)."""
        for s in self.synchronizers:
            s.close()


def build_model_sync(
    model: nn.Module,
    specs: Mapping[str, SyncSpec],
    *,
    group: dist.ProcessGroup | None = None,
    optimizer_fn: OptimizerFn | None = None,
    seed: int = 0,
    broadcast_from: int | None = 0,
) -> ModelSync:
    """One synchronizer per kind (and per compression or staleness) for the parameters ``specs`` names.

    ``broadcast_from``: group position whose parameters and buffers every rank starts from (None: keep each
    rank's own, e.g. when they were seeded alike). Collective over ``group`` (the world when None).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    by_key = plan_synchronizers(model, specs, has_optimizer=optimizer_fn is not None)
    if broadcast_from is not None:
        _broadcast(model, group, broadcast_from)
    out: list[Synchronizer] = []
    for key, names in by_key.items():
        named = [(n, params[n]) for n in names]
        if key[0] == "allreduce":
            first = specs[names[0]]
            out.append(AllReduceSync(named, buckets=_buckets(names, specs), group=group, compress=first.compress,
                                     compress_rank=first.compress_rank, error_feedback=first.error_feedback, seed=seed,
                                     name=_allreduce_name(first)))
        elif key[0] == "ps":
            assert optimizer_fn is not None
            out.append(ParameterServerSync(named, specs, optimizer_fn=optimizer_fn, group=group, name=f"ps-s{key[1]}",
                                           broadcast_from=None))  # already broadcast above, if asked
        else:
            out.append(SFBSync(_sfb_layers(names, model), group=group))
    return ModelSync(model, out)


def plan_synchronizers(model: nn.Module, specs: Mapping[str, SyncSpec], *, has_optimizer: bool = True) -> dict[tuple[object, ...], list[str]]:
    """The synchronizers ``build_model_sync`` would build, as key -> parameter names; raises what it would raise.

    Keys: ``("allreduce", compress, compress_rank, error_feedback)``, ``("ps", staleness)`` or ``("sfb",)``. Needs no
    process group, so a caller can validate a plan's sync specs against a model before any communication.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _check_names(params, specs)
    by_key: dict[tuple[object, ...], list[str]] = {}
    for name in params:
        spec = specs[name]
        if spec.kind == "reduce_scatter":
            raise PlaitError(f"parameter {name!r}: kind 'reduce_scatter' (sharded optimizer) is FSDP2's, applied by "
                             "apply_plan; runtime.sync builds allreduce, ps and sfb")
        if spec.kind != "none":
            by_key.setdefault(_group_key(spec), []).append(name)
    axes = {specs[n].axes for names in by_key.values() for n in names}
    if len(axes) > 1:
        raise PlaitError(f"the SyncSpecs span different mesh axes {sorted(axes)}; one ModelSync runs on one group: "
                         "build one per set of axes")
    for key, names in by_key.items():
        if key[0] == "sfb":
            _sfb_layers(names, model)
        if key[0] == "ps" and not has_optimizer:
            raise PlaitError(f"parameters {names[:3]} are served by a parameter server, which needs optimizer_fn "
                             "to build the servers' optimizer")
    return by_key


def _allreduce_name(spec: SyncSpec) -> str:
    """``allreduce``, ``allreduce-fp16``, ``allreduce-powersgd-r2`` (``-noef`` without error feedback)."""
    if spec.compress != "powersgd":
        return "allreduce" + (f"-{spec.compress}" if spec.compress else "")
    return f"allreduce-powersgd-r{spec.compress_rank}" + ("" if spec.error_feedback else "-noef")


def _group_key(spec: SyncSpec) -> tuple[object, ...]:
    """Parameters with equal keys share one synchronizer."""
    if spec.kind == "allreduce":
        return ("allreduce", spec.compress, spec.compress_rank, spec.error_feedback)
    if spec.kind == "ps":
        return ("ps", spec.staleness)
    return (spec.kind,)


def _buckets(names: Sequence[str], specs: Mapping[str, SyncSpec]) -> list[list[str]]:
    """Buckets by ``SyncSpec.bucket`` in index order; parameters without one share a last bucket."""
    numbered: dict[int, list[str]] = {}
    loose: list[str] = []
    for n in names:
        b = specs[n].bucket
        if b is None:
            loose.append(n)
        else:
            numbered.setdefault(b, []).append(n)
    return [numbered[b] for b in sorted(numbered)] + ([loose] if loose else [])


def _sfb_layers(names: Sequence[str], model: nn.Module) -> list[tuple[str, nn.Linear, bool]]:
    """The Linear layers of SFB parameters: (module name, module, bias too); SFB needs the weight's spec."""
    chosen = set(names)
    layers = []
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if not isinstance(module, nn.Linear):
            raise PlaitError(f"parameter {name!r}: SFB synchronises nn.Linear layers; {module_name!r} is a "
                             f"{type(module).__name__}")
        if leaf == "bias" and _join(module_name, "weight") not in chosen:
            raise PlaitError(f"parameter {name!r}: SFB rebuilds a bias from its layer's factors; give "
                             f"{_join(module_name, 'weight')!r} kind 'sfb' too")
        if leaf == "weight":
            layers.append((module_name, module, _join(module_name, "bias") in chosen))
    return layers


def _broadcast(model: nn.Module, group: dist.ProcessGroup | None, src: int) -> None:
    """Copy every parameter and buffer from group position ``src`` to the other ranks."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, group=group, group_src=src)


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _check_names(params: Mapping[str, nn.Parameter], specs: Mapping[str, SyncSpec]) -> None:
    missing = [n for n in params if n not in specs]
    if missing:
        raise PlaitError(f"no SyncSpec for parameters {missing[:5]}; give every trainable parameter one")
    unknown = [n for n in specs if n not in params]
    if unknown:
        raise PlaitError(f"SyncSpecs name parameters the model does not train: {unknown[:5]}")

