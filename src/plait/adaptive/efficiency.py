"""Statistical efficiency and the AdaScale gain of a batch size, from the gradient statistics (Pollux, OSDI'21 §3.1).

With ``sqr = |G|^2`` and ``var = tr(Sigma) / M0`` (the variance of a gradient over the reference batch
``M0``), a batch ``M = scale * M0`` has the AdaScale gain (Johnson et al., ICML'20)

    r = (var + sqr) / (var / scale + sqr)          in [1, scale]

which is how many ``M0``-batch steps one ``M``-batch step is worth, and the statistical efficiency

    efficiency = r / scale = (phi + M0) / (phi + M)     in (0, 1],   phi = tr(Sigma) / |G|^2.

These are the array functions the scheduler's goodput model (``plait.scheduler.goodput``) computes with
the same convention: where the gain is undefined (no statistics yet: ``var / scale + sqr <= 0``) it is 1.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from plait.errors import PlaitError

FloatArray = npt.NDArray[np.float64]


def _positive(name: str, value: npt.ArrayLike) -> FloatArray:
    array = np.asarray(value, dtype=np.float64)
    if not np.all(array > 0):  # also rejects NaN
        raise PlaitError(f"{name} must be positive, got {value!r}")
    return array


def adascale_gain(sqr: npt.ArrayLike, var: npt.ArrayLike, scale: npt.ArrayLike) -> FloatArray:
    """AdaScale gain ``(var + sqr) / (var / scale + sqr)`` of a batch ``scale`` x the reference batch (1 if undefined).

    ``sqr`` is ``|G|^2`` and ``var`` the variance ``tr(Sigma) / M0`` of a reference-batch gradient; negative
    estimates count as 0 (as AdaptDL clamps them).
    """
    ratio = _positive("scale (batch / reference batch)", scale)
    sqr_ = np.maximum(np.asarray(sqr, dtype=np.float64), 0.0)
    var_ = np.maximum(np.asarray(var, dtype=np.float64), 0.0)
    denom = var_ / ratio + sqr_
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.where(denom > 0, (var_ + sqr_) / denom, 1.0), dtype=np.float64)


def statistical_efficiency(sqr: npt.ArrayLike, var: npt.ArrayLike, scale: npt.ArrayLike) -> FloatArray:
    """Statistical efficiency ``gain / scale`` of a batch ``scale`` x the reference batch."""
    ratio = _positive("scale (batch / reference batch)", scale)
    return np.asarray(adascale_gain(sqr, var, ratio) / ratio, dtype=np.float64)


def noise_scale_efficiency(noise_scale: npt.ArrayLike, init_batch_size: float, batch_size: npt.ArrayLike) -> FloatArray:
    """Efficiency ``(phi + M0) / (phi + M)`` of batch ``M`` against ``M0`` from the noise scale ``phi`` (inf gives 1)."""
    sqr, var = _moments_of(noise_scale, init_batch_size)
    return statistical_efficiency(sqr, var, _positive("batch_size", batch_size) / init_batch_size)


def noise_scale_gain(noise_scale: npt.ArrayLike, init_batch_size: float, batch_size: npt.ArrayLike) -> FloatArray:
    """AdaScale gain ``(phi + M0) * M / ((phi + M) * M0)`` of batch ``M`` against ``M0`` from the noise scale ``phi``."""
    sqr, var = _moments_of(noise_scale, init_batch_size)
    return adascale_gain(sqr, var, _positive("batch_size", batch_size) / init_batch_size)


def _moments_of(noise_scale: npt.ArrayLike, init_batch_size: float) -> tuple[FloatArray, FloatArray]:
    """(sqr, var) with ``phi = M0 * var / sqr``: ``(1, phi / M0)``, or ``(0, 1)`` for an infinite ``phi``."""
    _positive("init_batch_size", init_batch_size)
    phi = np.asarray(noise_scale, dtype=np.float64)
    if np.any(np.isnan(phi)) or np.any(phi < 0):
        raise PlaitError(f"the noise scale must be >= 0 (inf allowed), got {noise_scale!r}")
    infinite = np.isinf(phi)
    sqr = np.where(infinite, 0.0, 1.0)
    var = np.where(infinite, 1.0, np.where(infinite, 0.0, phi) / init_batch_size)  # no inf / M0 is ever formed
    return sqr, var
