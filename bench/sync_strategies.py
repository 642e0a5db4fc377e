"""Gradient-synchronization strategies (issue 9): measured step time and bytes vs plait's prediction and torch DDP.

Two cases, each on N ranks (default 4) over plain loopback (``plait.runtime.run_ranks``, gloo):

- ``wide-head``: an MLP 256 -> 1024 -> 1024 -> 8192 whose last Linear is 1024 x 8192, at 4 samples per worker
  (Poseidon's regime: K(M+N) << MN, so SFB moves far fewer bytes than any all-reduce or parameter server);
- ``gpt``: the zoo's ``gpt-mini`` (or ``--gpt gpt-tiny``), 4 sequences per worker.

For every strategy (allreduce, ps, ps-load-balancing, partitioned-ps, parallax, hybcomm, auto, allreduce with
bf16) the plan is ``apply_sync(build_dp_plan(...), graph, strategy, cost=CostModel(local_cluster(N)))``: its
``predicted.step_s`` is the simulator's step on this machine's profile. The Trainer then runs the plan for
warm-up + timed steps; the median of the timed steps' ``step_s`` and rank 0's bytes per step (``sync.sent_bytes``
+ ``sync.recv_bytes`` of the metrics file; for the plain all-reduce, which runs through the wait-free buckets and
counts nothing, the ring's 2(n-1)/n x gradient bytes) are reported, together with torch DDP's step time on the same
model, data and ranks in the same run. A table per case marks the fastest strategy (measured and predicted) and
the Kendall tau between the predicted and the measured ranking.

Unless --quick (or --no-emulated, or not root), each case also runs on the emulated 2-node cluster
(``plait.testing.emulated_cluster``: 2 network namespaces, each node's link shaped by tbf, --gbit, default 1):
``plait run --nnodes 2 --node-rank K`` in each namespace starts this file in worker mode on 2 ranks per node.
The predictions there are still the loopback profile's (a single-node cluster): no two-level profile of the
emulated link is measured here, so the emulated taus test the ranking on a network the model does not see.

    python bench/sync_strategies.py --quick
    python bench/sync_strategies.py --json out/sync_strategies.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from plait.cluster import local_cluster
from plait.cost import CostModel
from plait.graph.capture import capture
from plait.models.mlp import MLP, MLPConfig, mse_loss, regression_batch
from plait.models.zoo import zoo_model
from plait.plan import plan_from_json, plan_to_json
from plait.planners import build_dp_plan
from plait.planners.sync_lowering import apply_sync
from plait.runtime import TrainConfig, Trainer, init_distributed, run_ranks, teardown
from plait.runtime.metrics import METRICS_FILE, read_metrics

STRATEGIES = ("allreduce", "ps", "ps-load-balancing", "partitioned-ps", "parallax", "hybcomm", "auto",
              "allreduce:compress=bf16")
WIDE_HEAD = MLPConfig(in_dim=256, hidden=1024, num_layers=2, out_dim=8192)  # last Linear 1024 x 8192


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What one benchmark run measures."""

    nproc: int = 4
    per_worker: int = 4  # samples (sequences) per worker per step
    gpt: str = "gpt-mini"
    warmup: int = 3
    steps: int = 10  # timed steps per strategy
    lr: float = 1e-4


@dataclass(frozen=True)
class Case:
    """A model to benchmark: how to build it, its batches and its loss."""

    name: str
    label: str
    build: Any  # () -> nn.Module
    make_batch: Any  # (batch_size, *, device, generator) -> batch
    loss: Any  # (model, batch) -> loss


def cases(s: Settings) -> list[Case]:
    gpt = zoo_model(s.gpt)
    return [
        Case("wide-head", f"MLP 256-1024-1024-8192 (head 1024 x 8192), {s.per_worker} per worker",
             partial(MLP, WIDE_HEAD), partial(regression_batch, WIDE_HEAD), mse_loss),
        Case("gpt", f"{s.gpt}, {s.per_worker} sequences per worker", gpt.build, gpt.make_batch, gpt.loss),
    ]


