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
Those plans are priced on the emulated network as plait's own profiler measures it: ``plait profile --quick
--nnodes 2 --nproc N/2`` in the two namespaces (``plait.testing.profile_emulated``) writes a two-level cluster
(intra-node loopback, inter-node through the tbf link), cached in out/sync_strategies_emulated_<gbit>g.cluster.yaml
and reused by later runs (--reprofile measures again). The emulated nodes share this machine's cores, so compute
and the intra-node tables are read from the N-rank profile of this machine at N ranks busy
(``plait.testing.SharedMachineCost``); only the links come from the emulated profile.

The machine's cores are shared, and other work comes and goes: every strategy (and DDP) runs its timed steps in
--rounds interleaved rounds (default 3, the order reversed every other round), each after --warmup steps, and
the table reports medians. The small GPT's strategies differ by a few ms per step, so its case times
--gpt-steps (default 30) steps against the wide head's --steps (default 12).

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

from plait.cluster import load_cluster, local_cluster
from plait.cluster.spec import Cluster
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
    steps: int = 12  # timed steps per strategy (wide-head)
    gpt_steps: int = 30  # timed steps per strategy (gpt: small differences, more steps for the medians)
    rounds: int = 3  # every strategy runs its timed steps in this many interleaved rounds
    lr: float = 1e-4


@dataclass(frozen=True)
class Case:
    """A model to benchmark: how to build it, its batches and its loss."""

    name: str
    label: str
    build: Any  # () -> nn.Module
    make_batch: Any  # (batch_size, *, device, generator) -> batch
    loss: Any  # (model, batch) -> loss
    steps: int = 10  # timed steps per strategy


def cases(s: Settings) -> list[Case]:
    gpt = zoo_model(s.gpt)
    return [
        Case("wide-head", f"MLP 256-1024-1024-8192 (head 1024 x 8192), {s.per_worker} per worker",
             partial(MLP, WIDE_HEAD), partial(regression_batch, WIDE_HEAD), mse_loss, s.steps),
        Case("gpt", f"{s.gpt}, {s.per_worker} sequences per worker", gpt.build, gpt.make_batch, gpt.loss, s.gpt_steps),
    ]


def make_plans(case: Case, s: Settings, cluster: Cluster, cost: CostModel) -> dict[str, Any]:
    """One plan per strategy, from the planner's replicated data-parallel plan on ``cluster``, simulated on ``cost``."""
    global_batch = s.per_worker * s.nproc
    with torch.device("meta"):
        model = case.build()
    graph = capture(model, case.make_batch(global_batch, device="meta"), name=case.name, loss_fn=case.loss)
    base = build_dp_plan(graph, cluster, kind="replicate", global_batch=global_batch, optimizer="adamw", cost=cost)
    return {name: apply_sync(base, graph, name, cost=cost) for name in STRATEGIES}


