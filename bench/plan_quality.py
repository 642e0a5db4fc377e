"""Plan quality: plait's automatic plan vs Megatron-LM's hand layout for GPT models, under one cost model.

For each row (a GPT config on a DGX-A100 cluster, one global batch for both sides) the model is captured
on the meta device. plait searches its plans (``plait.plan``: data parallelism and intra-op sharding) and
the bench builds Megatron-LM's layout with the same intra-op planner, given by hand
(``build_intra_op_plan(..., solved=given_layout(...))``), so both are predicted by the same cost model and
simulator, in bf16, under the same memory limit (0.9 x device memory):

- tensor parallelism over the 8 GPUs of a node: QKV and fc1 column-split (weight and bias ``Shard(0)``),
  proj and fc2 row-split (weight ``Shard(1)``, bias replicated) with their outputs pinned ``Replicate()``,
  layer norms replicated; the vocabulary either replicated (embedding and head) or split as Megatron-LM
  splits it (embedding rows ``Shard(0)`` with its output replicated, head column-split; the logits are
  gathered before the loss, since plait's model output leaves replicated): the faster that fits counts;
- data parallelism across nodes: replicated parameters with bucketed all-reduce, or, only when that fits
  in no way, FSDP2 on the data-parallel axis (where Megatron-LM users turn on its distributed optimizer);
- the fewest micro-batches, then activation recomputation, that fit memory.

Prints a table with the ratio Megatron / plait of predicted step times and writes JSON with --json.

``--scaling`` runs the Megatron-LM scaling study instead (``bench/plan_quality_scaling.py``: the paper's ten
GPT configurations from 1.7B on 32 A100s to 1T on 3,072, its tensor/pipeline/data-parallel configuration against
plait's pipeline planner).

    python bench/plan_quality.py --json out/plan_quality.json
    python bench/plan_quality.py --quick        # two small rows, a couple of minutes
    python bench/plan_quality.py --scaling --json out/plan_quality_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import plait  # noqa: E402
from plait.cluster import Cluster, load_cluster  # noqa: E402
from plait.cost import CostModel  # noqa: E402
from plait.errors import NoFeasiblePlanError  # noqa: E402
from plait.graph.boundary import Boundary  # noqa: E402
from plait.graph.joint import JointGraph  # noqa: E402
from plait.models import GPT, GPT_CONFIGS, GPTConfig, lm_batch, lm_loss  # noqa: E402
from plait.plan.ir import MeshSpec, Plan  # noqa: E402
from plait.plan.layout import shard_axis_of  # noqa: E402
from plait.plan.placement import REPLICATE, Placement, shard  # noqa: E402
from plait.planners.candidates import micro_options  # noqa: E402
from plait.planners.data_parallel import resolve_precision  # noqa: E402
from plait.planners.intra_op.planner import build_intra_op_plan, given_layout  # noqa: E402
from plait.planners.intra_op.search import MeshOption  # noqa: E402
from plait.planners.intra_op.source import ModelSource  # noqa: E402

GB = 1e9
MEMORY_FRACTION = 0.9
PRECISION = "bf16"
Placements = tuple[Placement, ...]
Layout = tuple[dict[str, Placements], dict[int, Placements]]


@dataclass(frozen=True, kw_only=True)
class Row:
    """One comparison: a zoo GPT on a cluster preset with a global batch (sequences per step)."""

    model: str
    cluster: str
    global_batch: int
    config: GPTConfig | None = None  # None: the zoo's GPT_CONFIGS[model]

    @property
    def label(self) -> str:
        """Short name for progress lines."""
        return f"{self.model} on {self.cluster}, batch {self.global_batch}"

    @property
    def gpt(self) -> GPTConfig:
        """The model's sizes."""
        return self.config or GPT_CONFIGS[self.model]


