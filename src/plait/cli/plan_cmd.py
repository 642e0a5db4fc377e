"""``plait plan``: choose a plan (data-parallel, intra-op or pipeline) for a model on a cluster, print why, write the plan JSON."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from plait.cli.progress import planning_progress
from plait.cluster import Cluster, load_cluster
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan import MeshSpec, plan_table, plan_to_json, save_plan
from plait.plan.layout import shard_axis_of
from plait.plan.table import console_for_tables
from plait.planners.auto import FAMILIES
from plait.planners.sync_strategies import SYNC_BUILDERS

DEFAULT_PER_RANK_BATCH = 8


def _per_rank_batch(cluster: Cluster, batch: int | None, micro_batch: int | None) -> int:
    """The batch to capture with: the micro-batch, else the global batch's share per rank, else 8."""
    if micro_batch:
        return micro_batch
    if batch and batch % cluster.world_size == 0:
        return batch // cluster.world_size
    return DEFAULT_PER_RANK_BATCH


def with_profile(cluster: Cluster, profile: str | None) -> Cluster:
    """The cluster calibrated by ``profile`` (a path, made absolute, or a packaged name), so a plan written
    from it carries the profile and ``plait sim`` and ``plait run`` see the same numbers."""
    if profile is None:
        return cluster
    path = Path(profile)
    return replace(cluster, profile=str(path.resolve()) if path.exists() else profile)


def _from_factory(spec: str) -> tuple[Any, Any, Callable[..., Any] | None, str]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PlaitError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PlaitError(f"{module_name} has no callable {attr!r}; MODEL must be a zoo name or module.path:factory")
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise PlaitError(
            f"{spec} returned {type(made).__name__}; a model factory must return (model, example_batch) "
            "or (model, example_batch, loss_fn)"
        )
    loss_fn = made[2] if len(made) == 3 else None
    return made[0], made[1], loss_fn, attr


def resolve_module(spec: str, per_rank_batch: int) -> tuple[Any, Any, Callable[..., Any] | None, str]:
    """MODEL as (module, example batch, loss_fn, name): a zoo name (built on the meta device, batch of
    ``per_rank_batch``) or ``module.path:factory``."""
    import torch

    from plait.models import ZOO, zoo_model

    if ":" in spec and spec.split(":", 1)[0] not in ZOO:
        return _from_factory(spec)
    if spec not in ZOO:
        raise PlaitError(f"unknown model {spec!r}; zoo models: {', '.join(ZOO)} (or give module.path:factory)")
    zoo = zoo_model(spec)
    with torch.device("meta"):
        model = zoo.build()
    return model, zoo.make_batch(per_rank_batch, device="meta"), zoo.loss, spec


def resolve_model(spec: str, per_rank_batch: int) -> ModelGraph:
    """Capture MODEL's layer view (see ``resolve_module``)."""
    from plait.graph import capture

    model, example_batch, loss_fn, name = resolve_module(spec, per_rank_batch)
    return capture(model, example_batch, name=name, loss_fn=loss_fn, with_ops=False)


def parse_mesh(text: str) -> MeshSpec:
    """``2x4`` (axes dp, tp) or ``x=2,y=4`` (named axes) as a MeshSpec."""
    try:
        if "=" in text:
            pairs = [item.split("=") for item in text.split(",")]
            return MeshSpec(shape=tuple(int(n) for _, n in pairs), axes=tuple(a.strip() for a, _ in pairs))
        sizes = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        raise PlaitError(f"--mesh {text!r} is not a mesh; write 2x4 or dp=2,tp=4") from None
    names = ("dp", "tp") if len(sizes) == 2 else tuple(f"d{k}" for k in range(len(sizes)))
    return MeshSpec(shape=sizes, axes=names[: len(sizes)])


