"""Cost-model fidelity: predicted vs measured step time and peak memory of real data-parallel and intra-op
runs.

For each configuration plait plans the run for ``local:N`` with the machine's measured profile (``plait
profile``), then runs it for real on N local gloo ranks and measures the median step time and the peak tensor
memory of a step. Data-parallel rows: model size x ranks x replicated/sharded (``build_dp_plan`` with a fixed
kind). Intra-op rows on 4 ranks (``plait.plan`` with ``families=("intra-op",)``): a (4,) ``tp`` mesh, and a
(2, 2) ``dp`` x ``tp`` mesh with replicated (wait-free buckets) or FSDP2 data parallelism; the ILP picks the
placements. Prints a table, the median absolute step-time and memory errors, the Spearman rank correlation of
predicted vs measured step times and the rows whose memory was under-predicted (targets: step error <= 25 %,
memory error <= 10 %, Spearman >= 0.8, none under), and writes JSON with --json.

    plait profile --nproc 4            # once: measure this machine
    python bench/cost_fidelity.py --json cost_fidelity.json
    python bench/cost_fidelity.py --dtensor-host    # the DTensor host-cost ratios of plait.cost.work
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr
from torch import nn
from torch.distributed.fsdp import fully_shard

import plait
from plait.cluster import default_profile_path, local_cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph import capture
from plait.models import GPT, MLP, GPTConfig, MLPConfig, lm_batch, lm_loss, mse_loss, regression_batch
from plait.plan import MeshSpec, Plan
from plait.planners import build_dp_plan
from plait.planners.intra_op.planner import IntraOpOptions
from plait.profiling.memory import track_peak_memory
from plait.runtime import apply_plan, init_distributed, local_micro_batches, run_ranks, teardown

MiB = 1 << 20

# name -> (build, make_batch(batch, device, generator), loss, per-rank micro-batch)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[..., Any], Callable[..., torch.Tensor], int]] = {
    "mlp-3m": (lambda: MLP(MLPConfig(in_dim=256, hidden=1024, num_layers=3, out_dim=64)),
               lambda b, **kw: regression_batch(MLPConfig(in_dim=256, hidden=1024, num_layers=3, out_dim=64), b, **kw),
               mse_loss, 64),
    "gpt-1m": (lambda: GPT(GPTConfig(vocab_size=512, seq_len=128, num_layers=4, num_heads=4, hidden=128)),
               lambda b, **kw: lm_batch(GPTConfig(vocab_size=512, seq_len=128, num_layers=4, num_heads=4, hidden=128), b, **kw),
               lm_loss, 8),
    "gpt-4m": (lambda: GPT(GPTConfig(vocab_size=2048, seq_len=128, num_layers=4, num_heads=4, hidden=256)),
               lambda b, **kw: lm_batch(GPTConfig(vocab_size=2048, seq_len=128, num_layers=4, num_heads=4, hidden=256), b, **kw),
               lm_loss, 4),
}


# intra-op layout name -> (mesh shape, mesh axes, data-parallel kind)
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[str, ...], str]] = {
    "tp4": ((4,), ("tp",), "replicate"),
    "dp2xtp2": ((2, 2), ("dp", "tp"), "replicate"),
    "dp2xtp2-fsdp": ((2, 2), ("dp", "tp"), "fsdp"),
}


@dataclass(frozen=True, kw_only=True)
class Config:
    """One measured configuration: data parallelism of a kind, or an intra-op layout (``LAYOUTS``)."""

    model: str
    nproc: int
    kind: str  # replicate | fsdp
    layout: str | None = None  # an intra-op layout; None: data parallelism only

    @property
    def label(self) -> str:
        """Short name for tables."""
        return f"{self.model} x{self.nproc} {self.layout or self.kind}"

    @property
    def global_batch(self) -> int:
        """The step's global batch: the model's per-rank micro-batch on each of ``nproc`` ranks."""
        return MODELS[self.model][3] * self.nproc


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """Predicted and measured numbers of one configuration."""

    config: Config
    predicted_step_s: float
    measured_step_s: float
    predicted_peak_bytes: int
    measured_peak_bytes: int

    @property
    def step_error(self) -> float:
        """Relative step-time error of the prediction."""
        return abs(self.predicted_step_s - self.measured_step_s) / self.measured_step_s

    @property
    def memory_error(self) -> float:
        """Relative peak-memory error of the prediction."""
        return abs(self.predicted_peak_bytes - self.measured_peak_bytes) / self.measured_peak_bytes


def make_plan(cfg: Config, bucket_mb: float) -> Plan:
    """Capture the model on the meta device and plan the fixed choice for local:N with the machine's profile."""
    if cfg.layout is not None:
        return make_intra_op_plan(cfg, bucket_mb)
    build, make_batch, loss, micro = MODELS[cfg.model]
    with torch.device("meta"):
        model = build()
    graph = capture(model, make_batch(micro, device="meta"), name=cfg.model, loss_fn=loss, with_ops=False)
    cluster = local_cluster(cfg.nproc)
    return build_dp_plan(graph, cluster, kind=cfg.kind, global_batch=cfg.global_batch, micro_batch=micro,
                         bucket_bytes=int(bucket_mb * MiB), cost=CostModel(cluster))


