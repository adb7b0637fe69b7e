"""Suppression rules: anomalies a user has said are not worth raising.

A detector flags what is unusual, not what matters: a CPU rise of 0.3 percentage points can be
rare for a quiet host and still be no page, and a drop in error rate is good news. A rule per
query (:class:`~aiops_plugin.config.SuppressionRule`) states which deviations of the latest value
from the expected one count, by direction and by size, and anomalies outside that are dropped.

Semantics, per entity whose fused score said anomaly:

* The *expected* value of a feature is the median of its observed values in the scoring context
  before the latest step; its deviation is ``d = latest - expected``.
* The *explaining* features are those with an above-average contribution share (at least
  ``1 / n`` of the total over the ``n`` features with a finite share). Without contributions,
  or none finite for the entity, every feature explains.
* A feature without a rule passes. A feature with a rule passes when ``d`` goes the rule's way
  (``up``: ``d > 0``, ``down``: ``d < 0``, ``both``: any) and ``|d| >= min_abs_deviation`` and
  ``|d| >= min_rel_deviation * |expected|``. A feature whose latest or expected value is missing
  passes: missing data is no evidence to drop an anomaly on.
* The anomaly is kept when at least one explaining feature passes, otherwise suppressed with the
  reason ``direction`` when every explaining feature went the wrong way, else ``min_deviation``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from aiops_plugin.config import SuppressionRule

SUPPRESSION_REASONS = ("direction", "min_deviation")

#: Relative slack on the above-average test, so that equal shares computed in float32 all explain.
_SHARE_TOLERANCE = 1e-6


@dataclass
class SuppressionResult:
    """Which anomalies survive the rules, and why the others did not."""

    keep: np.ndarray
    """``(entities,)`` bool; False where an anomaly was suppressed."""
    reason: np.ndarray
    """``(entities,)`` str (object array); ``""`` where kept or not anomalous, else one of
    :data:`SUPPRESSION_REASONS`."""

    def counts(self) -> dict[str, int]:
        """Suppressed entities per reason, every reason present (zero when none)."""
        return {name: int(np.count_nonzero(self.reason == name)) for name in SUPPRESSION_REASONS}


def feature_rules(
    features: list[str], rules: dict[str, SuppressionRule]
) -> dict[int, SuppressionRule]:
    """Feature column index -> the rule of its query.

    A feature is named like its query, or ``query{label="value",...}`` when the query returns
    several series per entity (see :func:`aiops_plugin.sources.prometheus.feature_name`).
    """
    mapped: dict[int, SuppressionRule] = {}
    for j, feature in enumerate(features):
        if feature in rules:
            mapped[j] = rules[feature]
            continue
        owners = [query for query in rules if feature.startswith(query + "{")]
        if owners:
            mapped[j] = rules[max(owners, key=len)]
    return mapped


def expected_values(values: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """``(entities, features)`` median of the observed values before the latest step.

    ``values`` and ``observed`` are the scoring context, ``(entities, time, features)`` with the
    latest step last. NaN where a feature has no observed value before the latest step.
    """
    history = np.where(observed[:, :-1, :], values[:, :-1, :], np.nan)
    if history.shape[1] == 0:
        return np.full((values.shape[0], values.shape[2]), np.nan)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="All-NaN slice encountered", category=RuntimeWarning
        )
        return np.nanmedian(history, axis=1)


def _explaining(contributions: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """``(entities, features)`` bool: the features with an above-average contribution share."""
    if contributions is None:
        return np.ones(shape, dtype=bool)
    finite = np.isfinite(contributions)
    n_finite = finite.sum(axis=1, keepdims=True)
    shares = np.where(finite, contributions, 0.0)
    average = shares.sum(axis=1, keepdims=True) / np.maximum(n_finite, 1)
    above = finite & (shares >= average * (1 - _SHARE_TOLERANCE))
    return np.where(n_finite > 0, above, True)


def apply_suppression(
    anomalous: np.ndarray,
    latest: np.ndarray,
    expected: np.ndarray,
    contributions: np.ndarray | None,
    rules: dict[int, SuppressionRule],
) -> SuppressionResult:
    """Drop the anomalies that no explaining feature justifies under its rule.

    ``anomalous`` is ``(entities,)`` bool, what the fused score said; ``latest`` and ``expected``
    are ``(entities, features)``; ``contributions`` is ``(entities, features)`` non-negative
    feature shares of the anomaly (NaN allowed) or None. ``rules`` maps feature columns to
    rules (:func:`feature_rules`). The semantics are those of the module docstring; entities that
    are not anomalous are always kept with reason ``""``.
    """
    n_entities, n_features = latest.shape
    keep = np.ones(n_entities, dtype=bool)
    reason = np.full(n_entities, "", dtype=object)
    if not rules or not anomalous.any():
        return SuppressionResult(keep=keep, reason=reason)

    ruled = np.zeros(n_features, dtype=bool)
    allows_up = np.ones(n_features, dtype=bool)
    allows_down = np.ones(n_features, dtype=bool)
    min_abs = np.zeros(n_features)
    min_rel = np.zeros(n_features)
    for j, rule in rules.items():
        ruled[j] = True
        allows_up[j] = rule.direction in ("up", "both")
        allows_down[j] = rule.direction in ("down", "both")
        min_abs[j] = rule.min_abs_deviation
        min_rel[j] = rule.min_rel_deviation

    deviation = latest.astype(np.float64) - expected
    size = np.abs(deviation)
    known = np.isfinite(deviation)
    right_way = (allows_up & allows_down) | (allows_up & (deviation > 0))
    right_way |= allows_down & (deviation < 0)
    wrong_way = ruled & known & ~right_way
    too_small = ruled & known & ((size < min_abs) | (size < min_rel * np.abs(expected)))
    fails = wrong_way | too_small

    explaining = _explaining(contributions, (n_entities, n_features))
    any_explaining = explaining.any(axis=1)
    suppressed = anomalous & any_explaining & ~(explaining & ~fails).any(axis=1)
    keep[suppressed] = False
    all_wrong_way = (wrong_way | ~explaining).all(axis=1)
    reason[suppressed & all_wrong_way] = "direction"
    reason[suppressed & ~all_wrong_way] = "min_deviation"
    return SuppressionResult(keep=keep, reason=reason)
