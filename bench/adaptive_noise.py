"""Which gradient noise scale explains AdamW's statistical efficiency? Plain against Adam-preconditioned, over a
fixed-batch run of one of ``bench/adaptive.py``'s tasks (issue 10, a diagnostic; no speed is compared).

One process trains the task at a fixed batch with AdamW, splitting each batch into --micro micro-batches whose
gradients give the unbiased estimates of |G|^2 and tr(Sigma) (per sample) each step, smoothed over steps:

* ``plain``: the gradients as they are (what ``plait.adaptive`` measures by default);
* ``P(1/v)``: each element times Adam's ``1 / (sqrt(v_hat) + eps)`` (Pollux's pre-conditioned noise scale,
  ``gns_preconditioned``): the squared norms weigh elements by ``1 / v_hat``;
* ``P(1/sqrt v)``: each element times the square root of that weight, so the squared norms weigh elements by
  Adam's own step factor ``1 / sqrt(v_hat)``.

Compare with the efficiency the fixed runs of ``bench/adaptive.py`` measure (samples to the target at one batch
over samples at another): the noise scale phi that makes ``(phi + M1) / (phi + M2)`` equal that ratio.

    python bench/adaptive_noise.py --task mlp --batch 512 --lr 6e-3 --json out/adaptive_noise_mlp.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from adaptive import TASKS, task_parts
from rich.console import Console
from rich.table import Table

WEIGHTINGS = ("plain", "P(1/v)", "P(1/sqrt v)")


class Smoothed:
    """Bias-corrected exponential moving averages by name."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.sums: dict[str, tuple[float, float]] = {}

    def add(self, name: str, value: float) -> None:
        """Fold one step's value in."""
        total, weight = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (self.decay * total + (1 - self.decay) * value, self.decay * weight + (1 - self.decay))

    def get(self, name: str) -> float:
        """The average so far."""
        total, weight = self.sums[name]
        return total / weight


def adam_weights(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """``1 / (sqrt(v_hat) + eps)`` of every element, flat, once the optimizer has stepped."""
    state = opt.state.get(params[0], {})
    if "exp_avg_sq" not in state:
        return None
    group = opt.param_groups[0]
    correction = 1 - group["betas"][1] ** float(state["step"])
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params]) / correction
    return 1.0 / (v.sqrt() + group["eps"])


def fold_in(stats: Smoothed, grads: torch.Tensor, weights: torch.Tensor | None, micro_size: int) -> None:
    """The step's unbiased |G|^2 and per-sample tr(Sigma) under each weighting, from K micro-batch gradients."""
    k = grads.shape[0]
    for name in WEIGHTINGS:
        g = grads
        if weights is not None and name != "plain":
            g = grads * (weights if name == "P(1/v)" else weights.sqrt())
        local = float((g**2).sum(1).mean())
        mean = float((g.mean(0) ** 2).sum())
        stats.add(name + " sqr", (k * mean - local) / (k - 1))
        stats.add(name + " var", micro_size * (local - mean) * k / (k - 1))


def run(task_name: str, batch: int, micro: int, lr: float, max_steps: int, every: int) -> list[dict[str, Any]]:
    """Train at ``batch`` until the task's target validation loss; the noise scales every ``every`` steps."""
    torch.manual_seed(0)
    model_fn, loss_fn, samples, val = task_parts(task_name)
    model = model_fn()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(5)
    stats = Smoothed(decay=0.98)
    rows = []
    for step in range(1, max_steps + 1):
        x, y = samples.take(torch.randint(0, len(samples), (batch,), generator=gen))
        grads = []
        for j in range(micro):
            opt.zero_grad()
            loss_fn(model, (x[j::micro], y[j::micro])).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        stacked = torch.stack(grads)
        fold_in(stats, stacked, adam_weights(opt, params), batch // micro)
        average = stacked.mean(0)
        offset = 0
        for p in params:
            p.grad = average[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                val_loss = float(loss_fn(model, val))
            row = {"step": step, "samples": step * batch, "val_loss": val_loss,
                   **{n: stats.get(n + " var") / max(stats.get(n + " sqr"), 1e-30) for n in WEIGHTINGS}}
            rows.append(row)
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            if val_loss <= TASKS[task_name].target:
                break
    return rows


def main() -> None:
    """Run one task and print the noise scales over training."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mlp", choices=sorted(TASKS))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--micro", type=int, default=8, help="micro-batches per step (the estimator's samples)")
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = run(a.task, a.batch, a.micro, a.lr, a.max_steps, a.every)
    table = Table(title=f"noise scales over a fixed-batch AdamW run: {a.task}, batch {a.batch}, lr {a.lr}")
    for col in ("step", "samples", "val loss", *WEIGHTINGS):
        table.add_column(col)
    for row in rows:
        table.add_row(str(row["step"]), str(row["samples"]), f"{row['val_loss']:.4f}", *(f"{row[n]:.1f}" for n in WEIGHTINGS))
    Console(width=160).print(table)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=1))
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
