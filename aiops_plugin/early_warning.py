"""Early warning: P(an entity becomes anomalous within each configured horizon).

``aiops_early_warning_probability{horizon}`` is computed per entity group by
:class:`GroupEarlyWarning`, in three stages, the same model -> calibrator -> probability chain the
anomaly score goes through (:mod:`aiops_plugin.calibration`).

**1. Evidence** per entity, step and horizon ``h`` (``H_h`` steps), each a raw statistic, higher
= more alarming:

- ``forecast``: the probability that the forecaster's trajectory leaves the normal band within
  ``H_h`` steps. The forecaster (:mod:`aiops_plugin.detectors.forecaster`) gives a Gaussian
  ``N(mu_k,f, sigma_k,f)`` for every step ``k = 1..H`` ahead and feature ``f`` in robust-scale
  units. The band of feature ``f`` is ``|z| <= b_f`` with ``b_f`` the ``1 - false_alarm_rate``
  quantile of the feature's observed ``|z|`` over the whole fit read (all entities pooled, since
  ``z`` is already per-entity standardised): the level the calibrated scores would call
  anomalous, at the same rate. ``b_f`` is never narrower than a Gaussian feature's band at that
  rate, ``Phi^-1(1 - rate / 2)``, so a feature that never moved during the fit (a quantile of 0)
  does not "cross" at every step. Per step and feature ``P_k,f = Phi((-b - mu) / sigma) +
  Phi((mu - b) / sigma)``; features and steps are combined by the maximum, ``max_{k <= H_h, f}
  P_k,f``, a lower bound of P(the trajectory leaves the band within the horizon) under any
  dependence between steps and features. The union bound (the sum) would be an upper bound,
  but over ~40 strongly dependent features and 30 steps it saturates at 1 for ordinary
  forecasts. Only features observed in the forecast's context count; the statistic is the
  probit ``Phi^-1(max P)`` (computed in log space), which keeps resolution in both tails.
- ``slo``: the same for the configured service-level thresholds (``entities[].slo``: query name
  -> ``above`` / ``below`` in the metric's original units). Every feature of that query
  (``name`` or ``name{extra="labels"}``, :func:`aiops_plugin.sources.prometheus.feature_name`)
  has the threshold moved into the entity's robust-scale units, ``(threshold - center) /
  scale``, and its one-sided crossing probability is combined as above. Present only when a
  forecaster is fitted and a configured query is among its features.
- ``ramp`` (``early_warning.ramp``, off by default; needs no forecaster): every metric's own
  line, PromQL's ``predict_linear`` for all of them at once. The entity's metrics are robustly
  standardised (:class:`~aiops_plugin.detectors.scaling.RobustScaler`, fitted on the detectors'
  training part of the fit read); over the last ``max(trend_steps, H_h)`` steps each one's
  least-squares line (:func:`line_extrapolation`) is extrapolated ``H_h`` steps ahead, and the
  statistic is the largest ``|line| / b_h,f`` over the metrics whose line is still inside their
  normal band ``b_f`` at the step itself (one already outside is anomalous now, the fused
  score's to say; a level that moved and stayed there, which the fused score's calibration took
  in, would otherwise warn at every step). ``b_h,f`` is the ``1 - false_alarm_rate`` quantile of
  that metric's ``|line|`` on the calibration slice (entities pooled), at least its normal band
  ``b_f`` (as the forecast's): a noisy metric's line swings far at every step and is measured
  against its own swings, so a smooth metric heading out of its band (memory, a queue, a disk)
  is what stands out. A line as long as its horizon keeps the extrapolation's noise near the
  data's. The agent keeps that many steps of every metric. Off by default (the measurements:
  docs/benchmarks.md, "Early warning: with the metrics' own lines").
- ``trend``: the fused exported score's recent trend. Over the last ``trend_steps`` steps the
  score, as ``-log p`` (the score times ``log(1 / false_alarm_rate)``), is fitted by least
  squares on the finite values only (at least ``MIN_TREND_POINTS`` of them), and the line is
  extrapolated to ``H_h`` steps ahead.

**2. p-value per horizon.** The statistics of the calibration slice (the steps the detectors did
not train on, so the forecasts there are out of sample and the fused scores out of fold) fit a
:class:`~aiops_plugin.calibration.tail.TailCalibrator` per evidence kind and horizon (tail
p-values under normal behaviour, per entity shrunk toward the group), and the kinds' p-values
are fused by the Cauchy combination (:func:`~aiops_plugin.calibration.combination.
cauchy_combination`), valid under the strong dependence between them (they all look at the same
entity). An evidence kind missing at some step (no forecast, too little score history) is left
out of that step's combination. Unlike the fused anomaly score
(:class:`~aiops_plugin.calibration.fused.FusedCalibrator`), the combination is not calibrated a
second time on out-of-fold halves of the slice: these statistics are strongly autocorrelated
(trend lines fitted over overlapping spans, forecasts made one step apart), so a half of a
short slice holds few independent values, its tail disagrees with the other half's, and the
out-of-fold p-values pile up near 0. Recalibrated on those, a trend beyond anything in the
slice (its own p-value 3e-4) came out at 0.03 on a 600-step SMD slice. The Cauchy combination
needs no second calibration for validity in the tail (it is exact when the kinds agree
perfectly and when they are independent).

**3. Probability, with the Bayesian gate** of the llm-fusion seed (Wang et al., "Anomaly
Detection and Early Warning Mechanism for Intelligent Monitoring Systems in Multi-Cloud
Environments Based on LLM", ``../shared/seeds/llm-fusion-early-warning.txt``: a posterior
``p(y | x) ∝ p(x | y) p(y)``, with warnings held back where the models' uncertainty is high):

- the posterior is the anomaly probability's own model: per horizon a
  :class:`~aiops_plugin.calibration.stage.RecentProbability`, a beta-uniform mixture of the
  group's recent combined p-values (``recent_capacity`` of them, seeded from the calibration
  slice's, fed every cycle). Its anomalous share ``pi`` is the prior ``p(y)``,
  uniform vs Beta(a, 1) the likelihoods ``p(x | y)``;
- the gate tempers the likelihood where the forecast is unsure. The uncertainty ``u`` of a
  forecast is its predicted sigma averaged over the horizon's steps and the observed features
  (robust-scale units); ``g`` is its ``gate_quantile`` on the calibration slice. Above ``g`` the
  evidence counts with weight ``tau = g / u`` (a power likelihood ``p(x | y)^tau``), i.e. the
  posterior log-odds are shrunk toward the prior's in proportion:
  ``logit P' = logit pi + tau (logit P - logit pi)``. At ``u = 2 g`` half the evidence is kept;
  at or below ``g`` all of it.

**With feedback** (:mod:`aiops_plugin.feedback`): every anomaly event keeps the early-warning
scores of the steps before it opened. Once a group has ``feedback.min_labelled_events``
labelled events, each horizon whose confirmed incidents came with such scores gets the labelled
probability instead of the mixture: the isotonic map (:class:`~aiops_plugin.calibration.
probability.LabelledProbability`) from the score's p-value to "an incident follows", fitted
on the scores of the ``H_h`` steps before each confirmed incident (positives), those before
false alarms and the calibration slice's (negatives: steps no one called an incident). It
answers "of the steps that looked like this, how many were followed by a real incident within
the horizon", which the mixture cannot; the gate has already tempered those scores, so it is
not applied again. The mixtures are still fed, so the next fit without labels picks up from
them.

**What the number means.** Under the mixture the probability is P(this step's evidence comes from
the anomalous component): how far the horizon's evidence lies from anything the calibration
slice produced, weighed against how often the group's recent p-values have been that small
(the prior rises while an anomaly goes on, as the mixture sees it). It is not the forecaster's
own chance of a crossing: a 20 % chance of crossing an SLO that the calibration slice never came
near is a tiny p-value, and a probability near 1. How well it matches real events is measured
by :mod:`aiops_plugin.evaluation.early_warning_benchmark` (ECE, Brier, lead time).

**The score.** ``aiops_early_warning_score{horizon}`` is stage 2's combined p-value on the
anomaly score's scale (``score_from_p``: 1.0 where the p-value is the false-alarm rate), tempered
by the same gate (times ``tau``, the power likelihood ``p ** tau``). It needs no threshold chosen
on anyone's data, so the early-warning alert reads it at 1.0, as the anomaly score is read; the
benchmark replays that rule beside one on the probability.

Without a forecaster (it is optional; the default detector set is mad + pca) only the trend
evidence (and the ramp, where configured) is used and there is no forecast uncertainty to gate
on; :attr:`GroupEarlyWarning.method` records which variant was fitted (it goes into the
calibration version).

The band and the trend's ``-log p`` use the ``false_alarm_rate`` given at construction, so a
change of the rate needs a refit of the early warning (unlike the anomaly score's calibration).

Everything is vectorised over entities and steps; the forecasts of a long calibration slice are
made and reduced chunk by chunk (:meth:`ForecasterDetector.forecast_distributions`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import numpy as np
from scipy.special import expit, log_ndtr, logit, ndtri, ndtri_exp

from aiops_plugin.calibration.combination import cauchy_combination
from aiops_plugin.calibration.probability import LabelledProbability
from aiops_plugin.calibration.stage import RecentProbability
from aiops_plugin.calibration.tail import TailCalibrator, p_from_score, score_from_p
from aiops_plugin.config import EarlyWarningConfig, SloThreshold
from aiops_plugin.detectors.forecaster import ForecastDistribution, ForecasterDetector
from aiops_plugin.detectors.scaling import RobustScaler
from aiops_plugin.windows import Windows

STATE_VERSION = 1
FORECAST, SLO, RAMP, TREND = "forecast", "slo", "ramp", "trend"
#: Fewest finite fused scores a trend is fitted on.
MIN_TREND_POINTS = 3
#: Values of the fit read the band quantiles are taken from at most (evenly spaced steps).
MAX_BAND_VALUES = 1_000_000
#: The gate tempers the log-odds of probabilities kept in ``[CLIP, 1 - CLIP]``: no evidence here
#: earns more certainty than that, so a strict enough gate can hold back any warning.
PROBABILITY_CLIP = 1e-6
#: Significant digits of the recent p-values (and the ramp's scaler) kept in the state.
STATE_DIGITS = 6
#: Calibration-slice scores per horizon the labelled probability takes as normal steps at most
#: (evenly spaced): a monotone map of a few thousand labels needs no more.
MAX_LABELLED_NORMALS = 200_000
#: Steps of one chunk of :func:`line_extrapolation`.
LINE_CHUNK = 4096
#: Values (entities x steps x features) of one block of entities the ramp evidence is computed
#: on at once; each of its float64 intermediates is 8 bytes a value.
RAMP_BLOCK_VALUES = 2**21


def minus_log_p(scores: np.ndarray, false_alarm_rate: float) -> np.ndarray:
    """``-log p`` of exported scores (``score = log p / log rate``); NaN passes through."""
    return np.asarray(scores, dtype=np.float64) * math.log(1.0 / false_alarm_rate)


def trend_extrapolation(values: np.ndarray, span: int, ahead: list[int]) -> np.ndarray:
    """Least-squares line through the finite values among each step and the ``span - 1``
    before it, evaluated ``ahead`` steps after that step.

    ``values``: ``(entities, time)``, NaN = missing. Returns ``(entities, time, len(ahead))``
    float64, NaN where fewer than ``MIN_TREND_POINTS`` finite values are in the span.
    """
    return line_extrapolation(values, span, ahead, min_points=MIN_TREND_POINTS)


def normal_band(
    scaler: RobustScaler, features: list[str], windows: Windows, false_alarm_rate: float
) -> dict:
    """Per feature, the half-width ``b_f`` (robust-scale units of ``scaler``) of its normal band
    on ``windows``: the ``1 - rate`` quantile of the observed ``|z|``, at least the Gaussian
    ``Phi^-1(1 - rate / 2)``; features never observed are left out (no band)."""
    windows = windows.reindex_features(features)
    n_entities, n_time, n_features = windows.values.shape
    stride = max(1, math.ceil(n_entities * n_time / MAX_BAND_VALUES))
    sampled = Windows(
        group=windows.group,
        values=windows.values[:, ::stride],
        observed=windows.observed[:, ::stride],
        timestamps=windows.timestamps[::stride],
        entities=windows.entities,
        features=features,
        step=windows.step * stride,
    )
    standard, mask = scaler.transform(sampled)
    magnitude = np.where(mask > 0, np.abs(standard), np.nan).reshape(-1, n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        quantile = np.nanquantile(magnitude, 1.0 - false_alarm_rate, axis=0)
    floor = float(ndtri(1.0 - false_alarm_rate / 2.0))
    return {
        name: max(float(value), floor)
        for name, value in zip(features, quantile, strict=True)
        if np.isfinite(value)
    }


def ramp_spans(horizons_steps: list[int], trend_steps: int) -> list[int]:
    """Steps each horizon's metric lines are fitted over: the horizon itself, at least
    ``trend_steps`` (a line fitted over a span as long as it is extrapolated keeps its
    extrapolation's noise near the data's, however long the horizon)."""
    return [max(int(trend_steps), int(h)) for h in horizons_steps]


def line_extrapolation(
    values: np.ndarray,
    span: int,
    ahead: list[int],
    first: int = 0,
    min_points: int | None = None,
) -> np.ndarray:
    """Least-squares line along axis 1 through the finite values among each step and the
    ``span - 1`` before it, evaluated ``ahead`` steps after that step, for steps ``first..``.

    ``values``: ``(entities, time, ...)``, NaN = missing. Returns ``(entities, time - first,
    ..., len(ahead))`` float64, NaN where fewer than ``min_points`` (default ``max(
    MIN_TREND_POINTS, span // 2)``) values are finite. Windowed sums of cumulative sums, a chunk
    of ``LINE_CHUNK`` steps at a time (its time index counted from the chunk, so the squares
    stay small): the cost does not grow with ``span``.
    """
    n_time = values.shape[1]
    steps = np.asarray(ahead, dtype=np.float64)
    out = np.full((values.shape[0], max(0, n_time - first), *values.shape[2:], len(steps)), np.nan)
    need = max(MIN_TREND_POINTS, span // 2) if min_points is None else min_points
    for c0 in range(first, n_time, LINE_CHUNK):
        c1 = min(n_time, c0 + LINE_CHUNK)
        lo = max(0, c0 - span + 1)
        y = values[:, lo:c1].astype(np.float64)
        finite = np.isfinite(y)
        weight = finite.astype(np.float64)
        part = np.where(finite, y, 0.0)
        shape = (1, -1) + (1,) * (y.ndim - 2)
        t = np.arange(c1 - lo, dtype=np.float64).reshape(shape)
        ends = np.arange(c0 - lo, c1 - lo)
        begins = np.maximum(ends - span + 1, 0)

        def windowed(a: np.ndarray, ends: np.ndarray = ends, begins: np.ndarray = begins):
            total = np.cumsum(a, axis=1)
            total = np.concatenate([np.zeros_like(total[:, :1]), total], axis=1)
            return total[:, ends + 1] - total[:, begins]

        n, si, sii = windowed(weight), windowed(weight * t), windowed(weight * t * t)
        sy, siy = windowed(part), windowed(part * t)
        end = ends.astype(np.float64).reshape(shape)
        # moved to the window's end: x = i - end <= 0
        sx, sxx, sxy = si - end * n, sii - 2 * end * si + end * end * n, siy - end * sy
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
            level = (sy - slope * sx) / n
        line = level[..., None] + slope[..., None] * steps
        out[:, c0 - first : c1 - first] = np.where((n >= need)[..., None], line, np.nan)
    return out


def slo_columns(
    features: list[str], slo: dict[str, SloThreshold]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features of the SLO queries: ``(columns, sign, threshold)``, ``sign`` +1 for
    ``above`` and -1 for ``below``, ``threshold`` in original units; a query's features are
    ``name`` and ``name{...}``."""
    columns, signs, thresholds = [], [], []
    for column, name in enumerate(features):
        rule = slo.get(name.split("{", 1)[0])
        if rule is None:
            continue
        columns.append(column)
        signs.append(1.0 if rule.above is not None else -1.0)
        thresholds.append(rule.above if rule.above is not None else rule.below)
    return (
        np.asarray(columns, dtype=np.int64),
        np.asarray(signs, dtype=np.float64),
        np.asarray(thresholds, dtype=np.float64),
    )


def _horizon_max(log_p: np.ndarray, usable: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(E, S, H, F)`` log-probabilities -> probit of their maximum over the features that
    are ``usable`` ``(E, S, 1, F)`` and over steps ``1..H_h``: ``(E, S, len(rows))``, NaN where
    no feature is usable."""
    best = np.where(usable, log_p, -np.inf).max(axis=-1)
    best = np.maximum.accumulate(best, axis=2)[:, :, rows].astype(np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(best), ndtri_exp(np.minimum(best, 0.0)), np.nan)


def forecast_evidence(
    distribution: ForecastDistribution,
    band: dict[str, float],
    slo: dict[str, SloThreshold],
    horizons_steps: list[int],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The forecast evidence of a chunk of forecasts: band crossing, SLO crossing (None when no
    feature has an SLO) and forecast uncertainty, each ``(entities, steps, horizons)`` (see the
    module docstring); NaN where no forecast was made."""
    mean, sigma = distribution.mean, distribution.sigma
    rows = np.asarray(horizons_steps, dtype=np.int64) - 1
    valid = distribution.valid[..., None]
    limit = np.array([band.get(name, np.inf) for name in distribution.features], np.float32)
    usable = (distribution.observed & np.isfinite(limit))[:, :, None, :]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        log_cross = np.logaddexp(
            log_ndtr((-limit - mean) / sigma), log_ndtr((mean - limit) / sigma)
        )
    crossing = np.where(valid, _horizon_max(log_cross, usable, rows), np.nan)

    observed = distribution.observed[:, :, None, :]
    count = observed.sum(axis=-1)
    spread = np.where(observed, sigma, 0.0).sum(axis=-1) / np.maximum(count, 1)
    mean_spread = np.cumsum(spread, axis=2) / np.arange(1, spread.shape[2] + 1)
    seen = count[:, :, 0, None] > 0
    uncertainty = np.where(valid & seen, mean_spread[:, :, rows], np.nan)

    columns, sign, threshold = slo_columns(distribution.features, slo)
    if columns.size == 0:
        return crossing, None, uncertainty
    standard = (threshold[None, :] - distribution.center[:, columns]) / distribution.scale[
        :, columns
    ]
    gap = sign * (mean[..., columns] - standard[:, None, None, :].astype(np.float32))
    with np.errstate(invalid="ignore", divide="ignore"):
        log_breach = log_ndtr(gap / sigma[..., columns])
    usable_slo = distribution.observed[:, :, None, columns]
    breach = np.where(valid, _horizon_max(log_breach, usable_slo, rows), np.nan)
    return crossing, breach, uncertainty


def ramp_statistic(lines: np.ndarray, band: np.ndarray) -> np.ndarray:
    """The ramp evidence of metric lines ``(entities, steps, features, horizons)`` (each
    feature's line extrapolated to each horizon's end, robust-scale units): per horizon the
    largest ``|line| / band`` over the features, ``band`` ``(horizons, features)`` (NaN: no band,
    left out). ``(entities, steps, horizons)``, NaN where no feature has a line."""
    ratio = np.abs(lines) / band.T
    best = np.where(np.isfinite(ratio), ratio, -np.inf).max(axis=2, initial=-np.inf)
    return np.where(np.isfinite(best), best, np.nan)


def gate_weight(uncertainty: np.ndarray, threshold: float) -> np.ndarray:
    """The weight ``tau`` the gate gives the evidence: ``threshold / uncertainty`` where the
    uncertainty is above ``threshold``, 1 elsewhere (and where it is NaN)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isfinite(u) & (u > threshold), threshold / u, 1.0)


def gate(
    probability: np.ndarray,
    prior: float | np.ndarray,
    uncertainty: np.ndarray | None,
    threshold: float,
) -> np.ndarray:
    """The Bayesian gate: where ``uncertainty > threshold`` the evidence is tempered by ``tau =
    threshold / uncertainty``, ``logit P' = logit prior + tau (logit P - logit prior)``;
    elsewhere (and where the uncertainty is NaN) ``P`` is kept. NaN probabilities stay NaN.
    ``prior`` is a probability, or an array broadcasting against ``probability``."""
    p = np.asarray(probability, dtype=np.float64)
    if uncertainty is None:
        return p
    tau = gate_weight(uncertainty, threshold)
    clipped = np.clip(np.nan_to_num(p, nan=0.5), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    base = logit(
        np.clip(np.asarray(prior, dtype=np.float64), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    )
    tempered = expit(base + tau * (logit(clipped) - base))
    return np.where(np.isnan(p) | (tau >= 1.0), p, tempered)


def labelled_warning(
    before_incidents: np.ndarray,
    before_false_alarms: np.ndarray,
    normal_scores: np.ndarray,
    false_alarm_rate: float,
) -> LabelledProbability | None:
    """P(an incident follows within the horizon | early-warning score): the isotonic map of the
    scores of the steps before confirmed incidents (positives) against those before false
    alarms and ``normal_scores`` (negatives; at most ``MAX_LABELLED_NORMALS``, evenly spaced),
    on the scores' p-values. None without a finite score of both kinds."""
    positives = np.asarray(before_incidents, dtype=np.float64).ravel()
    positives = positives[np.isfinite(positives)]
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    normal = normal[np.isfinite(normal)]
    if normal.size > MAX_LABELLED_NORMALS:
        normal = normal[np.linspace(0, normal.size - 1, MAX_LABELLED_NORMALS).astype(int)]
    negatives = np.concatenate([np.asarray(before_false_alarms, dtype=np.float64).ravel(), normal])
    negatives = negatives[np.isfinite(negatives)]
    if not positives.size or not negatives.size:
        return None
    scores = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(positives.size, bool), np.zeros(negatives.size, bool)])
    return LabelledProbability(min_positives=1, min_negatives=1).fit(
        p_from_score(np.maximum(scores, 0.0), false_alarm_rate), labels
    )


def replay_recent_probability(
    recent: RecentProbability, p: np.ndarray, refit_every: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of ``p`` ``(entities, steps)`` as the cycles' ``recent.update`` calls give
    them, step by step, feeding ``recent``; with ``refit_every > 1`` the mixture is refitted only
    at every ``refit_every``-th step and the steps in between use the latest fit (never one that
    saw them), for offline evaluation of long series. Returns the probabilities and, per step,
    the mixture's anomalous share they were computed with ``(steps,)``."""
    if refit_every < 1:
        raise ValueError(f"refit_every must be >= 1, got {refit_every}")
    values = np.asarray(p, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    n_steps = values.shape[1]
    share = np.full(n_steps, np.nan)
    for start in range(0, n_steps, refit_every):
        end = min(n_steps, start + refit_every)
        out[:, start] = recent.update(values[:, start])
        share[start:end] = recent.model.anomalous_share_
        if end > start + 1:
            out[:, start + 1 : end] = recent.probability(values[:, start + 1 : end])
            later = values[:, start + 1 : end].T.ravel()
            recent.recent.extend(later[np.isfinite(later)].tolist())
    return out, share


class GroupEarlyWarning:
    """The early-warning model of one entity group: evidence -> p-value -> gated probability,
    per horizon (module docstring).

    Args:
        horizons_steps: the horizons in steps (``calibration.horizons / prometheus.step``,
            rounded up), in the order of the exported ``horizon`` series.
        settings: ``early_warning`` (``trend_steps``, ``gate_quantile``).
        slo: the group's ``slo`` (query name -> threshold in original units).
        false_alarm_rate: the configured rate, which sets the band and the trend's ``-log p``.
        tail_fraction: of the evidence calibrators (``calibration.tail_fraction``).
        recent_capacity: recent p-values per horizon the probability is estimated from.
    """

    def __init__(
        self,
        horizons_steps: list[int],
        settings: EarlyWarningConfig,
        slo: dict[str, SloThreshold],
        false_alarm_rate: float,
        tail_fraction: float = 0.05,
        recent_capacity: int = 5000,
    ) -> None:
        if not horizons_steps or any(int(h) < 1 for h in horizons_steps):
            raise ValueError(f"horizons_steps must be positive steps, got {horizons_steps}")
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        self.horizons_steps = [int(h) for h in horizons_steps]
        self.settings = settings
        self.slo = dict(slo)
        self.false_alarm_rate = float(false_alarm_rate)
        self.tail_fraction = float(tail_fraction)
        self.recent_capacity = int(recent_capacity)
        self.evidence_: list[str] = []
        self.band_: dict[str, float] = {}
        self.gate_threshold_: np.ndarray | None = None
        #: the ramp evidence's own standardisation (fitted on the detectors' training part of the
        #: fit read), features and normal band ``(features,)``; None without the ramp
        self.ramp_scaler_: RobustScaler | None = None
        self.ramp_features_: list[str] = []
        self.ramp_band_: np.ndarray | None = None
        self.ramp_metric_band_: np.ndarray | None = None
        #: evidence kind -> one calibrator per horizon
        self.calibrators_: dict[str, list[TailCalibrator]] = {}
        self.recent_: list[RecentProbability] = []
        #: per horizon, the probability learnt from feedback labels; None: the mixture's
        self.labelled_: list[LabelledProbability | None] = []

    @property
    def method(self) -> str:
        """Which evidence and stages the fitted model uses, e.g.
        ``ew-forecast-ramp-trend-tail-cauchy-bum-gated-v1`` or
        ``ew-ramp-trend-tail-cauchy-bum-v1`` (``-labelled`` where feedback labels calibrate a
        horizon's probability)."""
        if not self.evidence_:
            raise RuntimeError("GroupEarlyWarning is not fitted")
        combined = "-cauchy" if len(self.evidence_) > 1 else ""
        gated = "-gated" if self.gate_threshold_ is not None else ""
        labelled = "-labelled" if self.labelled else ""
        return f"ew-{'-'.join(self.evidence_)}-tail{combined}-bum{gated}{labelled}-v{STATE_VERSION}"

    @property
    def labelled(self) -> bool:
        """Whether feedback labels calibrate the probability of at least one horizon."""
        return any(model is not None for model in self.labelled_)

    @property
    def ramp_spans(self) -> list[int]:
        """Steps each horizon's ramp lines are fitted over (:func:`ramp_spans`)."""
        return ramp_spans(self.horizons_steps, self.settings.trend_steps)

    @property
    def history_steps(self) -> int:
        """Steps of metric history an :meth:`update` needs in its windows (the forecaster's
        context aside): the longest ramp span, 1 without the ramp."""
        return max(self.ramp_spans) if RAMP in self.evidence_ else 1

    # ------------------------------------------------------------------------------ fitting
    def fit(
        self,
        fused_scores: np.ndarray,
        windows: Windows,
        first: int,
        forecaster: ForecasterDetector | None,
        warned_before: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> GroupEarlyWarning:
        """Fit on the calibration slice.

        ``fused_scores``: ``(entities, steps)`` exported fused scores of the calibration slice
        (``windows.timestamps[first:]``); ``windows``: the whole fit read (same entity order),
        which also gives the forecasts their context and the band its quantiles.
        ``warned_before``: from feedback, per horizon, the early-warning scores of the steps
        before confirmed incidents and before false alarms
        (:func:`aiops_plugin.feedback.warning_labels`); a horizon with scores before incidents
        gets the labelled probability (module docstring).
        """
        scores = np.asarray(fused_scores, dtype=np.float64)
        expected = (len(windows.entities), len(windows.timestamps) - first)
        if scores.shape != expected:
            raise ValueError(f"fused_scores must be {expected} (the slice), got {scores.shape}")
        if forecaster is not None:
            features = forecaster._require_fitted()
            self.band_ = normal_band(forecaster.scaler_, features, windows, self.false_alarm_rate)
        kinds = (FORECAST, SLO) if forecaster else ()
        self.ramp_scaler_, self.ramp_features_, self.ramp_band_ = None, [], None
        self.ramp_metric_band_ = None
        if self.settings.ramp and first > 0:
            self._fit_ramp(windows, first)
            kinds += (RAMP,)
        self.evidence_ = []
        statistics, uncertainty = self._evidence(scores, windows, first, forecaster, kinds)
        self.evidence_ = [
            name
            for name in (FORECAST, SLO, RAMP, TREND)
            if name in statistics and np.isfinite(statistics[name]).any()
        ]
        if RAMP not in self.evidence_:
            self.ramp_scaler_, self.ramp_features_, self.ramp_band_ = None, [], None
            self.ramp_metric_band_ = None
        if TREND not in self.evidence_:
            raise ValueError(
                f"the calibration slice ({scores.shape[1]} steps) has no fused-score trend: "
                f"it needs at least {MIN_TREND_POINTS} scored steps"
            )
        self.gate_threshold_ = None
        if FORECAST in self.evidence_ and uncertainty is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                threshold = np.nanquantile(
                    uncertainty.reshape(-1, len(self.horizons_steps)),
                    self.settings.gate_quantile,
                    axis=0,
                )
            self.gate_threshold_ = threshold if np.isfinite(threshold).all() else None
        if FORECAST not in self.evidence_:
            self.band_ = {}
        keys = windows.keys
        self.calibrators_ = {
            name: [
                TailCalibrator(self.tail_fraction).fit(statistics[name][:, :, j], keys)
                for j in range(len(self.horizons_steps))
            ]
            for name in self.evidence_
        }
        p = self._p_values(statistics, keys)
        self.recent_ = [
            RecentProbability(self.recent_capacity).seed(p[:, :, j])
            for j in range(len(self.horizons_steps))
        ]
        self.labelled_ = [None] * len(self.horizons_steps)
        if warned_before is not None:
            self._fit_labelled(self.scores(p, uncertainty), warned_before)
        return self

    def _fit_labelled(
        self, slice_scores: np.ndarray, warned_before: list[tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """Per horizon, the isotonic P(an incident follows | score) of the scores before
        confirmed incidents against those before false alarms and the calibration slice's
        ``slice_scores`` ``(entities, steps, horizons)``; None where no incident has any."""
        if len(warned_before) != len(self.horizons_steps):
            raise ValueError(
                f"warned_before has {len(warned_before)} horizons, the model "
                f"{len(self.horizons_steps)}"
            )
        for j, (before_incidents, before_false_alarms) in enumerate(warned_before):
            self.labelled_[j] = labelled_warning(
                before_incidents, before_false_alarms, slice_scores[..., j], self.false_alarm_rate
            )

    def _fit_ramp(self, windows: Windows, first: int) -> None:
        """The ramp's standardisation on the detectors' training part of the fit read (steps
        before ``first``), and per horizon and feature its band: the ``1 - rate`` quantile of
        the lines' ``|extrapolation|`` over the calibration slice (all entities pooled), never
        narrower than the metric's own normal band on the whole read. A noisy metric's line
        swings far at every step; measured against its own swings it counts as much as a
        smooth metric's does, not more."""
        self.ramp_features_ = list(windows.features)
        self.ramp_scaler_ = RobustScaler().fit(windows.head(first))
        metric = normal_band(self.ramp_scaler_, self.ramp_features_, windows, self.false_alarm_rate)
        floor = np.array([metric.get(name, np.nan) for name in self.ramp_features_])
        self.ramp_metric_band_ = floor
        n_steps = len(windows.timestamps) - first
        stride = max(1, math.ceil(len(windows.entities) * n_steps / MAX_BAND_VALUES))
        sampled = [
            np.abs(lines[:, ::stride]).reshape(-1, *lines.shape[2:])
            for _, lines in self._ramp_lines(windows, first)
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            quantile = np.nanquantile(np.concatenate(sampled), 1.0 - self.false_alarm_rate, axis=0)
        self.ramp_band_ = np.fmax(quantile, floor[:, None]).T

    def _ramp_lines(self, windows: Windows, first: int) -> Iterator[tuple[slice, np.ndarray]]:
        """Each block of entities (at most ``RAMP_BLOCK_VALUES`` values a horizon) and its
        metric lines at steps ``first..`` of ``windows``, each extrapolated to each horizon's
        end: ``(block, steps, features, horizons)``, robust-scale units; NaN where the line is
        already beyond the metric's band at the step itself. Such a metric is anomalous now,
        which is the fused score's to say; a level that moved and stays (the fused score's
        calibration took it in) must not read as a warning at every step."""
        assert self.ramp_scaler_ is not None and self.ramp_metric_band_ is not None
        n_time = len(windows.timestamps)
        spans = self.ramp_spans
        begin = max(0, first - max(spans) + 1)
        recent = windows.tail(n_time - begin)
        n_entities = len(windows.entities)
        per_entity = (min(n_time - begin, LINE_CHUNK) + max(spans)) * len(self.ramp_features_)
        block = max(1, RAMP_BLOCK_VALUES // max(1, per_entity))
        for e0 in range(0, n_entities, block):
            rows = slice(e0, min(n_entities, e0 + block))
            part = recent.select_entities(range(rows.start, rows.stop))
            standard, mask = self.ramp_scaler_.transform(part.reindex_features(self.ramp_features_))
            standard[mask == 0] = np.nan
            lines = []
            for span, ahead in zip(spans, self.horizons_steps, strict=True):
                line = line_extrapolation(standard, span, [0, ahead], first - begin)
                inside = np.abs(line[..., 0]) <= self.ramp_metric_band_
                lines.append(np.where(inside, line[..., 1], np.nan))
            yield rows, np.stack(lines, axis=-1)

    def _ramp_statistics(self, windows: Windows, first: int) -> np.ndarray:
        """The ramp evidence of steps ``first..`` of ``windows``, ``(entities, steps,
        horizons)``."""
        assert self.ramp_band_ is not None
        out = np.full(
            (len(windows.entities), len(windows.timestamps) - first, len(self.horizons_steps)),
            np.nan,
        )
        for rows, lines in self._ramp_lines(windows, first):
            out[rows] = ramp_statistic(lines, self.ramp_band_)
        return out

    def _evidence(
        self,
        scores: np.ndarray,
        windows: Windows,
        first: int,
        forecaster: ForecasterDetector | None,
        kinds: Collection[str],
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Statistics ``kind -> (entities, steps, horizons)`` of steps ``first..`` of
        ``windows`` (``scores``: the fused scores of the same steps) and the forecast
        uncertainty (None without forecasts), for the evidence ``kinds`` asked for; the
        ``slo`` one only where a forecaster feature has an SLO."""
        statistics = {
            TREND: trend_extrapolation(
                minus_log_p(scores, self.false_alarm_rate),
                self.settings.trend_steps,
                self.horizons_steps,
            )
        }
        if RAMP in kinds:
            statistics[RAMP] = self._ramp_statistics(windows, first)
        if FORECAST not in kinds and SLO not in kinds:
            return statistics, None
        chunks: Iterable[ForecastDistribution] = ()
        if forecaster is not None and len(windows.timestamps) >= forecaster.context:
            chunks = forecaster.forecast_distributions(windows, first)
        crossing, breach, uncertainty = self._forecast_statistics(chunks, scores.shape, first)
        if FORECAST in kinds:
            statistics[FORECAST] = crossing
        if SLO in kinds and (breach is not None or SLO in self.evidence_):
            statistics[SLO] = breach if breach is not None else np.full_like(crossing, np.nan)
        return statistics, uncertainty if forecaster is not None else None

    def _forecast_statistics(
        self, chunks: Iterable[ForecastDistribution], shape: tuple[int, int], first: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Band crossing, SLO breach (None where no feature has an SLO) and uncertainty,
        ``(entities, steps, horizons)``, of forecasts made at steps ``first..``, reduced chunk
        by chunk; NaN where no forecast was made."""
        full = (*shape, len(self.horizons_steps))
        crossing, uncertainty = np.full(full, np.nan), np.full(full, np.nan)
        breach: np.ndarray | None = None
        for chunk in chunks:
            cross, slo_breach, spread = forecast_evidence(
                chunk, self.band_, self.slo, self.horizons_steps
            )
            at = chunk.origins - first
            crossing[:, at], uncertainty[:, at] = cross, spread
            if slo_breach is not None:
                breach = np.full(full, np.nan) if breach is None else breach
                breach[:, at] = slo_breach
        return crossing, breach, uncertainty

    # ------------------------------------------------------------------------------ scoring
    def _require_fitted(self) -> None:
        if not self.calibrators_:
            raise RuntimeError("GroupEarlyWarning is not fitted")

    def _p_values(self, statistics: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
        """Cauchy-combined p-values of the evidence kinds, ``(entities, steps, horizons)``."""
        combined = []
        for j in range(len(self.horizons_steps)):
            p = [
                self.calibrators_[name][j].p_values(statistics[name][:, :, j], keys)
                for name in self.evidence_
            ]
            combined.append(cauchy_combination(np.stack(p)))
        return np.stack(combined, axis=-1)

    def _gated(
        self, probability: np.ndarray, uncertainty: np.ndarray | None, prior: np.ndarray
    ) -> np.ndarray:
        """Gate ``(entities, ..., horizons)`` probabilities with the matching uncertainty and
        the mixtures' anomalous shares ``prior`` (broadcasting against ``probability``)."""
        if self.gate_threshold_ is None or uncertainty is None:
            return probability
        return np.stack(
            [
                gate(
                    probability[..., j],
                    prior[..., j],
                    uncertainty[..., j],
                    float(self.gate_threshold_[j]),
                )
                for j in range(len(self.horizons_steps))
            ],
            axis=-1,
        )

    def update(
        self,
        fused_history: np.ndarray,
        windows: Windows,
        forecaster: ForecasterDetector | None,
    ) -> np.ndarray:
        """One inference cycle: the probabilities of :meth:`update_scored`."""
        return self.update_scored(fused_history, windows, forecaster)[0]

    def update_scored(
        self,
        fused_history: np.ndarray,
        windows: Windows,
        forecaster: ForecasterDetector | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One inference cycle.

        ``fused_history``: ``(entities, T)`` the recent exported fused scores ending with this
        cycle's (NaN where not scored; ``T`` may be shorter than ``trend_steps``); ``windows``:
        the scored windows, same entities, ending at this cycle (their tail is the forecaster's
        context). Returns ``(probabilities, scores)``, both ``(entities, horizons)``, NaN where
        no evidence exists: the gated probabilities in [0, 1], and the early-warning scores, the
        combined p-values (stage 2) on the anomaly score's scale (:meth:`scores`: 1.0 where the
        p-value is the false-alarm rate, tempered by the gate). Feeds the recent p-values.
        """
        self._require_fitted()
        history = np.asarray(fused_history, dtype=np.float64)
        if history.ndim != 2 or history.shape[0] != len(windows.entities):
            raise ValueError(
                f"fused_history must be (entities={len(windows.entities)}, T), got {history.shape}"
            )
        recent = history[:, -self.settings.trend_steps :]
        statistics = {
            TREND: trend_extrapolation(
                minus_log_p(recent, self.false_alarm_rate),
                self.settings.trend_steps,
                self.horizons_steps,
            )[:, -1:]
        }
        if RAMP in self.evidence_:
            statistics[RAMP] = self._ramp_statistics(windows, len(windows.timestamps) - 1)
        uncertainty = None
        if FORECAST in self.evidence_:
            chunks: list[ForecastDistribution] = []
            if forecaster is not None and len(windows.timestamps) >= forecaster.context:
                chunks = [forecaster.forecast_distribution(windows)]
            last = len(windows.timestamps) - 1
            crossing, breach, spread = self._forecast_statistics(
                chunks, (history.shape[0], 1), last
            )
            statistics[FORECAST] = crossing
            if SLO in self.evidence_:
                statistics[SLO] = breach if breach is not None else np.full_like(crossing, np.nan)
            uncertainty = spread[:, 0] if chunks else None
        p = self._p_values(statistics, windows.keys)[:, 0]
        probability = np.stack(
            [recent_j.update(p[:, j]) for j, recent_j in enumerate(self.recent_)], axis=-1
        )
        prior = np.array([recent_j.model.anomalous_share_ for recent_j in self.recent_])
        scores = self.scores(p, uncertainty)
        gated = self._gated(probability, uncertainty, prior)
        return (self._with_labels(gated, scores) if self.labelled else gated), scores

    def _with_labels(self, probability: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """``probability`` ``(entities, ..., horizons)`` with each labelled horizon's replaced
        by its labelled probability of the (gated) early-warning ``scores``."""
        out = np.array(probability, dtype=np.float64, copy=True)
        for j, labelled in enumerate(self.labelled_):
            if labelled is not None:
                score = scores[..., j]
                p = p_from_score(np.maximum(score, 0.0), self.false_alarm_rate)
                out[..., j] = np.where(np.isfinite(score), labelled.probability(p), np.nan)
        return out

    def scores(self, p: np.ndarray, uncertainty: np.ndarray | None) -> np.ndarray:
        """The early-warning scores of combined p-values ``(entities, ..., horizons)`` and the
        matching forecast uncertainty: ``score_from_p`` (1.0 at the false-alarm rate), tempered
        by the gate as the probability's evidence is, times ``tau`` where the forecast is unsure
        (the power likelihood ``p ** tau`` of the p-value)."""
        scores = score_from_p(p, self.false_alarm_rate)
        if self.gate_threshold_ is None or uncertainty is None:
            return scores
        tau = np.stack(
            [
                gate_weight(uncertainty[..., j], float(self.gate_threshold_[j]))
                for j in range(len(self.horizons_steps))
            ],
            axis=-1,
        )
        return scores * tau

    def replay(
        self,
        fused_scores: np.ndarray,
        windows: Windows,
        first: int,
        forecaster: ForecasterDetector | None,
        refit_every: int = 1,
    ) -> np.ndarray:
        """The probabilities of every step ``first..`` of ``windows``, as one :meth:`update`
        per step would give them (with ``refit_every > 1`` the mixtures are refitted only every
        that many steps, see :func:`replay_recent_probability`), for offline evaluation.

        ``fused_scores``: ``(entities, steps)`` of those steps; the trend at the first
        ``trend_steps - 1`` of them sees only the scores from ``first`` on. Feeds the recent
        p-values as the updates would. Returns ``(entities, steps, horizons)``.
        """
        p, uncertainty = self.replay_p_values(fused_scores, windows, first, forecaster)
        return self.replay_probabilities(p, uncertainty, refit_every)

    def replay_probabilities(
        self, p: np.ndarray, uncertainty: np.ndarray | None, refit_every: int = 1
    ) -> np.ndarray:
        """Stage 3 of :meth:`replay` on the combined p-values and uncertainty that
        :meth:`replay_p_values` gave: the mixtures' probabilities, gated; feeds the mixtures."""
        replayed = [
            replay_recent_probability(recent_j, p[:, :, j], refit_every)
            for j, recent_j in enumerate(self.recent_)
        ]
        probability = np.stack([part[0] for part in replayed], axis=-1)
        prior = np.stack([part[1] for part in replayed], axis=-1)[None]
        gated = self._gated(probability, uncertainty, prior)
        return self._with_labels(gated, self.scores(p, uncertainty)) if self.labelled else gated

    def replay_p_values(
        self,
        fused_scores: np.ndarray,
        windows: Windows,
        first: int,
        forecaster: ForecasterDetector | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The combined p-values ``(entities, steps, horizons)`` of every step ``first..`` of
        ``windows`` (stage 2, before the mixture and the gate) and the forecast uncertainty
        (None without forecasts); arguments as :meth:`replay`, nothing is fed."""
        self._require_fitted()
        scores = np.asarray(fused_scores, dtype=np.float64)
        expected = (len(windows.entities), len(windows.timestamps) - first)
        if scores.shape != expected:
            raise ValueError(f"fused_scores must be {expected}, got {scores.shape}")
        statistics, uncertainty = self._evidence(scores, windows, first, forecaster, self.evidence_)
        return self._p_values(statistics, windows.keys), uncertainty

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON (no NaN or infinity): settings, the band, the gate, the calibrators,
        each horizon's recent p-values (``STATE_DIGITS`` significant digits) and labelled
        probability (None without one)."""
        self._require_fitted()
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "horizons_steps": list(self.horizons_steps),
            "settings": self.settings.model_dump(mode="json"),
            "slo": {name: rule.model_dump(mode="json") for name, rule in self.slo.items()},
            "false_alarm_rate": self.false_alarm_rate,
            "tail_fraction": self.tail_fraction,
            "recent_capacity": self.recent_capacity,
            "evidence": list(self.evidence_),
            "band": dict(self.band_),
            "gate_threshold": None
            if self.gate_threshold_ is None
            else [float(value) for value in self.gate_threshold_],
            "ramp": None if self.ramp_scaler_ is None else self._ramp_state(),
            "calibrators": {
                name: [calibrator.state_dict() for calibrator in per_horizon]
                for name, per_horizon in self.calibrators_.items()
            },
            "recent": [
                [float(f"{value:.{STATE_DIGITS}g}") for value in recent.recent]
                for recent in self.recent_
            ],
            "labelled": [None if m is None else m.state_dict() for m in self.labelled_],
        }

    def _ramp_state(self) -> dict[str, Any]:
        assert self.ramp_scaler_ is not None and self.ramp_band_ is not None
        assert self.ramp_metric_band_ is not None
        scaler = self.ramp_scaler_.state_dict()
        return {
            "features": list(self.ramp_features_),
            "metric_band": [float(b) if np.isfinite(b) else None for b in self.ramp_metric_band_],
            "band": [
                [float(b) if np.isfinite(b) else None for b in per_horizon]
                for per_horizon in self.ramp_band_
            ],
            "scaler": {
                "keys": scaler["keys"],
                **{
                    name: _rounded(np.asarray(scaler[name]))
                    for name in ("centers", "scales", "default_center", "default_scale")
                },
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GroupEarlyWarning:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"early-warning state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        model = cls(
            list(state["horizons_steps"]),
            EarlyWarningConfig.model_validate(state["settings"]),
            {name: SloThreshold.model_validate(rule) for name, rule in state["slo"].items()},
            float(state["false_alarm_rate"]),
            float(state["tail_fraction"]),
            int(state["recent_capacity"]),
        )
        model.evidence_ = list(state["evidence"])
        model.band_ = {name: float(value) for name, value in state["band"].items()}
        threshold = state["gate_threshold"]
        model.gate_threshold_ = None if threshold is None else np.asarray(threshold, np.float64)
        ramp = state.get("ramp")  # absent from states saved before the ramp evidence
        if ramp is not None:
            model.ramp_features_ = list(ramp["features"])
            model.ramp_band_ = np.array(
                [[np.nan if b is None else b for b in per_horizon] for per_horizon in ramp["band"]],
                dtype=np.float64,
            )
            model.ramp_metric_band_ = np.array(
                [np.nan if b is None else b for b in ramp["metric_band"]], dtype=np.float64
            )
            model.ramp_scaler_ = RobustScaler()
            model.ramp_scaler_.load_state_dict(ramp["scaler"])
        model.calibrators_ = {
            name: [TailCalibrator.from_state_dict(s) for s in per_horizon]
            for name, per_horizon in state["calibrators"].items()
        }
        model.recent_ = [
            RecentProbability(model.recent_capacity).seed(np.asarray(values, dtype=np.float64))
            for values in state["recent"]
        ]
        # absent from states saved before feedback labels reached the early warning
        labelled = state.get("labelled") or [None] * len(model.horizons_steps)
        model.labelled_ = [None if m is None else _labelled_from_state(m) for m in labelled]
        return model


def _labelled_from_state(state: dict[str, Any]) -> LabelledProbability:
    labelled = LabelledProbability()
    labelled.load_state_dict(state)
    return labelled


def _rounded(values: np.ndarray) -> list:
    """``values`` as nested lists of floats with ``STATE_DIGITS`` significant digits."""
    return np.vectorize(lambda v: float(f"{v:.{STATE_DIGITS}g}"), otypes=[float])(values).tolist()
