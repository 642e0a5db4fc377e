"""Cost-model fidelity: predicted vs measured step time and peak memory of real data-parallel runs.

For each configuration (model size x ranks x replicated/sharded) plait plans the run for ``local:N``
with the machine's measured profile (``plait profile``), then runs it for real on N local gloo ranks
and measures the median step time and the peak tensor memory of a step. Prints a table, the median
absolute step-time and memory errors and the Spearman rank correlation of predicted vs measured step
times (targets: error <= 25 %, Spearman >= 0.8), and writes JSON with --json.

    plait profile --nproc 4            # once: measure this machine
    python bench/cost_fidelity.py --json cost_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr
from torch import nn

from plait.cluster import default_profile_path, local_cluster
from plait.cost import CostModel
from plait.graph import capture
from plait.models import GPT, MLP, GPTConfig, MLPConfig, lm_batch, lm_loss, mse_loss, regression_batch
from plait.plan import Plan
from plait.planners import build_dp_plan
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


@dataclass(frozen=True, kw_only=True)
class Config:
    """One measured configuration."""

    model: str
    nproc: int
    kind: str  # replicate | fsdp

    @property
    def label(self) -> str:
        """Short name for tables."""
        return f"{self.model} x{self.nproc} {self.kind}"


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
    build, make_batch, loss, micro = MODELS[cfg.model]
    with torch.device("meta"):
        model = build()
    graph = capture(model, make_batch(micro, device="meta"), name=cfg.model, loss_fn=loss, with_ops=False)
    cluster = local_cluster(cfg.nproc)
    return build_dp_plan(graph, cluster, kind=cfg.kind, global_batch=micro * cfg.nproc, micro_batch=micro,  # type: ignore[arg-type]
                         bucket_bytes=int(bucket_mb * MiB), cost=CostModel(cluster))


def _step(model: nn.Module, applied: Any, opt: torch.optim.Optimizer, batch: Any, loss: Callable[..., torch.Tensor], plan: Plan) -> None:
    applied.zero_grad(opt)
    for mb in local_micro_batches(batch, plan.batch, dp_rank=applied.dp_rank):
        (loss(model, mb) / plan.batch.num_micro).backward()
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
    console = Console()
    console.print(table)
    console.print(f"median |step-time error| {step_err:.1%} (target <= 25%), Spearman {rho:.3f} (target >= 0.8), "
                  f"median |memory error| {mem_err:.1%}")
    return {
        "outcomes": [dict(asdict(o), step_error=o.step_error, memory_error=o.memory_error) for o in outcomes],
        "median_step_error": step_err, "spearman": rho, "median_memory_error": mem_err,
        "targets": {"median_step_error": 0.25, "spearman": 0.8},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg": os.getloadavg(), "profile": str(default_profile_path())},
    }


def main() -> None:
    """Parse arguments, run every configuration, report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--nprocs", default="2,4")
    p.add_argument("--kinds", default="replicate,fsdp")
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    if not default_profile_path().is_file():
        raise SystemExit(f"no profile at {default_profile_path()}: run `plait profile --nproc 4` first")
    torch.set_num_threads(1)
    configs = [Config(model=m, nproc=int(n), kind=k) for m in a.models.split(",") for n in a.nprocs.split(",")
               for k in a.kinds.split(",")]
    outcomes = []
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {cfg.label}", flush=True)
        outcomes.append(run_config(cfg, bucket_mb=a.bucket_mb, warmup=a.warmup, steps=a.steps))
    record = report(outcomes)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
