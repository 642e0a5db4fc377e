"""The runtime: launch ranks, apply a Plan (WFBP replication, FSDP2, HSDP) and train with checkpoints."""

from plait.runtime.apply import AppliedPlan, apply_plan, build_mesh
from plait.runtime.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from plait.runtime.checks import PlanMismatchError, check_plan
from plait.runtime.context import DistContext, distributed, init_distributed, read_rank_env, teardown
from plait.runtime.data import DataSource, local_micro_batches
from plait.runtime.forkrun import run_ranks
from plait.runtime.launch import LaunchResult, RankExit, launch, launch_argv, raise_on_failure
from plait.runtime.metrics import METRICS_FILE, StepMetrics, read_metrics
from plait.runtime.trainer import FINAL_FILE, TrainConfig, Trainer, TrainResult
from plait.runtime.wfbp import StepTrace, WaitFreeReplicate

__all__ = [
    "FINAL_FILE",
    "METRICS_FILE",
    "AppliedPlan",
    "DataSource",
    "DistContext",
    "LaunchResult",
    "PlanMismatchError",
    "RankExit",
    "StepMetrics",
    "StepTrace",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WaitFreeReplicate",
    "apply_plan",
    "build_mesh",
    "check_plan",
    "checkpoint_dir",
    "distributed",
    "init_distributed",
    "latest_checkpoint",
    "launch",
    "launch_argv",
    "load_checkpoint",
    "local_micro_batches",
    "raise_on_failure",
    "read_metrics",
    "read_rank_env",
    "run_ranks",
    "save_checkpoint",
    "teardown",
]
