"""The one contract every detector honours, classic or deep.

A detector takes :class:`~aiops_plugin.windows.Windows` of one entity group, shape
``(entities, time, features)``, and returns a raw score per entity and step (higher = more
anomalous). It knows nothing of thresholds: turning raw scores into the exported scale where 1.0 is
the threshold is :mod:`aiops_plugin.calibration`'s job, so every detector goes through the same
scaling. Detectors are batched over all entities of a group at once and receive the compute device
from their caller, which chooses it once.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from aiops_plugin.windows import Windows


class NotFittedError(RuntimeError):
    """``score`` was called before ``fit`` or ``load_state_dict``."""


@dataclass
class Forecast:
    """Forecasts made at the last step of the scored windows, in the metrics' original units.

    Attributes:
        features: names of the forecast features (axis 2), a subset of the detector's.
        horizons_seconds: ``(horizons,)`` lead time of each forecast after that step, seconds.
        mean: ``(entities, horizons, features)`` point forecast; NaN where none was made.
        lower: the same shape, lower bound of the central ``interval``.
        upper: the same shape, upper bound of the central ``interval``.
        interval: probability the forecast distribution puts between ``lower`` and ``upper``.
    """

    features: list[str]
    horizons_seconds: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    interval: float


@dataclass
class Scores:
    """Raw detector output for one group.

    Attributes:
        score: ``(entities, time)`` raw anomaly score, NaN where it could not be computed.
        uncertainty: ``(entities, time)`` predictive standard deviation of the score in raw units,
            or None for detectors that do not model it (nothing is exported for them).
        contributions: ``(entities, time, features)`` non-negative share of each feature in the
            score (rows sum to 1 where defined), or None.
        forecast: forecasts of the next steps made at the last step, or None for detectors that
            do not forecast (or have nothing configured to forecast).
        log_branch: bool ``(entities,)``, for detectors that read logs: whether the entity's
            score used its logs (False: the metrics alone, the entity has no logs); None for
            detectors that do not read logs.
    """

    score: np.ndarray
    uncertainty: np.ndarray | None = None
    contributions: np.ndarray | None = None
    forecast: Forecast | None = None
    log_branch: np.ndarray | None = None

    def last_step(self) -> Scores:
        """The same output cut to its last step (a time axis of length 1)."""
        return replace(
            self,
            score=self.score[:, -1:],
            uncertainty=None if self.uncertainty is None else self.uncertainty[:, -1:],
            contributions=None if self.contributions is None else self.contributions[:, -1:],
        )


@dataclass
class FitReport:
    """What a fit did, stored with the model version (``metrics``: numbers, and a few names
    such as a deep fit's ``stopped_by``)."""

    n_entities: int
    n_steps: int
    n_features: int
    seconds: float
    metrics: dict[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelGauge:
    """A learned quantity of a fitted model that a user may inspect on ``/metrics``.

    Exported per entity group as ``name{entity_group, <label>=<key>} = value`` for each item
    of ``values``; the exporter does not know which detector produced it.
    """

    name: str
    documentation: str
    label: str
    values: dict[str, float]


class Detector(abc.ABC):
    """Scores windows of shape ``(entities, time, features)``; higher = more anomalous."""

    name: ClassVar[str]
    #: True for detectors that read the entities' log features (``Windows.logs``); the agent
    #: then fits the group's log model first and joins its features to the metrics
    reads_logs: ClassVar[bool] = False

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.features_: list[str] | None = None
        #: set by the agent; long fits poll it so a shutdown does not wait for them
        self.stop_event: threading.Event | None = None

    @abc.abstractmethod
    def fit(self, windows: Windows) -> FitReport:
        """Learn normal behaviour from history (unlabelled, assumed mostly normal)."""

    @abc.abstractmethod
    def score(self, windows: Windows) -> Scores:
        """Raw scores for every entity and step of ``windows``."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to score after a restart; tensors or numpy arrays and plain data."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    def context_steps(self) -> int:
        """Steps of history before the scored step that a score depends on."""
        return 1

    def score_latest(self, windows: Windows) -> Scores:
        """Scores of the last step of ``windows`` alone (a time axis of length 1): what a cycle
        exports. By default :meth:`score` of every step, cut; a detector whose cost grows with
        the steps it scores computes the last one only."""
        return self.score(windows).last_step()

    def to_device(self, device: torch.device) -> None:
        """Compute on ``device`` from now on (the agent's CPU fallback when the GPU fails);
        a detector holding a network moves it there too."""
        self.device = device
        network = getattr(self, "model_", None)
        if isinstance(network, torch.nn.Module):
            network.to(device)

    def model_gauges(self) -> list[ModelGauge]:
        """Learned state worth exporting (none by default); called once per fit or load."""
        return []

    def _require_fitted(self) -> list[str]:
        if self.features_ is None:
            raise NotFittedError(f"detector {self.name!r} is not fitted")
        return self.features_


#: Words of the errors PyTorch raises when the GPU itself fails (driver, illegal access, a
#: device-side assert), as opposed to an ordinary bug or an out-of-memory error (which the deep
#: detectors retry with smaller batches).
_DEVICE_ERROR_WORDS = ("CUDA", "cuDNN", "cuBLAS", "CUBLAS", "NCCL", "device-side", "HIP error")


def is_device_error(error: BaseException) -> bool:
    """Whether ``error`` is the GPU failing (not out-of-memory, not a bug of ours)."""
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error):
        return False
    return isinstance(error, RuntimeError) and any(w in str(error) for w in _DEVICE_ERROR_WORDS)


def usable_device(setting: str, what: str = "detectors.device") -> tuple[torch.device, str | None]:
    """:func:`choose_device`, or the CPU with the reason when the configured GPU is not there
    (no driver, no device of that index): an agent on a node whose GPU is gone runs slower
    rather than crash-looping."""
    try:
        device = choose_device(setting)
        index = device.index
        if device.type == "cuda" and index is not None and index >= torch.cuda.device_count():
            raise ValueError(
                f"{what} is {setting!r} but only {torch.cuda.device_count()} CUDA "
                "device(s) are present"
            )
    except (ValueError, RuntimeError) as exc:
        return torch.device("cpu"), str(exc).replace("detectors.device", what)
    return device, None


def choose_device(setting: str) -> torch.device:
    """The compute device, chosen once: 'auto' picks CUDA when present."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"detectors.device is {setting!r} but no CUDA device is available")
    return device
