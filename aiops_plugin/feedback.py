"""What the next fit learns from the labels engineers give anomaly events.

Three uses, each on the events of one group labelled within its fit window:

- **Detector weights** in the fused Cauchy combination. A detector that was beyond its own
  threshold at the peak of confirmed incidents and quiet at false alarms deserves more say:
  ``w_d = (1 + TP_d) / (1 + FP_d)``, with ``TP_d`` / ``FP_d`` the labelled true / false
  positives at whose peak detector ``d`` scored >= 1, normalised to mean 1. The +1 keeps a
  detector no label spoke about at the neutral weight, and a handful of labels moves weights by
  small factors only. The combination stays valid under any fixed weights (Liu & Xie 2020), and
  the fused score is calibrated again on the calibration slice with them.
- **The labelled probability**: with at least ``feedback.min_labelled_events`` labelled events
  of both kinds, P(anomalous) becomes an isotonic regression of the labels on the events' peak
  fused p-values, with the calibration slice's fused p-values as normal steps (those are steps
  no one called an incident). It answers "of the events that looked like this, how many were
  real", which the unlabelled mixture cannot.
- **The early warning's labelled probability**: with as many labelled events, each horizon's
  P(an incident within the horizon) becomes an isotonic regression on the early-warning scores
  of the steps before confirmed incidents (each event keeps those of the steps before it
  opened) against those before false alarms and the calibration slice's
  (:mod:`aiops_plugin.early_warning`).
- **Normal-data selection**: confirmed incidents leave the next fit's training and calibration
  data (:mod:`aiops_plugin.fit_exclusions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aiops_plugin.calibration.probability import LabelledProbability
from aiops_plugin.store import AnomalyEvent

TRUE_POSITIVE = "true_positive"
FALSE_POSITIVE = "false_positive"


def detector_weights(
    labelled: Sequence[tuple[AnomalyEvent, str]], detectors: Sequence[str]
) -> dict[str, float]:
    """Fused-combination weights from labelled events; empty (equal weights) without labels."""
    if not labelled or not detectors:
        return {}
    flagged = np.array(
        [
            [float(event.detector_scores.get(name, np.nan)) >= 1.0 for name in detectors]
            for event, _ in labelled
        ],
        dtype=bool,
    )
    true = np.array([label == TRUE_POSITIVE for _, label in labelled], dtype=bool)
    weights = (1.0 + flagged[true].sum(axis=0)) / (1.0 + flagged[~true].sum(axis=0))
    weights = weights / weights.mean()
    return {name: float(w) for name, w in zip(detectors, weights, strict=True)}


def labelled_probability(
    labelled: Sequence[tuple[AnomalyEvent, str]],
    false_alarm_rate: float,
    normal_p: np.ndarray,
    min_labelled_events: int,
) -> LabelledProbability | None:
    """The isotonic P(anomalous | fused p) of the labels, or None with too few labels (fewer
    than ``min_labelled_events``, or only one kind)."""
    if len(labelled) < min_labelled_events:
        return None
    true = np.array([label == TRUE_POSITIVE for _, label in labelled], dtype=bool)
    if true.all() or not true.any():
        return None
    # the exported score is log p / log rate, so the peak's p-value is rate ** score
    peak_p = np.array(
        [false_alarm_rate ** max(event.peak_score, 0.0) for event, _ in labelled], np.float64
    )
    normal = np.asarray(normal_p, dtype=np.float64).ravel()
    normal = normal[np.isfinite(normal)]
    p = np.concatenate([peak_p, normal])
    labels = np.concatenate([true, np.zeros(normal.size, dtype=bool)])
    return LabelledProbability(min_positives=1, min_negatives=1).fit(p, labels)


def warning_labels(
    labelled: Sequence[tuple[AnomalyEvent, str]],
    horizons: Sequence[str],
    min_labelled_events: int,
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per horizon (its exported label, e.g. ``"15m"``), ``(scores before confirmed incidents,
    scores before false alarms)``: the early-warning scores the events kept of the steps before
    they opened. None with fewer than ``min_labelled_events`` labelled events or where no
    confirmed incident kept any score (events opened before the early warning ran)."""
    if len(labelled) < min_labelled_events:
        return None
    out = []
    for horizon in horizons:
        before = {
            kind: [
                score
                for event, label in labelled
                if label == kind
                for score in event.warning_scores.get(horizon, ())
            ]
            for kind in (TRUE_POSITIVE, FALSE_POSITIVE)
        }
        out.append(
            (
                np.asarray(before[TRUE_POSITIVE], dtype=np.float64),
                np.asarray(before[FALSE_POSITIVE], dtype=np.float64),
            )
        )
    if not any(incidents.size for incidents, _ in out):
        return None
    return out
