"""What every deep detector shares: per-entity robust normalisation, sliding windows over
``(entities, time, features)``, masked training through :mod:`aiops_plugin.detectors.training`, and
batched scoring of the last step of each window.

One model serves a whole entity group: every entity's features are standardised with that entity's
own fit-window median and scale (so a busy and an idle host look alike to the network), windows of
all entities are pooled for training, and scoring runs all entities' windows through the network
in large batches, never a Python loop per entity. Missing values enter the network as 0 (the
entity's median after standardising) together with the mask, and losses ignore them; a step
whose own values are all missing is not scored.

A subclass provides the network (:meth:`build_model`), its training loss (:meth:`loss`) and how a
window's last step is scored (:meth:`score_batch`); shapes are ``(batch, window, features)``.
Optionally: per-step inputs beside the metrics on the same grid (:meth:`side_inputs`, e.g. the
entity's log features), windowed with them and passed to both after ``x, mask``; and
:meth:`after_step`, run after every optimiser step (an EMA teacher's update).

Scoring runs ``score_batch_size`` windows per forward pass (0: sized to the device, see
:func:`default_score_batch_size`); it is read at scoring time and never changes a score. Any
noise a score draws must not depend on the batch a window lands in: :func:`seeded_noise` draws it
from a fixed seed, once, shared by every window, so a checkpoint round trip and any batching
give identical scores.

Scoring runs in chunks of ``score_batch_size`` windows (0: sized to the device), each chunk's
results moved back to the host, so device memory holds one chunk; on a GPU the inputs go
through pinned memory with non-blocking copies under bf16 autocast and ``inference_mode``. An
out-of-memory error halves the chunk and the pass goes on (the smaller size is kept for the
next cycles): a fleet too large for the device is slower, never a crash.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from aiops_plugin.detectors.base import Detector, FitReport, Scores
from aiops_plugin.detectors.scaling import MAX_STANDARD, RobustScaler
from aiops_plugin.detectors.training import (
    TrainingInterrupted,
    TrainingSettings,
    autocast,
    train,
)
from aiops_plugin.windows import Windows

log = logging.getLogger(__name__)


@dataclass
class WindowScores:
    """Scores of the last step of each window in a batch.

    Attributes:
        score: ``(batch,)`` raw anomaly score.
        uncertainty: ``(batch,)`` predictive standard deviation of the score, or None.
        contributions: ``(batch, features)`` non-negative, each row summing to 1, or None.
    """

    score: torch.Tensor
    uncertainty: torch.Tensor | None = None
    contributions: torch.Tensor | None = None


def default_score_batch_size(device: torch.device) -> int:
    """Windows per scoring forward pass when the setting is 0: 8192 on a GPU (kernels are
    launch-bound below that), 1024 on a CPU (larger batches only grow memory there)."""
    return 8192 if device.type == "cuda" else 1024


def seeded_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` from a fixed seed: the same tensor on every call,
    for every batch and after a checkpoint round trip (drawn on the CPU, then moved)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device)


def sliding_windows(values: torch.Tensor, window: int) -> torch.Tensor:
    """``(E, T, F)`` -> view ``(E, T - window + 1, window, F)`` of every full window."""
    return values.unfold(1, window, 1).permute(0, 1, 3, 2)


class WindowedDeepDetector(Detector):
    """Base of deep detectors that read ``window`` steps and score the window's last step."""

    def __init__(
        self,
        window: int = 128,
        training: TrainingSettings | None = None,
        max_train_windows: int = 20000,
        validation_fraction: float = 0.1,
        min_observed_fraction: float = 0.5,
        score_batch_size: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(device)
        self.window = window
        self.score_batch_size = score_batch_size
        #: windows per pass after an out-of-memory error halved it (None: not yet), kept so
        #: the next cycles do not run out of memory again
        self._chunk_limit: int | None = None
        self.training = training or TrainingSettings()
        self.max_train_windows = max_train_windows
        self.validation_fraction = validation_fraction
        self.min_observed_fraction = min_observed_fraction
        self.scaler_ = RobustScaler()
        self.model_: nn.Module | None = None
        self.n_features_: int | None = None
        self.training_report_: dict[str, Any] = {}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], device: torch.device) -> WindowedDeepDetector:
        """From a detector's configuration section (flat: training fields beside the model's)."""
        settings = dict(settings)
        training = TrainingSettings(
            epochs=settings.pop("epochs"),
            max_steps=settings.pop("max_steps"),
            batch_size=settings.pop("batch_size"),
            learning_rate=settings.pop("learning_rate"),
            weight_decay=settings.pop("weight_decay"),
            patience=settings.pop("patience"),
            grad_clip=settings.pop("grad_clip"),
            max_fit_seconds=settings.pop("max_fit_seconds"),
            seed=settings.pop("seed"),
        )
        return cls(training=training, device=device, **settings)

    # ---------------------------------------------------------------- subclass hooks
    def build_model(self, n_features: int) -> nn.Module:
        raise NotImplementedError

    def loss(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor, *side: torch.Tensor
    ) -> torch.Tensor:
        """Training loss of a batch ``x``/``mask`` ``(B, W, F)`` (and the :meth:`side_inputs`'
        windows); must ignore masked values."""
        raise NotImplementedError

    def score_batch(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor, *side: torch.Tensor
    ) -> WindowScores:
        raise NotImplementedError

    def side_inputs(self, windows: Windows, fitting: bool) -> tuple[np.ndarray, ...]:
        """Per-step inputs beside the metrics, each float32 ``(entities, time, channels)`` on the
        grid of ``windows`` with no NaN; windowed like the metrics and passed after ``x, mask``
        to :meth:`loss` and :meth:`score_batch` as ``(batch, window, channels)``. ``fitting``:
        called from :meth:`fit` (learn any scaling here). None by default."""
        return ()

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step, under ``no_grad`` (default: nothing)."""

    def hyper_parameters(self) -> dict[str, Any]:
        """Constructor arguments of the subclass (besides the shared ones), for rebuilding."""
        return {}

    # ---------------------------------------------------------------------- contract
    @property
    def context_steps(self) -> int:
        return self.window - 1

    @property
    def training_window(self) -> int:
        """Steps of each training sample: ``window`` here; a subclass whose loss needs steps
        after the scored window (a forecaster's future targets) lengthens it."""
        return self.window

    def _training_windows(
        self, standard: np.ndarray, mask: np.ndarray, side: tuple[np.ndarray, ...] = ()
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Pooled windows of all entities: train (subsampled to ``max_train_windows``) and
        validation, for early stopping.

        Validation is the last ``validation_fraction`` of each entity's *observed* windows (those
        with at least ``min_observed_fraction`` observed), not of its time axis, so a fit window
        that ends in a data gap still holds out data; training windows end before the held-out
        ones start, so the two never overlap. When that leaves nothing to train on (an entity
        observed for little more than a window), a seeded random ``validation_fraction`` of the
        observed windows is held out instead.
        """
        window = self.training_window
        if standard.shape[1] < window + 1:
            raise ValueError(
                f"fit window has {standard.shape[1]} steps, fewer than the {window}-step "
                "model window needs"
            )
        values = sliding_windows(torch.from_numpy(standard), window)
        masks = sliding_windows(torch.from_numpy(mask), window)
        sides = [sliding_windows(torch.from_numpy(extra), window) for extra in side]
        n_windows = values.shape[1]
        observed = masks.mean(dim=(2, 3)) >= self.min_observed_fraction
        start = torch.arange(n_windows)[None, :]
        counts = observed.sum(dim=1, keepdim=True)
        train_counts = torch.floor(counts.double() * (1 - self.validation_fraction)).long()
        is_validation = observed & (observed.cumsum(dim=1) > train_counts)
        boundary = torch.where(is_validation, start, n_windows).min(dim=1, keepdim=True).values
        is_train = observed & (start < boundary - window)
        if not is_train.any():
            is_train, is_validation = self._random_split(observed)
        generator = torch.Generator().manual_seed(self.training.seed)

        def gather(selected: torch.Tensor, limit: int) -> tuple[torch.Tensor, ...]:
            entity, start = torch.nonzero(selected, as_tuple=True)
            if len(entity) > limit:
                pick = torch.randperm(len(entity), generator=generator)[:limit].sort().values
                entity, start = entity[pick], start[pick]
            return tuple(part[entity, start].contiguous() for part in (values, masks, *sides))

        train_part = gather(is_train, self.max_train_windows)
        validation_part = gather(is_validation, max(self.max_train_windows // 5, 1))
        if train_part[0].shape[0] == 0:
            raise ValueError("no fit window has enough observed data to train on")
        return train_part, validation_part

    def _random_split(self, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(entities, windows)`` train and validation masks: a seeded random
        ``validation_fraction`` of the ``observed`` windows (at least one when there are two or
        more) held out; the rest trains. Held-out windows overlap training ones, so this
        validation loss is optimistic, but it still selects among epochs."""
        entity, start = torch.nonzero(observed, as_tuple=True)
        count = len(entity)
        held_out = count - int(count * (1 - self.validation_fraction)) if count >= 2 else 0
        generator = torch.Generator().manual_seed(self.training.seed)
        order = torch.randperm(count, generator=generator)
        is_train = torch.zeros_like(observed)
        is_validation = torch.zeros_like(observed)
        is_validation[entity[order[:held_out]], start[order[:held_out]]] = True
        is_train[entity[order[held_out:]], start[order[held_out:]]] = True
        return is_train, is_validation

    def fit(self, windows: Windows) -> FitReport:
        """Train one network on all entities of ``windows``.

        Raises :class:`~aiops_plugin.detectors.training.TrainingFailed` (naming the detector)
        rather than keep weights that learned nothing; the detector then stays unfitted."""
        started = time.perf_counter()
        torch.manual_seed(self.training.seed)
        features = list(windows.features)
        self.scaler_.fit(windows)
        standard, mask = self.scaler_.transform(windows, clip=MAX_STANDARD)
        side = self.side_inputs(windows, fitting=True)
        train_part, validation_part = self._training_windows(standard, mask, side)
        model = self.build_model(len(features))
        stop = self.stop_event
        report = train(
            model,
            self.loss,
            train_part,
            validation_part,
            self.training,
            self.device,
            should_stop=stop.is_set if stop is not None else None,
            label=f"detector {self.name!r}",
            after_step=self.after_step,
        )
        self.model_, self.features_, self.n_features_ = model, features, len(features)
        finite_losses = [loss for loss in report.train_losses if math.isfinite(loss)]
        self.training_report_ = {
            "epochs": report.epochs,
            "steps": report.steps,
            "best_loss": report.best_loss,
            "first_train_loss": finite_losses[0],
            "final_train_loss": finite_losses[-1],
            "skipped_batches": report.skipped_batches,
            "train_windows": int(train_part[0].shape[0]),
            "validation_windows": int(validation_part[0].shape[0]),
            "training_seconds": report.seconds,
            "selected_on": report.selected_on,
            "stopped_by": report.stopped_by,
        }
        metrics = {
            key: value if isinstance(value, str) else float(value)
            for key, value in self.training_report_.items()
        }
        return FitReport(
            n_entities=len(windows.entities),
            n_steps=len(windows.timestamps),
            n_features=self.n_features_,
            seconds=time.perf_counter() - started,
            metrics=metrics,
        )

    def _score_chunk(
        self,
        values: torch.Tensor,
        masks: torch.Tensor,
        sides: list[torch.Tensor],
        index: torch.Tensor,
        n_windows: int,
    ) -> WindowScores:
        """Windows ``index`` (flat over entities x windows) scored in one forward pass, the
        results back on the CPU, so device memory holds one chunk at a time."""
        entity, offset = index // n_windows, index % n_windows
        on_gpu = self.device.type == "cuda"

        def moved(part: torch.Tensor) -> torch.Tensor:
            gathered = part[entity, offset]
            if on_gpu:  # pinned host memory: the copy overlaps the previous chunk's kernels
                gathered = gathered.pin_memory()
            return gathered.to(self.device, non_blocking=on_gpu)

        x, m = moved(values), moved(masks)
        extra = [moved(part) for part in sides]
        with autocast(self.device):
            out = self.score_batch(self.model_, x, m, *extra)

        def back(part: torch.Tensor | None) -> torch.Tensor | None:
            return None if part is None else part.float().cpu()

        return WindowScores(back(out.score), back(out.uncertainty), back(out.contributions))

    @torch.inference_mode()
    def score(self, windows: Windows) -> Scores:
        features = self._require_fitted()
        assert self.model_ is not None
        windows = windows.reindex_features(features)
        standard, mask = self.scaler_.transform(windows, clip=MAX_STANDARD)
        side = self.side_inputs(windows, fitting=False)
        n_entities, n_time, n_features = standard.shape
        score = np.full((n_entities, n_time), np.nan, dtype=np.float32)
        uncertainty = np.full((n_entities, n_time), np.nan, dtype=np.float32)
        contributions = np.full((n_entities, n_time, n_features), np.nan, dtype=np.float32)
        has_uncertainty = has_contributions = False
        if n_time >= self.window:
            values = sliding_windows(torch.from_numpy(standard), self.window)
            masks = sliding_windows(torch.from_numpy(mask), self.window)
            sides = [sliding_windows(torch.from_numpy(extra), self.window) for extra in side]
            n_windows = values.shape[1]
            total = n_entities * n_windows
            parts: list[WindowScores] = []
            chunk = self._chunk_limit or self.score_batch_size
            chunk = chunk or default_score_batch_size(self.device)
            self.model_.eval()
            stop = self.stop_event
            start = 0
            while start < total:
                if stop is not None and stop.is_set():
                    # a fit's calibration pass can be millions of windows: a SIGTERM must
                    # not wait for it
                    raise TrainingInterrupted(f"{self.name}: stopped while scoring")
                index = torch.arange(start, min(start + chunk, total))
                try:
                    parts.append(self._score_chunk(values, masks, sides, index, n_windows))
                except torch.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    chunk = self._chunk_limit = max(1, chunk // 2)
                    log.warning(
                        "%s: out of memory scoring %d windows at once; retrying %d at a time",
                        self.name,
                        len(index),
                        chunk,
                    )
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                start += len(index)
            end = self.window - 1
            score[:, end:] = _joined([p.score for p in parts], (n_entities, n_windows))
            if parts[0].uncertainty is not None:
                has_uncertainty = True
                uncertainty[:, end:] = _joined(
                    [p.uncertainty for p in parts], (n_entities, n_windows)
                )
            if parts[0].contributions is not None:
                has_contributions = True
                contributions[:, end:] = _joined(
                    [p.contributions for p in parts], (n_entities, n_windows, n_features)
                )
        unscored = ~windows.observed.any(axis=2)
        score[unscored] = np.nan
        uncertainty[unscored] = np.nan
        contributions[unscored] = np.nan
        return Scores(
            score=score,
            uncertainty=uncertainty if has_uncertainty else None,
            contributions=contributions if has_contributions else None,
        )

    def state_dict(self) -> dict[str, Any]:
        features = self._require_fitted()
        assert self.model_ is not None
        return {
            "window": self.window,
            "training": asdict(self.training),
            "max_train_windows": self.max_train_windows,
            "validation_fraction": self.validation_fraction,
            "min_observed_fraction": self.min_observed_fraction,
            "hyper_parameters": self.hyper_parameters(),
            "features": features,
            "n_features": self.n_features_,
            "scaler": self.scaler_.state_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model_.state_dict().items()},
            "training_report": {k: str(v) for k, v in self.training_report_.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self.training = TrainingSettings(**state["training"])
        self.max_train_windows = int(state["max_train_windows"])
        self.validation_fraction = float(state["validation_fraction"])
        self.min_observed_fraction = float(state["min_observed_fraction"])
        for name, value in state["hyper_parameters"].items():
            setattr(self, name, value)
        self.features_ = list(state["features"])
        self.n_features_ = int(state["n_features"])
        self.scaler_.load_state_dict(state["scaler"])
        self.model_ = self.build_model(self.n_features_)
        self.model_.load_state_dict(state["model"])
        self.model_.to(self.device)
        self.model_.eval()


def _joined(parts: list[torch.Tensor | None], shape: tuple[int, ...]) -> np.ndarray:
    return torch.cat([p for p in parts if p is not None]).float().cpu().view(*shape).numpy()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is 1 (0 if there are none)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
