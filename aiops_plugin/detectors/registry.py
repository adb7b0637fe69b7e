"""Detector name -> class, and the fitted detector saved as one version.

Nothing outside this module needs to know which detector it holds: the agent, the benchmark and
the exporter all go through :class:`FittedModel`.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch

from aiops_plugin.calibration.stage import split_point
from aiops_plugin.config import DetectorsConfig
from aiops_plugin.detectors.base import Detector, FitReport, Scores
from aiops_plugin.detectors.baselines import (
    ClusterOutlierDetector,
    IsolationForestDetector,
    PcaReconstructionDetector,
    RollingMadDetector,
)
from aiops_plugin.detectors.deep import WindowedDeepDetector
from aiops_plugin.detectors.diffusion import DiffusionDetector
from aiops_plugin.detectors.forecaster import ForecasterDetector
from aiops_plugin.detectors.fusion import FusionDetector
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
        DiffusionDetector,
        FusionDetector,
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


class FittedModel:
    """A trained detector and the end of the history it trained on; saved as one version.

    It returns raw scores only: turning them into p-values and the exported scale is the
    calibrate stage's job (:mod:`aiops_plugin.calibration.stage`), fitted on steps after
    ``train_end`` and versioned apart from the weights, so calibration settings change without
    retraining.
    """

    def __init__(self, detector: Detector, train_end: float | None = None) -> None:
        self.detector = detector
        #: unix time of the last step trained on; calibration uses only later steps
        self.train_end = train_end

    report: FitReport | None = None

    @classmethod
    def fit(cls, detector: Detector, windows: Windows) -> FittedModel:
        """Train on all of ``windows``."""
        started = time.perf_counter()
        report: FitReport = detector.fit(windows)
        model = cls(detector, float(windows.timestamps[-1]))
        model.report = report
        model.report.seconds = time.perf_counter() - started
        return model

    @classmethod
    def fit_split(
        cls, detector: Detector, windows: Windows, calibration_fraction: float
    ) -> tuple[FittedModel, np.ndarray]:
        """Train on the earlier part of ``windows``, score the later part (the calibration
        slice, ``(entities, steps)`` raw scores) with the context reaching back into the
        training part, so no calibration step is lost. Only the slice and its context are
        scored (a score depends on ``context_steps`` steps before it and nothing else): at 75 %
        training, a quarter of the fit window instead of all of it."""
        n_steps = len(windows.timestamps)
        split = split_point(n_steps, calibration_fraction, 2 * detector.context_steps + 2)
        model = cls.fit(detector, windows.head(split))
        context = min(detector.context_steps, split)
        raw = model.score(windows.tail(n_steps - split + context)).score[:, context:]
        return model, raw

    @property
    def features(self) -> list[str]:
        return self.detector._require_fitted()

    def score(self, windows: Windows) -> Scores:
        """Raw scores ``(entities, time)`` (with the detector's extras) of ``windows``."""
        return self.detector.score(windows)

    def score_latest(self, windows: Windows) -> Scores:
        """Raw scores of the last step of ``windows`` alone, ``(entities, 1)``."""
        return self.detector.score_latest(windows)

    def to_bytes(self) -> bytes:
        payload = {
            "detector": self.detector.name,
            "detector_state": _to_tensors(self.detector.state_dict()),
            "train_end": self.train_end,
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
        return cls(detector, payload.get("train_end"))


def _to_tensors(state: Any) -> Any:
    """numpy arrays to tensors, so ``torch.load(weights_only=True)`` can read the state back."""
    if isinstance(state, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(state))
    if isinstance(state, dict):
        return {key: _to_tensors(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return [_to_tensors(value) for value in state]
    return state
