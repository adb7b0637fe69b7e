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


#: Values per block of entities in ``RobustScaler.fit`` (16 MB of float32).
FIT_CHUNK_ELEMENTS = 2**22


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
        """Each entity's statistics over its own steps, a block of entities at a time (at most
        ``FIT_CHUNK_ELEMENTS`` values): the whole block's masked copy, nanmedian's copy of it
        and the deviations were over twice the fit block at once."""
        n_entities, n_time, n_features = windows.values.shape
        block = max(1, FIT_CHUNK_ELEMENTS // max(1, n_time * n_features))
        center = np.empty((n_entities, n_features), dtype=windows.values.dtype)
        scale = np.empty_like(center)
        spread = np.empty_like(center)
        for e0 in range(0, n_entities, block):
            e1 = min(e0 + block, n_entities)
            values = np.where(windows.observed[e0:e1], windows.values[e0:e1], np.nan)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                center[e0:e1] = np.nanmedian(values, axis=1)
                deviation = np.abs(values - center[e0:e1, None, :])
                scale[e0:e1] = MAD_TO_SIGMA * np.nanmedian(deviation, axis=1)
                spread[e0:e1] = np.nanstd(values, axis=1)
            del values, deviation
        scale = np.where(scale > 0, scale, spread)
        flat = FLAT_FEATURE_SCALE * np.maximum(np.abs(np.nan_to_num(center)), 1.0)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, flat).astype(np.float32)
        center = np.nan_to_num(center).astype(np.float32)
        self.centers_ = dict(zip(windows.keys, center, strict=True))
        self.scales_ = dict(zip(windows.keys, scale, strict=True))
        self.default_center_ = np.median(center, axis=0)
        self.default_scale_ = np.median(scale, axis=0)
        return self

    def _parameters(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(E, F)`` centers and scales of ``keys`` (the defaults for entities not fitted)."""
        assert self.default_center_ is not None and self.default_scale_ is not None
        centers = np.stack([self.centers_.get(k, self.default_center_) for k in keys])
        scales = np.stack([self.scales_.get(k, self.default_scale_) for k in keys])
        return centers, scales

    def transform(
        self, windows: Windows, clip: float = MAX_STANDARD
    ) -> tuple[np.ndarray, np.ndarray]:
        """Standardised values with missing = 0 (clipped to +-``clip``), and the float mask;
        both ``(E, T, F)``."""
        centers, scales = self._parameters(windows.keys)
        # one copy worked in place: the expression form held four copies of the block at once
        dtype = np.result_type(windows.values.dtype, np.float32)
        standard = windows.values.astype(dtype, copy=True)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            standard -= centers[:, None, :]
            standard /= scales[:, None, :]
        np.nan_to_num(standard, copy=False, nan=0.0)
        np.clip(standard, -clip, clip, out=standard)
        standard[~windows.observed] = 0.0
        return standard.astype(np.float32, copy=False), windows.observed.astype(np.float32)

    def transform_rows(
        self, windows: Windows, entities: np.ndarray, times: np.ndarray, clip: float = MAX_STANDARD
    ) -> np.ndarray:
        """:meth:`transform`'s standardised values at ``(entities[i], times[i])`` only,
        ``(n, F)``: the same numbers without the whole ``(E, T, F)`` block and its copies."""
        centers, scales = self._parameters(windows.keys)
        values = np.where(
            windows.observed[entities, times], windows.values[entities, times], np.nan
        )
        standard = (values - centers[entities]) / scales[entities]
        standard = np.clip(np.nan_to_num(standard, nan=0.0), -clip, clip)
        return standard.astype(np.float32)

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
