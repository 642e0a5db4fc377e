"""Tensor-parallel test kit: Megatron layouts of the zoo models, a rank that trains one, and its reference.

A layout gives each parameter its placements on the model axes (here one axis, ``tp``) and the pinned
activations, as the planner's intra-op pass would. ``train_rank`` builds the model with a fixed seed on
a ``(dp, tp)`` mesh, distributes and pins it, adds data parallelism on ``dp`` (plait's WFBP or FSDP2),
trains a few AdamW steps on its share of the global batch and counts the collectives of the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from plait.models import zoo_model
from plait.models.mlp import MLP, MLPConfig, mse_loss, regression_batch
from plait.plan.placement import REPLICATE, Placement, shard
from plait.runtime import init_distributed, teardown
from plait.runtime.collectives import CollectiveCounter
from plait.runtime.state import full_model_state
from plait.runtime.tensor_parallel import (
    Pin,
    distribute_parameters,
    pin_activations,
    reduce_grads_to_placements,
)
from plait.runtime.wfbp import WaitFreeReplicate

OPT = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
R = (REPLICATE,)
COL = {"weight": (shard(0),), "bias": (shard(0),)}  # split output features
ROW = {"weight": (shard(1),), "bias": R}  # split input features; the output is a pending sum
Batch = tuple[torch.Tensor, ...]
Layout = tuple[dict[str, tuple[Placement, ...]], list[Pin]]
DataParallel = Literal["none", "wfbp", "fsdp"]


@dataclass(frozen=True)
class Case:
    """A model to train tensor-parallel: how to build it, its batches, loss, layout and FSDP2 units."""

    build: Callable[[], nn.Module]
    make_batch: Callable[..., Batch]  # (batch_size, *, generator) -> batch
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    layout: Callable[[nn.Module], Layout]
    units: Callable[[nn.Module], list[nn.Module]]  # FSDP2 shard units, innermost first (the root comes last)


def _linear(
    placements: dict[str, tuple[Placement, ...]],
    fqn: str,
    split: dict[str, tuple[Placement, ...]],
    model: nn.Module,
) -> None:
    layer = model.get_submodule(fqn)
    for local, _ in layer.named_parameters(recurse=False):
        placements[f"{fqn}.{local}"] = split[local]


def megatron(
    model: nn.Module, columns: list[str], rows: list[str], extra_pins: list[Pin] | None = None
) -> Layout:
    """Column-split ``columns``, row-split ``rows`` (their outputs pinned replicated); all else replicated."""
    placements: dict[str, tuple[Placement, ...]] = {}
    for fqn in columns:
        _linear(placements, fqn, COL, model)
    for fqn in rows:
        _linear(placements, fqn, ROW, model)
    return placements, [Pin(fqn, "output", 0, R) for fqn in rows] + (extra_pins or [])


# ---- the models ------------------------------------------------------------------------------------

MLP6 = MLPConfig(in_dim=256, hidden=256, num_layers=5, out_dim=256)


def mlp_layout(model: nn.Module) -> Layout:
    """Six Linear layers alternating column and row splits."""
    fcs = [f"layers.{i}.fc" for i in range(5)] + ["out"]
    return megatron(model, fcs[0::2], fcs[1::2])


def encoder_layout(model: nn.Module) -> Layout:
    """QKV and fc1 column split, proj and fc2 row split (whole heads per rank: the QKV is head-major)."""
    n = len(model.layers)
    cols = [f"layers.{i}.{m}" for i in range(n) for m in ("attn.qkv", "mlp.fc1")]
    rows = [f"layers.{i}.{m}" for i in range(n) for m in ("attn.proj", "mlp.fc2")]
    return megatron(model, cols, rows)


def gpt_layout(model: nn.Module, *, attention: Literal["heads", "batch"]) -> Layout:
    """MLPs split Megatron-style, the vocabulary projection column split (logits gathered at the root).

    ``attention="heads"`` splits QKV/proj by heads; ``"batch"`` keeps their weights replicated and pins
    the attention input to a batch split on the tp axis (for fewer heads than tp ranks): its weights then
    get pending-sum gradients that ``reduce_grads_to_placements`` (or WFBP, or FSDP2) must reduce.
    """
    n = len(model.blocks)
    cols = [f"blocks.{i}.mlp.fc1" for i in range(n)] + ["head.out"]
    rows = [f"blocks.{i}.mlp.fc2" for i in range(n)]
    if attention == "heads":
        cols += [f"blocks.{i}.attn.qkv" for i in range(n)]
        rows += [f"blocks.{i}.attn.proj" for i in range(n)]
        return megatron(model, cols, rows)
    pins = [Pin(f"blocks.{i}.attn", "input", 0, (shard(0),)) for i in range(n)]
    pins += [Pin(f"blocks.{i}.attn", "output", 0, R) for i in range(n)]
    return megatron(model, cols, rows, pins)


def llama_layout(model: nn.Module) -> Layout:
    """q/k/v/gate/up column split, o/down row split; norms and embeddings replicated."""
    n = len(model.model.layers)
    cols = [
        f"model.layers.{i}.{m}"
        for i in range(n)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    ]
    rows = [f"model.layers.{i}.{m}" for i in range(n) for m in ("self_attn.o_proj", "mlp.down_proj")]
    # the gradients of q, k and v (gate and up) meet at the attention (MLP) input: reduce them there, once
    inputs = [Pin(f"model.layers.{i}.{m}", "input", 0, R) for i in range(n) for m in ("self_attn", "mlp")]
    return megatron(model, cols, rows, inputs)


def _zoo(
    name: str, layout: Callable[[nn.Module], Layout], units: Callable[[nn.Module], list[nn.Module]]
) -> Case:
    zm = zoo_model(name)
    return Case(zm.build, zm.make_batch, zm.loss, layout, units)


CASES: dict[str, Case] = {
    "mlp": Case(
        partial(MLP, MLP6), partial(regression_batch, MLP6), mse_loss, mlp_layout, lambda m: list(m.layers)
    ),
    "transformer-tiny": _zoo("transformer-tiny", encoder_layout, lambda m: list(m.layers)),
    "gpt-tiny-heads": _zoo("gpt-tiny", partial(gpt_layout, attention="heads"), lambda m: list(m.blocks)),
    "gpt-tiny-batch": _zoo("gpt-tiny", partial(gpt_layout, attention="batch"), lambda m: list(m.blocks)),
    "hf-llama-tiny": _zoo("hf-llama-tiny", llama_layout, lambda m: list(m.model.layers)),
}


# ---- training ----------------------------------------------------------------------------------------


def global_batch(case: Case, size: int, step: int) -> Batch:
    """The global batch of ``step``: the same on every rank and in the reference."""
    return case.make_batch(size, generator=torch.Generator().manual_seed(1000 + step))


def reference(
    name: str, size: int, steps: int, *, autocast: bool = False
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One plain process on the global batches: every step's loss and the final parameters (fp32)."""
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = case.loss(model, global_batch(case, size, step))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _buckets(model: nn.Module, num: int) -> list[list[str]]:
    """Parameters in reverse order (roughly the order backward produces them), cut into ``num`` buckets."""
    names = [n for n, _ in model.named_parameters()][::-1]
    size = -(-len(names) // num)
    return [names[i : i + size] for i in range(0, len(names), size)]


def wfbp_facts(wfbp: WaitFreeReplicate) -> dict[str, Any]:
    """Whether each local gradient lies in its bucket; the launches; whether the first overlapped backward."""

    def inside(bucket: Any, t: torch.Tensor) -> bool:
        start = bucket.buffer.data_ptr()
        return start <= t.data_ptr() < start + bucket.buffer.numel() * bucket.buffer.element_size()

    views = all(
        inside(b, p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad)
        for b in wfbp.buckets
        for p in b.params
    )
    trace = wfbp.traces[-1]
    return {
        "views": views,
        "num_launches": wfbp.num_launches,
        "overlap": trace.bucket_launch_s[0] < trace.backward_end_s,
    }


def train_rank(
    name: str,
    shape: tuple[int, int],
    size: int,
    steps: int,
    data_parallel: DataParallel,
    autocast: bool = False,
) -> dict[str, Any]:
    """One rank of a (dp, tp) job: losses (mean over dp), full final parameters, first-step collectives."""
    case = CASES[name]
    init_distributed()
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = case.build()
    placements, pins = case.layout(model)
    distribute_parameters(model, mesh["tp"], placements)
    pin_activations(model, mesh["tp"], pins)
    wfbp = None
    if data_parallel == "wfbp":
        wfbp = WaitFreeReplicate(model, _buckets(model, 3), group=mesh.get_group("dp"))
    elif data_parallel == "fsdp":
        for unit in case.units(model):
            fully_shard(unit, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    dp_rank, dp_size = mesh.get_local_rank("dp"), mesh.size(0)
    losses, counters = [], []
    for step in range(steps):
        batch = global_batch(case, size, step)
        rows = size // dp_size
        mine = tuple(t[dp_rank * rows : (dp_rank + 1) * rows] for t in batch)
        if wfbp is not None and step != 1:
            wfbp.zero_grad()
        else:  # under WFBP, step 1 tests the other path: gradients set to None, hooks re-attach bucket views
            opt.zero_grad(set_to_none=True)
        with CollectiveCounter(mesh) as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = case.loss(model, mine)
            loss.backward()
            reduce_grads_to_placements(model)
        opt.step()
        counters.append(counter)
        total = torch.tensor(loss.item())
        dist.all_reduce(total, group=mesh.get_group("dp"))
        losses.append(total.item() / dp_size)
    first = counters[0]
    out = {
        "losses": losses,
        "forward": dict(first.by_phase("forward")),
        "backward": dict(first.by_phase("backward")),
        "after": dict(first.by_phase("after_backward")),
        "bytes": dict(first.bytes_by_key()),
        "steady": dict(counters[-1].counts),
    }
    if wfbp is not None:
        out.update(wfbp_facts(wfbp))
    out["params"] = full_model_state(model)  # as checkpoints gather it: full tensors on rank 0, {} elsewhere
    dist.barrier()
    teardown()
    return out
