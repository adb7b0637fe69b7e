"""Detector name -> class, and the fitted pair (detector + threshold scaler) saved as one version.

Nothing outside this module needs to know which detector it holds: the agent, the benchmark and
the exporter all go through :class:`FittedModel`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aiops_plugin.calibration import ThresholdScaler
from aiops_plugin.config import DetectorsConfig
from aiops_plugin.detectors.base import Detector, FitReport, Scores
from aiops_plugin.detectors.baselines import (
    ClusterOutlierDetector,
    IsolationForestDetector,
    PcaReconstructionDetector,
    RollingMadDetector,
)
from aiops_plugin.detectors.deep import WindowedDeepDetector
from aiops_plugin.detectors.forecaster import ForecasterDetector
from aiops_plugin.detectors.multiscale import MultiscaleDetector
from aiops_plugin.windows import Windows

DETECTORS: dict[str, type[Detector]] = {
    detector.name: detector
    for detector in (
        RollingMadDetector,
        IsolationForestDetector,
        PcaReconstructionDetector,
        ClusterOutlierDetector,
        ForecasterDetector,
        MultiscaleDetector,
    )
}


def build_detector(name: str, detectors: DetectorsConfig, device: torch.device) -> Detector:
    """A fresh, unfitted detector with the configured hyper-parameters."""
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
    settings = getattr(detectors, name).model_dump(exclude={"enabled"})
    detector_class = DETECTORS[name]
    if issubclass(detector_class, WindowedDeepDetector):
        return detector_class.from_settings(settings, device)
    return detector_class(device=device, **settings)


@dataclass
class ScaledScores:
    """Scores on the exported scale (1.0 = threshold) plus the raw detector output."""

    score: np.ndarray
    uncertainty: np.ndarray | None
    contributions: np.ndarray | None
    raw: Scores


class FittedModel:
    """A detector and the scaler fitted on the same history; saved and loaded together."""

    def __init__(self, detector: Detector, scaler: ThresholdScaler) -> None:
        self.detector = detector
        self.scaler = scaler

    @classmethod
    def fit(cls, detector: Detector, windows: Windows, false_alarm_rate: float) -> FittedModel:
        started = time.perf_counter()
        report: FitReport = detector.fit(windows)
        raw = detector.score(windows)
        scaler = ThresholdScaler(false_alarm_rate).fit(raw.score, windows.keys)
        model = cls(detector, scaler)
        model.report = report
        model.report.seconds = time.perf_counter() - started
        return model

    report: FitReport | None = None

    @property
    def features(self) -> list[str]:
        return self.detector._require_fitted()

    def score(self, windows: Windows) -> ScaledScores:
        raw = self.detector.score(windows)
        keys = windows.keys
        uncertainty = None
        if raw.uncertainty is not None:
            uncertainty = self.scaler.scale(raw.uncertainty, keys)
        return ScaledScores(
            score=self.scaler.scale(raw.score, keys),
            uncertainty=uncertainty,
            contributions=raw.contributions,
            raw=raw,
        )

    def to_bytes(self) -> bytes:
        payload = {
            "detector": self.detector.name,
            "detector_state": _to_tensors(self.detector.state_dict()),
            "scaler_state": self.scaler.state_dict(),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(
        cls, blob: bytes, detectors: DetectorsConfig, device: torch.device
    ) -> FittedModel:
        payload = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
        detector = build_detector(payload["detector"], detectors, device)
        detector.load_state_dict(payload["detector_state"])
        scaler = ThresholdScaler(payload["scaler_state"]["false_alarm_rate"])
        scaler.load_state_dict(payload["scaler_state"])
        return cls(detector, scaler)


def _to_tensors(state: Any) -> Any:
    """numpy arrays to tensors, so ``torch.load(weights_only=True)`` can read the state back."""
    if isinstance(state, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(state))
    if isinstance(state, dict):
        return {key: _to_tensors(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return [_to_tensors(value) for value in state]
    return state
