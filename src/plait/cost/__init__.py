"""The cost model: compute, communication and memory estimates shared by planners and the simulator."""

from plait.cost.comm import COLLECTIVE_OPS, CollectiveOp, p2p_time, ring_time, tree_time
from plait.cost.memory import OPTIMIZER_STATES, memory_estimate
from plait.cost.model import CostModel

__all__ = [
    "COLLECTIVE_OPS",
    "OPTIMIZER_STATES",
    "CollectiveOp",
    "CostModel",
    "memory_estimate",
    "p2p_time",
    "ring_time",
    "tree_time",
]
