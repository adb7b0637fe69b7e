"""Raw detector scores -> tail p-values ``P(S >= s)`` under normal behaviour.

A detector's raw score has no unit; its tail probability on normal history does. The
:class:`TailCalibrator` is fitted on a *calibration slice* the detector did not train on (a
detector scores its own training data too well, so quantiles taken there would make every later
step look rare) and maps each raw score to the share of normal steps that score at least as high.
The p-value does not depend on the false-alarm rate, so the exported score
:func:`score_from_p` ``= log p / log rate`` can be put on any rate without a refit: 1.0 is exactly
``p = rate``, 2.0 is ``p = rate ** 2``.

**Pooled** (all the group's calibration scores, ``n`` of them):

- Body, wherever at least ``min_tail_count`` calibration scores lie at or above ``s``: the
  conformal p-value ``(1 + #{cal >= s}) / (n + 1)``, valid (never below the true tail) for
  exchangeable normal scores. The count is interpolated linearly between stored order
  statistics, which keeps it continuous and only ever raises it.
- Tail, beyond that: Peaks-Over-Threshold. Excesses over ``u`` = the ``1 - tail_fraction``
  quantile follow a generalized Pareto distribution (Pickands-Balkema-de Haan), fitted by maximum
  likelihood (``scipy.stats.genpareto.fit``, location fixed at 0); the p-value continues from the
  body's last value with that GPD's conditional tail, so it keeps falling smoothly beyond the
  largest calibration score. A conformal p-value alone stops at ``1 / (n + 1)``, which would cap
  the exported score at ``log(n + 1) / log(1 / rate)``. The GPD is fitted at ``u`` (where it has
  ``tail_fraction * n`` excesses) but used only where the counts run out: between ``u`` and there
  the empirical tail is exact and the GPD would add its model bias (fitted at the 5 % level, a
  lognormal's GPD overstates its 0.1 % tail, giving ~0.85x the nominal alarms). Guards: a shape
  below 0 (a bounded tail) is replaced by the exponential tail (the maximum-likelihood fit with
  shape 0), which only ever gives larger p-values; a shape above ``XI_MAX`` (an infinite-mean
  tail, in practice a few outliers) is refitted with the shape fixed there; fewer than
  ``min_gpd_exceedances`` excesses give the exponential tail with the mean excess as scale; no
  excess at all (every score tied at ``u``) an exponential tail with scale
  ``DEGENERATE_SCALE * max(|u|, 1)``, the relative margin :data:`TIE_MARGIN` uses for ties.

**Per entity**, shrinkage toward the pool rather than a hard switch, in two parts.

*Where the entity has counts of its own* (at or below ``s*``, its ``min_tail_count``-th largest
score): its own count ``k(s)`` of ``n`` calibration steps at or above ``s`` is Poisson with mean
``r * n * p_pool(s)``, ``r`` its tail risk relative to the pool, and ``r ~ Gamma(c, c)`` a priori
(mean 1). The posterior mean gives

    p_e(s) = p_pool(s) * (k(s) + c) / (n p_pool(s) + c) = (k(s) + c) / (n + c / p_pool(s)),

the Beta-binomial blend ``(k + m p_pool) / (n + m)`` with a prior worth ``m = c / p_pool(s)``
steps: ``c`` exceedances at every level. So at level ``p`` an entity's own tail outweighs the pool
once it has more than ``c / p`` calibration steps -- at the default false-alarm rate 0.001 and
``c = 1``, 1000 steps -- yet ``c`` is a number of exceedances, not a rate: changing the rate
refits nothing. A blend with a fixed ``m`` (steps) was tried first and rejected: next to one
entity at 10x the scale, the pool put hundreds of pseudo-exceedances on the normal entities'
tails, and none of their fresh normal draws reached ``p <= 0.001`` (a realised rate of 0.00).

``c`` is estimated from the group by empirical Bayes, the Gamma-Poisson model of disease mapping
(Clayton & Kaldor 1987; Marshall, Appl. Stat. 1991): the spread of the entities' counts above
``u`` around their pooled expectation, less its Poisson part, is the between-entity variance
``1 / c`` (:func:`_gamma_prior_shape`). A homogeneous group gives ``c`` up to
``PRIOR_EXCEEDANCES_MAX`` (entities are the pool, as they should be: a 20-step entity is within a
few percent of it); a heterogeneous one a small ``c``, down to ``PRIOR_EXCEEDANCES_MIN`` (each
entity mostly its own: 8 entities spanning a factor 4 in scale give ``c ~ 0.6``). Where an
entity sits far from the pool the pull is bounded by ``c`` pseudo-exceedances against its own
``min_tail_count``: a bias of ``(1 + c / min_tail_count)`` at most. Pass ``prior_exceedances``
to fix ``c`` instead.

*Beyond* ``s*``, the entity has no counts left; it keeps its level there and takes a tail shape
``log p_e(s) = log p_e(s*) + w log G_e(s - s*) + (1 - w) log(p_pool(s) / p_pool(s*))``: ``G_e``
is its own generalized Pareto tail with the pool's shape ``xi`` and its own scale (the
index-flood assumption of regional frequency analysis, Hosking & Wallis 1997: one shape for a
group, a scale per site -- the shape needs hundreds of excesses, the scale a few dozen), the
second term the pool's shape; ``w = e / (e + c)`` with ``e`` its own excesses over its threshold
``u_e`` (its ``tail_fraction`` quantile), so the same ``c`` decides. The scale at ``u_e`` is
``xi * median / (2**xi - 1)`` of its excesses (``median / ln 2`` at ``xi = 0``), the GPD median
solved for the scale (defined for any ``xi``, robust), moved to ``s*`` by threshold stability
``sigma(s*) = sigma(u_e) + xi (s* - u_e)``. The pool's shape alone (the first design) failed:
an entity below a pool dominated by a larger one inherited that one's flat tail and never
alarmed.

Every piece is non-increasing in ``s``, and continuous except at a tied calibration value (an
atom, where the tail itself jumps), and so is the result.

State is bounded: per entity ``n``, at most ``entity_knots`` (value, count) order statistics,
from rank ``n`` up to ``min_tail_count``, half geometrically spaced in rank (the tail), half
evenly (the bulk), plus one just above each tied one (:func:`_survival_knots`), and its tail
scale and excess count; the pool keeps ``pool_knots`` of them plus the GPD's three numbers.

No conformal library is used: ``crepes`` (0.9.1) needs pandas and keeps every calibration score
(its Mondrian bins are the hard per-entity switch this replaces), ``nonconform`` needs
Python >= 3.12, and ``mapie`` is about prediction intervals; the conformal p-value itself is one
``searchsorted``, and none of them offers the GPD tail, the shrinkage or bounded state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import genpareto

from aiops_plugin.calibration.threshold import TIE_MARGIN

#: Version of :meth:`TailCalibrator.state_dict`'s layout.
STATE_VERSION = 1
#: How the p-values are made, in one line (stored with each calibration version).
TAIL_METHOD = (
    "conformal body + generalized Pareto (POT) tail, per-entity Gamma-Poisson shrinkage "
    "toward the pooled tail (empirical-Bayes prior)"
)
#: Range the empirical-Bayes prior strength ``c`` (pseudo-exceedances) is held in.
PRIOR_EXCEEDANCES_MIN = 0.5
PRIOR_EXCEEDANCES_MAX = 1000.0
#: Expected pooled-threshold exceedances an entity needs to vote in the estimate of ``c``.
MIN_EXPECTED_FOR_PRIOR = 5.0
#: Smallest p-value returned: ``log`` of it stays finite, so the exported score does too.
TINY_P = float(np.finfo(np.float64).tiny)
#: Largest GPD shape kept; above it (infinite mean) the fit is redone with the shape fixed here.
XI_MAX = 1.0
#: Excesses used for the GPD fit at most (evenly spaced order statistics of all of them).
MAX_GPD_FIT_SAMPLES = 10_000
#: Relative exponential scale of a tail that no calibration score exceeds (see TIE_MARGIN).
DEGENERATE_SCALE = TIE_MARGIN
#: Comparisons per chunk in the batched per-entity interpolation (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 22


def _check_rate(false_alarm_rate: float) -> float:
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    return float(false_alarm_rate)


def score_from_p(p: np.ndarray | float, false_alarm_rate: float) -> np.ndarray:
    """Exported score ``log p / log rate``: 0 at ``p = 1``, 1.0 at ``p = rate``, 2.0 at ``rate**2``.

    ``p`` any shape, probabilities (clipped to ``[TINY_P, 1]``); NaN passes through. float64.
    """
    rate = _check_rate(false_alarm_rate)
    p = np.clip(np.asarray(p, dtype=np.float64), TINY_P, 1.0)
    return np.log(p) / math.log(rate) + 0.0


def p_from_score(score: np.ndarray | float, false_alarm_rate: float) -> np.ndarray:
    """Inverse of :func:`score_from_p`: ``rate ** score``, capped at 1; NaN passes through."""
    rate = _check_rate(false_alarm_rate)
    return np.minimum(np.exp(np.asarray(score, dtype=np.float64) * math.log(rate)), 1.0)


def _survival_knots(
    sorted_x: np.ndarray, top_count: int, max_knots: int
) -> tuple[np.ndarray, np.ndarray]:
    """Order statistics of ``sorted_x`` (ascending, finite) with their counts ``#{x >= value}``.

    Ranks (counted from the top) from ``top_count`` to ``n``, half of them geometrically spaced,
    which resolves the tail (a constant relative step in the count), half evenly, which resolves
    the bulk and the lower end: at most ``max_knots``. Tied values share one knot whose count
    includes all of them, and a tied value below the last knot also brings a knot one float
    above it, where the count is the exact ``#{x > value}``: an atom (e.g. a log score that is 0
    at most steps) is a jump of the tail, not a slope interpolated across to the next knot. At
    most ``2 * max_knots``. Returns ``(values ascending, counts descending)``.
    """
    n = sorted_x.size
    geometric = np.geomspace(top_count, n, max_knots // 2)
    even = np.linspace(top_count, n, max_knots - max_knots // 2)
    ranks = np.unique(np.rint(np.concatenate([geometric, even])).astype(np.int64))
    values = np.unique(sorted_x[n - ranks])
    first = np.searchsorted(sorted_x, values, side="left")
    after = np.searchsorted(sorted_x, values, side="right")
    tied = (after - first > 1) & (values < values[-1])
    values = np.union1d(values, np.nextafter(values[tied], np.inf))
    counts = n - np.searchsorted(sorted_x, values, side="left")
    return values, counts


def _degenerate_scale(threshold: float) -> float:
    return DEGENERATE_SCALE * max(abs(threshold), 1.0)


def _fit_excesses(
    excess: np.ndarray, min_gpd: int, degenerate_scale: float
) -> tuple[float, float, str]:
    """``(shape xi >= 0, scale, kind)`` of the tail of the sorted positive excesses over ``u``."""
    if excess.size == 0:
        return 0.0, degenerate_scale, "degenerate"
    mean_excess = float(excess.mean())
    if excess.size < min_gpd:
        return 0.0, mean_excess, "exponential"
    if excess.size > MAX_GPD_FIT_SAMPLES:
        picks = (np.arange(MAX_GPD_FIT_SAMPLES) + 0.5) * excess.size / MAX_GPD_FIT_SAMPLES
        excess = excess[picks.astype(np.int64)]
    xi, _, sigma = genpareto.fit(excess, floc=0.0)
    if not (np.isfinite(xi) and np.isfinite(sigma) and sigma > 0) or xi < 0:
        return 0.0, mean_excess, "exponential"
    if xi > XI_MAX:
        xi, _, sigma = genpareto.fit(excess, f0=XI_MAX, floc=0.0)
    return float(xi), float(sigma), "gpd"


def _gpd_scale_from_median(median_excess: float, xi: float) -> float:
    """GPD scale with shape ``xi`` whose median excess is ``median_excess``."""
    if xi < 1e-9:
        return median_excess / math.log(2.0)
    return xi * median_excess / (2.0**xi - 1.0)


def _gamma_prior_shape(observed: np.ndarray, expected: np.ndarray) -> float:
    """Shape ``c`` of a Gamma(c, c) prior on entities' relative tail risk, by moments.

    ``observed``: each entity's count above the pooled threshold; ``expected``: its count were it
    the pool. With ``r = observed / expected``, ``E[(r - 1)^2 - r / expected]`` is the prior's
    variance ``1 / c`` (the subtracted term is the Poisson part of the spread), averaged with
    one vote per entity: Marshall's (Appl. Stat. 1991) global estimator weights by ``expected``,
    which would let one entity holding most of the pool set the heterogeneity for all others.
    Entities expecting fewer than ``MIN_EXPECTED_FOR_PRIOR`` counts are left out (their ratio is
    mostly noise). No spread left (a homogeneous group, a single entity) gives the largest ``c``,
    i.e. pooling.
    """
    keep = expected >= MIN_EXPECTED_FOR_PRIOR
    if np.count_nonzero(keep) < 2:
        return PRIOR_EXCEEDANCES_MAX
    ratio = observed[keep] / expected[keep]
    between = float(np.mean((ratio - 1.0) ** 2 - ratio / expected[keep]))
    if between <= 1.0 / PRIOR_EXCEEDANCES_MAX:
        return PRIOR_EXCEEDANCES_MAX
    return float(np.clip(1.0 / between, PRIOR_EXCEEDANCES_MIN, PRIOR_EXCEEDANCES_MAX))


class _Entity(NamedTuple):
    """One entity's calibration summary (see the module docstring)."""

    n: int  # calibration steps with a score
    values: np.ndarray  # (knots,) order statistics, ascending; the last is s*
    counts: np.ndarray  # (knots,) #{own scores >= value}
    tail_scale: float  # GPD scale of its own excesses over s*, pool's shape
    tail_excesses: int  # its own excesses over u_e that the scale was estimated from


