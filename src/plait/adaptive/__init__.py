"""Adaptive training (Pollux): gradient noise scale, statistical efficiency, learning-rate scaling and progress.

``noise``: the unbiased two-batch estimator of ``|G|^2`` and ``tr(Sigma)``; ``smoothing``: their
bias-corrected averages over steps and the noise scale; ``gradnorms``: the squared norms a step already
has (local before synchronisation, synchronised after), combined over ranks and shards with one small
all-reduce; ``efficiency``: efficiency and AdaScale gain of a batch size; ``scaling``: learning-rate rules
and scale-invariant progress; ``tracker``: the training loop's side (norms combined once per step, the learning-rate
factor around ``optimizer.step()``, progress and checkpoints); ``throughput``: the one step-time model
(Pollux's form, CostModel prior, online refit), also the scheduler's; ``goodput``: goodput and the
batch-size choice that maximises it. See docs/adaptive.md.
"""

from plait.adaptive.efficiency import (
    adascale_gain,
    noise_scale_efficiency,
    noise_scale_gain,
    statistical_efficiency,
)
from plait.adaptive.goodput import BatchChoice, BatchLimits, GoodputModel, GradParams, choose_batch
from plait.adaptive.gradnorms import GradNormProbe, all_reduce_sum, combine_norms, placed_grads, squared_norm
from plait.adaptive.noise import GradStats, NormSample, estimate, expected_sqnorm
from plait.adaptive.precondition import AdamPreconditioner
from plait.adaptive.scaling import LR_SCALING_RULES, Progress, lr_factor, resolve_lr_scaling
from plait.adaptive.smoothing import DEFAULT_SMOOTHING, ExpAverage, GradNoiseScale
from plait.adaptive.throughput import (
    PerfParams,
    Prior,
    ThroughputModel,
    cost_model_predictor,
    default_prior_configs,
    fit_perf_params,
    fit_prior,
)
from plait.adaptive.tracker import (
    DEFAULT_REDUCE_EVERY,
    AdaptiveStats,
    AdaptiveTracker,
    ProbeLayout,
    scaled_lr,
)

__all__ = [
    "AdamPreconditioner",
    "DEFAULT_REDUCE_EVERY",
    "DEFAULT_SMOOTHING",
    "LR_SCALING_RULES",
    "AdaptiveStats",
    "AdaptiveTracker",
    "BatchChoice",
    "BatchLimits",
    "ExpAverage",
    "GoodputModel",
    "GradNoiseScale",
    "GradNormProbe",
    "GradParams",
    "GradStats",
    "NormSample",
    "PerfParams",
    "Prior",
    "ProbeLayout",
    "Progress",
    "ThroughputModel",
    "adascale_gain",
    "all_reduce_sum",
    "choose_batch",
    "combine_norms",
    "cost_model_predictor",
    "default_prior_configs",
    "estimate",
    "expected_sqnorm",
    "fit_perf_params",
    "fit_prior",
    "lr_factor",
    "noise_scale_efficiency",
    "noise_scale_gain",
    "placed_grads",
    "resolve_lr_scaling",
    "scaled_lr",
    "squared_norm",
    "statistical_efficiency",
]