ROWS: tuple[Row, ...] = (
    Row(model="gpt3-1.3b", cluster="dgx-a100:1", global_batch=128),
    Row(model="gpt3-2.7b", cluster="dgx-a100:2", global_batch=256),
    Row(model="gpt3-6.7b", cluster="dgx-a100:2", global_batch=256),
    Row(model="gpt3-13b", cluster="dgx-a100:4", global_batch=512),
    Row(model="gpt-39b", cluster="dgx-a100:8", global_batch=512),
)
# 8 heads, so that a tensor-parallel axis of 8 keeps whole heads; 15 M parameters
QUICK_GPT = GPTConfig(vocab_size=2048, seq_len=256, num_layers=4, num_heads=8, hidden=512)
QUICK_ROWS: tuple[Row, ...] = (
    Row(model="gpt-quick", cluster="dgx-a100:1", global_batch=64, config=QUICK_GPT),
    Row(model="gpt-quick", cluster="dgx-a100:2", global_batch=64, config=QUICK_GPT),
)


# ---- Megatron-LM's layout -------------------------------------------------------------------------


def _boundary_keys(joint: JointGraph) -> dict[Boundary, int]:
    return {b: key for key, b in enumerate(joint.boundaries)}


def megatron_layout(joint: JointGraph, num_layers: int, *, vocab_parallel: bool) -> Layout:
    """Megatron-LM's placements on one tensor-parallel axis (by parameter name) and pins (by boundary key)."""
    keys = _boundary_keys(joint)
    col, row, rep = (shard(0),), (shard(1),), (REPLICATE,)
    params: dict[str, Placements] = {}
    pins: dict[int, Placements] = {}
    for i in range(num_layers):
        for name in ("attn.qkv", "mlp.fc1"):
            params[f"blocks.{i}.{name}.weight"] = col
            params[f"blocks.{i}.{name}.bias"] = col
        for name in ("attn.proj", "mlp.fc2"):
            params[f"blocks.{i}.{name}.weight"] = row
            params[f"blocks.{i}.{name}.bias"] = rep
            pins[keys[Boundary(f"blocks.{i}.{name}", "output", 0)]] = rep
    if vocab_parallel:
        params["embed.tok.weight"] = col
        pins[keys[Boundary("embed.tok", "output", 0)]] = rep
        params["head.out.weight"] = col
    return params, pins


@dataclass(frozen=True, kw_only=True)
class HandPlan:
    """Megatron-LM's layout built for one cluster: the plan chosen (or the leanest one tried) and how."""

    plan: Plan
    fits: bool
    vocab: str  # "replicated" | "split" (embedding rows and head columns over tp)
    fsdp: bool
    build_s: float

    @property
    def peak_bytes(self) -> int:
        """The plan's predicted peak memory on its fullest rank."""
        return peak_of(self.plan)


def peak_of(plan: Plan) -> int:
    """A plan's predicted peak memory on its fullest rank."""
    assert plan.predicted is not None
    return max(plan.predicted.peak_memory_bytes)


def step_of(plan: Plan) -> float:
    """A plan's predicted step time."""
    assert plan.predicted is not None
    return plan.predicted.step_s


def _fit(
    source: ModelSource,
    cluster: Cluster,
    layout: Layout,
    *,
    fsdp: bool,
    global_batch: int,
    cost: CostModel,
    limit: int,
) -> tuple[Plan, bool]:
    """The fewest micro-batches, first without and then with recomputation, whose peak fits ``limit``."""
    nodes, per_node = cluster.num_nodes, cluster.devices_per_node
    mesh = MeshSpec(shape=(nodes, per_node), axes=("dp", "tp"))
    per_rank = global_batch // nodes
    joint, graph = source.joint(per_rank), source.graph(per_rank)
    solved = given_layout(joint, mesh, ("tp",), *layout)
    leanest: Plan | None = None
    for n in micro_options(global_batch, nodes, None):
        for recompute in (False, True):
            plan, _ = build_intra_op_plan(
                graph,
                joint,
                cluster,
                mesh=mesh,
                model_axes=("tp",),
                global_batch=global_batch,
                joint_batch=per_rank,
                num_micro=n,
                fsdp=fsdp,
                cost=cost,
                precision=resolve_precision(PRECISION, cluster),
                recompute=recompute,
                solved=solved,
            )
            if peak_of(plan) <= limit:
                return plan, True
            if leanest is None or peak_of(plan) <= peak_of(leanest):
                leanest = plan
    assert leanest is not None
    return leanest, False


