"""``plait plan``: choose a plan (data-parallel, intra-op or pipeline) for a model on a cluster, print why, write the plan JSON."""

from __future__ import annotations

import os
from pathlib import Path

import click

from plait.cli.progress import planning_progress
from plait.graph.model_graph import ModelGraph
from plait.plan import plan_table, plan_to_json, save_plan
from plait.plan.layout import shard_axis_of
from plait.plan.table import console_for_tables, token_slicing_text
from plait.planners.pipeline_tokens import token_slicing as token_slicing_context
from plait.planners.request import (  # noqa: F401  (with_profile, parse_mesh: also used from here)
    PlanRequest,
    parse_mesh,
    resolve_module,
    with_profile,
)
from plait.planners.sync_strategies import SYNC_BUILDERS


def resolve_model(spec: str, per_rank_batch: int) -> ModelGraph:
    """Capture MODEL's layer view (see ``resolve_module``)."""
    from plait.graph import capture

    model, example_batch, loss_fn, name = resolve_module(spec, per_rank_batch)
    return capture(model, example_batch, name=name, loss_fn=loss_fn, with_ops=False)


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
@click.option("--token-slicing/--no-token-slicing", "token_slicing", default=True, show_default=True,
              help="Also offer a pipeline's stages with every sequence cut into token slices (TeraPipe; causal "
                   "transformers; `plait run` runs them on CPU ranks for now); --no-token-slicing plans micro-batch "
                   "pipelining only and saves the extra captures of a big search.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the chosen plan's JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan JSON instead of the tables.")
def plan(model: str, cluster_spec: str, batch: int | None, micro_batch: int | None, profile: str | None,
         memory_fraction: float, family: str, mesh_text: str | None, precision: str | None, sync: str | None,
         token_slicing: bool, out: str | None, as_json: bool) -> None:
    """Choose the fastest plan for MODEL that fits the cluster's memory, data-parallel, intra-op
    (tensor-parallel by an ILP) or a pipeline (stages and micro-batches by dynamic programming), and explain
    it: placements per layer or stages, every candidate's predicted step time, memory, TFLOP/s and MFU.

    MODEL is a zoo name (see `plait.models`, e.g. gpt2-small, mlp-small) or `module.path:factory`, a
    callable with no arguments that returns (model, example_batch) or (model, example_batch, loss_fn);
    example_batch may hold meta tensors, its first dimension is the per-rank batch.
    """
    is_file = cluster_spec.endswith((".yaml", ".yml")) or os.path.sep in cluster_spec
    spec = str(Path(cluster_spec).resolve()) if is_file else cluster_spec  # absolute: re-planned from anywhere
    profile = str(Path(profile).resolve()) if profile is not None and Path(profile).exists() else profile
    request = PlanRequest(model=model, cluster=spec, batch=batch, micro_batch=micro_batch, profile=profile,
                          memory_fraction=memory_fraction, family=family, mesh=mesh_text, precision=precision, sync=sync)
    with planning_progress(not as_json) as progress, token_slicing_context(token_slicing):
        chosen = request.plan(progress=progress)  # records the request, so `plait run --elastic` can re-plan it
    if sync and (chosen.is_pipeline or shard_axis_of(chosen) is not None):
        click.echo(f"note: --sync {sync} re-planned the replicated data-parallel candidates; a sharded or pipeline plan "
                   "was faster (see the candidates)", err=True)
    if chosen.schedule.is_token_sliced and not as_json:
        click.echo(f"{token_slicing_text(chosen)}; plait's token pipeline runs on CPU (gloo) ranks for now: for GPU "
                   "ranks re-plan with --no-token-slicing", err=True)
    if as_json:
        click.echo(plan_to_json(chosen), nl=False)
    else:
        console_for_tables().print(plan_table(chosen))
    if out:
        path = save_plan(chosen, out)
        if not as_json:
            click.echo(f"plan written to {path}; simulate it with `plait sim {path}`, run it with `plait run --plan {path}`")