@click.command()
@click.argument("model")
@click.option("--cluster", "cluster_spec", required=True, help="Preset NAME:K (e.g. dgx-a100:2, local:4) or a cluster YAML file.")
@click.option("--batch", type=click.IntRange(min=1), help="Global batch size (default: 8 per rank).")
@click.option("--micro-batch", type=click.IntRange(min=1), help="Per-rank micro-batch (default: chosen to fit memory).")
@click.option("--profile", type=click.Path(dir_okay=False), help="A measured profile JSON (`plait profile`) for the cost model.")
@click.option("--memory-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Share of each device's memory a plan may use.")
@click.option("--family", "family", type=click.Choice(["all", "data-parallel", "intra-op", "pipeline"]), default="all",
              show_default=True,
              help="Search data-parallel plans, intra-op (tensor-parallel) plans, pipelines (stages by dynamic programming, "
                   "data-parallel inside each), or all of them.")
@click.option("--mesh", "mesh_text", help="Intra-op mesh to plan on, e.g. 2x4 (dp x tp) or x=2,y=4 (every role of its axes is tried); "
                                          "default: a tp axis of 2, 4, ... ranks inside a node.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "bf16-reduce"]), default=None,
              help="fp32, or bf16 compute with fp32 master weights (bf16-reduce: also bf16 gradient reduction). "
                   "Default: bf16 on GPU clusters, fp32 on CPUs.")
@click.option("--sync", "sync", metavar="NAME[:KEY=VALUE,...]",
              help=f"Per-parameter gradient synchronization of the replicated data-parallel candidates: "
                   f"{', '.join(SYNC_BUILDERS)} (e.g. hybcomm, ps:staleness=1, allreduce:compress=powersgd,rank=2; "
                   "auto picks per parameter by the cost model). Default: the wait-free all-reduce.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the chosen plan's JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan JSON instead of the tables.")
def plan(model: str, cluster_spec: str, batch: int | None, micro_batch: int | None, profile: str | None,
         memory_fraction: float, family: str, mesh_text: str | None, precision: str | None, sync: str | None,
         out: str | None, as_json: bool) -> None:
    """Choose the fastest plan for MODEL that fits the cluster's memory, data-parallel, intra-op
    (tensor-parallel by an ILP) or a pipeline (stages and micro-batches by dynamic programming), and explain
    it: placements per layer or stages, every candidate's predicted step time, memory, TFLOP/s and MFU.

    MODEL is a zoo name (see `plait.models`, e.g. gpt2-small, mlp-small) or `module.path:factory`, a
    callable with no arguments that returns (model, example_batch) or (model, example_batch, loss_fn);
    example_batch may hold meta tensors, its first dimension is the per-rank batch.
    """
    from plait.cost import CostModel
    from plait.planners import plan as choose

    cluster = with_profile(load_cluster(cluster_spec), profile)
    module, example_batch, loss_fn, name = resolve_module(model, _per_rank_batch(cluster, batch, micro_batch))
    families = FAMILIES if family == "all" else (family,)
    meshes = [parse_mesh(mesh_text)] if mesh_text else None
    batch_axis = "dp" if meshes and meshes[0].axes == ("dp", "tp") else None  # 2x4 names the roles
    with planning_progress(not as_json) as progress:
        chosen = choose(module, example_batch, cluster, global_batch=batch, micro_batch=micro_batch, cost=CostModel(cluster),
                        memory_fraction=memory_fraction, precision=precision, loss_fn=loss_fn, name=name, families=families,
                        meshes=meshes, force_batch_axis=batch_axis, progress=progress, sync=sync)
    if sync and (chosen.is_pipeline or shard_axis_of(chosen) is not None):
        click.echo(f"note: --sync {sync} re-planned the replicated data-parallel candidates; a sharded or pipeline plan "
                   "was faster (see the candidates)", err=True)
    if as_json:
        click.echo(plan_to_json(chosen), nl=False)
    else:
        console_for_tables().print(plan_table(chosen))
    if out:
        path = save_plan(chosen, out)
        if not as_json:
            click.echo(f"plan written to {path}; simulate it with `plait sim {path}`, run it with `plait run --plan {path}`")
