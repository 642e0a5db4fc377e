"""Token-level pipelining on 4 CPU ranks (issue 8, "Measured speedup"): micro-batch-only against token slicing.

A GPT (8 blocks, hidden 256, 4 heads, vocabulary 512) on 1,024 tokens at batch 1 runs as 4 pipeline stages on 4
gloo ranks of this machine (``embed, blocks.0-1 | blocks.2-3 | blocks.4-5 | blocks.6-7, head``), AdamW step
included. The rows are timed in the same process tree, their steps interleaved step by step so that load from
other processes falls on all of them alike:

- ``gpipe``: plait's pipeline runtime over torch.distributed.pipelining, one micro-batch (micro-batch-only
  pipelining: at batch 1 there is nothing to pipeline);
- ``1 slice``: plait's token pipeline with the whole sequence as one slice (the same, on the token runtime);
- ``token slices``: the token pipeline with the slicing ``plait.planners.token_slicing.slice_tokens`` chose on
  ``SliceCost``s of this machine's CostModel (``CostModel(local_cluster(4))``, calibrated by the profile
  ``plait profile`` measured, when there is one): each stage's layers from the layer view captured at three
  sequence lengths (``token_work``), the first slice's attention counted causally (SDPA's causal kernel skips
  masked tiles) and later slices' in full (an explicit mask computes every pair); the DP's cost of a cell is
  the slowest stage's;
- ``N equal slices`` (``--uniform N``): for comparison.

Predictions, all from the same CostModel: ``formula`` is the DP's ``sum + (K - 1) * max`` of the cells plus the
slowest stage's AdamW step, every rank computing at the cost model's own level (all 4 ranks busy at once);
``simulated`` runs per-stage programs (plait's token lowering, ``lower_token_pipeline``: each cell's forward, its boundary sent on, then each backward in reverse
order, then the optimizer) through plait's simulator, where CPU ranks share the cores and a rank that waits uses
none (``plait.sim.shared_cores``); ``sim + others' load`` is the same with the cores other processes kept busy
during the run (``/proc/stat``, rounded) counted as that many more ranks computing: a correction after the fact,
for a machine shared with other jobs. Measured: the median step (barrier to barrier) over the timed steps.

    python bench/token_pipeline.py --json out/token_pipeline.json        # about a minute
    python bench/token_pipeline.py --uniform 2,4                         # and rows of 2 and 4 equal slices
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from pipeline_fidelity import CpuUse, cpu_clock, cpu_since, others_cores  # noqa: E402

from plait.cluster import local_cluster  # noqa: E402
from plait.cost import CostModel  # noqa: E402
from plait.graph import ModelGraph, capture  # noqa: E402
from plait.models import GPT, GPTConfig, lm_batch, lm_loss  # noqa: E402
from plait.plan import BatchSpec, MeshSpec, Plan, RankProgram  # noqa: E402
from plait.plan.placement import REPLICATE  # noqa: E402
from plait.planners.token_cost import TokenWork, runtime_slice_cost, slowest_of, token_work  # noqa: E402
from plait.planners.token_slicing import SlicingResult, pipeline_time, slice_tokens  # noqa: E402
from plait.planners.token_slicing_lowering import TokenStageWork, lower_token_pipeline  # noqa: E402
from plait.runtime import init_distributed, run_ranks, teardown  # noqa: E402
from plait.runtime.pipeline import build_pipeline_rank  # noqa: E402
from plait.runtime.token_pipeline import build_token_pipeline_rank  # noqa: E402
from plait.sim import simulate  # noqa: E402

NPROC = 4
CONFIG = GPTConfig(vocab_size=512, seq_len=1024, num_layers=8, num_heads=4, hidden=256)
STAGES = [["embed", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3"], ["blocks.4", "blocks.5"],
          ["blocks.6", "blocks.7", "head"]]
GRANULARITY = 64  # slices are cut at multiples of 64 tokens (32 units)
LR = 1e-4


@dataclass(frozen=True)
class Row:
    """One way of running the pipeline: its slicing, predictions and measured step."""

    name: str
    runtime: str  # "torch pipelining (gpipe)" or "plait token pipeline"
    slicing: list[int]  # token slices of the one sequence
    formula_s: float
    simulated_s: float
    loaded_s: float  # simulated with the other processes' measured load as extra busy ranks (after the fact)
    measured_s: float
    measured_all_s: list[float]

    @property
    def error(self) -> float:
        """Relative error of the simulated prediction against the measurement."""
        return self.simulated_s / self.measured_s - 1.0


# ---- prediction --------------------------------------------------------------------------------------------------


def captures(cfg: GPTConfig) -> list[ModelGraph]:
    """The GPT's layer view captured on the meta device at a quarter, half and all of its sequence."""
    graphs = []
    for length in (cfg.seq_len // 4, cfg.seq_len // 2, cfg.seq_len):
        sized = GPTConfig(**{**asdict(cfg), "seq_len": length})
        with torch.device("meta"):
            model = GPT(sized)
        graphs.append(capture(model, lm_batch(sized, 1, device="meta"), loss_fn=lm_loss, with_ops=False, name="gpt"))
    return graphs


def stage_works(graphs: list[ModelGraph], stages: list[list[str]]) -> list[TokenWork]:
    """Each stage's work per token and query-key pair (its layers of the layer view)."""
    index = {layer.name: k for k, layer in enumerate(graphs[0].layers)}
    return [token_work(graphs, layers=[index[n] for n in names]) for names in stages]


def stage_params(graph: ModelGraph, stages: list[list[str]]) -> list[tuple[int, int]]:
    """(elements, tensors) of each stage's parameters."""
    out = []
    for names in stages:
        mine = [p for p in graph.params if any(p.name.startswith(n + ".") for n in names)]
        out.append((sum(p.numel for p in mine), len(mine)))
    return out


def stage_cost(work: TokenWork, cost: CostModel, last: bool) -> Any:
    """A stage's ``t(l, c)`` as the token runtime's kernels run it: the first slice (``c = 0``) through SDPA's causal
    kernel, which skips masked tiles (``SliceCost(causal_skip=True)``), later slices with an explicit mask, which
    computes every query-key pair of ``l x (c + l)`` (``causal_skip=False``): ``runtime_slice_cost``."""
    return runtime_slice_cost(work, cost, last_stage=last)


def slowest_stage(costs: list[Any]) -> Any:
    """The DP's cell cost: the slowest stage's time of a slice (the pipeline moves at its pace)."""
    return slowest_of(costs)


def formula_s(slowest: Any, cuts: list[int], num_stages: int) -> float:
    """``sum + (K - 1) * max`` of the cells of one sequence cut into ``cuts``."""
    starts = np.cumsum([0, *cuts[:-1]])
    return pipeline_time(slowest(1, np.array(cuts), starts).tolist(), num_stages)


def runs(cuts: list[int]) -> str:
    """``4x192,10x128``: the slice lengths, run-length encoded."""
    groups: list[list[int]] = []
    for n in cuts:
        if groups and groups[-1][1] == n:
            groups[-1][0] += 1
        else:
            groups.append([1, n])
    return ",".join(f"{k}x{n}" if k > 1 else str(n) for k, n in groups)


def stage_programs(works: list[TokenWork], params: list[tuple[int, int]], cuts: list[int]) -> tuple[RankProgram, ...]:
    """Every stage: every cell forward (receive, compute, send on), every cell backward in reverse order (receive the
    gradient, compute, send it back), then AdamW: what the token pipeline runs, from plait's token lowering."""
    stages = [TokenStageWork(work=w) for w in works]
    return lower_token_pipeline(stages, cuts, [(k,) for k in range(len(works))],
                                optimizer_numel=[n for n, _ in params], optimizer_tensors=[t for _, t in params])


class OthersLoad:
    """``cost`` as if ``extra`` more processes computed on the node beside the pipeline's ranks (read after the
    run, from what ``/proc/stat`` saw: a correction, not a prediction)."""

    def __init__(self, cost: CostModel, extra: int) -> None:
        self.cost = cost
        self.extra = extra

    def at_concurrency(self, level: int) -> CostModel:
        """The cost model read for ``level`` ranks plus the others computing at once."""
        return self.cost.at_concurrency(level + self.extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cost, name)


def simulated_step(works: list[TokenWork], params: list[tuple[int, int]], cuts: list[int], cost: CostModel,
                   graph: ModelGraph, extra: int = 0) -> float:
    """The step plait's simulator predicts for the stage programs of slicing ``cuts`` on ``cost`` (with ``extra``
    busy processes beside the ranks)."""
    programs = stage_programs(works, params, cuts)
    plan = Plan(model=graph, cluster=cost.cluster, mesh=MeshSpec(shape=(len(works),), axes=("pp",)),
                batch=BatchSpec(global_size=1, micro_size=1, placements=(REPLICATE,)), params=(), programs=programs)
    return simulate(plan, cast(CostModel, OthersLoad(cost, extra)) if extra else cost).prediction.step_s


# ---- measurement -------------------------------------------------------------------------------------------------


def measure_rank(slicings: dict[str, list[int] | None], warmup: int, steps: int) -> tuple[dict[str, list[float]], CpuUse]:
    """One rank: every row's runner on its own copy of the model, steps interleaved; step times per row."""
    init_distributed()
    runners: dict[str, Any] = {}
    for name, slicing in slicings.items():
        torch.manual_seed(0)
        model = GPT(CONFIG)
        if slicing is None:
            runners[name] = build_pipeline_rank(model, STAGES, pp=NPROC, dp=1, schedule="gpipe", num_micro=1, loss=lm_loss)
        else:
            runners[name] = build_token_pipeline_rank(model, STAGES, dp=1, slicing=[(1, slicing)], loss=lm_loss)
    opts = {name: torch.optim.AdamW(list(r.params.values()), lr=LR) for name, r in runners.items()}
    batch = lm_batch(CONFIG, 1, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in runners}
    start = cpu_clock()
    for i in range(warmup + steps):
        if i == warmup:
            start = cpu_clock()
        for name, runner in runners.items():
            dist.barrier()
            t0 = time.perf_counter()
            opts[name].zero_grad()
            runner.step(batch)
            opts[name].step()
            dist.barrier()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    used = cpu_since(start)
    dist.barrier()
    teardown()
    return times, used


# ---- report ------------------------------------------------------------------------------------------------------


def report(rows: list[Row], others: float, sliced: SlicingResult, cost: CostModel, search_s: float) -> dict[str, Any]:
    """Print the table and the speedups; the JSON record."""
    table = Table(title=f"token pipeline on this machine (local:4, gloo): GPT h{CONFIG.hidden} x {CONFIG.num_layers} "
                        f"blocks, {CONFIG.seq_len} tokens, batch 1, 4 stages")
    for col in ("row", "runtime", "slices (tokens)", "formula (ms)", "simulated (ms)", "sim + others' load (ms)",
                "measured (ms)", "sim err"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, r.runtime, runs(r.slicing), f"{r.formula_s * 1e3:.0f}", f"{r.simulated_s * 1e3:.0f}",
                      f"{r.loaded_s * 1e3:.0f}", f"{r.measured_s * 1e3:.0f}", f"{r.error:+.0%}")
    Console(width=200).print(table)
    by = {r.name: r for r in rows}
    base, tok = by["1 slice"], by["token slices"]
    speed = {"measured": base.measured_s / tok.measured_s, "simulated": base.simulated_s / tok.simulated_s,
             "formula": base.formula_s / tok.formula_s, "measured_vs_gpipe": by["gpipe"].measured_s / tok.measured_s}
    print(f"token slicing vs micro-batch-only (1 slice): measured {speed['measured']:.2f}x, simulated "
          f"{speed['simulated']:.2f}x, formula {speed['formula']:.2f}x; vs torch gpipe measured "
          f"{speed['measured_vs_gpipe']:.2f}x. Other processes kept {others:.2f} cores busy. Cost model: {cost.source}; "
          f"DP search {search_s:.2f} s, {sliced.num_candidates} t_max values.")
    return {"rows": [dict(asdict(r), error=r.error) for r in rows], "speedup": speed, "others_cores": others,
            "config": asdict(CONFIG), "stages": STAGES, "granularity": GRANULARITY, "cost_source": cost.source,
            "dp_slicing": sliced.compact(), "dp_search_s": search_s, "dp_candidates": sliced.num_candidates,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "load_avg": os.getloadavg()}}


