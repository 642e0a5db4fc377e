"""plait: automated, composable and adaptive distributed training for PyTorch."""

from plait.cluster import Cluster, load_cluster
from plait.errors import PlaitError
from plait.plan import Plan, load_plan, save_plan

__version__ = "0.1.0"

__all__ = ["Cluster", "Plan", "PlaitError", "__version__", "load_cluster", "load_plan", "save_plan"]