def _hand_plan(
    source: ModelSource,
    cluster: Cluster,
    layout: Layout,
    vocab: str,
    *,
    global_batch: int,
    cost: CostModel,
    limit: int,
) -> HandPlan:
    """Replicated data parallelism with the fewest micro-batches that fit, else FSDP2 on the dp axis."""
    t0 = time.perf_counter()
    for fsdp in (False, True) if cluster.num_nodes > 1 else (False,):
        plan, fits = _fit(
            source, cluster, layout, fsdp=fsdp, global_batch=global_batch, cost=cost, limit=limit
        )
        if fits:
            break
    return HandPlan(plan=plan, fits=fits, vocab=vocab, fsdp=fsdp, build_s=time.perf_counter() - t0)


def megatron_plans(
    source: ModelSource, cluster: Cluster, num_layers: int, *, global_batch: int, cost: CostModel, limit: int
) -> list[HandPlan]:
    """Megatron-LM's layout with the vocabulary replicated and with it split."""
    joint = source.joint(global_batch // cluster.num_nodes)
    return [
        _hand_plan(
            source,
            cluster,
            megatron_layout(joint, num_layers, vocab_parallel=split),
            "split" if split else "replicated",
            global_batch=global_batch,
            cost=cost,
            limit=limit,
        )
        for split in (False, True)
    ]


def best_hand_plan(plans: list[HandPlan]) -> HandPlan:
    """The fastest hand plan that fits, else the leanest."""
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(fitting, key=lambda p: step_of(p.plan))
    return min(plans, key=lambda p: p.peak_bytes)


# ---- describing plans -----------------------------------------------------------------------------


def dp_treatment(plan: Plan) -> str:
    """How parameters meet on the data-parallel axes: replicate, fsdp or hybrid (or none without any)."""
    if plan.dp_degree == 1:
        return "none"
    axis = shard_axis_of(plan)
    if axis is None:
        return "replicate"
    return "hybrid" if len(plan.data_parallel_axes) > 1 else "fsdp"


def describe(plan: Plan) -> dict[str, Any]:
    """The choices a plan makes, for the table and the JSON."""
    assert plan.predicted is not None
    return {
        "mesh": " x ".join(f"{a}={s}" for a, s in zip(plan.mesh.axes, plan.mesh.shape, strict=True)),
        "model_axes": list(plan.model_axes),
        "dp": dp_treatment(plan),
        "num_micro": plan.batch.num_micro,
        "micro_size": plan.batch.micro_size,
        "recompute": any(layer.recompute for layer in plan.layers),
        "step_s": plan.predicted.step_s,
        "peak_bytes": max(plan.predicted.peak_memory_bytes),
        "compute_s": plan.predicted.compute_s,
        "exposed_comm_s": plan.predicted.exposed_comm_s,
    }


def choice_text(d: dict[str, Any]) -> str:
    """One cell: mesh and axis roles, data-parallel treatment, micro-batches, recomputation."""
    roles = d["mesh"] + (f" (model: {','.join(d['model_axes'])})" if d["model_axes"] else " (data parallel)")
    micro = f"{d['num_micro']} x {d['micro_size']}"
    return f"{roles}, {d['dp']}, micro {micro}" + (", recompute" if d["recompute"] else "")


# ---- one row --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Comparison:
    """Both sides of one row."""

    model: str
    cluster: str
    num_params: int
    world_size: int
    global_batch: int
    limit_bytes: int
    plait: dict[str, Any] | None = None  # None: plait found no plan that fits
    plait_note: str = ""
    plan_s: float = 0.0
    megatron: dict[str, Any] = field(default_factory=dict)
    megatron_fits: bool = False
    megatron_variants: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    same_mesh: dict[str, Any] | None = (
        None  # plait's own candidate on Megatron's mesh and data-parallel treatment
    )

    @property
    def ratio(self) -> float | None:
        """Megatron's predicted step time over plait's (>= 1: plait is no worse); None unless both fit."""
        if self.plait is None or not self.megatron_fits:
            return None
        return float(self.megatron["step_s"] / self.plait["step_s"])


def run_plait(
    model: torch.nn.Module,
    cfg: GPTConfig,
    cluster: Cluster,
    *,
    global_batch: int,
    cost: CostModel,
    name: str,
    **options: Any,
) -> tuple[Plan | None, str, float]:
    """plait's search; the plan (None if nothing fits), why not, and the wall time it took."""
    t0 = time.perf_counter()
    try:
        plan = plait.plan(
            model,
            lm_batch(cfg, 1, device="meta"),
            cluster,
            global_batch=global_batch,
            cost=cost,
            loss_fn=lm_loss,
            name=name,
            precision=PRECISION,
            memory_fraction=MEMORY_FRACTION,
            **options,
        )
    except NoFeasiblePlanError as exc:
        return None, str(exc), time.perf_counter() - t0
    return plan, "", time.perf_counter() - t0


def compare(
    cfg: GPTConfig, cluster: Cluster, *, global_batch: int, name: str = "gpt", **options: Any
) -> Comparison:
    """Plan ``cfg`` with plait and with Megatron-LM's layout on ``cluster`` (``options``: to plait.plan)."""
    with torch.device("meta"):
        model = GPT(cfg)
    cost = CostModel(cluster)
    limit = int(cluster.device.memory_bytes * MEMORY_FRACTION)
    out = Comparison(
        model=name,
        cluster=cluster.name,
        num_params=cfg.num_params,
        world_size=cluster.world_size,
        global_batch=global_batch,
        limit_bytes=limit,
    )
    plan, out.plait_note, out.plan_s = run_plait(
        model, cfg, cluster, global_batch=global_batch, cost=cost, name=name, **options
    )
    if plan is not None:
        out.plait = describe(plan)
        out.candidates = [asdict(c) for c in plan.candidates]
    source = model_source(model, cfg, cluster, name=name)
    hand = megatron_plans(source, cluster, cfg.num_layers, global_batch=global_batch, cost=cost, limit=limit)
    best = best_hand_plan(hand)
    out.megatron = dict(describe(best.plan), vocab=best.vocab, fsdp=best.fsdp)
    out.megatron_fits = best.fits
    out.megatron_variants = [
        dict(describe(h.plan), vocab=h.vocab, fsdp=h.fsdp, fits=h.fits, build_s=h.build_s) for h in hand
    ]
    out.same_mesh = same_mesh_candidate(out.candidates, best.plan.mesh, fsdp=best.fsdp)
    return out


def model_source(
    model: torch.nn.Module, cfg: GPTConfig, cluster: Cluster, *, name: str | None = None
) -> ModelSource:
    """The model the hand layout is captured from: under autocast to the compute dtype, as ``plait.plan`` captures it
    (both plans run under it: activations and their collectives in bf16, and the casts among the ops)."""
    policy = resolve_precision(PRECISION, cluster)
    return ModelSource(
        model=model,
        example_batch=lm_batch(cfg, 1, device="meta"),
        batch_size=1,
        loss_fn=lm_loss,
        name=name,
        autocast=policy.compute_dtype if policy.mixed else None,
    )


def same_mesh_candidate(
    candidates: list[dict[str, Any]], mesh: MeshSpec, *, fsdp: bool
) -> dict[str, Any] | None:
    """plait's scored candidate on ``mesh`` with tp as the model axis (its ILP's layout), if any."""
    name = MeshOption(mesh=mesh, model_axes=("tp",), fsdp=fsdp).name
    return next((c for c in candidates if c["name"] == name), None)


def run_row(row: Row) -> Comparison:
    """One row of the table, on the cluster preset."""
    return compare(row.gpt, load_cluster(row.cluster), global_batch=row.global_batch, name=row.model)


# ---- report ---------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f}"


def _cells(c: Comparison) -> list[str]:
    over = f" > {_gb(c.limit_bytes)}"
    plait_choice = choice_text(c.plait) if c.plait else "no plan fits (see JSON)"
    plait_step = f"{c.plait['step_s']:.4g}" if c.plait else "-"
    plait_peak = _gb(c.plait["peak_bytes"]) if c.plait else "-"
    m = c.megatron
    mega_step = f"{m['step_s']:.4g}" if c.megatron_fits else "does not fit"
    mega_peak = _gb(m["peak_bytes"]) + ("" if c.megatron_fits else over)
    mega_choice = (
        f"{m['mesh']}, vocab {m['vocab']}, {m['dp']}, micro {m['num_micro']} x {m['micro_size']}"
        + (", recompute" if m["recompute"] else "")
    )
    ratio = f"{c.ratio:.2f}" if c.ratio is not None else "-"
    same = c.same_mesh
    same_step = (
        "-"
        if same is None or not same["step_s"]
        else f"{same['step_s']:.4g}" + ("" if same["fits"] else " (no fit)")
    )
    return [
        c.model,
        _count(c.num_params),
        f"{c.cluster} ({c.world_size})",
        str(c.global_batch),
        plait_choice,
        plait_step,
        mega_choice,
        mega_step,
        ratio,
        plait_peak,
        mega_peak,
        same_step,
        f"{c.plan_s:.0f}",
    ]


def report(rows: list[Comparison]) -> dict[str, Any]:
    """Print the table and the verdict; the JSON record."""
    table = Table(
        title=f"plait vs Megatron-LM's layout (tp = node, dp across nodes): predicted step, {PRECISION}, "
        f"memory limit {MEMORY_FRACTION} x device"
    )
    for col in (
        "model",
        "params",
        "cluster (GPUs)",
        "batch",
        "plait's choice",
        "plait step (s)",
        "Megatron layout",
        "Megatron step (s)",
        "Megatron / plait",
        "plait peak (GB)",
        "Megatron peak (GB)",
        "plait's ILP on Megatron's mesh (s)",
        "planning (s)",
    ):
        table.add_column(
            col, justify="left" if col in ("model", "plait's choice", "Megatron layout") else "right"
        )
    for c in rows:
        table.add_row(*_cells(c))
    console = Console(width=220)
    console.print(table)
    both = [c for c in rows if c.ratio is not None]
    worse = [c for c in both if c.ratio is not None and c.ratio < 1 - 1e-9]
    console.print(
        f"rows where both fit: {len(both)} of {len(rows)}; plait no worse than Megatron's layout in "
        f"{len(both) - len(worse)} of them"
        + (f"; worse in: {', '.join(c.model for c in worse)}" if worse else "")
    )
    for c in rows:
        if c.plait is None:
            console.print(
                f"{c.model} on {c.cluster}: plait found no plan that fits: {c.plait_note.splitlines()[0]}"
            )
        if not c.megatron_fits:
            console.print(
                f"{c.model} on {c.cluster}: Megatron's layout does not fit without pipeline parallelism "
                f"(leanest peak {_gb(c.megatron['peak_bytes'])} GB > {_gb(c.limit_bytes)} GB)"
            )
    return {
        "rows": [dict(asdict(c), ratio=c.ratio) for c in rows],
        "precision": PRECISION,
        "memory_fraction": MEMORY_FRACTION,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_avg": os.getloadavg(),
            "commit": _git_state(),
        },
    }


