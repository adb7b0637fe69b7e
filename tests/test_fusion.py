"""The ``fusion`` detector: branch and head shapes, the attention mask that takes logs out, the
random-Fourier RBF kernel, training on a real slice, checkpoints with and without logs, batching,
planted metric anomalies and planted log bursts. Tiny configurations on the shipped SMD
machine-1-7 slice with log features built as the log pipeline names them; CPU only."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from aiops_plugin.config import DetectorsConfig, FusionConfig
from aiops_plugin.demo import load_demo_sample
from aiops_plugin.detectors.fusion import (
    FusionAttention,
    FusionDetector,
    FusionNetwork,
    LogBranch,
    MetricBranch,
    RbfOneClassHead,
)
from aiops_plugin.detectors.registry import DETECTORS, FittedModel, build_detector
from aiops_plugin.detectors.training import TrainingSettings
from aiops_plugin.logs.features import SEVERITY_BUCKETS
from aiops_plugin.windows import LogInputs, Windows

WINDOW = 16
TINY = {
    "enabled": True,
    "window": WINDOW,
    "channels": 8,
    "lstm_hidden": 8,
    "heads": 2,
    "rff_features": 64,
    "mc_samples": 4,
    "epochs": 3,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "max_train_windows": 600,
}
LOG_NAMES = (
    [f"log_{bucket}_count" for bucket in SEVERITY_BUCKETS]
    + ["log_new_templates", "log_rare_templates", "log_template_divergence"]
    + ["log_embedding_0", "log_embedding_1"]
)
ENTITIES = [{"instance": "a"}, {"instance": "b"}]


def quiet_logs(n_entities: int, n_time: int, seed: int) -> np.ndarray:
    """``(E, T, len(LOG_NAMES))`` features of a healthy service: a few info lines most steps,
    a warning now and then, an error rarely, nothing new; divergence and embedding NaN where
    the step had no record, as :func:`aiops_plugin.logs.features.step_features` gives them."""
    rng = np.random.default_rng(seed)
    values = np.zeros((n_entities, n_time, len(LOG_NAMES)), dtype=np.float32)
    values[..., 1] = rng.poisson(3.0, (n_entities, n_time))
    values[..., 2] = rng.poisson(0.1, (n_entities, n_time))
    values[..., 3] = rng.poisson(0.01, (n_entities, n_time))
    values[..., 6] = rng.poisson(0.02, (n_entities, n_time))
    values[..., 7] = rng.uniform(0.05, 0.15, (n_entities, n_time))
    values[..., 8:] = rng.normal(0.0, 0.1, (n_entities, n_time, 2))
    had_records = values[..., :5].sum(axis=2) > 0
    values[..., 7:] = np.where(had_records[..., None], values[..., 7:], np.nan)
    return values


def with_logs(windows: Windows, values: np.ndarray, has_logs: list[bool]) -> Windows:
    return windows.with_logs(LogInputs(values, list(LOG_NAMES), np.array(has_logs)))


@pytest.fixture(scope="module")
def smd():
    return load_demo_sample()


def two_entities(values_a: np.ndarray, values_b: np.ndarray, names: list[str]) -> Windows:
    return Windows.from_array(np.stack([values_a, values_b]), entities=ENTITIES, features=names)


@pytest.fixture(scope="module")
def fitted(smd) -> FusionDetector:
    """Trained on two entities, both with logs."""
    detector = FusionDetector.from_settings(
        FusionConfig(**TINY).model_dump(exclude={"enabled"}), torch.device("cpu")
    )
    assert isinstance(detector, FusionDetector)
    windows = two_entities(smd.train[:1500], smd.train[1500:3000], smd.feature_names)
    detector.fit(with_logs(windows, quiet_logs(2, 1500, seed=0), [True, True]))
    return detector


@pytest.fixture(scope="module")
def test_windows(smd) -> Windows:
    return two_entities(smd.test[:300], smd.test[300:600], smd.feature_names)


def test_modules_have_the_documented_shapes() -> None:
    torch.manual_seed(0)
    values, mask = torch.randn(3, 16, 5), torch.ones(3, 16, 5)
    assert MetricBranch(5, channels=8, lstm_hidden=6)(values, mask).shape == (3, 16, 8)
    assert LogBranch(4, channels=8, window=16)(torch.randn(3, 16, 4)).shape == (3, 16, 8)
    keep = torch.ones(3, 32, dtype=torch.bool)
    assert FusionAttention(8, heads=2, dropout=0.1)(torch.randn(3, 32, 8), keep).shape == (3, 32, 8)
    network = FusionNetwork(
        5, 3, window=16, channels=8, lstm_hidden=6, heads=2, dropout=0.1, rff_features=32
    )
    phi, residual = network(values, mask, torch.rand(3, 16, 5))
    assert phi.shape == (3, 32) and residual.shape == (3, 5 + 3)
    phi, residual = network(values, mask, torch.rand(3, 16, 5), torch.ones(7, 8))
    assert phi.shape == (7, 3, 32) and residual.shape == (7, 3, 8)


def test_masked_tokens_do_not_change_what_the_others_attend_to() -> None:
    torch.manual_seed(0)
    attention = FusionAttention(8, heads=2, dropout=0.1).eval()
    tokens = torch.randn(2, 10, 8)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[:, 6:] = False
    changed = tokens.clone()
    changed[:, 6:] = 1e4 * torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            attention(tokens, keep)[:, :6], attention(changed, keep)[:, :6], rtol=0, atol=0
        )
        alone = attention(tokens[:, :6], torch.ones(2, 6, dtype=torch.bool))
    torch.testing.assert_close(attention(tokens, keep)[:, :6], alone, rtol=1e-5, atol=1e-5)


def test_random_fourier_features_approximate_the_rbf_kernel() -> None:
    head = RbfOneClassHead(n_inputs=6, rff_features=8192)
    head.bandwidth.fill_(1.5)
    u = torch.randn(20, 6)
    phi = head.features(u)
    kernel = torch.exp(-torch.cdist(u, u).square() / (2 * 1.5))
    assert (phi @ phi.T - kernel).abs().max() < 0.05
    assert torch.allclose((phi**2).sum(dim=1), torch.ones(20), atol=0.05)
    head.update(u)
    # the centre is the kernel mean embedding: |phi(u) - c|^2 = const - 2 mean_i k(u, u_i)
    distance = head.distance(head.features(u))
    expected = 1 + head.centre.square().sum() - 2 * (head.features(u) @ head.centre)
    torch.testing.assert_close(distance, expected, atol=0.05, rtol=0)


def test_channels_must_be_a_multiple_of_heads() -> None:
    with pytest.raises(ValueError, match="multiple of heads"):
        FusionConfig(channels=30, heads=4)


def test_every_config_field_builds_the_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DETECTORS, "fusion", FusionDetector)
    detector = build_detector("fusion", DetectorsConfig(fusion=TINY), torch.device("cpu"))
    assert isinstance(detector, FusionDetector) and detector.reads_logs
    assert detector.hyper_parameters()["rff_features"] == TINY["rff_features"]
    assert detector.window == WINDOW


def test_training_overfits_a_tiny_real_slice(smd) -> None:
    detector = FusionDetector(
        window=WINDOW,
        channels=8,
        lstm_hidden=8,
        heads=2,
        rff_features=64,
        training=TrainingSettings(epochs=40, batch_size=32, learning_rate=1e-2, patience=40),
        max_train_windows=200,
    )
    detector.fit(Windows.from_array(smd.train[:300], features=smd.feature_names))
    report = detector.training_report_
    assert report["epochs"] == 40
    assert report["final_train_loss"] < 0.5 * report["first_train_loss"]


def test_scores_have_the_grid_shape_and_skip_unscorable_steps(fitted, smd) -> None:
    values = smd.test[:200].copy()
    values[120] = np.nan
    windows = Windows.from_array(values, features=smd.feature_names)
    scores = fitted.score(windows)
    assert scores.score.shape == scores.uncertainty.shape == (1, 200)
    assert scores.contributions.shape == (1, 200, len(smd.feature_names))
    assert np.isnan(scores.score[0, : WINDOW - 1]).all() and np.isnan(scores.score[0, 120])
    scored = np.r_[WINDOW - 1 : 120, 121:200]
    assert np.isfinite(scores.score[0, scored]).all()
    assert (scores.uncertainty[0, scored] > 0).all()
    np.testing.assert_allclose(scores.contributions[0, scored].sum(axis=1), 1, atol=1e-4)
    short = fitted.score(Windows.from_array(smd.test[: WINDOW - 1], features=smd.feature_names))
    assert np.isnan(short.score).all()


def test_an_unobserved_value_is_never_read(fitted, smd) -> None:
    windows = Windows.from_array(smd.test[:100], features=smd.feature_names)
    hidden = copy.deepcopy(windows)
    hidden.observed[0, 60:80, 4] = False
    garbage = copy.deepcopy(hidden)
    garbage.values[0, 60:80, 4] = 1e9
    np.testing.assert_array_equal(fitted.score(garbage).score, fitted.score(hidden).score)
    assert not np.array_equal(fitted.score(hidden).score, fitted.score(windows).score)
    assert (fitted.score(hidden).contributions[0, 60:80, 4] == 0).all()


def test_scores_do_not_depend_on_the_scoring_batch(fitted, test_windows) -> None:
    windows = with_logs(test_windows, quiet_logs(2, 300, seed=1), [True, False])
    small, large = copy.copy(fitted), copy.copy(fitted)
    small.score_batch_size, large.score_batch_size = 7, 4096
    expected, actual = large.score(windows), small.score(windows)
    np.testing.assert_array_equal(actual.score, expected.score)
    np.testing.assert_array_equal(actual.uncertainty, expected.uncertainty)
    np.testing.assert_array_equal(actual.contributions, expected.contributions)
    again = large.score(windows)
    np.testing.assert_array_equal(again.uncertainty, expected.uncertainty)


def test_planted_shift_and_spike_score_above_normal_data_and_point_at_their_channel(
    fitted, smd
) -> None:
    values = smd.test[:300].copy()
    scale = fitted.scaler_.default_scale_
    shifted, spiked = 10, 3
    values[150:200, shifted] += 30 * scale[shifted]
    values[250, spiked] += 30 * scale[spiked]
    scores = fitted.score(Windows.from_array(values, features=smd.feature_names))
    score = scores.score[0]
    normal = np.r_[score[WINDOW:150], score[205:250], score[255:]]
    typical = np.quantile(normal, 0.99)
    assert score[150:200].min() > typical, "the score stays up while the shift lasts"
    assert score[250] > typical
    assert np.argmax(scores.contributions[0, 150]) == shifted
    assert np.argmax(scores.contributions[0, 250]) == spiked


def test_windows_without_logs_are_scored_on_the_metrics_alone(fitted, test_windows) -> None:
    scores = fitted.score(test_windows)
    assert scores.log_branch is not None and scores.log_branch.tolist() == [False, False]
    assert np.isfinite(scores.score[:, WINDOW - 1 :]).all()


def test_an_entity_without_logs_scores_exactly_as_with_no_log_inputs(fitted, test_windows):
    logs = quiet_logs(2, 300, seed=1)
    mixed = fitted.score(with_logs(test_windows, logs, [True, False]))
    alone = fitted.score(test_windows)
    assert mixed.log_branch.tolist() == [True, False]
    np.testing.assert_array_equal(mixed.score[1], alone.score[1])
    np.testing.assert_array_equal(mixed.uncertainty[1], alone.uncertainty[1])
    np.testing.assert_array_equal(mixed.contributions[1], alone.contributions[1])
    assert not np.array_equal(mixed.score[0], alone.score[0]), "entity a reads its logs"


def test_a_log_burst_at_quiet_metrics_raises_the_score_only_with_the_log_branch(
    fitted, test_windows
) -> None:
    quiet = quiet_logs(2, 300, seed=1)
    burst = quiet.copy()
    steps = slice(200, 206)
    burst[0, steps, 3] = 40.0  # error lines
    burst[0, steps, 5] = 12.0  # templates never seen at fit time
    burst[0, steps, 7] = 0.6
    calm = fitted.score(with_logs(test_windows, quiet, [True, True])).score[0]
    alarmed = fitted.score(with_logs(test_windows, burst, [True, True])).score[0]
    # the test slice opens far from the fit window (scores decay from ~60 over its first 110
    # steps), so "normal" is the settled part around the burst
    normal = np.r_[calm[120:190], calm[215:]]
    assert alarmed[steps].min() > np.quantile(normal, 0.99)
    assert alarmed[steps].min() > 2 * calm[steps].max()
    off = copy.copy(fitted)
    off.log_branch = False
    without = off.score(with_logs(test_windows, burst, [True, True]))
    assert without.log_branch.tolist() == [False, False]
    np.testing.assert_array_equal(without.score, fitted.score(test_windows).score)


def test_log_features_are_matched_by_name(fitted, test_windows) -> None:
    logs = quiet_logs(2, 300, seed=1)
    expected = fitted.score(with_logs(test_windows, logs, [True, True]))
    order = [4, 0, 9, 2, 8, 1, 7, 3, 6, 5]
    shuffled = LogInputs(
        np.concatenate([logs[..., order], np.ones((2, 300, 1), np.float32)], axis=2),
        [LOG_NAMES[j] for j in order] + ["log_embedding_7"],
        np.array([True, True]),
    )
    actual = fitted.score(test_windows.with_logs(shuffled))
    np.testing.assert_array_equal(actual.score, expected.score)
    # a log refit with fewer embedding axes: the fitted features are gone, metrics alone
    fewer = LogInputs(logs[..., :-1], list(LOG_NAMES[:-1]), np.array([True, True]))
    reduced = fitted.score(test_windows.with_logs(fewer))
    assert reduced.log_branch.tolist() == [False, False]
    np.testing.assert_array_equal(reduced.score, fitted.score(test_windows).score)


def test_a_detector_fitted_without_logs_never_reads_them(smd, test_windows) -> None:
    detector = FusionDetector.from_settings(
        FusionConfig(**{**TINY, "epochs": 1}).model_dump(exclude={"enabled"}),
        torch.device("cpu"),
    )
    detector.fit(Windows.from_array(smd.train[:600], features=smd.feature_names))
    assert detector.log_features_ == []
    scores = detector.score(with_logs(test_windows, quiet_logs(2, 300, seed=1), [True, True]))
    assert scores.log_branch.tolist() == [False, False]
    np.testing.assert_array_equal(scores.score, detector.score(test_windows).score)


def test_checkpoint_round_trip_gives_identical_scores_with_logs(
    fitted, test_windows, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(DETECTORS, "fusion", FusionDetector)
    model = FittedModel(fitted, train_end=1500.0)
    restored = FittedModel.from_bytes(
        model.to_bytes(), DetectorsConfig(fusion={**TINY, "heads": 4}), torch.device("cpu")
    )
    assert isinstance(restored.detector, FusionDetector)
    assert restored.detector.hyper_parameters() == fitted.hyper_parameters()
    assert restored.detector.log_features_ == LOG_NAMES
    for windows in (test_windows, with_logs(test_windows, quiet_logs(2, 300, 2), [True, False])):
        expected, actual = model.score(windows), restored.score(windows)
        np.testing.assert_array_equal(actual.score, expected.score)
        np.testing.assert_array_equal(actual.uncertainty, expected.uncertainty)
        np.testing.assert_array_equal(actual.contributions, expected.contributions)
        np.testing.assert_array_equal(actual.log_branch, expected.log_branch)


def test_the_head_centre_and_bandwidth_are_learnt_from_the_training_batches(fitted) -> None:
    head = fitted.model_.head
    assert int(head.batches) > 0 and float(head.bandwidth) > 0
    assert math.isfinite(float(head.centre.norm())) and float(head.centre.norm()) > 0