def make_intra_op_plan(cfg: Config, bucket_mb: float) -> Plan:
    """``plait.plan`` of the model on the layout's mesh: intra-op candidates of its data-parallel kind."""
    assert cfg.layout is not None
    shape, axes, kind = LAYOUTS[cfg.layout]
    build, make_batch, loss, _ = MODELS[cfg.model]
    with torch.device("meta"):
        model = build()
    cluster = local_cluster(cfg.nproc)
    batch = make_batch(cfg.global_batch, device="meta")
    return plait.plan(model, batch, cluster, global_batch=cfg.global_batch, loss_fn=loss, name=cfg.model,
                      families=("intra-op",), meshes=[MeshSpec(shape=shape, axes=axes)], dp_kinds=(kind,),
                      force_batch_axis="dp" if "dp" in axes else None, cost=CostModel(cluster),
                      intra_op=IntraOpOptions(bucket_bytes=int(bucket_mb * MiB)))


def _step(model: nn.Module, applied: Any, opt: torch.optim.Optimizer, batch: Any, loss: Callable[..., torch.Tensor], plan: Plan) -> None:
    """One optimizer step as plait's Trainer takes it (deferred sync on all but the last micro-batch)."""
    applied.zero_grad(opt)
    micro = local_micro_batches(batch, plan.batch, dp_rank=applied.dp_rank)
    for j, mb in enumerate(micro):
        with nullcontext() if j == len(micro) - 1 else applied.accumulate(), applied.step_context():
            (loss(model, mb) / plan.batch.num_micro).backward()
    applied.before_optimizer_step()
    opt.step()