def main() -> None:
    """Predict, measure and report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--uniform", default="", help="also run these numbers of equal slices, e.g. 2,4")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    cost = CostModel(local_cluster(NPROC))
    graphs = captures(CONFIG)
    works = stage_works(graphs, STAGES)
    params = stage_params(graphs[-1], STAGES)
    slowest = slowest_stage([stage_cost(w, cost, k == len(works) - 1) for k, w in enumerate(works)])
    sliced = slice_tokens(slowest, CONFIG.seq_len, len(STAGES), granularity=GRANULARITY, batch=1)
    slicings: dict[str, list[int] | None] = {"gpipe": None, "1 slice": [CONFIG.seq_len],
                                             "token slices": list(sliced.slices[0][1])}
    for n in (int(k) for k in a.uniform.split(",") if k):
        slicings[f"{n} equal slices"] = [CONFIG.seq_len // n] * (n - 1) + [CONFIG.seq_len - (n - 1) * (CONFIG.seq_len // n)]
    optimizer_s = max(cost.optimizer_time(n, num_tensors=t) for n, t in params)
    print(f"DP slicing: {sliced.compact()}; measuring {len(slicings)} rows on {NPROC} ranks ...", flush=True)
    out = run_ranks(measure_rank, NPROC, slicings, a.warmup, a.steps, timeout_s=1200)
    others = others_cores([u for _, u in out])
    extra = round(others) if others == others else 0  # NaN without /proc/stat
    rows = []
    for name, cuts in slicings.items():
        cuts = cuts or [CONFIG.seq_len]
        steps = [max(rank[0][name][k] for rank in out) for k in range(a.steps)]
        runtime = "torch pipelining (gpipe)" if name == "gpipe" else "plait token pipeline"
        rows.append(Row(name=name, runtime=runtime, slicing=cuts,
                        formula_s=formula_s(slowest, cuts, len(STAGES)) + optimizer_s,
                        simulated_s=simulated_step(works, params, cuts, cost, graphs[-1]),
                        loaded_s=simulated_step(works, params, cuts, cost, graphs[-1], extra),
                        measured_s=statistics.median(steps), measured_all_s=steps))
    record = report(rows, others, sliced, cost, sliced.search_s)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
