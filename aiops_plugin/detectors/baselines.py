"""Classic detectors: the honest yardstick and the CPU fallback for the deep ones.

``mad`` (robust rolling z-score) runs by default. ``iforest``, ``pca`` and ``cblof`` are PyOD
models over each step's standardised feature vector (:class:`PointwiseDetector`), used as
benchmark baselines and available to the agent.

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
entities and time so that no chunk holds more than ``chunk_elements`` window values (the whole
``(entities, steps, features, window)`` block is ~11 MB per entity at 10 features and 2048 steps,
22 GB at 2000 entities), and runs on whatever device its caller chose. A cycle needs the last
step only (:meth:`RollingMadDetector.score_latest`), so only that step is computed.
"""

from __future__ import annotations

import pickle
import time
import warnings
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch

from aiops_plugin.detectors.base import Detector, FitReport, Scores
from aiops_plugin.detectors.scaling import MAD_TO_SIGMA, RobustScaler
from aiops_plugin.windows import Windows

#: z-scores are clipped here: beyond it "very anomalous" is all an operator needs to know.
MAX_Z = 1000.0
#: Window values per chunk of ``mad``'s rolling medians (~64 MB of float32, a few times that
#: while ``nanmedian`` sorts).
MAD_CHUNK_ELEMENTS = 1 << 24


