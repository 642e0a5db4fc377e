"""Fit the 7-parameter step-time model to measured step times (re-exported from ``plait.adaptive.throughput``).

The objective is Pollux's: the RMS error of log predicted vs log measured compute (accumulation) time,
plus that of the synchronising step time, plus two small regularisers; parameters the measurements
cannot identify are pinned (prior-driven exploration). See ``plait.adaptive.throughput``, which also
holds the CostModel prior and the online refit the Trainer uses: one implementation for both.
"""

from __future__ import annotations

from plait.adaptive.throughput import _Data, fit_perf_params, objective

__all__ = ["_Data", "fit_perf_params", "objective"]
