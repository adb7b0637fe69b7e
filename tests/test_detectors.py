"""The MAD baseline and the score scaling, on the shipped real SMD sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aiops_plugin.calibration import ThresholdScaler, fuse_scores
from aiops_plugin.config import DetectorsConfig
from aiops_plugin.detectors.base import NotFittedError, choose_device
from aiops_plugin.detectors.baselines import RollingMadDetector
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.localstack import load_demo_sample
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


def test_fused_score_is_the_max_of_defined_scores() -> None:
    fused = fuse_scores([np.array([0.5, np.nan, np.nan]), np.array([1.5, 0.2, np.nan])])
    np.testing.assert_allclose(fused[:2], [1.5, 0.2], rtol=1e-6)
    assert np.isnan(fused[2])


def test_device_auto_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device("auto").type == expected


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
