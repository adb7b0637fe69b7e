"""Fusing several detectors' p-values into one that stays valid when they are dependent.

The detectors of one entity look at the same data, so their p-values are strongly correlated;
Fisher's or Stouffer's rules assume independence, and the maximum of the scaled scores
(:func:`~aiops_plugin.calibration.threshold.fuse_scores`, i.e. the minimum p-value) raises the
false-alarm rate to up to the sum of the detectors' rates. The Cauchy combination test (Liu & Xie,
JASA 2020) maps each p-value to a standard Cauchy variate, ``tan((0.5 - p) pi)``, and averages
them: a weighted mean of standard Cauchy variables is standard Cauchy under independence and, in
the tail that matters for alarms, approximately so under arbitrary dependence (the tail of a sum
of Cauchy variables is driven by the largest one), so the combined p-value needs no estimate of
the correlation.
"""

from __future__ import annotations

import numpy as np

#: p-values are clipped to ``[P_MIN, P_MAX]`` so the Cauchy variates stay finite.
P_MIN = 1e-300
P_MAX = 1.0 - 1e-16


def cauchy_combination(p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Combined p-value of ``p`` ``(detectors, ...)`` by the Cauchy combination test.

    ``T = sum_i w_i tan((0.5 - p_i) pi)``, combined ``p = 0.5 - arctan(T) / pi``. ``weights``
    ``(detectors,)``, non-negative, normalised to sum 1 (equal by default). A NaN p-value is left
    out of its element with the remaining weights renormalised; an element with no finite input
    is NaN. Returns float64 of shape ``p.shape[1:]``.

    Numerics: ``tan((0.5 - p) pi) = cot(pi p)`` is computed as ``1 / tan(pi p)`` for ``p <= 0.5``
    and ``-1 / tan(pi (1 - p))`` above, exact near both ends (it is ``1 / (pi p)`` for tiny
    ``p``); for ``T > 0`` the result is ``arctan(1 / T) / pi``, which keeps full precision when
    the combined p-value is tiny instead of cancelling in ``0.5 - arctan(T) / pi``.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 0:
        raise ValueError("p must have a leading detectors axis")
    detectors = p.shape[0]
    w = np.ones(detectors) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (detectors,):
        raise ValueError(f"weights must have shape ({detectors},), got {w.shape}")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    w = (w / w.sum()).reshape((detectors,) + (1,) * (p.ndim - 1))
    defined = np.isfinite(p)
    w_eff = np.where(defined, w, 0.0)
    total = w_eff.sum(axis=0)
    q = np.clip(np.where(defined, p, 0.5), P_MIN, P_MAX)
    cauchy = np.where(q <= 0.5, 1.0 / np.tan(np.pi * q), -1.0 / np.tan(np.pi * (1.0 - q)))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (w_eff * cauchy).sum(axis=0) / total
        combined = np.where(t > 0, np.arctan(1.0 / t) / np.pi, 0.5 - np.arctan(t) / np.pi)
    return np.where(total > 0, np.clip(combined, P_MIN, 1.0), np.nan)
