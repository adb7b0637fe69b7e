"""From raw detector scores to the exported scale, where 1.0 is the alarm threshold.

Kept apart from the detectors so that every detector, classic or deep, is scaled the same way and
the scaling is versioned with the model. The threshold of an entity is the ``1 - false_alarm_rate``
quantile of the detector's raw scores on that entity's fit window; dividing by it makes "above 1"
mean "rarer than the configured false-alarm rate on normal history". An entity with too few scored
fit steps for its own quantile to be estimated (fewer than ``MIN_TAIL_SAMPLES / rate`` steps) uses
the quantile pooled over its whole group, as do entities first seen after the fit.

Scores with ties (a log score is often the same value for every normal step) would put the normal
steps exactly on 1.0; when more than ``false_alarm_rate`` of the fit scores sit at or above the
quantile, the threshold is raised just above it, so normal history scales to just below 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Scored steps expected above the quantile before a per-entity quantile is trusted.
MIN_TAIL_SAMPLES = 5
#: A threshold is never below this, so a detector that scored all-zero history still divides.
MIN_THRESHOLD = 1e-6
#: Relative margin that lifts a threshold above tied fit scores.
TIE_MARGIN = 1e-3


class ThresholdScaler:
    """Per-entity quantile thresholds; ``scale(raw) = raw / threshold``."""

    def __init__(self, false_alarm_rate: float) -> None:
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        self.false_alarm_rate = false_alarm_rate
        self.thresholds_: dict[str, float] = {}
        self.pooled_threshold_: float | None = None

    def fit(self, raw: np.ndarray, keys: list[str]) -> ThresholdScaler:
        """``raw``: ``(entities, time)`` raw scores on the fit window, NaN where undefined."""
        finite = raw[np.isfinite(raw)]
        if finite.size == 0:
            raise ValueError("no finite raw scores on the fit window: cannot set a threshold")
        self.pooled_threshold_ = self._threshold(finite)
        needed = MIN_TAIL_SAMPLES / self.false_alarm_rate
        self.thresholds_ = {}
        for key, row in zip(keys, raw, strict=True):
            row = row[np.isfinite(row)]
            if row.size >= needed:
                self.thresholds_[key] = self._threshold(row)
        return self

    def _threshold(self, scores: np.ndarray) -> float:
        threshold = float(np.quantile(scores, 1.0 - self.false_alarm_rate))
        if np.mean(scores >= threshold) > self.false_alarm_rate:
            threshold = threshold * (1.0 + TIE_MARGIN) + TIE_MARGIN
        return max(threshold, MIN_THRESHOLD)

    def thresholds_for(self, keys: list[str]) -> np.ndarray:
        if self.pooled_threshold_ is None:
            raise RuntimeError("ThresholdScaler is not fitted")
        return np.array(
            [self.thresholds_.get(key, self.pooled_threshold_) for key in keys], dtype=np.float64
        )

    def scale(self, raw: np.ndarray, keys: list[str]) -> np.ndarray:
        """Raw ``(entities, ...)`` scores to the exported scale (1.0 = threshold)."""
        thresholds = self.thresholds_for(keys).reshape((-1,) + (1,) * (raw.ndim - 1))
        return (raw / thresholds).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {
            "false_alarm_rate": self.false_alarm_rate,
            "keys": list(self.thresholds_),
            "thresholds": [self.thresholds_[key] for key in self.thresholds_],
            "pooled_threshold": self.pooled_threshold_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.false_alarm_rate = float(state["false_alarm_rate"])
        self.thresholds_ = dict(
            zip(state["keys"], (float(t) for t in state["thresholds"]), strict=True)
        )
        self.pooled_threshold_ = float(state["pooled_threshold"])


def fuse_scores(scaled: list[np.ndarray]) -> np.ndarray:
    """Fused score of several detectors already on the common scale: their maximum.

    Each input is 1.0 at its own false-alarm rate, so the maximum alarms when any detector does;
    its false-alarm rate is at most the sum of theirs. NaN where no detector scored.
    """
    stacked = np.stack(scaled)
    defined = np.isfinite(stacked)
    best = np.where(defined, stacked, -np.inf).max(axis=0)
    return np.where(defined.any(axis=0), best, np.nan).astype(np.float32)
