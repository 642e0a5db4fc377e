"""Token-level pipelining at scale (TeraPipe, ICML'21 §5): the best token slicing against micro-batch-only pipelining
for the GPT-3 settings of TeraPipe's evaluation on p3.16xlarge clusters, under plait's cost model.

Models (GPT-3 shapes, head dim 128): 1B = 24 layers / hidden 2048, 13B = 40 / 5120, 44B = 96 / 6144,
175B = 96 / 12288. Settings are (batch per pipeline B, tensor-parallel size, stages K, data-parallel size) as
TeraPipe's DP evaluation hard-codes them (192, 320, 384 and 384 V100s; 8 per p3.16xlarge), at 2,048 tokens; the
sequence sweep runs each model's deepest setting with tensor parallelism 8 at 2,048, 4,096 and 8,192 tokens with
B halved as the sequence doubles (never below 1) and, for 13B, the paper's long-sequence batches (B = 8, 4, 2 at
4,096, 6,144, 8,192); the fixed-batch rows keep B (13B at 8, 175B at 2) over 2,048, 4,096 and 8,192 tokens, so
that the growth with the sequence is seen apart from the shrinking batch.

Both sides are priced by one ``SliceCost`` (``plait.planners.token_cost``): a GPT block captured in fp16 at three
sequence lengths gives its FLOPs and memory traffic as polynomials in a slice's tokens and query-key pairs; a stage
of ``layers / K`` blocks (the embedding and the head left out, as TeraPipe's DP leaves them) runs forward and
backward on the CostModel of the cluster's datasheet (V100 fp16 peak at the default efficiency, memory traffic
added to it, kernel launches, Megatron-LM tensor parallelism inside the stage with its all-reduces on NVLink) and
sends each slice's activation on and its gradient back across nodes. Every slice reads the stage's weights again,
which the additive roofline charges in full, so short slices are priced high. A pipeline of cells (micro-batch,
slice) takes ``sum + (K - 1) * max`` (``plait.planners.token_slicing``):

- micro-batch-only: the best split of B into micro-batches of whole sequences (every size 1..B);
- token slicing: the joint DP over micro-batch sizes (powers of two up to B, B itself and the sizes the baseline
  chose, so it can always do what the baseline does) and token slices cut at multiples of ``L / 256`` tokens,
  ``t_max`` values within 10 us evaluated once (TeraPipe's eps).

Predictions only (nothing runs on GPUs): the pipeline's forward and backward, without the once-per-step gradient
all-reduce and optimizer step (the same on both sides), and without a memory check (the settings are the ones
TeraPipe ran; a GPipe-style pass keeps every cell's activations until its backward on both sides). The paper
measured 5.0x on GPT3-175B with 48 stages against Megatron-LM with micro-batch pipelining.

    python bench/token_pipeline_scale.py --json out/token_pipeline_scale.json
    python bench/token_pipeline_scale.py --quick          # three rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from plan_quality import _git_state  # noqa: E402

from plait.cluster import load_cluster  # noqa: E402
from plait.cost import CostModel  # noqa: E402
from plait.graph import capture  # noqa: E402
from plait.models import GPTConfig  # noqa: E402
from plait.models.gpt import Block  # noqa: E402
from plait.planners.token_cost import SliceCost, TokenWork, token_work  # noqa: E402
from plait.planners.token_slicing import SlicingResult, solve_joint  # noqa: E402

DTYPE = "fp16"  # V100s: TeraPipe trained in fp16
UNITS = 256  # slices are cut at multiples of L / 256 tokens (8 at 2,048, TeraPipe's granularity)
CAPTURE_LENGTHS = (128, 256, 512)
EPS_S = 1e-5  # t_max values within 10 us are evaluated once (TeraPipe's value): at most (K - 1) x 10 us above optimal
GPUS_PER_NODE = 8

# name -> (layers, hidden, heads)
MODELS: dict[str, tuple[int, int, int]] = {
    "1B": (24, 2048, 16),
    "13B": (40, 5120, 40),
    "44B": (96, 6144, 48),
    "175B": (96, 12288, 96),
}


@dataclass(frozen=True)
class Row:
    """One setting: a model, the batch per pipeline, tensor-parallel size, stages, data-parallel size, tokens."""

    model: str
    batch: int
    tp: int
    stages: int
    dp: int
    seq: int = 2048
    group: str = "paper"  # "paper": TeraPipe's settings at 2,048 tokens; "sweep", "fixed-batch": sequence sweeps

    @property
    def gpus(self) -> int:
        """Devices the setting uses."""
        return self.tp * self.stages * self.dp

    @property
    def label(self) -> str:
        """``175B L2048 (2,8,48,1)``."""
        return f"{self.model} L{self.seq} ({self.batch},{self.tp},{self.stages},{self.dp})"


PAPER = [(m, *s) for m, settings in {
    "1B": [(8, 1, 24, 8), (16, 1, 24, 8), (36, 8, 12, 2), (48, 8, 24, 1), (48, 8, 12, 2), (72, 8, 24, 1)],
    "13B": [(2, 1, 40, 8), (4, 1, 40, 8), (7, 1, 40, 8), (12, 8, 20, 2), (16, 8, 20, 2), (20, 8, 40, 1), (20, 8, 20, 2),
            (32, 8, 40, 1)],
    "44B": [(8, 8, 48, 1), (4, 8, 24, 2), (2, 1, 96, 4)],
    "175B": [(2, 8, 48, 1), (2, 4, 96, 1)],
}.items() for s in settings]
SWEEP_BASE = {"1B": (48, 8, 24, 1), "13B": (32, 8, 40, 1), "44B": (8, 8, 48, 1), "175B": (2, 8, 48, 1)}
SWEEP_13B = {4096: 8, 6144: 4, 8192: 2}  # TeraPipe's long-sequence batches (GPT3-13B, MP 8, 40 stages)
FIXED_BATCH = [("13B", 8, 8, 40, 1), ("175B", 2, 8, 48, 1)]  # the same batch at every length (the sweep's control)


def rows(quick: bool) -> list[Row]:
    """The paper's settings at 2,048 tokens, then the sequence sweep (``quick``: three rows)."""
    paper = [Row(m, b, t, k, d) for m, b, t, k, d in PAPER]
    sweep = []
    for model, (b, t, k, d) in SWEEP_BASE.items():
        lengths = (4096, 6144, 8192) if model == "13B" else (4096, 8192)
        for seq in lengths:
            batch = SWEEP_13B[seq] if model == "13B" else max(1, b * 2048 // seq)
            sweep.append(Row(model, batch, t, k, d, seq=seq, group="sweep"))
    fixed = [Row(m, b, t, k, d, seq=seq, group="fixed-batch") for m, b, t, k, d in FIXED_BATCH for seq in (2048, 4096, 8192)]
    if quick:
        return [Row("175B", 2, 8, 48, 1), Row("1B", 48, 8, 24, 1), Row("175B", 1, 8, 48, 1, seq=8192, group="sweep")]
    return paper + sweep + fixed


@cache
def block_work(model: str) -> TokenWork:
    """One fp16 GPT block of ``model`` captured at three sequence lengths, as polynomials in tokens and pairs."""
    _, hidden, heads = MODELS[model]
    graphs = []
    for s in CAPTURE_LENGTHS:
        cfg = GPTConfig(seq_len=s, num_layers=1, num_heads=heads, hidden=hidden)
        with torch.device("meta"):
            block = Block(cfg).half()
        x = torch.empty(1, s, hidden, device="meta", dtype=torch.float16)
        graphs.append(capture(block, (x,), name=f"gpt3-{model}-block", with_ops=False))
    return token_work(graphs)


def slice_cost(row: Row) -> SliceCost:
    """The stage's slice cost for ``row`` on ``p3.16xlarge`` nodes."""
    layers = MODELS[row.model][0]
    if layers % row.stages:
        raise ValueError(f"{row.label}: {layers} layers do not split into {row.stages} equal stages")
    cluster = load_cluster(f"p3.16xlarge:{-(-row.gpus // GPUS_PER_NODE)}")
    return SliceCost(work=block_work(row.model), cost=CostModel(cluster), num_layers=layers // row.stages, tp=row.tp,
                     dtype=DTYPE)


def whole_table(cost: SliceCost, micro: int, units: int, granularity: int) -> np.ndarray:
    """A table that allows only the unsliced sequence (micro-batch-only pipelining)."""
    table = np.full((units + 1, units + 1), np.inf)
    table[units, 0] = float(cost(micro, np.array([units * granularity]), np.array([0]))[0])
    return table


def token_sizes(batch: int, baseline: SlicingResult) -> list[int]:
    """Micro-batch sizes the token DP may use: powers of two up to B, B, and the baseline's."""
    sizes = {1 << i for i in range(batch.bit_length()) if 1 << i <= batch} | {batch}
    return sorted(sizes | {b for b, _ in baseline.slices})


@dataclass(frozen=True)
class Result:
    """One row's two pipelines and their ratio."""

    row: Row
    granularity: int
    layers_per_stage: int
    baseline_s: float
    baseline_micro: list[int]
    token_s: float
    token_slices: list[list[Any]]
    token_compact: str
    token_cells: int
    t_max_s: float
    speedup: float
    candidates: int
    dp_s: float
    tables_s: float


def run_row(row: Row) -> Result:
    """Price, search both pipelines, compare."""
    cost = slice_cost(row)
    g = row.seq // UNITS
    base = solve_joint({b: whole_table(cost, b, UNITS, g) for b in range(1, row.batch + 1)}, row.batch, row.stages,
                       granularity=g)
    t0 = time.perf_counter()
    tables = {b: cost.table(b, UNITS, g) for b in token_sizes(row.batch, base)}
    tables_s = time.perf_counter() - t0
    best = solve_joint(tables, row.batch, row.stages, granularity=g, eps=EPS_S)
    return Result(row=row, granularity=g, layers_per_stage=cost.num_layers, baseline_s=base.total_s,
                  baseline_micro=[b for b, _ in base.slices], token_s=best.total_s,
                  token_slices=[[b, list(s)] for b, s in best.slices], token_compact=best.compact(),
                  token_cells=best.num_cells, t_max_s=best.t_max, speedup=base.total_s / best.total_s,
                  candidates=best.num_candidates, dp_s=best.search_s, tables_s=tables_s)


def _micro_text(sizes: list[int]) -> str:
    """``4x2+1`` for micro-batch sizes [2, 2, 2, 2, 1]."""
    counts: dict[int, int] = {}
    for b in sizes:
        counts[b] = counts.get(b, 0) + 1
    return "+".join(f"{n}x{b}" if n > 1 else str(b) for b, n in sorted(counts.items(), reverse=True))


def report(results: list[Result]) -> dict[str, Any]:
    """Print the table; return the JSON record."""
    table = Table(title="Token slicing vs micro-batch-only pipelining (predicted, plait's cost model, p3.16xlarge)")
    for col in ("rows", "setting", "GPUs", "layers/stage", "g", "micro-batch only", "token slicing (micro-batch:[slices])",
                "t_max", "speedup", "DP cand.", "DP s"):
        table.add_column(escape(col), overflow="fold")
    for r in results:
        cells = (r.row.group, r.row.label, str(r.row.gpus), str(r.layers_per_stage), str(r.granularity),
                 f"{r.baseline_s * 1e3:.0f} ms [{_micro_text(r.baseline_micro)}]",
                 f"{r.token_s * 1e3:.0f} ms {r.token_compact}", f"{r.t_max_s * 1e3:.1f} ms", f"{r.speedup:.2f}x",
                 str(r.candidates), f"{r.dp_s:.2f}")
        table.add_row(*(escape(c) for c in cells))
    Console(width=220).print(table)
    return {
        "bench": "token_pipeline_scale",
        "git": _git_state(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dtype": DTYPE,
        "units": UNITS,
        "rows": [asdict(r) for r in results],
    }


def main() -> None:
    """Parse arguments, run every row, report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three rows")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    torch.set_num_threads(1)
    results = []
    selected = rows(a.quick)
    for i, row in enumerate(selected, 1):
        t0 = time.perf_counter()
        results.append(run_row(row))
        print(f"[{i}/{len(selected)}] {row.label}: {results[-1].speedup:.2f}x in {time.perf_counter() - t0:.1f} s",
              flush=True)
    record = report(results)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
