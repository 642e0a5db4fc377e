"""Planners: pure functions from (graph, cluster, cost model, options) to a Plan."""

from plait.planners.auto import plan
from plait.planners.buckets import DEFAULT_BUCKET_BYTES, gradient_order, make_buckets, pack_greedy
from plait.planners.candidates import DEFAULT_BUCKET_SIZES, Option, Scored, micro_options, options, score
from plait.planners.data_parallel import DP_KINDS, batch_spec, build_dp_plan, dp_mesh

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_BUCKET_SIZES",
    "DP_KINDS",
    "Option",
    "Scored",
    "batch_spec",
    "build_dp_plan",
    "dp_mesh",
    "gradient_order",
    "make_buckets",
    "micro_options",
    "options",
    "pack_greedy",
    "plan",
    "score",
]