def make_plans(case: Case, s: Settings) -> dict[str, Any]:
    """One plan per strategy, from the planner's replicated data-parallel plan, simulated on this machine."""
    global_batch = s.per_worker * s.nproc
    with torch.device("meta"):
        model = case.build()
    graph = capture(model, case.make_batch(global_batch, device="meta"), name=case.name, loss_fn=case.loss)
    cluster = local_cluster(s.nproc)
    base = build_dp_plan(graph, cluster, kind="replicate", global_batch=global_batch, optimizer="adamw")
    cost = CostModel(cluster)
    return {name: apply_sync(base, graph, name, cost=cost) for name in STRATEGIES}


def _data(case: Case, global_batch: int, step: int) -> Any:
    return case.make_batch(global_batch, generator=torch.Generator().manual_seed(1000 + step))


def _ddp_times(case: Case, s: Settings, rank: int, world: int) -> list[float]:
    """Seconds of each DDP step (rank 0's clock, after a barrier so every step starts together)."""
    torch.manual_seed(0)
    model = DistributedDataParallel(case.build(), gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    gb = s.per_worker * world
    times = []
    for step in range(s.warmup + s.steps):
        batch = tuple(t[rank * s.per_worker:(rank + 1) * s.per_worker] for t in _data(case, gb, step))
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        case.loss(model, batch).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[s.warmup:]


def bench_rank(case: Case, s: Settings, plan_jsons: dict[str, str], out: str) -> dict[str, Any]:
    """One rank: every strategy's plan through the Trainer, then DDP; rank 0's step times and bytes."""
    ctx = init_distributed()
    try:
        res: dict[str, Any] = {}
        # DDP first and last: the median of both brackets the machine's drift over the strategies
        ddp = _ddp_times(case, s, ctx.rank, ctx.world_size)
        for name, text in plan_jsons.items():
            plan = plan_from_json(text)
            out_dir = Path(out) / name.replace(":", "_").replace("=", "-")
            config = TrainConfig(steps=s.warmup + s.steps, lr=s.lr, progress=False, out_dir=str(out_dir))
            data = partial(_data, case, s.per_worker * s.nproc)
            result = Trainer(model_fn=case.build, loss_fn=case.loss, data=data, plan=plan, config=config, ctx=ctx).fit()
            dist.barrier()
            if ctx.rank == 0:
                metrics = read_metrics(out_dir / METRICS_FILE)[s.warmup:]
                sent = [m.sync_bytes.get("sync.sent_bytes", 0) if m.sync_bytes else None for m in metrics]
                recv = [m.sync_bytes.get("sync.recv_bytes", 0) if m.sync_bytes else None for m in metrics]
                res[name] = {"step_s": list(result.step_times[s.warmup:]), "sent_bytes": sent, "recv_bytes": recv}
        ddp += _ddp_times(case, s, ctx.rank, ctx.world_size)
        res["ddp"] = {"step_s": ddp}
        return res
    finally:
        teardown()


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two samples (scipy's when installed)."""
    try:
        from scipy.stats import kendalltau
    except ImportError:
        conc = disc = tx = ty = 0
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                a, b = x[i] - x[j], y[i] - y[j]
                if a == 0 and b == 0:
                    continue
                if a == 0:
                    tx += 1
                elif b == 0:
                    ty += 1
                elif (a > 0) == (b > 0):
                    conc += 1
                else:
                    disc += 1
        den = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
        return (conc - disc) / den if den else float("nan")
    return float(kendalltau(x, y).statistic)


def _kinds(plan: Any) -> str:
    counts: dict[str, int] = {}
    for p in plan.params:
        k = p.sync.kind + (f"/{p.sync.compress}" if p.sync.compress else "")
        counts[k] = counts.get(k, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def report(case: Case, s: Settings, plans: dict[str, Any], res: dict[str, Any], network: str,
           console: Console) -> dict[str, Any]:
    """Print the case's table and return its JSON record."""
    ddp = statistics.median(res["ddp"]["step_s"])
    rows = {}
    for name, plan in plans.items():
        r = res[name]
        nbytes = [a + b for a, b in zip(r["sent_bytes"], r["recv_bytes"], strict=True) if a is not None and b is not None]
        if nbytes:
            per_step, source = statistics.median(nbytes), "metrics"
        else:  # plain all-reduce: the wait-free buckets count nothing; the ring moves 2(n-1)/n x bytes each way
            grad_bytes = 4 * plan.model.num_params
            per_step, source = 2 * (2 * (s.nproc - 1) * grad_bytes // s.nproc), "ring formula"
        rows[name] = {"predicted_s": plan.predicted.step_s, "measured_s": statistics.median(r["step_s"]),
                      "step_s": r["step_s"], "bytes_per_step": per_step, "bytes_source": source,
                      "kinds": _kinds(plan)}
    names = list(rows)
    pred = [rows[n]["predicted_s"] for n in names]
    meas = [rows[n]["measured_s"] for n in names]
    tau = kendall_tau(pred, meas)
    best_m, best_p = min(names, key=lambda n: rows[n]["measured_s"]), min(names, key=lambda n: rows[n]["predicted_s"])
    params = sum(p.numel() for p in case.build().parameters())
    table = Table(title=f"{case.label}: {params / 1e6:.2f} M params, {s.nproc} ranks, {network}")
    for col in ("strategy", "kinds", "predicted (ms)", "measured (ms)", "/ DDP", "bytes/rank/step (sent+recv)"):
        table.add_column(col, justify="left" if col in ("strategy", "kinds") else "right")
    for n in names:
        r = rows[n]
        mark = (" [bold green]<- measured best[/]" if n == best_m else "") + (" [cyan](predicted best)[/]" if n == best_p else "")
        b = f"{r['bytes_per_step'] / 1e6:.3f} MB" + ("*" if r["bytes_source"] != "metrics" else "")
        table.add_row(n + mark, r["kinds"], f"{r['predicted_s'] * 1e3:.2f}", f"{r['measured_s'] * 1e3:.2f}",
                      f"{r['measured_s'] / ddp:.2f}", b)
    table.add_row("torch DDP", "allreduce", "-", f"{ddp * 1e3:.2f}", "1.00", "-")
    console.print(table)
    console.print(f"  Kendall tau (predicted vs measured ranking of {len(names)} strategies): {tau:+.3f}"
                  "   (* bytes from the ring formula: the wait-free buckets do not count bytes)")
    return {"case": case.name, "label": case.label, "num_params": params, "network": network, "rows": rows,
            "ddp_step_s": res["ddp"]["step_s"], "ddp_median_s": ddp, "kendall_tau": tau,
            "measured_best": best_m, "predicted_best": best_p}


def _worker(folder: str) -> None:
    """Worker mode (one rank started by `plait run` in a namespace): run the case, rank 0 saves the results."""
    job = torch.load(Path(folder) / "job.pt", weights_only=False)
    s = Settings(**job["settings"])
    case = next(c for c in cases(s) if c.name == job["case"])
    torch.set_num_threads(1)
    res = bench_rank(case, s, job["plans"], str(Path(folder) / "runs"))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(res, Path(folder) / "result.pt")


def run_emulated(case: Case, s: Settings, plan_jsons: dict[str, str], gbit: float, console: Console) -> dict[str, Any]:
    """The case on 2 emulated nodes of nproc / 2 ranks each, joined by tbf-shaped links; rank 0's results."""
    from plait.testing import LinkShape, emulated_cluster, tcp_throughput

    with tempfile.TemporaryDirectory() as folder, emulated_cluster(2, shape=LinkShape.gbit(gbit)) as cluster:
        rate = tcp_throughput(cluster.nodes[0], cluster.nodes[1], 16 * 2**20)
        console.print(f"  emulated link: tbf {gbit:g} Gbit/s, one TCP stream measured {rate / 1e6:.0f} MB/s")
        torch.save({"settings": asdict(s), "case": case.name, "plans": plan_jsons}, Path(folder) / "job.pt")
        procs = []
        for node in cluster.nodes:
            argv = [sys.executable, "-c", "from plait.cli.main import main; main()", "run", os.path.abspath(__file__),
                    "--nproc", str(s.nproc // 2), "--nnodes", "2", "--node-rank", str(node.index),
                    "--master-addr", cluster.master_addr, "--master-port", "29555", "--ifname", "eth0",
                    "--", "--worker", folder]
            log = open(Path(folder) / f"node{node.index}.log", "wb")  # noqa: SIM115 - closed below
            procs.append((node.popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))
        codes = []
        for proc, log in procs:
            codes.append(proc.wait(timeout=1800))
            log.close()
        if any(codes):
            tails = "\n".join((Path(folder) / f"node{k}.log").read_text()[-3000:] for k in range(2))
            raise RuntimeError(f"emulated run failed (exit codes {codes}):\n{tails}")
        return {**torch.load(Path(folder) / "result.pt", weights_only=False), "link_tcp_bytes_per_s": rate}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=Settings.nproc)
    p.add_argument("--per-worker", type=int, default=Settings.per_worker)
    p.add_argument("--gpt", default=Settings.gpt, choices=("gpt-tiny", "gpt-mini"))
    p.add_argument("--warmup", type=int, default=Settings.warmup)
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--quick", action="store_true", help="2 warm-up and 4 timed steps, loopback only")
    p.add_argument("--no-emulated", action="store_true", help="loopback only")
    p.add_argument("--gbit", type=float, default=1.0, help="the emulated nodes' link rate")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    emulated = not (a.quick or a.no_emulated) and os.geteuid() == 0
    s = Settings(nproc=a.nproc, per_worker=a.per_worker, gpt=a.gpt, warmup=2 if a.quick else a.warmup,
                 steps=4 if a.quick else a.steps)
    torch.set_num_threads(1)
    console = Console(width=160)
    records = []
    for case in cases(s):
        t0 = time.perf_counter()
        plans = make_plans(case, s)
        with tempfile.TemporaryDirectory() as out:
            res = run_ranks(bench_rank, s.nproc, case, s, {n: plan_to_json(pl) for n, pl in plans.items()}, out,
                            timeout_s=1800)[0]
        records.append(report(case, s, plans, res, "loopback (gloo)", console))
        console.print(f"  ({time.perf_counter() - t0:.0f} s)")
        if emulated:
            t0 = time.perf_counter()
            res = run_emulated(case, s, {n: plan_to_json(pl) for n, pl in plans.items()}, a.gbit, console)
            net = f"emulated 2 nodes x {s.nproc // 2} ranks, tbf {a.gbit:g} Gbit/s"
            rec = report(case, s, plans, res, net, console)
            rec["link_tcp_bytes_per_s"] = res["link_tcp_bytes_per_s"]
            records.append(rec)
            console.print(f"  ({time.perf_counter() - t0:.0f} s)")
    taus = [r["kendall_tau"] for r in records]
    per_case = ", ".join(f"{r['case']} ({r['network']}) {r['kendall_tau']:+.3f}" for r in records)
    console.print(f"Kendall tau per case: {per_case}; "
                  f"mean {statistics.mean(taus):+.3f} (target >= 0.6)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"settings": asdict(s), "cases": records, "emulated_cluster": emulated,
                       "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                   "load_avg": os.getloadavg()}}, f, indent=1)


if __name__ == "__main__":
    main()
