"""The calibrate stage of one entity group: raw detector scores -> p-values -> score, probability.

**Where the calibration data comes from: a split of the fit window in time.** The detectors are
trained on the earlier ``1 - calibration_fraction`` of the fit window and scored over all of it;
the scores of the later part, which no detector trained on, are the calibration slice. The
detector's context reaches back into the training part, so every calibration step has a score
(no step is lost to warm-up). A time split was chosen over cross-fitting (K models each trained
without one fold) because it costs one training, not K, on the deep detectors, and because it
calibrates against the most recent normal behaviour, the one the next cycles resemble; its price
is that the detectors train on 75 % of the history instead of all of it
(:func:`split_point`).

**What is fitted on the slice** (:class:`GroupCalibration`):

- per detector, a :class:`~aiops_plugin.calibration.tail.TailCalibrator` (per entity where the
  entity has the calibration steps for its own tail, shrunk toward the group's pooled tail
  otherwise; see that module), giving p-values ``P(S >= s)`` under normal behaviour;
- the fused calibrator (:class:`~aiops_plugin.calibration.fused.FusedCalibrator`): the
  detectors' p-values Cauchy-combined and that statistic calibrated again, on the slice's own
  p-values from the calibrators above. Those are rank-like (about uniform on the slice), which
  is how a new normal step's p-values look under the same calibrators, and they carry the
  detectors' dependence, which is what the second calibration is for. An earlier version fitted
  it on *out-of-fold* p-values (each half of the slice scored by calibrators fitted on the other
  half): where the halves differ (drift, an unlabelled incident in one of them) the
  half-calibrators' extrapolated tails gave p-values down to ``e^-95``, the fused calibrator
  learned that such values are common, and a 6-sigma shift of every metric, beyond anything
  either detector had seen, came out below the alarm (0.56 on an SMD machine; 1.2 with this
  fit; ``tests/test_calibration_stage.py``);
- the probability model's starting point: the same fused p-values of the slice
  (:class:`RecentProbability`), to which every cycle's fused p-values are added.

The exported score is :func:`~aiops_plugin.calibration.tail.score_from_p` of the p-value:
``log p / log rate``, 1.0 exactly at the configured false-alarm rate. The false-alarm rate is
therefore not part of any fitted state: changing it rescales the exported scores at once, with
neither retraining nor recalibration.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from aiops_plugin.calibration.fused import FUSED, FusedCalibrator, with_log_evidence
from aiops_plugin.calibration.probability import BetaUniformMixture, LabelledProbability
from aiops_plugin.calibration.tail import TAIL_METHOD, TailCalibrator

STATE_VERSION = 1
#: Method recorded with each calibration version.
METHOD = f"{TAIL_METHOD}; fused: Cauchy combination recalibrated on the slice's p-values"
PROBABILITY_METHOD = "beta-uniform mixture of the group's recent fused p-values (MAP)"
LABELLED_PROBABILITY_METHOD = (
    "isotonic regression of feedback labels (events' peak fused p-values; the calibration "
    "slice as normal) on -log p"
)


def split_point(n_steps: int, calibration_fraction: float, min_train_steps: int) -> int:
    """Index of the first calibration step of a fit window of ``n_steps`` steps.

    The detectors train on ``[0, split)``, calibration is on ``[split, n_steps)``. Raises
    ``ValueError`` when the window cannot give the detector ``min_train_steps`` steps (its
    context plus at least as many again) and leave a calibration slice.
    """
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    split = int(round(n_steps * (1.0 - calibration_fraction)))
    if split < min_train_steps or n_steps - split < 1:
        raise ValueError(
            f"a fit window of {n_steps} steps is too short to train on "
            f"{1 - calibration_fraction:.0%} of it (need {min_train_steps} steps) and calibrate "
            f"on the rest; lengthen schedule.fit_window"
        )
    return split


class GroupCalibration:
    """The calibrators of one entity group: one per detector, the fused one, their state."""

    def __init__(
        self,
        detectors: list[str],
        tail_fraction: float = 0.05,
        weights: dict[str, float] | None = None,
    ) -> None:
        if not detectors:
            raise ValueError("a group calibration needs at least one detector")
        self.detectors = list(detectors)
        self.tail_fraction = float(tail_fraction)
        self.weights = dict(weights or {})
        self.calibrators_: dict[str, TailCalibrator] = {}
        self.fused_: FusedCalibrator | None = None
        #: fused p-values of the slice, ``(entities, steps)``; not part of the state
        self.fused_calibration_p_: np.ndarray | None = None
        self.n_steps_: int = 0

    def fit(self, raw: dict[str, np.ndarray], keys: list[str]) -> GroupCalibration:
        """``raw``: detector -> ``(entities, steps)`` raw scores of the calibration slice."""
        missing = [name for name in self.detectors if name not in raw]
        if missing:
            raise KeyError(f"calibration needs raw scores of {missing}")
        steps = {np.asarray(raw[name]).shape[1] for name in self.detectors}
        if len(steps) != 1:
            raise ValueError(f"detectors' calibration slices differ in length: {sorted(steps)}")
        n_steps = steps.pop()
        self.calibrators_ = {
            name: TailCalibrator(tail_fraction=self.tail_fraction).fit(raw[name], keys)
            for name in self.detectors
        }
        slice_p = {
            name: self.calibrators_[name].p_values(raw[name], keys) for name in self.detectors
        }
        self.fused_ = FusedCalibrator(self.detectors, self.weights, self.tail_fraction).fit(
            slice_p, keys
        )
        self.fused_calibration_p_ = self.fused_.p_values(slice_p, keys)
        self.n_steps_ = n_steps
        return self

    def p_values(
        self,
        raw: dict[str, np.ndarray],
        keys: list[str],
        log_p: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """p-values of new raw scores ``(entities, ...)``, per detector and ``"fused"``.

        ``log_p``: the log score's p-values ``(entities, ...)``, NaN for entities without logs;
        where present they join the fused p-value (Cauchy, valid under dependence), elsewhere
        the fused p-value is the metric detectors' alone.
        """
        if self.fused_ is None:
            raise RuntimeError("GroupCalibration is not fitted")
        p = {name: self.calibrators_[name].p_values(raw[name], keys) for name in self.detectors}
        fused = self.fused_.p_values(p, keys)
        p[FUSED] = with_log_evidence(fused, log_p)
        return p

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (what the store's calibration version holds)."""
        if self.fused_ is None:
            raise RuntimeError("GroupCalibration is not fitted")
        return {
            "version": STATE_VERSION,
            "detectors": self.detectors,
            "tail_fraction": self.tail_fraction,
            "weights": self.weights,
            "n_steps": self.n_steps_,
            "calibrators": {name: c.state_dict() for name, c in self.calibrators_.items()},
            "fused": self.fused_.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GroupCalibration:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"calibration state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        calibration = cls(list(state["detectors"]), state["tail_fraction"], state["weights"])
        calibration.calibrators_ = {
            name: TailCalibrator.from_state_dict(s) for name, s in state["calibrators"].items()
        }
        calibration.fused_ = FusedCalibrator.from_state_dict(state["fused"])
        calibration.n_steps_ = int(state["n_steps"])
        return calibration


class RecentProbability:
    """P(anomalous now) from a group's recent fused p-values (beta-uniform mixture).

    The mixture is refitted on a bounded buffer of the group's most recent fused p-values
    (``capacity`` of them, all entities together), started from the calibration slice's
    fused p-values and fed every cycle. Under the model (normal p-values uniform,
    anomalous ones Beta(a, 1)) the posterior is calibrated; how well that holds on real data is
    measured by the benchmark (ECE, Brier).
    """

    def __init__(self, capacity: int = 5000, **mixture: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.mixture_settings = dict(mixture)
        self.recent: deque[float] = deque(maxlen=self.capacity)
        self.model = BetaUniformMixture(**mixture)
        #: learnt from feedback labels; when set it answers instead of the mixture
        self.labelled: LabelledProbability | None = None

    def seed(self, p: np.ndarray) -> RecentProbability:
        """Start the buffer from calibration p-values (the most recent ones kept) and fit."""
        values = np.asarray(p, dtype=np.float64)
        if values.ndim == 2:
            values = values.T  # time-major, so the newest steps are the ones the buffer keeps
        values = values.ravel()
        self.recent.extend(values[np.isfinite(values)][-self.capacity :].tolist())
        self.model.fit(np.fromiter(self.recent, dtype=np.float64))
        return self

    def update(self, p: np.ndarray) -> np.ndarray:
        """Add this cycle's fused p-values ``(entities,)``, refit, return their probabilities."""
        values = np.asarray(p, dtype=np.float64)
        self.recent.extend(values[np.isfinite(values)].tolist())
        self.model.fit(np.fromiter(self.recent, dtype=np.float64))
        return self.probability(values)

    def probability(self, p: np.ndarray) -> np.ndarray:
        if self.labelled is not None:
            return self.labelled.probability(p)
        return self.model.probability(p)

    @property
    def method(self) -> str:
        return LABELLED_PROBABILITY_METHOD if self.labelled is not None else PROBABILITY_METHOD

    def state_dict(self) -> dict[str, Any]:
        state = {"method": self.method, "capacity": self.capacity, **self.model.state_dict()}
        if self.labelled is not None:
            state["labelled"] = self.labelled.state_dict()
        return state
