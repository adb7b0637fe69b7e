"""Calibration: raw detector scores -> p-values -> exported score and probability.

Merlion's model -> calibrator -> threshold, each its own object with its own state:

- :mod:`.tail` -- :class:`TailCalibrator` turns a detector's raw scores into tail p-values
  ``P(S >= s)`` under normal behaviour (conformal body, generalized Pareto tail, per-entity tails
  shrunk toward the pooled one); :func:`score_from_p` puts a p-value on the exported scale where
  1.0 is the configured false-alarm rate, so changing the rate needs no refit.
- :mod:`.combination` -- :func:`cauchy_combination` fuses several detectors' p-values with a rule
  that stays valid when they are strongly dependent.
- :mod:`.fused` -- :class:`FusedCalibrator`: a group's detector p-values combined, and the
  combination calibrated again.
- :mod:`.probability` -- :class:`LocalFdr` and :class:`BetaUniformMixture` (no labels) and
  :class:`LabelledProbability` (with feedback) turn fused p-values into P(anomalous now).
- :mod:`.stage` -- :class:`GroupCalibration`, what the agent's calibrate phase runs per entity
  group (fitted on the later part of the fit window, which the detectors did not train on), and
  :class:`RecentProbability`, the anomaly probability refitted every cycle.
- :mod:`.threshold` -- the former in-sample quantile :class:`ThresholdScaler` and max-rule
  :func:`fuse_scores`, kept only as the baseline the log benchmark and the tests compare the
  p-value path with (the max rule's inflated false-alarm rate is what the fused calibration
  fixes).
"""

from aiops_plugin.calibration.combination import cauchy_combination
from aiops_plugin.calibration.fused import FusedCalibrator
from aiops_plugin.calibration.probability import (
    BetaUniformMixture,
    InsufficientLabelsError,
    LabelledProbability,
    LocalFdr,
)
from aiops_plugin.calibration.stage import GroupCalibration, RecentProbability
from aiops_plugin.calibration.tail import TAIL_METHOD, TailCalibrator, p_from_score, score_from_p
from aiops_plugin.calibration.threshold import (
    MIN_TAIL_SAMPLES,
    MIN_THRESHOLD,
    TIE_MARGIN,
    ThresholdScaler,
    fuse_scores,
)

__all__ = [
    "MIN_TAIL_SAMPLES",
    "MIN_THRESHOLD",
    "TAIL_METHOD",
    "TIE_MARGIN",
    "BetaUniformMixture",
    "FusedCalibrator",
    "GroupCalibration",
    "InsufficientLabelsError",
    "LabelledProbability",
    "LocalFdr",
    "RecentProbability",
    "TailCalibrator",
    "ThresholdScaler",
    "cauchy_combination",
    "fuse_scores",
    "p_from_score",
    "score_from_p",
]
