"""Elastic training: a job whose number of ranks changes while it runs (4 -> 2 -> 3), re-planned for each size.

``run_elastic(script, plan=..., out_dir=...)`` is ``plait run --elastic`` in Python: it launches the script's ranks
on ``plan``, and whenever the control file (default ``OUT/elastic.json``, ``{"nproc": N}``) or ``ElasticRun.resize``
asks for another number of ranks it re-plans the plan's recorded request (``plait.planners.request``) for that
many, lets the ranks checkpoint at a step boundary and restarts them there with resume. See docs/elastic.md.
"""

from __future__ import annotations

import os
from typing import Any

from plait.plan.io import load_plan
from plait.plan.ir import Plan
from plait.planners.request import PlanRequest, Replanner, replan, request_of
from plait.runtime.elastic import RESIZE_EXIT, RESIZE_SIGNAL
from plait.runtime.elastic_launch import (
    CONTROL_FILE,
    ElasticResult,
    ElasticRun,
    Replan,
    ResizeEvent,
    read_control,
)

__all__ = [
    "CONTROL_FILE",
    "RESIZE_EXIT",
    "RESIZE_SIGNAL",
    "ElasticResult",
    "ElasticRun",
    "PlanRequest",
    "Replan",
    "Replanner",
    "ResizeEvent",
    "elastic_run",
    "read_control",
    "replan_request",
    "run_elastic",
]


def replan_request(plan: Plan, nproc: int) -> Plan:
    """The default ``Replan``: the plan's recorded request planned again for ``nproc`` devices."""
    return replan(plan, nproc).plan


def elastic_run(script: str | os.PathLike[str], *, plan: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                replan_fn: Replan | None = None, **kwargs: Any) -> ElasticRun:
    """An ``ElasticRun`` of ``script`` (not started: call ``run()``, and ``resize(n)`` from another thread). Without
    ``replan_fn`` it re-plans the plan's recorded request, and refuses at once a plan that records none."""
    if replan_fn is None:
        request_of(load_plan(plan), where=f"plan {plan}")  # a clear error now, not at the first resize
        replan_fn = Replanner()  # keeps the model's captures and ILP results across this job's re-plans
    return ElasticRun(script, plan=plan, out_dir=out_dir, replan=replan_fn, **kwargs)


def run_elastic(script: str | os.PathLike[str], *, plan: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                replan_fn: Replan | None = None, **kwargs: Any) -> ElasticResult:
    """Run ``script`` elastically until training ends or a rank fails (see ``elastic_run``)."""
    return elastic_run(script, plan=plan, out_dir=out_dir, replan_fn=replan_fn, **kwargs).run()
