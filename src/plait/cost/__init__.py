"""The cost model: compute, communication and memory estimates shared by planners and the simulator."""

from plait.cost.comm import (
    COLLECTIVE_OPS,
    CollectiveOp,
    flat_time,
    hierarchical_time,
    p2p_time,
    ring_time,
    tree_time,
)
from plait.cost.memory import OPTIMIZER_STATES, check_optimizer, memory_estimate
from plait.cost.model import CostModel
from plait.cost.profile import Profile, ProfileError, load_profile, save_profile

__all__ = [
    "COLLECTIVE_OPS",
    "OPTIMIZER_STATES",
    "CollectiveOp",
    "CostModel",
    "Profile",
    "ProfileError",
    "check_optimizer",
    "flat_time",
    "hierarchical_time",
    "load_profile",
    "memory_estimate",
    "p2p_time",
    "ring_time",
    "save_profile",
    "tree_time",
]
