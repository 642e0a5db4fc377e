"""The pipeline runtime's host cost per pass, in kernel launches: the measurement behind
``plait.cost.work.PIPELINE_PASS_KERNELS``.

A GPT of tiny layers (hidden 16, sequence 8, two blocks) is planned as 2 stages on ``local:2`` with 4 and with 16
micro-batches, so its passes do next to no compute and the step is mostly the runtime's own host work: torch's
schedule, the stage's chunk bookkeeping, posting and waiting on the boundary's sends and receives. Each runs on 2
gloo ranks (a core each) as the Trainer applies it, under GPipe and 1F1B (median of --steps timed steps after
--warmup, per round). The simulator runs the same plans' programs with each pass's host cost set to 0 and to a
probe value; the difference says how much of the step one kernel launch per pass adds (the passes on the
critical path, as the simulator schedules them). Taking the difference between the two micro-batch counts leaves
out what a step costs once (the optimizer's call, the schedule's set-up), so the pass cost is

    (measured 16 - measured 4 - (simulated 16 - simulated 4, without it)) / (the same difference per kernel launch)

The tiny pipeline is not one of ``bench/pipeline_fidelity.py``'s rows: the constant is measured here, not
fitted to the fidelity rows. Prints a table per round; writes JSON with --json.

    python bench/pipeline_host.py --json out/pipeline_host.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from pipeline_fidelity import Config, choose, measure_plan_rank  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from plait.cost import CostModel  # noqa: E402
from plait.cost.work import PIPELINE_PASS_KERNELS, PIPELINE_TP_PASS_KERNELS  # noqa: E402
from plait.plan import Plan, plan_to_json  # noqa: E402
from plait.plan.ir import RankProgram  # noqa: E402
from plait.planners.pipeline_plan import build_pipeline_plan  # noqa: E402
from plait.runtime import run_ranks  # noqa: E402
from plait.sim.engine import simulate  # noqa: E402

SCHEDULES = ("gpipe", "1f1b")
MICRO_COUNTS = (4, 16)
PROBE_KERNELS = 100


def host_config(schedule: str, num_micro: int, tp: int) -> Config:
    """The tiny two-stage pipeline on two ranks (``tp`` 2: tensor-parallel stages of two ranks, sliced boundaries)."""
    return Config("gpt-host", 32, 2, schedule, tp=tp, split=tp > 1, nproc=2 * tp, micro=(num_micro,))


def with_pass_kernels(plan: Plan, extra: int) -> Plan:
    """``plan`` with ``extra`` kernel launches added to every pass (F, B, I, W) of every program."""
    programs = tuple(RankProgram(ranks=p.ranks, instrs=tuple(
        replace(i, num_kernels=i.num_kernels + extra) if i.pass_kind is not None else i for i in p.instrs))
        for p in plan.programs)
    return replace(plan, programs=programs)


def simulated_step(plan: Plan, cost: CostModel, extra: int) -> float:
    """The simulated step with ``extra`` kernel launches per pass on top of the plan's own."""
    return simulate(with_pass_kernels(plan, extra), cost).prediction.step_s


def measure_one(schedule: str, num_micro: int, tp: int, warmup: int, steps: int) -> dict[str, Any]:
    """Plan, simulate (with and without the pass cost, and with the probe) and run one schedule and count."""
    config = host_config(schedule, num_micro, tp)
    current = PIPELINE_PASS_KERNELS if tp == 1 else PIPELINE_TP_PASS_KERNELS
    graph, choice, cost = choose(config)
    plan = build_pipeline_plan(graph, cost.cluster, choice, global_batch=config.global_batch, cost=cost,
                               schedule=schedule)
    assert plan.schedule.num_microbatches == num_micro and plan.num_pipeline_ranks == 2, "expected 2 stages"
    base = simulated_step(plan, cost, -current)
    out = run_ranks(measure_plan_rank, config.nproc, config.model, plan_to_json(plan), warmup, steps, timeout_s=600)
    return {"measured_s": statistics.median(t for t, _, _ in out), "without_s": base,
            "with_s": simulated_step(plan, cost, 0), "kernel_s": cost.kernel_overhead_s,
            "probe_s": simulated_step(plan, cost, PROBE_KERNELS - current) - base}


def measure(schedule: str, tp: int, warmup: int, steps: int) -> dict[str, Any]:
    """Both micro-batch counts of one schedule, and the pass cost their difference implies."""
    few, many = (measure_one(schedule, m, tp, warmup, steps) for m in MICRO_COUNTS)
    slope = (many["probe_s"] - few["probe_s"]) / PROBE_KERNELS
    extra = many["measured_s"] - few["measured_s"] - (many["without_s"] - few["without_s"])
    return {"schedule": schedule, "tp": tp, "few": few, "many": many, "seconds_per_kernel_per_pass": slope,
            "kernel_s": many["kernel_s"], "pass_kernels": extra / slope}


def main() -> None:
    """Measure every schedule for --rounds rounds and report the pass cost."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    rows = []
    for r in range(a.rounds):
        for tp in (1, 2):
            for schedule in SCHEDULES:
                print(f"[round {r + 1}/{a.rounds}] {schedule}, tp {tp}", flush=True)
                rows.append({"round": r + 1, **measure(schedule, tp, a.warmup, a.steps)})
    few, many = MICRO_COUNTS
    table = Table(title=f"pipeline runtime's host cost per pass (2 stages x {few} and {many} micro-batches, tiny layers; "
                        f"tp 1: 2 gloo ranks, tp 2: 4); now PIPELINE_PASS_KERNELS {PIPELINE_PASS_KERNELS}, "
                        f"PIPELINE_TP_PASS_KERNELS {PIPELINE_TP_PASS_KERNELS}")
    for col in ("round", "tp", "schedule", "measured (ms)", "simulated without (ms)", "with current (ms)",
                "ms per kernel per pass", "pass cost (kernels)"):
        table.add_column(col)
    for row in rows:
        f, m = row["few"], row["many"]
        table.add_row(str(row["round"]), str(row["tp"]), row["schedule"],
                      f"{f['measured_s'] * 1e3:.2f} / {m['measured_s'] * 1e3:.2f}",
                      f"{f['without_s'] * 1e3:.2f} / {m['without_s'] * 1e3:.2f}",
                      f"{f['with_s'] * 1e3:.2f} / {m['with_s'] * 1e3:.2f}",
                      f"{row['seconds_per_kernel_per_pass'] * 1e3:.4f}", f"{row['pass_kernels']:.1f}")
    Console(width=200).print(table)
    median = {tp: statistics.median(row["pass_kernels"] for row in rows if row["tp"] == tp) for tp in (1, 2)}
    print(f"median pass cost: {median[1]:.1f} kernel launches without tensor parallelism, {median[2]:.1f} with "
          "(in units of kernel_s at the ranks' count: " +
          ", ".join(f"{row['kernel_s'] * 1e6:.1f} us at {2 * row['tp']}" for row in rows[:2 * len(SCHEDULES):len(SCHEDULES)]) + ")")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"rows": rows, "median_pass_kernels": median[1], "median_tp_pass_kernels": median[2], "load_avg": os.getloadavg(),
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
        Path(a.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
