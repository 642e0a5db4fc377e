"""The Plan IR: data that carries every planner decision to the simulator and the runtime."""

from plait.plan.io import load_plan, plan_from_json, plan_to_json, save_plan
from plait.plan.ir import (
    PLAN_VERSION,
    BatchSpec,
    Bucket,
    CandidateReport,
    DataParallelSpec,
    Instr,
    MemoryEstimate,
    MeshSpec,
    ParamPlan,
    Plan,
    Prediction,
    Provenance,
    RankProgram,
    ScheduleSpec,
    StageSpec,
    SyncSpec,
)
from plait.plan.table import plan_table, plan_text

__all__ = [
    "PLAN_VERSION",
    "BatchSpec",
    "Bucket",
    "CandidateReport",
    "DataParallelSpec",
    "Instr",
    "MemoryEstimate",
    "MeshSpec",
    "ParamPlan",
    "Plan",
    "Prediction",
    "Provenance",
    "RankProgram",
    "ScheduleSpec",
    "StageSpec",
    "SyncSpec",
    "load_plan",
    "plan_from_json",
    "plan_table",
    "plan_text",
    "plan_to_json",
    "save_plan",
]
