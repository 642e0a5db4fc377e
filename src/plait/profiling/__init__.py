"""Measuring the live machine (`plait profile`) and peak tensor memory of real runs."""

from plait.profiling.config import ProfileConfig, ProfilingError, default_config
from plait.profiling.memory import PeakMemory, live_tensor_bytes, track_peak_memory
from plait.profiling.run import measure_profile

__all__ = [
    "PeakMemory",
    "ProfileConfig",
    "ProfilingError",
    "default_config",
    "live_tensor_bytes",
    "measure_profile",
    "track_peak_memory",
]
