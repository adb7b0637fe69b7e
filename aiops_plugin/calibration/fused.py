"""The fused score of an entity group: its detectors' p-values combined and calibrated again.

Detectors of one entity look at the same data, so their p-values are strongly dependent; the
maximum of their scores (a min-p rule) alarms up to N times the configured rate. The Cauchy
combination (:func:`cauchy_combination`) stays approximately valid under arbitrary dependence;
its combined p-value is then calibrated once more (a :class:`TailCalibrator` on
``-log(combined p)``) on the calibration slice's p-values, so ``detector="fused"``
at 1.0 is at the configured false-alarm rate too, as measured on data no part of it was fitted
on.

The log score joins afterwards: where an entity has a log p-value this cycle, the calibrated
metric p-value and the log p-value are Cauchy-combined (valid under dependence, so no second
calibration is needed for validity); an entity without logs is fused from its metric detectors
alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aiops_plugin.calibration.combination import cauchy_combination
from aiops_plugin.calibration.tail import TailCalibrator

FUSED = "fused"


def combined_statistic(p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``-log`` of the Cauchy-combined p-value of ``p`` ``(detectors, ...)``: higher = more
    anomalous, the raw score the fused calibrator calibrates."""
    with np.errstate(divide="ignore"):
        return -np.log(np.clip(cauchy_combination(p, weights), 1e-300, 1.0))


class FusedCalibrator:
    """Cauchy combination of a group's detector p-values, calibrated on the calibration slice."""

    def __init__(
        self,
        detectors: list[str],
        weights: dict[str, float] | None = None,
        tail_fraction: float = 0.05,
    ) -> None:
        self.detectors = list(detectors)
        self.weights = dict(weights or {})
        self.tail_fraction = tail_fraction
        self.calibrator_: TailCalibrator | None = None

    def _weights(self) -> np.ndarray | None:
        if not self.weights:
            return None
        return np.array([self.weights.get(name, 1.0) for name in self.detectors], np.float64)

    def _stack(self, p_by_detector: dict[str, np.ndarray]) -> np.ndarray:
        missing = [name for name in self.detectors if name not in p_by_detector]
        if missing:
            raise KeyError(f"fused calibration needs p-values of {missing}")
        return np.stack([np.asarray(p_by_detector[name], np.float64) for name in self.detectors])

    def fit(self, p_by_detector: dict[str, np.ndarray], keys: list[str]) -> FusedCalibrator:
        """``p_by_detector``: the calibration slice's p-values, each ``(entities, steps)``."""
        statistic = combined_statistic(self._stack(p_by_detector), self._weights())
        self.calibrator_ = TailCalibrator(tail_fraction=self.tail_fraction).fit(statistic, keys)
        return self

    def p_values(self, p_by_detector: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
        """Calibrated fused p-values of ``(entities, ...)`` detector p-values."""
        if self.calibrator_ is None:
            raise RuntimeError("FusedCalibrator is not fitted")
        statistic = combined_statistic(self._stack(p_by_detector), self._weights())
        return self.calibrator_.p_values(statistic, keys)

    def state_dict(self) -> dict[str, Any]:
        if self.calibrator_ is None:
            raise RuntimeError("FusedCalibrator is not fitted")
        return {
            "detectors": self.detectors,
            "weights": self.weights,
            "tail_fraction": self.tail_fraction,
            "calibrator": self.calibrator_.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FusedCalibrator:
        fused = cls(list(state["detectors"]), dict(state["weights"]), state["tail_fraction"])
        fused.calibrator_ = TailCalibrator(tail_fraction=fused.tail_fraction)
        fused.calibrator_.load_state_dict(state["calibrator"])
        return fused


def with_log_evidence(p_metrics: np.ndarray, p_logs: np.ndarray | None) -> np.ndarray:
    """Fold the log p-value into the calibrated metric p-value where the entity has one."""
    if p_logs is None:
        return p_metrics
    return cauchy_combination(np.stack([p_metrics, p_logs]))
