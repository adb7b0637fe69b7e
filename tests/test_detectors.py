"""The MAD baseline and the score scaling, on the shipped real SMD sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aiops_plugin.calibration import ThresholdScaler, fuse_scores
from aiops_plugin.config import DetectorsConfig
from aiops_plugin.demo import load_demo_sample
from aiops_plugin.detectors.base import NotFittedError, choose_device
from aiops_plugin.detectors.baselines import RollingMadDetector
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.windows import Windows


@pytest.fixture(scope="module")
def smd():
    return load_demo_sample()


@pytest.fixture(scope="module")
def fitted(smd) -> FittedModel:
    return FittedModel.fit(RollingMadDetector(window=60), Windows.from_array(smd.train), 0.001)


def test_score_is_one_at_configured_false_alarm_rate() -> None:
    rng = np.random.default_rng(7)
    raw = rng.gamma(2.0, size=(3, 20000))
    keys = ["a", "b", "c"]
    scaler = ThresholdScaler(0.01).fit(raw, keys)
    scaled = scaler.scale(raw, keys)
    assert np.mean(scaled > 1.0) == pytest.approx(0.01, abs=0.001)
    fresh = scaler.scale(rng.gamma(2.0, size=(3, 20000)), keys)
    assert np.mean(fresh > 1.0) == pytest.approx(0.01, abs=0.002)


def test_entity_with_short_history_uses_the_pooled_threshold() -> None:
    raw = np.vstack([np.linspace(0, 1, 10000), np.full(10000, np.nan)])
    raw[1, :50] = 5.0
    scaler = ThresholdScaler(0.01).fit(raw, ["long", "short"])
    assert "short" not in scaler.thresholds_
    assert scaler.thresholds_for(["short", "unseen"]).tolist() == [scaler.pooled_threshold_] * 2


def test_mad_flags_the_labelled_smd_anomaly(smd, fitted: FittedModel) -> None:
    history = np.concatenate([smd.train, smd.test])
    scores = fitted.score(Windows.from_array(history)).score[0, len(smd.train) :]
    labels = smd.test_labels.astype(bool)
    assert np.nanmax(scores[labels]) > 2.0
    assert np.mean(scores[~labels] > 1.0) < 0.01
    assert np.nanmax(scores[labels]) > np.nanquantile(scores[~labels], 0.99)


def test_mad_is_batched_over_entities(smd, fitted: FittedModel) -> None:
    one = fitted.score(Windows.from_array(smd.test[None])).score
    batch = np.stack([smd.test, smd.test[::-1].copy()])
    both = fitted.score(
        Windows.from_array(batch, entities=[{"entity": "0"}, {"entity": "1"}])
    ).score
    np.testing.assert_allclose(both[0], one[0], rtol=1e-6, equal_nan=True)


def test_missing_values_are_masked_not_imputed(smd, fitted: FittedModel) -> None:
    values = smd.test.copy()
    values[200:260, :] = np.nan
    scores = fitted.score(Windows.from_array(values)).score[0]
    assert np.isnan(scores[200:260]).all()
    assert np.isfinite(scores[300:]).all()


def test_contributions_point_at_the_moved_metric(smd, fitted: FittedModel) -> None:
    values = smd.train[-300:].copy()
    steady = int(np.argmin(next(iter(fitted.detector.entity_references_.values()))))
    values[-1, steady] += 1.0
    output = fitted.score(Windows.from_array(values))
    shares = output.contributions[0, -1]
    assert int(np.nanargmax(shares)) == steady
    assert output.score[0, -1] > 1.0
    assert np.nansum(shares) == pytest.approx(1.0, abs=1e-5)


def test_state_round_trips_through_bytes(smd, fitted: FittedModel) -> None:
    loaded = FittedModel.from_bytes(fitted.to_bytes(), DetectorsConfig(), torch.device("cpu"))
    windows = Windows.from_array(smd.test)
    np.testing.assert_array_equal(loaded.score(windows).score, fitted.score(windows).score)


def test_unfitted_detector_refuses_to_score(smd) -> None:
    with pytest.raises(NotFittedError):
        RollingMadDetector().score(Windows.from_array(smd.test))


def test_fused_score_crosses_one_exactly_when_some_detector_is_beyond_its_threshold() -> None:
    """The contract of ``detector="fused"``: >= 1.0 iff at least one detector's scaled score is
    >= 1.0 (its own threshold), NaN iff no detector scored. Scores sit close to 1 on both sides,
    where a mean, a sum or a product of the detectors would alarm differently."""
    below = np.nextafter(np.float32(1.0), np.float32(0.0))
    cases = np.array(
        [
            [0.6, 0.6, 0.6],  # a sum alarms, no detector does
            [1.5, 0.2, 0.1],  # a mean stays below, one detector alarms
            [1.0, np.nan, 0.0],  # exactly at one threshold
            [below, below, below],  # just below all of them
            [np.nan, 3.0, np.nan],
            [np.nan, np.nan, np.nan],
        ],
        dtype=np.float32,
    ).T
    rng = np.random.default_rng(11)
    drawn = rng.uniform(0.0, 2.0, size=(3, 5000)).astype(np.float32)
    drawn[rng.random(drawn.shape) < 0.2] = np.nan
    for scaled in (cases, drawn):
        fused = fuse_scores(list(scaled))
        defined = np.isfinite(scaled)
        beyond = (np.where(defined, scaled, 0.0) >= 1.0).any(axis=0)
        np.testing.assert_array_equal(np.isnan(fused), ~defined.any(axis=0))
        np.testing.assert_array_equal(fused >= 1.0, beyond)
    assert 0.4 < np.mean(beyond) < 0.9, "the drawn scores exercise both sides of the threshold"


def test_an_explicit_device_setting_is_the_device_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    assert choose_device("auto") == torch.device("cuda")


def test_device_auto_is_cpu_without_cuda_and_cuda_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda:0' but no CUDA device is available"):
        choose_device("cuda:0")


@pytest.mark.parametrize("name", ["mad", "iforest", "pca", "cblof"])
def test_every_baseline_ranks_the_smd_anomaly_above_normal_steps(smd, name: str) -> None:
    detector = build_detector(name, DetectorsConfig(), torch.device("cpu"))
    model = FittedModel.fit(detector, Windows.from_array(smd.train), 0.01)
    history = Windows.from_array(np.concatenate([smd.train, smd.test]))
    scores = model.score(history).score[0, len(smd.train) :]
    labels = smd.test_labels.astype(bool)
    assert np.nanmean(scores[labels]) > np.nanmean(scores[~labels])
    assert np.nanmax(scores[labels]) > 1.0
    loaded = FittedModel.from_bytes(model.to_bytes(), DetectorsConfig(), torch.device("cpu"))
    np.testing.assert_allclose(loaded.score(history).score, model.score(history).score, rtol=1e-5)