class TailCalibrator:
    """Raw scores -> p-values ``P(S >= s)`` under normal behaviour, per entity and pooled.

    Args:
        tail_fraction: share of calibration scores above the POT threshold (pooled ``u``, and
            each entity's ``u_e``).
        prior_exceedances: ``c``, the pool's weight in an entity's estimate, in exceedances at
            every level; None estimates it from the group (empirical Bayes, module docstring).
        entity_knots: order statistics kept per entity (state size per entity).
        pool_knots: order statistics kept for the pooled body.
        min_tail_count: calibration scores at or above ``s`` (an entity's own; all of them for
            the pool) needed for the empirical counts to be used there; beyond, the tail is
            extrapolated.
        min_gpd_exceedances: pooled excesses over ``u`` needed for a GPD fit (else exponential).
    """

    def __init__(
        self,
        tail_fraction: float = 0.05,
        prior_exceedances: float | None = None,
        entity_knots: int = 64,
        pool_knots: int = 512,
        min_tail_count: int = 10,
        min_gpd_exceedances: int = 30,
    ) -> None:
        if not 0 < tail_fraction < 1:
            raise ValueError(f"tail_fraction must be in (0, 1), got {tail_fraction}")
        if prior_exceedances is not None and not prior_exceedances > 0:
            raise ValueError(f"prior_exceedances must be > 0, got {prior_exceedances}")
        if entity_knots < 2 or pool_knots < 2:
            raise ValueError("entity_knots and pool_knots must be >= 2")
        if min_tail_count < 1 or min_gpd_exceedances < 1:
            raise ValueError("min_tail_count and min_gpd_exceedances must be >= 1")
        self.tail_fraction = float(tail_fraction)
        self.prior_exceedances = None if prior_exceedances is None else float(prior_exceedances)
        self.entity_knots = int(entity_knots)
        self.pool_knots = int(pool_knots)
        self.min_tail_count = int(min_tail_count)
        self.min_gpd_exceedances = int(min_gpd_exceedances)
        self.pool_: dict[str, Any] | None = None
        self.entities_: dict[str, _Entity] = {}
        self.prior_exceedances_: float = math.nan

    # --- fitting ---------------------------------------------------------------------------

    def fit(self, raw: np.ndarray, keys: list[str]) -> TailCalibrator:
        """Fit on calibration scores ``raw`` ``(entities, time)``; NaN = unscored step, ignored.

        ``keys``: one entity key per row, unique. Rows without a finite score are left to the
        pool, as are keys first seen after the fit.
        """
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[0] != len(keys):
            raise ValueError(f"raw must be (entities, time) with {len(keys)} rows, got {raw.shape}")
        if len(set(keys)) != len(keys):
            raise ValueError("keys must be unique")
        finite = raw[np.isfinite(raw)]
        if finite.size == 0:
            raise ValueError("no finite calibration scores: cannot fit a TailCalibrator")
        self.pool_ = self._fit_pool(np.sort(finite))
        self.entities_ = {}
        observed = []
        for key, row in zip(keys, raw, strict=True):
            row = np.sort(row[np.isfinite(row)])
            if row.size:
                self.entities_[key] = self._fit_entity(row)
                observed.append(row.size - np.searchsorted(row, self.pool_["threshold"], "right"))
        if self.prior_exceedances is None:
            share = self.pool_["exceedances"] / self.pool_["n"]
            expected = np.array([entity.n for entity in self.entities_.values()]) * share
            self.prior_exceedances_ = _gamma_prior_shape(np.asarray(observed), expected)
        else:
            self.prior_exceedances_ = self.prior_exceedances
        self._pack()
        return self

    def _fit_pool(self, x: np.ndarray) -> dict[str, Any]:
        """Pooled knots and POT tail of the sorted finite calibration scores ``x``."""
        n = x.size
        u = float(np.quantile(x, 1.0 - self.tail_fraction))
        above_u = n - int(np.searchsorted(x, u, side="right"))
        at_or_above_u = n - int(np.searchsorted(x, u, side="left"))
        top = max(1, min(self.min_tail_count, at_or_above_u))
        values, counts = _survival_knots(x, top, self.pool_knots)
        xi, sigma, kind = _fit_excesses(
            x[n - above_u :] - u, self.min_gpd_exceedances, _degenerate_scale(u)
        )
        return {
            "n": n,
            "values": values,
            "counts": counts,
            "threshold": u,
            "exceedances": above_u,
            "shape": xi,
            "scale": sigma,
            "tail": kind,
        }

    def _fit_entity(self, row: np.ndarray) -> _Entity:
        """Knots and own tail scale of one entity's sorted finite calibration scores."""
        n = row.size
        top = min(self.min_tail_count, n)
        values, counts = _survival_knots(row, top, self.entity_knots)
        u_e = row[n - max(top, math.ceil(self.tail_fraction * n))]
        excess = row[row > u_e] - u_e
        xi = self.pool_["shape"]
        scale = _degenerate_scale(float(u_e))
        if excess.size:
            at_u = _gpd_scale_from_median(float(np.median(excess)), xi)
            scale = max(at_u + xi * float(values[-1] - u_e), scale)
        return _Entity(n, values, counts, scale, int(excess.size))

    def _pack(self) -> None:
        """Per-entity knots as padded arrays, and each entity's tail beyond ``s*``."""
        entities = list(self.entities_.values())
        self._index = {key: i for i, key in enumerate(self.entities_)}
        width = max([2] + [entity.values.size for entity in entities])
        self._values = np.full((len(entities), width), np.inf)
        self._counts = np.zeros((len(entities), width))
        for i, entity in enumerate(entities):
            self._values[i, : entity.values.size] = entity.values
            self._counts[i, : entity.counts.size] = entity.counts
        self._n = np.array([entity.n for entity in entities], dtype=np.float64)
        self._s_star = np.array([entity.values[-1] for entity in entities], dtype=np.float64)
        self._tail_scale = np.array([entity.tail_scale for entity in entities], dtype=np.float64)
        excesses = np.array([entity.tail_excesses for entity in entities], dtype=np.float64)
        self._own_weight = excesses / (excesses + self.prior_exceedances_)
        last = np.array([entity.counts[-1] for entity in entities], dtype=np.float64)
        self._pool_log_p_star = self._pooled_log_p(self._s_star)
        self._log_p_star = self._blend(last, self._n, self._pool_log_p_star)

    # --- scoring ---------------------------------------------------------------------------

    def _blend(self, own: np.ndarray, n: np.ndarray, pooled_log_p: np.ndarray) -> np.ndarray:
        """``log((k + c) / (n + c / p_pool))``: the entity's posterior tail where it has counts."""
        c = self.prior_exceedances_
        return np.log(own + c) - np.logaddexp(np.log(n), math.log(c) - pooled_log_p)

    def _pooled_log_p(self, s: np.ndarray) -> np.ndarray:
        """``log p_pool(s)`` for finite or infinite ``s`` (no NaN), any shape."""
        pool = self.pool_
        assert pool is not None
        values, counts, u = pool["values"], pool["counts"], pool["threshold"]
        out = np.empty(s.shape, dtype=np.float64)
        body = s <= values[-1]
        out[body] = np.log((1.0 + np.interp(s[body], values, counts)) / (pool["n"] + 1.0))
        shape, scale = pool["shape"], pool["scale"]
        level = math.log((1.0 + counts[-1]) / (pool["n"] + 1.0))
        level -= float(genpareto.logsf(values[-1] - u, shape, scale=scale))
        out[~body] = level + genpareto.logsf(s[~body] - u, shape, scale=scale)
        return out

    def _entity_counts(self, s: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Own counts ``k(s)`` interpolated between knots, ``s`` ``(len(rows), T)`` below ``s*``."""
        values, counts = self._values[rows], self._counts[rows]
        s = np.maximum(s, values[:, :1])
        out = np.empty(s.shape, dtype=np.float64)
        width = values.shape[1]
        chunk = max(1, _CHUNK_ELEMENTS // max(1, rows.size * width))
        for start in range(0, s.shape[1], chunk):
            part = s[:, start : start + chunk]
            upper = (values[:, None, :] <= part[:, :, None]).sum(axis=-1).clip(1, width - 1)
            lower = upper - 1
            v_lo = np.take_along_axis(values, lower, axis=1)
            v_hi = np.take_along_axis(values, upper, axis=1)
            c_lo = np.take_along_axis(counts, lower, axis=1)
            c_hi = np.take_along_axis(counts, upper, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.clip((part - v_lo) / (v_hi - v_lo), 0.0, 1.0)
            out[:, start : start + chunk] = c_lo + np.nan_to_num(frac) * (c_hi - c_lo)
        return out

    def _entity_log_p(self, s: np.ndarray, pooled: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``log p_e(s)`` for ``s`` ``(len(rows), T)`` given ``log p_pool(s)`` of the same shape."""
        star = self._s_star[rows, None]
        below = self._blend(self._entity_counts(s, rows), self._n[rows, None], pooled)
        own_tail = genpareto.logsf(
            np.maximum(s - star, 0.0), self.pool_["shape"], scale=self._tail_scale[rows, None]
        )
        weight = self._own_weight[rows, None]
        with np.errstate(invalid="ignore"):
            own_term = np.where(weight > 0, weight * own_tail, 0.0)
        beyond = (
            self._log_p_star[rows, None]
            + own_term
            + (1.0 - weight) * (pooled - self._pool_log_p_star[rows, None])
        )
        return np.where(s < star, below, beyond)

    def p_values(self, raw: np.ndarray, keys: list[str]) -> np.ndarray:
        """p-values ``P(S >= raw)`` of raw scores ``(entities, ...)``, one key per row.

        float64 in ``[TINY_P, 1]``, the shape of ``raw``; NaN where ``raw`` is NaN. Keys not seen
        at fit use the pooled estimate.
        """
        if self.pool_ is None:
            raise RuntimeError("TailCalibrator is not fitted")
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim == 0 or raw.shape[0] != len(keys):
            raise ValueError(f"raw must have one row per key ({len(keys)}), got shape {raw.shape}")
        if raw.size == 0:
            return np.empty(raw.shape, dtype=np.float64)
        s = raw.reshape(len(keys), -1)
        missing = np.isnan(s)
        s = np.where(missing, 0.0, s)
        log_p = self._pooled_log_p(s)
        known = np.array([key in self._index for key in keys], dtype=bool)
        if known.any():
            rows = np.array([self._index[key] for key in keys if key in self._index])
            log_p[known] = self._entity_log_p(s[known], log_p[known], rows)
        with np.errstate(invalid="ignore"):
            p = np.clip(np.exp(log_p), TINY_P, 1.0)
        p[missing] = np.nan
        return p.reshape(raw.shape)

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: plain lists, ints, strings and finite floats (``null`` if unset)."""
        if self.pool_ is None:
            raise RuntimeError("TailCalibrator is not fitted")
        pool = self.pool_
        entities = list(self.entities_.values())
        return {
            "version": STATE_VERSION,
            "tail_fraction": self.tail_fraction,
            "prior_exceedances": self.prior_exceedances,
            "entity_knots": self.entity_knots,
            "pool_knots": self.pool_knots,
            "min_tail_count": self.min_tail_count,
            "min_gpd_exceedances": self.min_gpd_exceedances,
            "fitted_prior_exceedances": self.prior_exceedances_,
            "pool": {
                "n": int(pool["n"]),
                "values": pool["values"].tolist(),
                "counts": pool["counts"].tolist(),
                "threshold": float(pool["threshold"]),
                "exceedances": int(pool["exceedances"]),
                "shape": float(pool["shape"]),
                "scale": float(pool["scale"]),
                "tail": pool["tail"],
            },
            "entities": {
                "keys": list(self.entities_),
                "n": [entity.n for entity in entities],
                "values": [entity.values.tolist() for entity in entities],
                "counts": [entity.counts.tolist() for entity in entities],
                "tail_scale": [entity.tail_scale for entity in entities],
                "tail_excesses": [entity.tail_excesses for entity in entities],
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TailCalibrator:
        """A fitted calibrator from :meth:`state_dict`'s output (settings included)."""
        calibrator = cls()
        calibrator.load_state_dict(state)
        return calibrator

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"TailCalibrator state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        self.tail_fraction = float(state["tail_fraction"])
        fixed = state["prior_exceedances"]
        self.prior_exceedances = None if fixed is None else float(fixed)
        self.entity_knots = int(state["entity_knots"])
        self.pool_knots = int(state["pool_knots"])
        self.min_tail_count = int(state["min_tail_count"])
        self.min_gpd_exceedances = int(state["min_gpd_exceedances"])
        self.prior_exceedances_ = float(state["fitted_prior_exceedances"])
        pool = state["pool"]
        self.pool_ = {
            "n": int(pool["n"]),
            "values": np.asarray(pool["values"], dtype=np.float64),
            "counts": np.asarray(pool["counts"], dtype=np.int64),
            "threshold": float(pool["threshold"]),
            "exceedances": int(pool["exceedances"]),
            "shape": float(pool["shape"]),
            "scale": float(pool["scale"]),
            "tail": str(pool["tail"]),
        }
        entities = state["entities"]
        self.entities_ = {
            key: _Entity(
                int(n),
                np.asarray(values, dtype=np.float64),
                np.asarray(counts, dtype=np.int64),
                float(scale),
                int(excesses),
            )
            for key, n, values, counts, scale, excesses in zip(
                entities["keys"],
                entities["n"],
                entities["values"],
                entities["counts"],
                entities["tail_scale"],
                entities["tail_excesses"],
                strict=True,
            )
        }
        self._pack()
