"""Fused p-values -> P(anomalous now), without labels (local fdr) and with them (isotonic).

A p-value says how rare a step would be if the entity were normal; an on-call engineer wants the
probability that it is not. That needs a model of how often, and how strongly, entities are
anomalous, which recent p-values themselves carry:

- :class:`LocalFdr` -- the two-group model (Efron 2001): recent p-values have density
  ``f(p) = pi0 * 1 + (1 - pi0) * f1(p)``, uniform for normal steps, concentrated near 0 for
  anomalous ones. Then ``P(anomalous | p) = 1 - pi0 / f(p)``, one minus the local false discovery
  rate. ``pi0`` is Storey's estimator; ``f`` the Grenander estimator (the maximum-likelihood
  non-increasing density), so the probability is non-increasing in ``p`` by construction.
- :class:`LabelledProbability` -- where feedback exists, the isotonic regression of the labels on
  ``-log p``: the calibration map learned from what engineers confirmed, used once enough labels
  of both kinds exist (else the caller keeps :class:`LocalFdr`).

Both evaluate a stored step / piecewise-linear function of at most ``max_knots`` knots, so their
state is bounded and JSON-ready, and a fitted and a reloaded object give identical probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit
from scipy.stats import gamma
from sklearn.isotonic import IsotonicRegression

#: Version of the ``state_dict`` layouts below.
STATE_VERSION = 1
#: p-values are clipped to ``[P_MIN, 1]`` before fitting or evaluating.
P_MIN = 1e-300


class InsufficientLabelsError(ValueError):
    """Too few labelled positives or negatives to fit :class:`LabelledProbability`."""


def _clean_p(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.clip(p, P_MIN, 1.0)


def _grenander_blocks(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grenander estimate of the density of ``p`` (sorted-or-not, in ``(0, 1]``) on ``[0, 1]``.

    The Grenander estimator is the left derivative of the least concave majorant of the ECDF;
    equivalently the antitonic regression of the naive densities ``count_j / (n gap_j)`` between
    consecutive distinct values, weighted by the gaps (Robertson, Wright & Dykstra 1988, ch. 7.2),
    which ``sklearn.isotonic.IsotonicRegression`` solves by pool-adjacent-violators in C. Ties
    share one gap; the stretch above the largest p-value is a gap with no count (density 0).

    Returns ``(right_edges, counts, widths)`` of the constant blocks, left to right.
    """
    values, counts = np.unique(p, return_counts=True)
    if values[-1] < 1.0:
        values = np.append(values, 1.0)
        counts = np.append(counts, 0)
    gaps = np.diff(values, prepend=0.0)
    heights = counts / (p.size * gaps)
    order = np.arange(values.size, dtype=np.float64)
    fitted = IsotonicRegression(increasing=False).fit_transform(order, heights, sample_weight=gaps)
    last_of_block = np.flatnonzero(np.append(fitted[1:] != fitted[:-1], True))
    first_of_block = np.concatenate([[0], last_of_block[:-1] + 1])
    block_counts = np.add.reduceat(counts, first_of_block)
    block_widths = np.add.reduceat(gaps, first_of_block)
    return values[last_of_block], block_counts, block_widths


