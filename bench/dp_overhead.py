"""plait's replicated data parallelism (WFBP buckets) vs torch DDP: step time on N local ranks.

Both wrap the same GPT (same initial weights, same data, same gradient bucket cap, gradients as bucket
views) and train it with AdamW. Blocks of timed steps alternate between the two (ABBA order) after a
warm-up, so drift in the machine's load affects both alike. Prints a table and the step-time ratio
plait/DDP (target <= 1.05) and writes JSON with --json.

    python bench/dp_overhead.py --nproc 4 --json dp_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from plait.cluster import local_cluster
from plait.graph.capture import capture
from plait.models import GPT, GPTConfig, lm_batch, lm_loss
from plait.planners import build_dp_plan
from plait.runtime import apply_plan, init_distributed, run_ranks, teardown

MiB = 1 << 20
BENCH_GPT = GPTConfig(vocab_size=2048, seq_len=128, num_layers=4, num_heads=4, hidden=256)  # 4.2 M parameters


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What one benchmark run measures."""

    nproc: int = 4
    micro_batch: int = 4  # sequences per rank per step
    bucket_mb: float = 4.0
    warmup: int = 3
    steps: int = 5  # timed steps per block
    rounds: int = 4  # ABBA rounds; each times one block of each system


def make_plan(s: Settings):  # noqa: ANN201 - a Plan
    """Capture the GPT on the meta device and plan replicated data parallelism with the bucket cap."""
    with torch.device("meta"):
        model = GPT(BENCH_GPT)
    graph = capture(model, lm_batch(BENCH_GPT, s.micro_batch, device="meta"), name="bench-gpt", loss_fn=lm_loss)
    return build_dp_plan(graph, local_cluster(s.nproc), kind="replicate", global_batch=s.micro_batch * s.nproc,
                         bucket_bytes=int(s.bucket_mb * MiB))


def _block(model: torch.nn.Module, opt: torch.optim.Optimizer, zero, batches, steps: int) -> float:  # noqa: ANN001
    """Seconds per step of ``steps`` steps, timed between barriers (so it is the slowest rank's time)."""
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        zero()
        lm_loss(model, batches[i % len(batches)]).backward()
        opt.step()
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def bench_rank(s: Settings, plan) -> dict[str, list[float]]:  # noqa: ANN001
    """One rank: build both wrappers, warm up, then alternate timed blocks."""
    ctx = init_distributed()
    torch.manual_seed(0)
    plait_model = GPT(BENCH_GPT)
    torch.manual_seed(0)
    ddp_model = DistributedDataParallel(GPT(BENCH_GPT), bucket_cap_mb=s.bucket_mb, gradient_as_bucket_view=True)
    applied = apply_plan(plait_model, plan, ctx)
    plait_opt = torch.optim.AdamW(plait_model.parameters(), lr=1e-4)
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    batches = [lm_batch(BENCH_GPT, s.micro_batch, generator=gen) for _ in range(4)]
    systems = {
        "plait": (plait_model, plait_opt, lambda: applied.zero_grad(plait_opt)),
        "ddp": (ddp_model, ddp_opt, lambda: ddp_opt.zero_grad(set_to_none=False)),
    }
    for model, opt, zero in systems.values():
        _block(model, opt, zero, batches, s.warmup)
    times: dict[str, list[float]] = {"plait": [], "ddp": []}
    for r in range(s.rounds):
        order = ["plait", "ddp"] if r % 2 == 0 else ["ddp", "plait"]
        for name in order:
            times[name].append(_block(*systems[name], batches, s.steps))
    teardown()
    return times


def report(s: Settings, plan, times: dict[str, list[float]]) -> dict[str, object]:  # noqa: ANN001
    """Print the table and return the JSON record."""
    med = {k: statistics.median(v) for k, v in times.items()}
    # each round times one block of each system back to back: its ratio is immune to slow drift
    paired = [p / d for p, d in zip(times["plait"], times["ddp"], strict=True)]
    ratio = statistics.median(paired)
    table = Table(title=f"data-parallel step time, {s.nproc} ranks, GPT {plan.model.num_params / 1e6:.1f} M params, "
                        f"bucket {s.bucket_mb:g} MiB")
    for col in ("system", "median step (ms)", "min (ms)", "max (ms)", "blocks"):
        table.add_column(col)
    for name, label in (("plait", "plait WFBP buckets"), ("ddp", "torch DDP")):
        v = times[name]
        table.add_row(label, f"{med[name] * 1e3:.1f}", f"{min(v) * 1e3:.1f}", f"{max(v) * 1e3:.1f}", str(len(v)))
    console = Console()
    console.print(table)
    verdict = "meets" if ratio <= 1.05 else "misses"
    console.print(f"plait / DDP step-time ratio: {ratio:.3f} (median of {len(paired)} paired rounds; ratio of medians "
                  f"{med['plait'] / med['ddp']:.3f}; {verdict} the <= 1.05 target)")
    return {
        "settings": asdict(s), "num_params": plan.model.num_params, "num_buckets": len(plan.buckets),
        "step_s": times, "median_step_s": med, "paired_ratios": paired, "ratio_plait_over_ddp": ratio,
        "ratio_of_medians": med["plait"] / med["ddp"], "target": 1.05,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg": os.getloadavg()},
    }


def main() -> None:
    """Parse arguments, run the ranks, report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=Settings.nproc)
    p.add_argument("--micro-batch", type=int, default=Settings.micro_batch)
    p.add_argument("--bucket-mb", type=float, default=Settings.bucket_mb)
    p.add_argument("--warmup", type=int, default=Settings.warmup)
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--rounds", type=int, default=Settings.rounds)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    s = Settings(nproc=a.nproc, micro_batch=a.micro_batch, bucket_mb=a.bucket_mb, warmup=a.warmup, steps=a.steps, rounds=a.rounds)
    torch.set_num_threads(1)
    plan = make_plan(s)
    times = run_ranks(bench_rank, s.nproc, s, plan, timeout_s=1800)[0]
    record = report(s, plan, times)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