class RollingMadDetector(Detector):
    """Robust rolling z-score / MAD baseline."""

    name: ClassVar[str] = "mad"

    def __init__(
        self,
        window: int = 60,
        min_scale_fraction: float = 0.1,
        reference_quantile: float = 0.99,
        device: torch.device | None = None,
        chunk_elements: int = MAD_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(device)
        self.window = window
        self.min_scale_fraction = min_scale_fraction
        self.reference_quantile = reference_quantile
        self.chunk_elements = chunk_elements
        self.entity_scales_: dict[str, np.ndarray] = {}
        self.entity_references_: dict[str, np.ndarray] = {}
        self.default_scale_: np.ndarray | None = None
        self.default_reference_: np.ndarray | None = None

    @property
    def context_steps(self) -> int:
        return self.window

    def fit(self, windows: Windows) -> FitReport:
        started = time.perf_counter()
        fit_scales = RobustScaler().fit(windows)
        self.features_ = list(windows.features)
        self.entity_scales_ = fit_scales.scales_
        assert fit_scales.default_scale_ is not None
        self.default_scale_ = fit_scales.default_scale_.astype(np.float32)
        n_entities, _, n_features = windows.values.shape
        self.entity_references_ = {key: np.ones(n_features, np.float32) for key in windows.keys}
        self.default_reference_ = np.ones(n_features, np.float32)
        # the reference quantile of each entity's z over the fit window, a block of entities
        # at a time: the whole (entities, time, features) z and nanquantile's copy of it were
        # twice the fit block at once
        n_time = windows.values.shape[1]
        block = max(1, self.chunk_elements // max(1, n_time * n_features))
        reference = np.empty((n_entities, n_features), dtype=np.float32)
        for e0 in range(0, n_entities, block):
            e1 = min(e0 + block, n_entities)
            z = self._feature_z(windows, entities=(e0, e1))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                reference[e0:e1] = np.nanquantile(z, self.reference_quantile, axis=1)
            del z
        reference = np.where(np.isfinite(reference), np.maximum(reference, 1.0), 1.0)
        reference = reference.astype(np.float32)
        self.entity_references_ = dict(zip(windows.keys, reference, strict=True))
        self.default_reference_ = np.median(reference, axis=0).astype(np.float32)
        return FitReport(
            n_entities=len(windows.entities),
            n_steps=len(windows.timestamps),
            n_features=len(windows.features),
            seconds=time.perf_counter() - started,
            metrics={
                "median_fit_scale": float(np.median(np.stack(list(self.entity_scales_.values()))))
            },
        )

    def _per_entity(
        self, table: dict[str, np.ndarray], default: np.ndarray | None, keys: list[str]
    ):
        assert default is not None
        return np.stack([table.get(key, default) for key in keys])

    def score(self, windows: Windows) -> Scores:
        return self._scores(windows, from_step=0)

    def score_latest(self, windows: Windows) -> Scores:
        """The last step alone: one rolling median per feature instead of one per step."""
        return self._scores(windows, from_step=len(windows.timestamps) - 1)

    def _scores(self, windows: Windows, from_step: int) -> Scores:
        """Scores and contributions from ``from_step`` on, a block of entities at a time
        (``chunk_elements`` z values): the temporaries of one pass were five times the z."""
        features = self._require_fitted()
        windows = windows.reindex_features(features)
        references = self._per_entity(
            self.entity_references_, self.default_reference_, windows.keys
        )
        n_entities, n_time, n_features = windows.values.shape
        steps = n_time - from_step
        score = np.empty((n_entities, steps), dtype=np.float32)
        contributions = np.empty((n_entities, steps, n_features), dtype=np.float32)
        # a quarter of chunk_elements: about five z-sized temporaries are alive at once
        block = max(1, self.chunk_elements // 4 // max(1, steps * n_features))
        for e0 in range(0, n_entities, block):
            e1 = min(e0 + block, n_entities)
            z = self._feature_z(windows, from_step, (e0, e1)) / references[e0:e1, None, :]
            defined = np.isfinite(z)
            score[e0:e1] = np.where(
                defined.any(axis=2), np.where(defined, z, -np.inf).max(axis=2), np.nan
            )
            shown = np.where(defined, z, 0.0)
            total = shown.sum(axis=2, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                contributions[e0:e1] = np.where(total > 0, shown / total, np.nan)
        return Scores(score=score, contributions=contributions)

    def _feature_z(
        self, windows: Windows, from_step: int = 0, entities: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Robust z ``(entities, time - from_step, features)`` of each value from ``from_step``
        on against its trailing window; NaN where the value is missing or the window holds too
        few observed values. Chunked over entities and steps (``chunk_elements``).
        ``entities``: ``(first, end)`` rows of ``windows`` only."""
        lo, hi = entities if entities is not None else (0, windows.values.shape[0])
        scales = self._per_entity(self.entity_scales_, self.default_scale_, windows.keys[lo:hi])
        values_all, observed_all = windows.values[lo:hi], windows.observed[lo:hi]
        n_entities, n_time, n_features = values_all.shape
        per_step = n_features * self.window
        steps = max(1, min(n_time - from_step, self.chunk_elements // per_step))
        entities = max(1, self.chunk_elements // (steps * per_step))
        z = np.full((n_entities, n_time - from_step, n_features), np.nan, dtype=np.float32)
        first = max(0, from_step - self.window)  # the earliest value a computed step reads
        for e0 in range(0, n_entities, entities):
            e1 = min(e0 + entities, n_entities)
            floor = torch.as_tensor(self.min_scale_fraction * scales[e0:e1], device=self.device)
            values = torch.as_tensor(
                np.where(observed_all[e0:e1, first:], values_all[e0:e1, first:], np.nan),
                device=self.device,
            )
            # padded[:, t - first + pad] is step t; `pad` NaN steps stand before the data
            pad = self.window - (from_step - first)
            padded = torch.cat(
                [torch.full((e1 - e0, pad, n_features), float("nan"), device=self.device), values],
                dim=1,
            )
            for t0 in range(from_step, n_time, steps):
                t1 = min(t0 + steps, n_time)
                # history[:, i] = the `window` steps before step t0 + i: (E, steps, F, window)
                at = t0 - first + pad
                history = padded[:, at - self.window : at + t1 - t0 - 1].unfold(1, self.window, 1)
                current = padded[:, at : at + t1 - t0]
                median = history.nanmedian(dim=-1).values
                mad = (history - median[..., None]).abs().nanmedian(dim=-1).values
                enough = (~history.isnan()).sum(dim=-1) >= max(2, self.window // 2)
                scale = torch.maximum(MAD_TO_SIGMA * mad, floor[:, None, :])
                chunk = ((current - median).abs() / scale).clamp(max=MAX_Z)
                chunk = torch.where(enough, chunk, torch.full_like(chunk, float("nan")))
                z[e0:e1, t0 - from_step : t1 - from_step] = chunk.cpu().numpy()
        return z

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


#: Rows per ``decision_function`` call when scoring (a block of entities' steps).
SCORE_BLOCK_ROWS = 200_000


class PointwiseDetector(Detector):
    """A PyOD model over each step's feature vector, one model for the whole entity group.

    Every entity's features are robustly standardised (:class:`RobustScaler`), so entities of
    different size share one model and one ``decision_function`` call over all
    ``entities x steps`` rows.
    Missing features are set to the entity's median (0 after standardising) only where at least
    half of the step's features were observed; a step with less is not scored (NaN).
    The fit uses at most ``max_train_samples`` rows, drawn with a fixed seed.
    """

    def __init__(
        self, max_train_samples: int = 20000, seed: int = 0, device: torch.device | None = None
    ) -> None:
        super().__init__(device)
        self.max_train_samples = max_train_samples
        self.seed = seed
        self.model_: Any = None
        self.scaler_ = RobustScaler()

    def build_model(self) -> Any:
        raise NotImplementedError

    def _hyper_parameters(self) -> dict[str, Any]:
        return {"max_train_samples": self.max_train_samples, "seed": self.seed}

    def _rows(self, windows: Windows) -> tuple[np.ndarray, np.ndarray]:
        """``(entities*time, features)`` standardised rows and ``(entities*time,)`` validity."""
        standard, _ = self.scaler_.transform(windows, clip=MAX_Z)
        valid = windows.observed.mean(axis=2) >= 0.5
        return standard.reshape(-1, standard.shape[2]), valid.reshape(-1)

    def fit(self, windows: Windows) -> FitReport:
        """Fit on at most ``max_train_samples`` valid rows, drawn with the seed first and only
        then standardised (standardising the whole block to keep 20,000 rows of it cost about
        five copies of the fit block)."""
        started = time.perf_counter()
        self.features_ = list(windows.features)
        self.scaler_.fit(windows)
        valid = np.flatnonzero((windows.observed.mean(axis=2) >= 0.5).reshape(-1))
        if len(valid) > self.max_train_samples:
            pick = np.random.default_rng(self.seed).choice(
                len(valid), self.max_train_samples, replace=False
            )
            valid = valid[np.sort(pick)]
        entities, times = np.divmod(valid, windows.values.shape[1])
        rows = self.scaler_.transform_rows(windows, entities, times, clip=MAX_Z)
        self.model_ = self.build_model()
        self.model_.fit(rows)
        return FitReport(
            n_entities=len(windows.entities),
            n_steps=len(windows.timestamps),
            n_features=len(windows.features),
            seconds=time.perf_counter() - started,
            metrics={"train_rows": float(len(rows))},
        )

    def score(self, windows: Windows) -> Scores:
        """One ``decision_function`` call per block of entities (``SCORE_BLOCK_ROWS`` rows),
        so the standardised copies stay bounded whatever the fleet's size."""
        features = self._require_fitted()
        windows = windows.reindex_features(features)
        n_entities, n_time, n_features = windows.values.shape
        raw = np.full((n_entities, n_time), np.nan, dtype=np.float32)
        contributions: np.ndarray | None = None
        block = max(1, SCORE_BLOCK_ROWS // max(1, n_time))
        for e0 in range(0, n_entities, block):
            e1 = min(e0 + block, n_entities)
            part = replace(
                windows,
                values=windows.values[e0:e1],
                observed=windows.observed[e0:e1],
                entities=windows.entities[e0:e1],
                logs=None,
            )
            rows, valid = self._rows(part)
            if valid.any():
                raw[e0:e1].reshape(-1)[valid] = self.model_.decision_function(rows[valid])
            shares = self._contributions(rows, valid)
            if shares is not None:
                if contributions is None:
                    contributions = np.full(
                        (n_entities, n_time, n_features), np.nan, dtype=np.float32
                    )
                contributions[e0:e1] = shares.reshape(e1 - e0, n_time, -1)
        return Scores(score=raw, contributions=contributions)

    def _contributions(self, rows: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        features = self._require_fitted()
        return {
            "hyper_parameters": self._hyper_parameters(),
            "features": features,
            "scaler": self.scaler_.state_dict(),
            # a fitted scikit-learn / PyOD estimator; written and read only by this store
            "model_pickle": pickle.dumps(self.model_),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["hyper_parameters"].items():
            setattr(self, name, value)
        self.features_ = list(state["features"])
        self.scaler_.load_state_dict(state["scaler"])
        self.model_ = pickle.loads(state["model_pickle"])  # noqa: S301 - our own store


class IsolationForestDetector(PointwiseDetector):
    """Isolation Forest (Liu et al. 2008) via PyOD's ``IForest`` (scikit-learn underneath)."""

    name: ClassVar[str] = "iforest"

    def __init__(self, n_estimators: int = 200, max_samples: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_estimators = n_estimators
        self.max_samples = max_samples

    def _hyper_parameters(self) -> dict[str, Any]:
        return {
            **super()._hyper_parameters(),
            "n_estimators": self.n_estimators,
            "max_samples": self.max_samples,
        }

    def build_model(self) -> Any:
        from pyod.models.iforest import IForest

        return IForest(
            n_estimators=self.n_estimators,
            max_samples=self.max_samples,
            random_state=self.seed,
            n_jobs=1,
        )


class PcaReconstructionDetector(PointwiseDetector):
    """PCA reconstruction (Shyu et al. 2003) via PyOD's ``PCA``: distance of a step from the
    principal subspace of normal steps. Contributions are each feature's share of the squared
    residual outside that subspace."""

    name: ClassVar[str] = "pca"

    def __init__(self, n_components: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_components = n_components

    def _hyper_parameters(self) -> dict[str, Any]:
        return {**super()._hyper_parameters(), "n_components": self.n_components}

    def build_model(self) -> Any:
        from pyod.models.pca import PCA

        return PCA(n_components=self.n_components, standardization=True, random_state=self.seed)

    def _contributions(self, rows: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        detector = self.model_.detector_
        standard = self.model_.scaler_.transform(rows)
        reconstructed = detector.inverse_transform(detector.transform(standard))
        residual = (standard - reconstructed) ** 2
        total = residual.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = np.where(total > 0, residual / total, np.nan)
        shares[~valid] = np.nan
        return shares.astype(np.float32)


class ClusterOutlierDetector(PointwiseDetector):
    """CBLOF, cluster-based local outlier factor (He et al. 2003), via PyOD: distance to the
    nearest large k-means cluster. Cluster-distance detectors (CBLOF, KMeansAD) rank near the top
    of TSB-AD's multivariate results, next to PCA."""

    name: ClassVar[str] = "cblof"

    def __init__(self, n_clusters: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_clusters = n_clusters

    def _hyper_parameters(self) -> dict[str, Any]:
        return {**super()._hyper_parameters(), "n_clusters": self.n_clusters}

    def build_model(self) -> Any:
        from pyod.models.cblof import CBLOF

        return CBLOF(n_clusters=self.n_clusters, random_state=self.seed, n_jobs=1)