def _merge_blocks(
    edges: np.ndarray, counts: np.ndarray, widths: np.ndarray, max_blocks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge adjacent blocks with the closest densities until at most ``max_blocks`` remain.

    A merged block's density is the count-weighted mean of its two, between theirs, so the step
    function stays non-increasing.
    """
    edges, counts, widths = list(edges), list(counts), list(widths)
    while len(edges) > max_blocks:
        log_density = np.log(np.asarray(counts) / np.asarray(widths) + 1e-300)
        i = int(np.argmin(log_density[:-1] - log_density[1:]))
        counts[i : i + 2] = [counts[i] + counts[i + 1]]
        widths[i : i + 2] = [widths[i] + widths[i + 1]]
        edges[i : i + 2] = [edges[i + 1]]
    return np.asarray(edges), np.asarray(counts), np.asarray(widths)


class LocalFdr:
    """P(anomalous | p) under the two-group model, fitted on recent p-values without labels.

    ``fit(p_recent)`` estimates

    - ``pi0``, the share of normal steps, by Storey's estimator with ``lambda = 0.5`` in its
      finite-sample form ``(1 + #{p > lambda}) / (n (1 - lambda))`` (Storey, Taylor & Siegmund
      2004), clipped to ``[pi0_min, 1]``: p-values above ``lambda`` are almost all normal, and
      normal p-values are uniform;
    - ``f`` by the Grenander estimator, with a guard: that estimator is inconsistent at ``p -> 0``
      (under pure uniform data ``sup_t F_n(t) / t`` exceeds ``x`` with probability ``1 / x``,
      Daniels 1945), so a handful of the smallest *normal* p-values would form a block of high
      density and get a high probability. Each block's density is therefore replaced by the
      one-sided ``confidence`` lower bound of its Poisson count, ``Gamma(count).ppf(1 -
      confidence) / (n width)``, and made non-increasing again by a running minimum: a block
      only counts as dense when its count proves it, which makes the probability conservative
      (never above the plain plug-in), and almost unchanged for the many-point blocks that real
      anomalies form near 0.

    ``probability(p) = clip(1 - pi0 / f(p), 0, 1)``, non-increasing in ``p``. ``f`` is constant
    below the smallest recent p-value, so a p-value far smaller than any recent one gets the
    probability of the smallest block: pass the current cycle's p-values in ``p_recent`` too.

    With fewer than ``min_samples`` p-values there is no density to estimate; the fallback is the
    Sellke-Bayarri-Berger calibration (Am. Stat. 2001) with the stated prior null share
    ``prior_null``: ``1 / (1 + pi0 / (1 - pi0) * B(p))`` with ``B(p) = -e p ln p`` for
    ``p < 1/e`` (else 1), the smallest Bayes factor for the null that any ``Beta(xi, 1)``
    alternative can give. With ``prior_null = 0.99`` (an anomalous step is a 1-in-100 event a
    priori): p = 1e-3 -> 0.35, 1e-4 -> 0.80, 1e-6 -> 0.996, and ``1 - prior_null`` for large p.
    """

    def __init__(
        self,
        storey_lambda: float = 0.5,
        min_samples: int = 50,
        prior_null: float = 0.99,
        pi0_min: float = 0.05,
        confidence: float = 0.95,
        max_knots: int = 256,
    ) -> None:
        if not 0 < storey_lambda < 1:
            raise ValueError(f"storey_lambda must be in (0, 1), got {storey_lambda}")
        if not 0 < prior_null < 1:
            raise ValueError(f"prior_null must be in (0, 1), got {prior_null}")
        if not 0 < pi0_min <= 1:
            raise ValueError(f"pi0_min must be in (0, 1], got {pi0_min}")
        if not 0.5 <= confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
        if max_knots < 2 or min_samples < 1:
            raise ValueError("max_knots must be >= 2 and min_samples >= 1")
        self.storey_lambda = float(storey_lambda)
        self.min_samples = int(min_samples)
        self.prior_null = float(prior_null)
        self.pi0_min = float(pi0_min)
        self.confidence = float(confidence)
        self.max_knots = int(max_knots)
        self.mode_: str | None = None
        self.n_: int = 0
        self.pi0_: float = self.prior_null
        self.edges_ = np.empty(0)
        self.density_ = np.empty(0)

    def fit(self, p_recent: np.ndarray) -> LocalFdr:
        """Fit on recent p-values (any shape; NaN ignored)."""
        p = _clean_p(np.asarray(p_recent, dtype=np.float64).ravel())
        p = p[np.isfinite(p)]
        self.n_ = int(p.size)
        if p.size < self.min_samples:
            self.mode_, self.pi0_ = "prior", self.prior_null
            self.edges_, self.density_ = np.empty(0), np.empty(0)
            return self
        above = np.count_nonzero(p > self.storey_lambda)
        pi0 = (1.0 + above) / (p.size * (1.0 - self.storey_lambda))
        self.pi0_ = float(np.clip(pi0, self.pi0_min, 1.0))
        edges, counts, widths = _merge_blocks(*_grenander_blocks(p), self.max_knots)
        lower = np.where(counts > 0, gamma.ppf(1.0 - self.confidence, np.maximum(counts, 1)), 0.0)
        self.edges_ = edges
        self.density_ = np.minimum.accumulate(lower / (p.size * widths))
        self.mode_ = "grenander"
        return self

    def probability(self, p: np.ndarray) -> np.ndarray:
        """P(anomalous | p) for p-values of any shape; float64 in [0, 1], NaN where p is NaN."""
        if self.mode_ is None:
            raise RuntimeError("LocalFdr is not fitted")
        p = _clean_p(p)
        if self.mode_ == "prior":
            with np.errstate(invalid="ignore"):
                bayes_factor = np.where(p < 1.0 / math.e, -math.e * p * np.log(p), 1.0)
            odds_null = self.pi0_ / (1.0 - self.pi0_) * bayes_factor
            out = 1.0 / (1.0 + odds_null)
        else:
            block = np.searchsorted(self.edges_, np.nan_to_num(p, nan=1.0), side="left")
            density = self.density_[np.minimum(block, self.density_.size - 1)]
            with np.errstate(divide="ignore"):
                out = np.clip(1.0 - self.pi0_ / density, 0.0, 1.0)
        return np.where(np.isnan(p), np.nan, out)

    def state_dict(self) -> dict[str, Any]:
        if self.mode_ is None:
            raise RuntimeError("LocalFdr is not fitted")
        return {
            "version": STATE_VERSION,
            "mode": self.mode_,
            "n": self.n_,
            "pi0": self.pi0_,
            "edges": self.edges_.tolist(),
            "density": self.density_.tolist(),
            "storey_lambda": self.storey_lambda,
            "min_samples": self.min_samples,
            "prior_null": self.prior_null,
            "pi0_min": self.pi0_min,
            "confidence": self.confidence,
            "max_knots": self.max_knots,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"LocalFdr state version {state.get('version')!r}, expected 1")
        self.storey_lambda = float(state["storey_lambda"])
        self.min_samples = int(state["min_samples"])
        self.prior_null = float(state["prior_null"])
        self.pi0_min = float(state["pi0_min"])
        self.confidence = float(state["confidence"])
        self.max_knots = int(state["max_knots"])
        self.mode_ = str(state["mode"])
        self.n_ = int(state["n"])
        self.pi0_ = float(state["pi0"])
        self.edges_ = np.asarray(state["edges"], dtype=np.float64)
        self.density_ = np.asarray(state["density"], dtype=np.float64)


class LabelledProbability:
    """P(anomalous | p) learned from labelled steps: isotonic regression of labels on ``-log p``.

    ``IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0, y_max=1)`` on
    ``x = -log p`` is the same fit as a decreasing one on ``p`` (isotonic regression is invariant
    under monotone transforms of ``x``); the log scale only makes the linear interpolation between
    knots follow orders of magnitude of evidence. It is the maximum-likelihood monotone calibration
    map, with no parametric shape assumed. Below ``min_positives`` anomalous or ``min_negatives``
    normal labels a step function on a handful of points is mostly noise, so :meth:`fit` raises
    :class:`InsufficientLabelsError` and the caller keeps :class:`LocalFdr`
    (:meth:`has_enough_labels` checks first).
    """

    def __init__(self, min_positives: int = 20, min_negatives: int = 20, max_knots: int = 256):
        if min_positives < 1 or min_negatives < 1 or max_knots < 2:
            raise ValueError("min_positives and min_negatives must be >= 1, max_knots >= 2")
        self.min_positives = int(min_positives)
        self.min_negatives = int(min_negatives)
        self.max_knots = int(max_knots)
        self.x_: np.ndarray | None = None
        self.y_ = np.empty(0)

    def has_enough_labels(self, labels: np.ndarray) -> bool:
        """Whether ``labels`` (bool, one per step) hold enough of both kinds to fit."""
        y = np.asarray(labels).astype(bool).ravel()
        positives = int(y.sum())
        return positives >= self.min_positives and y.size - positives >= self.min_negatives

    def fit(self, p: np.ndarray, labels: np.ndarray) -> LabelledProbability:
        """Fit on p-values and labels (True = anomalous), same shape; NaN p-values dropped."""
        p = np.asarray(p, dtype=np.float64).ravel()
        y = np.asarray(labels).astype(bool).ravel()
        if p.shape != y.shape:
            raise ValueError(f"p has {p.size} values but labels has {y.size}")
        keep = np.isfinite(p)
        p, y = p[keep], y[keep]
        if not self.has_enough_labels(y):
            raise InsufficientLabelsError(
                f"need >= {self.min_positives} anomalous and >= {self.min_negatives} normal "
                f"labelled steps, got {int(y.sum())} and {int((~y).sum())}"
            )
        iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(-np.log(_clean_p(p)), y.astype(np.float64))
        x, fitted = iso.X_thresholds_, iso.y_thresholds_
        if x.size > self.max_knots:
            picks = np.unique(np.rint(np.linspace(0, x.size - 1, self.max_knots)).astype(int))
            x, fitted = x[picks], fitted[picks]
        self.x_, self.y_ = np.asarray(x, dtype=np.float64), np.asarray(fitted, dtype=np.float64)
        return self

    def probability(self, p: np.ndarray) -> np.ndarray:
        """P(anomalous | p) for p-values of any shape; float64 in [0, 1], NaN where p is NaN."""
        if self.x_ is None:
            raise RuntimeError("LabelledProbability is not fitted")
        p = _clean_p(p)
        out = np.interp(-np.log(np.nan_to_num(p, nan=1.0)), self.x_, self.y_)
        return np.where(np.isnan(p), np.nan, out)

    def state_dict(self) -> dict[str, Any]:
        if self.x_ is None:
            raise RuntimeError("LabelledProbability is not fitted")
        return {
            "version": STATE_VERSION,
            "x": self.x_.tolist(),
            "y": self.y_.tolist(),
            "min_positives": self.min_positives,
            "min_negatives": self.min_negatives,
            "max_knots": self.max_knots,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"LabelledProbability state version {state.get('version')!r}, expected 1"
            )
        self.min_positives = int(state["min_positives"])
        self.min_negatives = int(state["min_negatives"])
        self.max_knots = int(state["max_knots"])
        self.x_ = np.asarray(state["x"], dtype=np.float64)
        self.y_ = np.asarray(state["y"], dtype=np.float64)


class BetaUniformMixture:
    """P(anomalous | p) under the beta-uniform mixture of p-values (Pounds & Morris 2003).

    ``f(p) = (1 - pi1) * 1 + pi1 * a * p**(a - 1)``: normal steps have uniform p-values,
    anomalous ones a Beta(a, 1) density piled up near 0. ``pi1`` and ``a`` are MAP estimates
    from the group's recent p-values, with a log-normal prior on ``a`` centred on
    ``prior_shape`` and ``pi1`` kept at or above ``min_anomalous``: when the recent p-values
    hold no anomaly to learn the shape from, a single extreme p-value is still judged against
    an alternative that concentrates near 0 (a Grenander or local-FDR estimate has no mass there
    until several anomalies were seen, and answers ~0 to the first one). Under the model the
    posterior is calibrated; the benchmark measures how far that holds on real data (ECE).
    """

    def __init__(
        self,
        prior_shape: float = 0.1,
        prior_shape_sd: float = 0.5,
        min_anomalous: float = 1e-3,
        max_shape: float = 0.95,
    ) -> None:
        self.prior_shape = prior_shape
        self.prior_shape_sd = prior_shape_sd
        self.min_anomalous = min_anomalous
        self.max_shape = max_shape
        self.anomalous_share_: float = min_anomalous
        self.shape_: float = prior_shape
        self.n_: int = 0

    def _unpack(self, theta: np.ndarray) -> tuple[float, float]:
        pi1 = self.min_anomalous + (0.5 - self.min_anomalous) * float(expit(theta[0]))
        shape = 1e-3 + (self.max_shape - 1e-3) * float(expit(theta[1]))
        return pi1, shape

    def fit(self, p: np.ndarray) -> BetaUniformMixture:
        values = np.asarray(p, np.float64).ravel()
        values = np.clip(values[np.isfinite(values)], 1e-300, 1.0)
        self.n_ = int(values.size)
        if values.size == 0:
            self.anomalous_share_, self.shape_ = self.min_anomalous, self.prior_shape
            return self
        log_p = np.log(values)
        log_prior = np.log(self.prior_shape)

        def negative_log_posterior(theta: np.ndarray) -> float:
            pi1, shape = self._unpack(theta)
            density = (1.0 - pi1) + pi1 * shape * np.exp((shape - 1.0) * log_p)
            penalty = (np.log(shape) - log_prior) ** 2 / (2 * self.prior_shape_sd**2)
            return float(-np.sum(np.log(density)) + penalty)

        start = np.array([-3.0, float(logit((self.prior_shape - 1e-3) / (self.max_shape - 1e-3)))])
        result = minimize(negative_log_posterior, start, method="Nelder-Mead")
        self.anomalous_share_, self.shape_ = self._unpack(result.x)
        return self

    def probability(self, p: np.ndarray) -> np.ndarray:
        """``(...)`` p-values -> P(anomalous | p), monotone non-increasing in p; NaN kept."""
        values = np.asarray(p, np.float64)
        clipped = np.clip(np.nan_to_num(values, nan=1.0), 1e-300, 1.0)
        alternative = (
            self.anomalous_share_ * self.shape_ * np.exp((self.shape_ - 1.0) * np.log(clipped))
        )
        probability = alternative / (alternative + (1.0 - self.anomalous_share_))
        return np.where(np.isnan(values), np.nan, probability)

    def state_dict(self) -> dict[str, float | int]:
        return {
            "anomalous_share": self.anomalous_share_,
            "shape": self.shape_,
            "n": self.n_,
            "prior_shape": self.prior_shape,
            "prior_shape_sd": self.prior_shape_sd,
            "min_anomalous": self.min_anomalous,
        }
