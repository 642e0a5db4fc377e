"""Timing a callable: warm-up, several repeats of back-to-back calls, the median time per call."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Wall-clock timing on the CPU (``time.perf_counter``)."""

    name = "perf_counter"

    def __init__(self, device: torch.device, *, min_time_s: float = 2e-3) -> None:
        self.device = device
        self.min_time_s = min_time_s  # each timed window lasts at least this long

    def elapsed(self, fn: Callable[[], Any], inner: int) -> float:
        """Seconds for ``inner`` back-to-back calls of ``fn``."""
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return time.perf_counter() - start

    def synchronize(self) -> None:
        """Wait for queued device work (nothing to wait for on the CPU)."""

    def per_call(self, fn: Callable[[], Any], *, warmup: int, repeats: int, min_time_s: float | None = None) -> float:
        """Median seconds per call over ``repeats`` repeats of enough back-to-back calls to last ``min_time_s``."""
        min_time_s = self.min_time_s if min_time_s is None else min_time_s
        for _ in range(max(1, warmup)):
            fn()
        self.synchronize()
        first = max(self.elapsed(fn, 1), 1e-9)
        inner = max(1, min(10_000, math.ceil(min_time_s / first)))
        return statistics.median(self.elapsed(fn, inner) / inner for _ in range(max(1, repeats)))


class CudaTimer(Timer):
    """GPU timing with CUDA events around the back-to-back calls (the host only queues them)."""

    name = "cuda_event"

    def elapsed(self, fn: Callable[[], Any], inner: int) -> float:
        """Seconds between two events recorded on the current stream around ``inner`` calls."""
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds

    def synchronize(self) -> None:
        """Wait for every kernel queued on the device."""
        torch.cuda.synchronize(self.device)


def timer_for(device: torch.device) -> Timer:
    """The timer for ``device``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    return CudaTimer(device) if device.type == "cuda" else Timer(device)
