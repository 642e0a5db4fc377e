"""The layer view: which modules of a model are its ordered blocks.

Rule: walk the root's children; a container (``ModuleList``, ``Sequential``, ``ModuleDict``) is replaced
by its elements, and so is a *trunk*, a module with a direct child container of at least two modules
(e.g. Hugging Face's ``GPT2Model`` holding ``h``). Every other child is a candidate layer. Candidates
without parameters (dropout, activations) are not layers: their ops count in the layer that ran before
them. Layers are ordered by first call in the forward pass. A model with no children is one layer ``""``.
"""

from __future__ import annotations

from torch import nn

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def _is_trunk(module: nn.Module) -> bool:
    return any(isinstance(c, CONTAINERS) and len(c) >= 2 for c in module.children())


def _expand(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    for name, child in module.named_children():
        fqn = f"{prefix}{name}"
        if isinstance(child, CONTAINERS) or _is_trunk(child):
            _expand(child, f"{fqn}.", out)
        else:
            out.append((fqn, child))


def candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layer modules in definition order as ``(fqn, module)``, before ordering by call."""
    found: list[tuple[str, nn.Module]] = []
    _expand(model, "", found)
    with_params = [(n, m) for n, m in found if any(True for _ in m.parameters())]
    if with_params:
        return with_params
    return found or [("", model)]


def order_by_call(candidates: list[tuple[str, nn.Module]], call_order: list[int]) -> list[int]:
    """Candidate indices in first-call order; never-called candidates follow in definition order."""
    called = list(dict.fromkeys(call_order))
    rest = [i for i in range(len(candidates)) if i not in set(called)]
    return called + rest


def structural_owner(fqn: str, layer_names: list[str]) -> int | None:
    """Index of the layer whose module is, or holds, the module or parameter ``fqn``; ``None`` outside every layer."""
    for i, name in enumerate(layer_names):
        if name == "" or fqn == name or fqn.startswith(f"{name}."):
            return i
    return None
