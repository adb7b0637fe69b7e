"""What the next fit learns from labelled events: fused weights and the labelled probability."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from aiops_plugin.feedback import (
    FALSE_POSITIVE,
    TRUE_POSITIVE,
    detector_weights,
    labelled_probability,
    warning_labels,
)
from aiops_plugin.store import AnomalyEvent

RATE = 0.01
DETECTORS = ["mad", "pca"]
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def event(
    peak_score: float,
    warning_scores: dict[str, list[float]] | None = None,
    **detector_scores: float,
) -> AnomalyEvent:
    return AnomalyEvent(
        id=1,
        group_name="hosts",
        entity_key="instance=a",
        entity_labels={"instance": "a"},
        detector="fused",
        start_at=T0,
        end_at=T0,
        peak_score=peak_score,
        peak_at=T0,
        detector_scores=dict(detector_scores),
        warning_scores=warning_scores or {},
    )


def test_weights_move_toward_the_detector_that_was_right() -> None:
    # mad was beyond its threshold at every confirmed incident and quiet at every false alarm;
    # pca the other way round
    labelled = [(event(2.0, mad=2.5, pca=0.4), TRUE_POSITIVE)] * 3 + [
        (event(1.2, mad=0.3, pca=1.6), FALSE_POSITIVE)
    ] * 3
    weights = detector_weights(labelled, DETECTORS)
    # raw (1 + TP) / (1 + FP): mad 4 / 1, pca 1 / 4, normalised to mean 1
    assert weights == pytest.approx({"mad": 4 / 2.125, "pca": 0.25 / 2.125})
    assert np.mean(list(weights.values())) == pytest.approx(1.0)


def test_a_detector_no_label_spoke_about_keeps_the_neutral_raw_weight() -> None:
    labelled = [(event(3.0, mad=3.0, pca=0.2), TRUE_POSITIVE)] * 2
    weights = detector_weights(labelled, ["mad", "pca", "multiscale"])
    # mad 3, pca 1 (never flagged), multiscale 1 (no score at all): mean 5 / 3
    assert weights == pytest.approx({"mad": 1.8, "pca": 0.6, "multiscale": 0.6})


def test_equal_weights_without_labels_or_detectors() -> None:
    assert detector_weights([], DETECTORS) == {}
    assert detector_weights([(event(2.0, mad=2.0), TRUE_POSITIVE)], []) == {}


def separable_labels(n_true: int, n_false: int) -> list[tuple[AnomalyEvent, str]]:
    """Confirmed incidents peak high (scores 3..5), false alarms just above 1 (1.0..1.6)."""
    return [(event(float(s)), TRUE_POSITIVE) for s in np.linspace(3.0, 5.0, n_true)] + [
        (event(float(s)), FALSE_POSITIVE) for s in np.linspace(1.0, 1.6, n_false)
    ]


def normal_p_values(size: int = 5000) -> np.ndarray:
    return np.random.default_rng(0).uniform(size=size)


def test_too_few_labels_or_one_kind_give_no_labelled_probability() -> None:
    normal = normal_p_values()
    assert labelled_probability(separable_labels(4, 5), RATE, normal, 10) is None
    assert labelled_probability(separable_labels(12, 0), RATE, normal, 10) is None
    assert labelled_probability(separable_labels(0, 12), RATE, normal, 10) is None
    assert labelled_probability(separable_labels(5, 5), RATE, normal, 10) is not None


def test_labelled_probability_rises_with_evidence() -> None:
    model = labelled_probability(separable_labels(8, 8), RATE, normal_p_values(), 10)
    assert model is not None
    scores = np.linspace(0.0, 6.0, 61)
    probability = model.probability(RATE**scores)
    assert np.all(np.diff(probability) >= 0)
    # a step as rare as the confirmed incidents' peaks: what they were; ordinary steps: normal
    assert model.probability(np.array([RATE**4.0]))[0] == pytest.approx(1.0)
    assert model.probability(np.array([0.5]))[0] == pytest.approx(0.0)
    # just above the threshold, where the false alarms peaked, it stays low
    assert model.probability(np.array([RATE**1.3]))[0] < 0.1


def test_unscored_calibration_steps_are_ignored() -> None:
    normal = normal_p_values()
    with_gaps = normal.copy()
    with_gaps[::7] = np.nan
    kept = normal[np.isfinite(with_gaps)]
    labels = separable_labels(6, 6)
    p = RATE ** np.linspace(0.0, 6.0, 25)
    gapped = labelled_probability(labels, RATE, with_gaps, 10)
    clean = labelled_probability(labels, RATE, kept, 10)
    assert gapped is not None and clean is not None
    np.testing.assert_allclose(gapped.probability(p), clean.probability(p))


def test_warning_labels_gather_what_the_early_warning_said_before_each_kind() -> None:
    labelled = [
        (event(3.0, {"5m": [1.5, 2.5], "15m": [0.4, 1.5, 2.5]}), TRUE_POSITIVE),
        (event(2.0, {"5m": [0.3]}), FALSE_POSITIVE),
        (event(2.0), TRUE_POSITIVE),  # opened before the early warning ran: nothing kept
    ]
    five, fifteen, thirty = warning_labels(labelled, ["5m", "15m", "30m"], 3)
    np.testing.assert_array_equal(five[0], [1.5, 2.5])
    np.testing.assert_array_equal(five[1], [0.3])
    np.testing.assert_array_equal(fifteen[0], [0.4, 1.5, 2.5])
    assert fifteen[1].size == thirty[0].size == thirty[1].size == 0
    # too few labels, or no incident that kept any score: no labels for the early warning
    assert warning_labels(labelled, ["5m"], 4) is None
    assert warning_labels(labelled[1:], ["5m"], 2) is None