def emulated_pricing(s: Settings, gbit: float, reprofile: bool, console: Console) -> tuple[Cluster, CostModel]:
    """The emulated 2-node cluster as `plait profile --nnodes 2` measures it (cached under out/), and the cost model
    that prices plans on it: its links, and this machine's N-rank profile for compute (the nodes share the cores)."""
    from plait.testing import LinkShape, SharedMachineCost, emulated_cluster, profile_emulated

    path = Path("out") / f"sync_strategies_emulated_{gbit:g}g.json"
    yaml_path = path.with_suffix(".cluster.yaml")
    if reprofile or not yaml_path.is_file():
        t0 = time.perf_counter()
        with emulated_cluster(2, shape=LinkShape.gbit(gbit)) as emu:
            profile_emulated(emu, path, nproc=s.nproc // 2, quick=True)
        console.print(f"profiled the emulated cluster (tbf {gbit:g} Gbit/s) with `plait profile --quick --nnodes 2 "
                      f"--nproc {s.nproc // 2}` in {time.perf_counter() - t0:.0f} s: {yaml_path}")
    else:
        console.print(f"reusing the emulated cluster's profile {yaml_path} (--reprofile measures it again)")
    cluster = load_cluster(yaml_path)
    if cluster.world_size != s.nproc or cluster.num_nodes != 2:
        raise SystemExit(f"{yaml_path} describes {cluster.num_nodes} x {cluster.devices_per_node} ranks, not 2 x "
                         f"{s.nproc // 2}: run with --reprofile")
    machine = local_cluster(s.nproc).profile
    if machine is None or not Path(machine).is_file():
        raise SystemExit(f"no profile of this machine at {machine}: run `plait profile --nproc {s.nproc}` first")
    for note in cluster.notes:
        console.print(f"  {note}")
    return cluster, SharedMachineCost(cluster, machine)


def _data(case: Case, global_batch: int, step: int) -> Any:
    return case.make_batch(global_batch, generator=torch.Generator().manual_seed(1000 + step))


def _ddp_times(case: Case, s: Settings, rank: int, world: int, steps: int) -> list[float]:
    """Seconds of each timed DDP step (rank 0's clock, after a barrier so every step starts together)."""
    torch.manual_seed(0)
    model = DistributedDataParallel(case.build(), gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    gb = s.per_worker * world
    times = []
    for step in range(s.warmup + steps):
        batch = tuple(t[rank * s.per_worker:(rank + 1) * s.per_worker] for t in _data(case, gb, step))
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        case.loss(model, batch).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[s.warmup:]


def round_steps(total: int, rounds: int) -> list[int]:
    """Timed steps of each round: ``total`` split as evenly as possible over ``rounds`` (at least one each)."""
    rounds = max(1, min(rounds, total))
    return [total // rounds + (1 if k < total % rounds else 0) for k in range(rounds)]


def bench_rank(case: Case, s: Settings, plan_jsons: dict[str, str], out: str) -> dict[str, Any]:
    """One rank: every strategy's plan through the Trainer and DDP, in ``s.rounds`` rounds (the order reversed every
    other round, so that a slow spell of the shared machine falls on every strategy alike); rank 0's step times
    and bytes."""
    ctx = init_distributed()
    try:
        names = [*plan_jsons, "ddp"]
        res: dict[str, Any] = {n: {"step_s": [], "sent_bytes": [], "recv_bytes": []} for n in names}
        for k, steps in enumerate(round_steps(case.steps, s.rounds)):
            for name in names if k % 2 == 0 else names[::-1]:
                if name == "ddp":
                    res[name]["step_s"] += _ddp_times(case, s, ctx.rank, ctx.world_size, steps)
                    continue
                plan = plan_from_json(plan_jsons[name])
                out_dir = Path(out) / f"{name.replace(':', '_').replace('=', '-')}-r{k}"
                config = TrainConfig(steps=s.warmup + steps, lr=s.lr, progress=False, out_dir=str(out_dir))
                data = partial(_data, case, s.per_worker * s.nproc)
                result = Trainer(model_fn=case.build, loss_fn=case.loss, data=data, plan=plan, config=config,
                                 ctx=ctx).fit()
                dist.barrier()
                if ctx.rank == 0:
                    metrics = read_metrics(out_dir / METRICS_FILE)[s.warmup:]
                    r = res[name]
                    r["sent_bytes"] += [m.sync_bytes.get("sync.sent_bytes", 0) if m.sync_bytes else None for m in metrics]
                    r["recv_bytes"] += [m.sync_bytes.get("sync.recv_bytes", 0) if m.sync_bytes else None for m in metrics]
                    r["step_s"] += list(result.step_times[s.warmup:])
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
    console.print(f"  Kendall tau (predicted vs measured ranking of {len(names)} strategies): {tau:+.3f}   (measured: "
                  f"median of {len(res['ddp']['step_s'])} steps; * bytes from the ring formula: the wait-free buckets "
                  "do not count bytes)")
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


def wait_for_quiet(max_load: float | None, console: Console, limit_s: float = 900.0) -> None:
    """Wait (at most ``limit_s``) until the 1-minute load average is below ``max_load`` (others' work on shared cores)."""
    if max_load is None:
        return
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= max_load and time.perf_counter() - t0 < limit_s:
        time.sleep(10)
    console.print(f"  load average {os.getloadavg()[0]:.1f} after waiting {time.perf_counter() - t0:.0f} s for < {max_load:g}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=Settings.nproc)
    p.add_argument("--per-worker", type=int, default=Settings.per_worker)
    p.add_argument("--gpt", default=Settings.gpt, choices=("gpt-tiny", "gpt-mini"))
    p.add_argument("--warmup", type=int, default=Settings.warmup)
    p.add_argument("--steps", type=int, default=Settings.steps, help="timed steps per strategy, wide-head case")
    p.add_argument("--gpt-steps", type=int, default=Settings.gpt_steps, help="timed steps per strategy, gpt case")
    p.add_argument("--rounds", type=int, default=Settings.rounds,
                   help="interleaved rounds over the strategies (each with --warmup steps first)")
    p.add_argument("--cases", default="wide-head,gpt", help="comma-separated: wide-head, gpt")
    p.add_argument("--quick", action="store_true", help="2 warm-up and 4 (gpt: 8) timed steps, loopback only")
    p.add_argument("--no-emulated", action="store_true", help="loopback only")
    p.add_argument("--gbit", type=float, default=1.0, help="the emulated nodes' link rate")
    p.add_argument("--reprofile", action="store_true",
                   help="profile the emulated cluster again instead of reusing out/sync_strategies_emulated_<gbit>g.*")
    p.add_argument("--wait-load", type=float, default=None,
                   help="before each run, wait (up to 15 min) until the 1-minute load average is below this")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    emulated = not (a.quick or a.no_emulated) and os.geteuid() == 0
    s = Settings(nproc=a.nproc, per_worker=a.per_worker, gpt=a.gpt, warmup=2 if a.quick else a.warmup,
                 steps=4 if a.quick else a.steps, gpt_steps=8 if a.quick else a.gpt_steps,
                 rounds=1 if a.quick else a.rounds)
    torch.set_num_threads(1)
    console = Console(width=160)
    records = []
    loop_cluster = local_cluster(s.nproc)
    loop_cost = CostModel(loop_cluster)
    console.print(f"loopback cases priced on {loop_cluster.name}: {loop_cost.source}")
    if emulated:
        emu_cluster, emu_cost = emulated_pricing(s, a.gbit, a.reprofile, console)
        console.print(f"emulated cases priced on {emu_cluster.name} (links measured through tbf {a.gbit:g} Gbit/s), "
                      f"compute: {emu_cost.source} at {s.nproc} ranks busy")
    wanted = a.cases.split(",")
    for case in [c for c in cases(s) if c.name in wanted]:
        wait_for_quiet(a.wait_load, console)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        plans = make_plans(case, s, loop_cluster, loop_cost)
        with tempfile.TemporaryDirectory() as out:
            res = run_ranks(bench_rank, s.nproc, case, s, {n: plan_to_json(pl) for n, pl in plans.items()}, out,
                            timeout_s=1800)[0]
        records.append(report(case, s, plans, res, "loopback (gloo)", console))
        records[-1].update(priced_on=loop_cluster.name, load_avg=(load0, os.getloadavg()[0]))
        console.print(f"  ({time.perf_counter() - t0:.0f} s, 1-minute load average {load0:.1f} -> {os.getloadavg()[0]:.1f},"
                      f" 4 of it this run's ranks)")
        if emulated:
            wait_for_quiet(a.wait_load, console)
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            plans = make_plans(case, s, emu_cluster, emu_cost)
            res = run_emulated(case, s, {n: plan_to_json(pl) for n, pl in plans.items()}, a.gbit, console)
            net = f"emulated 2 nodes x {s.nproc // 2} ranks, tbf {a.gbit:g} Gbit/s"
            rec = report(case, s, plans, res, net, console)
            rec.update(link_tcp_bytes_per_s=res["link_tcp_bytes_per_s"], load_avg=(load0, os.getloadavg()[0]),
                       priced_on=f"{emu_cluster.name}: " + "; ".join(emu_cluster.notes))
            records.append(rec)
            console.print(f"  ({time.perf_counter() - t0:.0f} s, 1-minute load average {load0:.1f} -> "
                          f"{os.getloadavg()[0]:.1f}, 4 of it this run's ranks)")
    taus = [r["kendall_tau"] for r in records]
    per_case = ", ".join(f"{r['case']} ({r['network']}) {r['kendall_tau']:+.3f}" for r in records)
    console.print(f"Kendall tau per case (medians): {per_case}; mean {statistics.mean(taus):+.3f} (target >= 0.6)")
    console.print("No constant of the cost model is fitted to these measurements (the machine's profile and the emulated "
                  "cluster's are measured by `plait profile`); the sync entries' formulas (docs/sync.md) were last "
                  "changed after looking at an earlier run of this benchmark.")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"settings": asdict(s), "cases": records, "emulated_cluster": emulated,
                       "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                   "load_avg": os.getloadavg()}}, f, indent=1)


if __name__ == "__main__":
    main()
