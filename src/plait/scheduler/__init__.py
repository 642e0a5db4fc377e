"""Co-adaptive cluster scheduling: Pollux's goodput model, scheduling policies and a trace-driven simulator.

- ``goodput``/``fit``: the per-job model (7-parameter step time x statistical efficiency) and its fit;
- ``decisions``/``state``: what policies see and return, and the scheduler state machine;
- ``policies``: Pollux (genetic search over allocations), Optimus(+oracle), Tiresias, FIFO;
- ``sim``: the trace-driven simulator on the Pollux artifact's traces and workloads.
"""

from plait.scheduler.decisions import ClusterView, Decision, JobView, Policy, SchedulerError
from plait.scheduler.fit import fit_perf_params
from plait.scheduler.goodput import BatchLimits, GoodputModel, GradParams, PerfParams
from plait.scheduler.policies import (
    POLICY_NAMES,
    FifoPolicy,
    JobMode,
    OptimusPolicy,
    PolluxPolicy,
    TiresiasPolicy,
    make_policy,
)
from plait.scheduler.sim.metrics import JobResult, ScheduleResult, write_results_json
from plait.scheduler.sim.profiles import TraceError
from plait.scheduler.sim.simulator import SimConfig, Simulator, simulate_schedule
from plait.scheduler.sim.workload import load_workload
from plait.scheduler.state import JobPhase, SchedulerState, Transition

__all__ = [
    "POLICY_NAMES", "BatchLimits", "ClusterView", "Decision", "FifoPolicy", "GoodputModel", "GradParams",
    "JobMode", "JobPhase", "JobResult", "JobView", "OptimusPolicy", "PerfParams", "Policy", "PolluxPolicy",
    "ScheduleResult", "SchedulerError", "SchedulerState", "SimConfig", "Simulator", "TiresiasPolicy", "TraceError",
    "Transition", "fit_perf_params", "load_workload", "make_policy", "simulate_schedule", "write_results_json",
]
