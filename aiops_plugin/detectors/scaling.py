"""Per-entity robust standardisation, shared by the PyOD baselines and the deep detectors.

One model serves a whole entity group, so every entity's features are first put on a common
footing with that entity's own fit-window median and robust scale: a busy and an idle host then
look alike to the model.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from aiops_plugin.windows import Windows

MAD_TO_SIGMA = 1.4826
#: Scale of a feature that never moved during the fit, relative to its magnitude.
FLAT_FEATURE_SCALE = 1e-3
#: Default clip of standardised values, so one wild sample cannot blow up a batch.
MAX_STANDARD = 50.0


class RobustScaler:
    """Per-entity, per-feature median and robust scale from the fit window.

    Entities first seen after the fit use the median of the fitted entities' parameters.
    """

    def __init__(self) -> None:
        self.centers_: dict[str, np.ndarray] = {}
        self.scales_: dict[str, np.ndarray] = {}
        self.default_center_: np.ndarray | None = None
        self.default_scale_: np.ndarray | None = None

    def fit(self, windows: Windows) -> RobustScaler:
        values = np.where(windows.observed, windows.values, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            center = np.nanmedian(values, axis=1)
            scale = MAD_TO_SIGMA * np.nanmedian(np.abs(values - center[:, None, :]), axis=1)
            spread = np.nanstd(values, axis=1)
        scale = np.where(scale > 0, scale, spread)
        flat = FLAT_FEATURE_SCALE * np.maximum(np.abs(np.nan_to_num(center)), 1.0)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, flat).astype(np.float32)
        center = np.nan_to_num(center).astype(np.float32)
        self.centers_ = dict(zip(windows.keys, center, strict=True))
        self.scales_ = dict(zip(windows.keys, scale, strict=True))
        self.default_center_ = np.median(center, axis=0)
        self.default_scale_ = np.median(scale, axis=0)
        return self

    def transform(
        self, windows: Windows, clip: float = MAX_STANDARD
    ) -> tuple[np.ndarray, np.ndarray]:
        """Standardised values with missing = 0 (clipped to +-``clip``), and the float mask;
        both ``(E, T, F)``."""
        assert self.default_center_ is not None and self.default_scale_ is not None
        centers = np.stack([self.centers_.get(k, self.default_center_) for k in windows.keys])
        scales = np.stack([self.scales_.get(k, self.default_scale_) for k in windows.keys])
        values = np.where(windows.observed, windows.values, np.nan)
        standard = (values - centers[:, None, :]) / scales[:, None, :]
        standard = np.clip(np.nan_to_num(standard, nan=0.0), -clip, clip)
        return standard.astype(np.float32), windows.observed.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": list(self.centers_),
            "centers": np.stack(list(self.centers_.values())),
            "scales": np.stack(list(self.scales_.values())),
            "default_center": self.default_center_,
            "default_scale": self.default_scale_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = list(state["keys"])
        self.centers_ = dict(zip(keys, np.asarray(state["centers"], np.float32), strict=True))
        self.scales_ = dict(zip(keys, np.asarray(state["scales"], np.float32), strict=True))
        self.default_center_ = np.asarray(state["default_center"], np.float32)
        self.default_scale_ = np.asarray(state["default_scale"], np.float32)
