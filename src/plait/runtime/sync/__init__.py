"""Per-parameter gradient synchronizers over torch.distributed, composable in one model, with byte accounting.

``AllReduceSync`` (wait-free buckets; fp16, bf16 or PowerSGD compression), ``ParameterServerSync`` (sharded,
co-located servers with SSP staleness), ``SFBSync`` (sufficient factors of ``nn.Linear`` layers) and
``build_model_sync``, which reads a SyncSpec per parameter and builds them. See docs/sync.md.
"""

from plait.runtime.sync.allreduce import AllReduceSync
from plait.runtime.sync.compose import ModelSync, Synchronizer, build_model_sync, plan_synchronizers
from plait.runtime.sync.counter import ByteCounter, merge_counts
from plait.runtime.sync.p2p import all_gather_flat, ring_all_reduce
from plait.runtime.sync.powersgd import PowerSGD
from plait.runtime.sync.ps import ParameterServerSync
from plait.runtime.sync.ps_server import Reply
from plait.runtime.sync.sfb import SFBSync

__all__ = [
    "AllReduceSync",
    "ByteCounter",
    "ModelSync",
    "ParameterServerSync",
    "PowerSGD",
    "Reply",
    "SFBSync",
    "Synchronizer",
    "all_gather_flat",
    "build_model_sync",
    "merge_counts",
    "plan_synchronizers",
    "ring_all_reduce",
]