def _git_state() -> str:
    """The checkout's commit, ``+dirty`` when src/ has uncommitted changes (predictions follow the code)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def _parse_rows(spec: str | None, quick: bool) -> list[Row]:
    if not spec:
        return list(QUICK_ROWS if quick else ROWS)
    out = []
    for item in spec.split(","):
        model, cluster, batch = item.split("@")
        out.append(Row(model=model, cluster=cluster, global_batch=int(batch)))
    return out


def main() -> None:
    """Parse arguments, compare every row, report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two small rows (a couple of minutes)")
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated MODEL@CLUSTER@GLOBAL_BATCH, e.g. gpt3-1.3b@dgx-a100:1@128",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--scaling", action="store_true", help="the Megatron-LM scaling study (ten GPTs, 32 to 3,072 GPUs)")
    p.add_argument("--scaling-rows", default=None, help="1-based rows of the scaling study, e.g. 1,2,5 (default: all)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.scaling:
        run_scaling(a.scaling_rows, a.json)
        return
    rows = _parse_rows(a.rows, a.quick)
    results = []
    for i, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(rows)}] {row.label}", flush=True)
        results.append(run_row(row))
        print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    record = report(results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)


def run_scaling(spec: str | None, out: str | None) -> None:
    """The Megatron-LM scaling study (``bench/plan_quality_scaling.py``)."""
    import plan_quality_scaling

    plan_quality_scaling.main(spec, out)


if __name__ == "__main__":
    main()
