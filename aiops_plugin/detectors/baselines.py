"""Classic detectors: the honest yardstick and the CPU fallback for the deep ones.

``mad`` is a robust rolling z-score. For every feature, the value at step t is compared with the
median of the trailing ``window`` steps before it, in units of that window's median absolute
deviation (MAD x 1.4826, the normal-consistent scale). A window's MAD is floored at a fraction of
the feature's scale over the whole fit window, so a channel that is flat for an hour does not turn
a rounding wiggle into an alarm.

Real server metrics are far from Gaussian: many channels sit at one value and spike now and then
(SMD has dozens), so their raw z-scores reach hundreds on perfectly normal days and would drown
every other channel. Each feature's z is therefore divided by its own ``reference_quantile`` on the
fit window (never by less than 1): a feature counts as anomalous when it deviates more than it
usually does. The entity's score at t is the largest normalised feature z-score; the features'
shares of the normalised z-scores are its contributions.

It is vectorised over entities, steps and features (torch ``unfold`` + ``nanmedian``), chunked over
time so memory stays bounded, and runs on whatever device its caller chose.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from aiops_plugin.detectors.base import Detector, FitReport, Scores
from aiops_plugin.windows import Windows

MAD_TO_SIGMA = 1.4826
#: z-scores are clipped here: beyond it "very anomalous" is all an operator needs to know.
MAX_Z = 1000.0
#: Scale floor for a feature that never moved during the fit, relative to its magnitude.
FLAT_FEATURE_SCALE = 1e-3


class RollingMadDetector(Detector):
    """Robust rolling z-score / MAD baseline."""

    name: ClassVar[str] = "mad"

    def __init__(
        self,
        window: int = 60,
        min_scale_fraction: float = 0.1,
        reference_quantile: float = 0.99,
        device: torch.device | None = None,
        time_chunk: int = 2048,
    ) -> None:
        super().__init__(device)
        self.window = window
        self.min_scale_fraction = min_scale_fraction
        self.reference_quantile = reference_quantile
        self.time_chunk = time_chunk
        self.entity_scales_: dict[str, np.ndarray] = {}
        self.entity_references_: dict[str, np.ndarray] = {}
        self.default_scale_: np.ndarray | None = None
        self.default_reference_: np.ndarray | None = None

    @property
    def context_steps(self) -> int:
        return self.window

    def fit(self, windows: Windows) -> FitReport:
        started = time.perf_counter()
        values = np.where(windows.observed, windows.values, np.nan)
        with np.errstate(all="ignore"):
            median = np.nanmedian(values, axis=1)
            scale = MAD_TO_SIGMA * np.nanmedian(np.abs(values - median[:, None, :]), axis=1)
            spread = np.nanstd(values, axis=1)
        scale = np.where(scale > 0, scale, spread)
        flat = FLAT_FEATURE_SCALE * np.maximum(np.abs(np.nan_to_num(median)), 1.0)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, flat).astype(np.float32)
        self.features_ = list(windows.features)
        self.entity_scales_ = dict(zip(windows.keys, scale, strict=True))
        self.default_scale_ = np.median(scale, axis=0).astype(np.float32)
        n_entities, _, n_features = windows.values.shape
        self.entity_references_ = {key: np.ones(n_features, np.float32) for key in windows.keys}
        self.default_reference_ = np.ones(n_features, np.float32)
        z = self._feature_z(windows)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reference = np.nanquantile(z, self.reference_quantile, axis=1)
        reference = np.where(np.isfinite(reference), np.maximum(reference, 1.0), 1.0)
        reference = reference.astype(np.float32)
        self.entity_references_ = dict(zip(windows.keys, reference, strict=True))
        self.default_reference_ = np.median(reference, axis=0).astype(np.float32)
        return FitReport(
            n_entities=len(windows.entities),
            n_steps=len(windows.timestamps),
            n_features=len(windows.features),
            seconds=time.perf_counter() - started,
            metrics={"median_fit_scale": float(np.median(scale))},
        )

    def _per_entity(
        self, table: dict[str, np.ndarray], default: np.ndarray | None, keys: list[str]
    ):
        assert default is not None
        return np.stack([table.get(key, default) for key in keys])

    def score(self, windows: Windows) -> Scores:
        features = self._require_fitted()
        windows = windows.reindex_features(features)
        references = self._per_entity(
            self.entity_references_, self.default_reference_, windows.keys
        )
        z = self._feature_z(windows) / references[:, None, :]
        defined = np.isfinite(z)
        any_defined = defined.any(axis=2)
        score = np.where(any_defined, np.where(defined, z, -np.inf).max(axis=2), np.nan)
        total = np.where(defined, z, 0.0).sum(axis=2, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            contributions = np.where(total > 0, np.where(defined, z, 0.0) / total, np.nan)
        return Scores(
            score=score.astype(np.float32), contributions=contributions.astype(np.float32)
        )

    def _feature_z(self, windows: Windows) -> np.ndarray:
        """Robust z ``(entities, time, features)`` of each value against its trailing window;
        NaN where the value is missing or the window holds too few observed values."""
        scales = self._per_entity(self.entity_scales_, self.default_scale_, windows.keys)
        floor = torch.as_tensor(self.min_scale_fraction * scales, device=self.device)[:, None, :]
        values = torch.as_tensor(
            np.where(windows.observed, windows.values, np.nan), device=self.device
        )
        n_entities, n_time, n_features = values.shape
        padded = torch.cat(
            [
                torch.full((n_entities, self.window, n_features), float("nan"), device=self.device),
                values,
            ],
            dim=1,
        )
        z_parts = []
        for chunk_start in range(0, n_time, self.time_chunk):
            chunk_end = min(chunk_start + self.time_chunk, n_time)
            # history[:, t] = the `window` steps before step t: (E, chunk, F, window)
            history = padded[:, chunk_start : chunk_end + self.window - 1].unfold(1, self.window, 1)
            current = values[:, chunk_start:chunk_end]
            median = history.nanmedian(dim=-1).values
            mad = (history - median[..., None]).abs().nanmedian(dim=-1).values
            enough = (~history.isnan()).sum(dim=-1) >= max(2, self.window // 2)
            scale = torch.maximum(MAD_TO_SIGMA * mad, floor)
            z = ((current - median).abs() / scale).clamp(max=MAX_Z)
            z_parts.append(torch.where(enough, z, torch.full_like(z, float("nan"))))
        return torch.cat(z_parts, dim=1).cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        features = self._require_fitted()
        return {
            "window": self.window,
            "min_scale_fraction": self.min_scale_fraction,
            "reference_quantile": self.reference_quantile,
            "features": features,
            "entity_keys": list(self.entity_scales_),
            "entity_scales": np.stack(list(self.entity_scales_.values())),
            "default_scale": self.default_scale_,
            "entity_references": np.stack(list(self.entity_references_.values())),
            "default_reference": self.default_reference_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self.min_scale_fraction = float(state["min_scale_fraction"])
        self.features_ = list(state["features"])
        scales = np.asarray(state["entity_scales"], dtype=np.float32)
        self.entity_scales_ = dict(zip(state["entity_keys"], scales, strict=True))
        self.default_scale_ = np.asarray(state["default_scale"], dtype=np.float32)
        self.reference_quantile = float(state["reference_quantile"])
        references = np.asarray(state["entity_references"], dtype=np.float32)
        self.entity_references_ = dict(zip(state["entity_keys"], references, strict=True))
        self.default_reference_ = np.asarray(state["default_reference"], dtype=np.float32)
