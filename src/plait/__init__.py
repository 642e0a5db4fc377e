"""plait: automated, composable and adaptive distributed training for PyTorch.

``plait.plan(model, example_batch, cluster)`` chooses a plan; the Plan IR itself lives in the
``plait.plan`` package (``from plait.plan import Plan``).
"""

import plait.plan as _plan_ir  # noqa: F401  (binds the subpackage first; the planner function below takes its name)
from plait.cluster import Cluster, load_cluster
from plait.errors import PlaitError
from plait.graph import ModelGraph, capture
from plait.plan import Plan, load_plan, save_plan
from plait.planners import build_dp_plan
from plait.planners import plan as plan  # noqa: PLC0414
from plait.sim import simulate

__version__ = "0.1.0"

__all__ = [
    "Cluster",
    "ModelGraph",
    "Plan",
    "PlaitError",
    "__version__",
    "build_dp_plan",
    "capture",
    "load_cluster",
    "load_plan",
    "plan",
    "save_plan",
    "simulate",
]