def measure_rank(cfg: Config, plan: Plan, warmup: int, steps: int) -> tuple[float, int]:
    """One rank: median step time over ``steps`` timed steps, then the peak memory of one more step."""
    ctx = init_distributed()
    build, make_batch, loss, micro = MODELS[cfg.model]
    torch.manual_seed(0)
    model = build()
    applied = apply_plan(model, plan, ctx)
    opt = torch.optim.AdamW(applied.model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(plan.batch.global_size, generator=gen) for _ in range(4)]
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        _step(applied.model, applied, opt, batches[i % 4], loss, plan)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    with track_peak_memory(baseline=[applied.model, opt]) as mem:
        _step(applied.model, applied, opt, batches[0], loss, plan)
    peak = torch.tensor([mem.total_peak_bytes], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    teardown()
    return statistics.median(times), int(peak.item())


def run_config(cfg: Config, *, bucket_mb: float, warmup: int, steps: int) -> Outcome:
    """Plan, run and compare one configuration."""
    plan = make_plan(cfg, bucket_mb)
    assert plan.predicted is not None
    step_s, peak = run_ranks(measure_rank, cfg.nproc, cfg, plan, warmup, steps, timeout_s=1200)[0]
    return Outcome(config=cfg, predicted_step_s=plan.predicted.step_s, measured_step_s=step_s,
                   predicted_peak_bytes=max(plan.predicted.peak_memory_bytes), measured_peak_bytes=peak)


def _per_call(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def dtensor_host_rank(rounds: int = 7) -> dict[str, float]:
    """One rank on a one-rank mesh: DTensor's and FSDP2's extra host time over plain tensors in units of the
    profile's ``kernel_s`` (its tiny blocks' forward+backward over three times their forward kernels, timed
    here): per op of two GPT blocks' forward+backward (the joint graph's ops and one gradient detach per
    parameter), per parameter of a single-tensor AdamW step, per Partial -> Replicate redistribution, and per
    FSDP2 unit (Linear + GELU) in forward and in forward+backward."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from plait.graph.joint import capture_joint
    from plait.models.gpt import Block
    from plait.planners.intra_op.work import dispatched_ops
    from plait.profiling.bench_compute import tiny_blocks
    from plait.runtime.tensor_parallel import distribute_parameters, pin_activations

    ctx = init_distributed()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    cfg = GPTConfig(vocab_size=64, seq_len=8, num_layers=2, num_heads=4, hidden=64)
    torch.manual_seed(0)
    plain, tp = nn.Sequential(Block(cfg), Block(cfg)), nn.Sequential(Block(cfg), Block(cfg))
    distribute_parameters(tp, mesh, {})
    pin_activations(tp, mesh, [])
    x = torch.randn(1, cfg.seq_len, cfg.hidden)
    with torch.device("meta"):
        meta = nn.Sequential(Block(cfg), Block(cfg))
        joint = capture_joint(meta, (x.to("meta"),), loss_fn=lambda m, b: m(*b).sum())
    num_params = len(list(tp.parameters()))
    ops = sum(dispatched_ops(joint).values()) + num_params
    blocks = tiny_blocks()
    kernels = sum(layer.num_kernels for m, i in blocks for layer in capture(m, (i,), with_ops=False).layers)
    partial = DTensor.from_local(torch.randn(16), mesh, [Partial()], run_check=False)
    opts = [torch.optim.AdamW(m.parameters()) for m in (plain, tp)]
    units = [nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(6)]) for _ in range(2)]
    for unit in units[1]:
        fully_shard(unit, mesh=mesh)
    fully_shard(units[1], mesh=mesh)
    u = torch.randn(2, 8)
    fns = {
        "units": lambda: units[0](u).sum().backward(), "fsdp_units": lambda: units[1](u).sum().backward(),
        "units_fwd": lambda: units[0](u), "fsdp_units_fwd": lambda: units[1](u),
        "plain": lambda: plain(x).sum().backward(), "dtensor": lambda: tp(x).sum().backward(),
        "adamw_plain": opts[0].step, "adamw_dtensor": opts[1].step,
        "redistribute": lambda: partial.redistribute(mesh, [Replicate()]),
        "tiny": lambda: [m(i).sum().backward() for m, i in blocks],
    }
    times = {k: statistics.median(_per_call(f, 30) for _ in range(rounds)) for k, f in fns.items()}
    kernel_s = times["tiny"] / (3 * kernels)
    teardown()
    del ctx
    return {
        "op": (times["dtensor"] - times["plain"]) / ops / kernel_s,
        "adamw_param": (times["adamw_dtensor"] - times["adamw_plain"]) / num_params / kernel_s,
        "redistribute": times["redistribute"] / kernel_s,
        # per unit: six units and the root
        "fsdp2_unit_fwd": (times["fsdp_units_fwd"] - times["units_fwd"]) / 7 / kernel_s,
        "fsdp2_unit_fwd_bwd": (times["fsdp_units"] - times["units"]) / 7 / kernel_s,
    }


MEGATRON_SHARDS = {"qkv.weight": 0, "qkv.bias": 0, "fc1.weight": 0, "fc1.bias": 0, "proj.weight": 1, "fc2.weight": 1}


def dtensor_sharded_rank(rounds: int = 7) -> dict[str, float]:
    """One rank of a two-rank ``tp`` mesh: DTensor's host cost per op when the parameters are really sharded
    (two GPT blocks, Megatron placements: the projections into attention and the MLP split by output, the ones
    out of them by input), in units of the profile's ``kernel_s`` timed here. The step's redistributions
    (counted with the profiler in an untimed call) are subtracted at the measured time of one Partial ->
    Replicate redistribution of an activation on the same mesh: the cost model prices those as collectives."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from plait.graph.joint import capture_joint
    from plait.models.gpt import Block
    from plait.plan.ir import Placement
    from plait.planners.intra_op.work import dispatched_ops
    from plait.profiling.bench_compute import tiny_blocks
    from plait.runtime.tensor_parallel import distribute_parameters, pin_activations

    ctx = init_distributed()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    cfg = GPTConfig(vocab_size=64, seq_len=8, num_layers=2, num_heads=4, hidden=64)
    torch.manual_seed(0)
    plain, tp = nn.Sequential(Block(cfg), Block(cfg)), nn.Sequential(Block(cfg), Block(cfg))
    shards = {name: (Placement("shard", dim),) for name, _ in tp.named_parameters()
              for suffix, dim in MEGATRON_SHARDS.items() if name.endswith(suffix)}
    distribute_parameters(tp, mesh, shards)
    pin_activations(tp, mesh, [])
    x = torch.randn(1, cfg.seq_len, cfg.hidden)
    with torch.device("meta"):
        meta = nn.Sequential(Block(cfg), Block(cfg))
        joint = capture_joint(meta, (x.to("meta"),), loss_fn=lambda m, b: m(*b).sum())
    ops = sum(dispatched_ops(joint).values()) + len(list(tp.parameters()))
    with torch.profiler.profile() as prof:
        tp(x).sum().backward()
    redistributions = sum(e.count for e in prof.key_averages() if e.key.startswith("gloo:"))
    blocks = tiny_blocks()
    kernels = sum(layer.num_kernels for m, i in blocks for layer in capture(m, (i,), with_ops=False).layers)
    partial = DTensor.from_local(torch.randn_like(x), mesh, [Partial()], run_check=False)
    fns = {
        "plain": lambda: plain(x).sum().backward(), "dtensor": lambda: tp(x).sum().backward(),
        "redistribute": lambda: partial.redistribute(mesh, [Replicate()]).to_local(),
        "tiny": lambda: [m(i).sum().backward() for m, i in blocks],
    }
    times = {k: statistics.median(_per_call(f, 30) for _ in range(rounds)) for k, f in fns.items()}
    kernel_s = times["tiny"] / (3 * kernels)
    teardown()
    del ctx
    host = times["dtensor"] - times["plain"] - redistributions * times["redistribute"]
    return {"op_sharded": host / ops / kernel_s, "redistribute_with_collective": times["redistribute"] / kernel_s,
            "redistributions": float(redistributions)}


def report(outcomes: list[Outcome]) -> dict[str, Any]:
    """Print the table and the summary; the JSON record."""
    table = Table(title="cost-model fidelity on this machine (local:N, gloo)")
    for col in ("configuration", "pred step (ms)", "meas step (ms)", "err", "pred peak (MB)", "meas peak (MB)", "err"):
        table.add_column(col, justify="right" if col != "configuration" else "left")
    for o in outcomes:
        table.add_row(o.config.label, f"{o.predicted_step_s * 1e3:.1f}", f"{o.measured_step_s * 1e3:.1f}", f"{o.step_error:.0%}",
                      f"{o.predicted_peak_bytes / 1e6:.1f}", f"{o.measured_peak_bytes / 1e6:.1f}", f"{o.memory_error:.0%}")
    step_err = statistics.median(o.step_error for o in outcomes)
    mem_err = statistics.median(o.memory_error for o in outcomes)
    rho = float(spearmanr([o.predicted_step_s for o in outcomes], [o.measured_step_s for o in outcomes]).statistic)
    under = [o.config.label for o in outcomes if o.predicted_peak_bytes < o.measured_peak_bytes]
    console = Console()
    console.print(table)
    console.print(f"median |step-time error| {step_err:.1%} (target <= 25%), Spearman {rho:.3f} (target >= 0.8), "
                  f"median |memory error| {mem_err:.1%} (target <= 10%), memory under-predicted on "
                  f"{', '.join(under) or 'no row'} (target: no row)")
    return {
        "outcomes": [dict(asdict(o), step_error=o.step_error, memory_error=o.memory_error) for o in outcomes],
        "median_step_error": step_err, "spearman": rho, "median_memory_error": mem_err,
        "memory_under_predicted": under,
        "targets": {"median_step_error": 0.25, "spearman": 0.8, "median_memory_error": 0.10,
                    "memory_under_predicted": []},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg": os.getloadavg(), "profile": str(default_profile_path())},
    }


def main() -> None:
    """Parse arguments, run every configuration, report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--nprocs", default="2,4")
    p.add_argument("--kinds", default="replicate,fsdp")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="intra-op rows on 4 ranks (empty: none); of " + ", ".join(LAYOUTS))
    p.add_argument("--dtensor-host", action="store_true",
                   help="measure DTensor's and FSDP2's host cost in kernel launches and exit")
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    if a.dtensor_host:
        torch.set_num_threads(1)
        ratios = run_ranks(dtensor_host_rank, 1, timeout_s=600)[0]
        ratios |= run_ranks(dtensor_sharded_rank, 2, timeout_s=600)[0]
        print(", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
              + " kernel launches (plait.cost.work's DTENSOR_* and FSDP2_* constants)")
        return
    if not default_profile_path().is_file():
        raise SystemExit(f"no profile at {default_profile_path()}: run `plait profile --nproc 4` first")
    torch.set_num_threads(1)
    models = a.models.split(",")
    configs = [Config(model=m, nproc=int(n), kind=k)
               for m in models for n in a.nprocs.split(",") for k in a.kinds.split(",")]
    configs += [Config(model=m, nproc=4, kind=LAYOUTS[lay][2], layout=lay)
                for m in models for lay in a.layouts.split(",") if lay]
    outcomes, failed = [], {}
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {cfg.label}", flush=True)
        try:
            o = run_config(cfg, bucket_mb=a.bucket_mb, warmup=a.warmup, steps=a.steps)
        except PlaitError as exc:  # a plan the runtime refuses: report it, measure the rest
            failed[cfg.label] = str(exc).splitlines()[0]
            print(f"    failed: {failed[cfg.label]}", flush=True)
            continue
        outcomes.append(o)
        print(f"    step {o.predicted_step_s * 1e3:.1f} / {o.measured_step_s * 1e3:.1f} ms "
              f"({o.step_error:.0%}), "
              f"peak {o.predicted_peak_bytes / 1e6:.2f} / {o.measured_peak_bytes / 1e6:.2f} MB "
              f"({o.memory_error:.0%})", flush=True)
    record = report(outcomes)
    if failed:
        print("rows that did not run: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        record["failed"] = failed
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
