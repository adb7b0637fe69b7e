"""The ``multiscale`` detector: decomposition and module shapes, softmax fusion, masking, training,
checkpoints through a real store, planted anomalies in real SMD data, uncertainty, contributions
and the configuration hash. Tiny configurations on the shipped SMD machine-1-7 slice, CPU only."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from aiops_plugin.agent import Agent
from aiops_plugin.config import Config, DetectorsConfig, MultiscaleConfig
from aiops_plugin.demo import load_demo_sample
from aiops_plugin.detectors.multiscale import (
    MIN_VARIANCE,
    GaussianHead,
    MultiscaleDecomposition,
    MultiscaleDetector,
    MultiscaleNetwork,
    ScaleEncoder,
    ScaleFusion,
    gaussian_nll,
)
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.detectors.training import TrainingSettings
from aiops_plugin.exporter import Exporter
from aiops_plugin.store import Store
from aiops_plugin.windows import Windows

WINDOW = 32
TINY = {
    "enabled": True,
    "window": WINDOW,
    "levels": 4,
    "d_model": 16,
    "heads": 2,
    "epochs": 4,
    "batch_size": 64,
    "max_train_windows": 1500,
    "learning_rate": 3e-3,
    "score_steps": 1,
    "max_fit_seconds": 600,
}


@pytest.fixture(scope="module")
def smd():
    return load_demo_sample()


@pytest.fixture(scope="module")
def fitted(smd) -> MultiscaleDetector:
    detector = build_detector("multiscale", DetectorsConfig(multiscale=TINY), torch.device("cpu"))
    assert isinstance(detector, MultiscaleDetector)
    detector.fit(Windows.from_array(smd.train[:2000], features=smd.feature_names))
    return detector


def _batch(detector: MultiscaleDetector, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised ``(B, W, F)`` windows and mask, as the detector feeds its network."""
    standard, mask = detector.scaler_.transform(Windows.from_array(values[None]))
    x = torch.from_numpy(standard[0]).unfold(0, WINDOW, WINDOW).permute(0, 2, 1)
    m = torch.from_numpy(mask[0]).unfold(0, WINDOW, WINDOW).permute(0, 2, 1)
    return x.contiguous(), m.contiguous()


def test_decomposition_gives_one_coarser_series_per_level() -> None:
    values = torch.arange(2 * 20 * 3, dtype=torch.float32).reshape(2, 20, 3)
    mask = torch.ones_like(values)
    levels = MultiscaleDecomposition(levels=4)(values, mask)
    assert [level.shape for level in levels] == [(2, 20, 6), (2, 10, 6), (2, 5, 6), (2, 2, 6)]
    torch.testing.assert_close(levels[0][..., :3], values)
    torch.testing.assert_close(levels[1][0, -1, :3], values[0, -2:].mean(dim=0))
    # 20 steps at 8 per point: the points end at the last step, the 4 oldest steps are dropped
    torch.testing.assert_close(levels[3][0, 0, :3], values[0, 4:12].mean(dim=0))
    assert torch.all(levels[2][..., 3:] == 1.0)


def test_decomposition_averages_only_observed_values() -> None:
    values = torch.tensor([[[1.0], [3.0], [1000.0], [5.0]]])
    mask = torch.tensor([[[1.0], [1.0], [0.0], [1.0]]])
    pooled = MultiscaleDecomposition(levels=2)(values, mask)[1]
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(pooled[0, :, 1], torch.tensor([1.0, 0.5]))


def test_modules_have_the_documented_shapes_and_fusion_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    assert ScaleEncoder(10, length=16, d_model=8, heads=2, dropout=0.1)(
        torch.randn(3, 16, 10)
    ).shape == (3, 8)
    fusion = ScaleFusion(levels=4)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([2.0, -1.0, 0.5, 0.0]))
    assert fusion([torch.randn(3, 8) for _ in range(4)]).shape == (3, 8)
    assert torch.all(fusion.weights() > 0)
    assert float(fusion.weights().detach().sum()) == pytest.approx(1.0, abs=1e-6)
    mean, variance = GaussianHead(8, 5, dropout=0.1)(torch.randn(3, 8))
    assert mean.shape == variance.shape == (3, 5) and torch.all(variance >= MIN_VARIANCE)
    samples, _ = GaussianHead(8, 5, dropout=0.1)(torch.randn(3, 8), torch.ones(7, 8))
    assert samples.shape == (7, 3, 5)
    network = MultiscaleNetwork(5, window=32, levels=4, d_model=8, heads=2, dropout=0.1)
    mean, variance = network(torch.randn(3, 32, 5), torch.ones(3, 32, 5))
    assert mean.shape == variance.shape == (3, 5)


def test_a_window_too_short_for_the_levels_is_rejected() -> None:
    with pytest.raises(ValueError, match="fewer than 2 points"):
        MultiscaleNetwork(5, window=16, levels=5, d_model=8, heads=2, dropout=0.1)
    with pytest.raises(ValueError, match="at least 2 points at the coarsest level"):
        MultiscaleConfig(window=16, levels=5)
    with pytest.raises(ValueError, match="multiple of heads"):
        MultiscaleConfig(d_model=30, heads=4)


def test_the_network_cannot_see_the_step_it_predicts(fitted, smd) -> None:
    x, m = _batch(fitted, smd.test[:256])
    changed = x.clone()
    changed[:, -1] += 40.0
    with torch.no_grad():
        torch.testing.assert_close(fitted.model_(x, m), fitted.model_(changed, m))


def test_training_lowers_the_loss_on_a_real_slice(fitted) -> None:
    report = fitted.training_report_
    assert report["epochs"] == TINY["epochs"]
    assert report["final_train_loss"] < report["first_train_loss"] - 0.3


def test_a_masked_channel_changes_neither_the_loss_nor_the_score_of_the_others(fitted, smd) -> None:
    x, m = _batch(fitted, smd.test[:256])
    channel = 3
    masked_x, masked_m = x.clone(), m.clone()
    masked_m[:, -1, channel] = 0.0
    masked_x[:, -1, channel] = 1e6
    masked_m[:, 5:9, 10] = 0.0  # a gap in the context: the value under it is never read
    masked_x[:, 5:9, 10] = -1e6
    reference_m = m.clone()
    reference_m[:, 5:9, 10] = 0.0
    model = fitted.model_
    with torch.no_grad():
        mean, variance = model(x, reference_m)
        terms = gaussian_nll(mean, variance, x[:, -1])
        others = torch.ones(x.shape[2], dtype=torch.bool)
        others[channel] = False
        expected_loss = terms[:, others].mean()
        torch.testing.assert_close(fitted.loss(model, masked_x, masked_m), expected_loss)
        masked = fitted.score_batch(model, masked_x, masked_m)
        reference = fitted.score_batch(model, x, reference_m)
    shares = reference.contributions[:, others]
    expected_score = reference.score * shares.sum(dim=1) * x.shape[2] / (x.shape[2] - 1)
    torch.testing.assert_close(masked.score, expected_score)
    assert torch.all(masked.contributions[:, channel] == 0)


def test_a_fully_masked_last_step_is_not_scored(fitted, smd) -> None:
    values = smd.test[:200].copy()
    values[120] = np.nan
    values[150:152, :20] = np.nan
    scores = fitted.score(Windows.from_array(values, features=smd.feature_names))
    assert np.isnan(scores.score[0, 120]) and np.isnan(scores.uncertainty[0, 120])
    assert np.isnan(scores.contributions[0, 120]).all()
    assert np.isfinite(scores.score[0, 150:152]).all()
    assert np.isfinite(scores.score[0, WINDOW - 1 : 120]).all()


def test_windows_shorter_than_the_network_reads_score_nothing_and_do_not_fail(fitted, smd):
    """A buffer still filling up after a restart: every step is unscored, none raises."""
    scores = fitted.score(Windows.from_array(smd.test[: WINDOW - 1], features=smd.feature_names))
    assert scores.score.shape == (1, WINDOW - 1) and np.isnan(scores.score).all()


def test_a_mostly_missing_context_is_not_scored(fitted, smd) -> None:
    values = smd.test[:200].copy()
    values[100:160, :] = np.nan
    values[100:160, 0] = smd.test[100:160, 0]
    scores = fitted.score(Windows.from_array(values, features=smd.feature_names))
    assert np.isnan(scores.score[0, 150])


def test_planted_shift_and_spike_score_above_normal_data_and_point_at_their_channel(
    fitted, smd
) -> None:
    values = smd.test[:300].copy()
    key = Windows.from_array(values).keys[0]
    scale = fitted.scaler_.scales_[key]
    shifted, spiked = 10, 3
    values[150:200, shifted] += 45 * scale[shifted]
    values[250, spiked] += 45 * scale[spiked]
    scores = fitted.score(Windows.from_array(values, features=smd.feature_names))
    score = scores.score[0]
    normal = np.r_[score[WINDOW:150], score[205:250], score[255:]]
    typical = np.quantile(normal, 0.99)
    assert score[150] > max(1.5 * typical, score[100:150].max())
    assert score[150:200].mean() > typical, "the score stays up while the shift lasts"
    assert score[250] > max(1.5 * typical, score[205:250].max(), score[251:].max())
    assert np.argmax(scores.contributions[0, 150]) == shifted
    assert np.argmax(scores.contributions[0, 250]) == spiked
    uncertainty = scores.uncertainty[0, WINDOW - 1 :]
    assert np.isfinite(uncertainty).all() and (uncertainty > 0).all()
    assert scores.uncertainty[0, 250] > np.median(uncertainty)
    np.testing.assert_allclose(np.nansum(scores.contributions[0, WINDOW:], axis=1), 1, atol=1e-4)


def test_the_score_averages_the_surprise_of_the_last_score_steps(fitted, smd) -> None:
    smoothed = copy.copy(fitted)
    smoothed.score_steps = 4
    values = smd.test[:200].copy()
    values[120] = np.nan
    windows = Windows.from_array(values, features=smd.feature_names)
    steps, scores = fitted.score(windows), smoothed.score(windows)
    expected = np.nanmean(steps.score[0, 100:104])
    assert scores.score[0, 103] == pytest.approx(expected, rel=1e-5)
    assert scores.score[0, 123] == pytest.approx(np.nanmean(steps.score[0, 121:124]), rel=1e-5)
    assert np.isnan(scores.score[0, 120])
    weighted = steps.contributions[0, 100:104] * steps.score[0, 100:104, None]
    np.testing.assert_allclose(
        scores.contributions[0, 103], weighted.sum(axis=0) / weighted.sum(), rtol=1e-4
    )
    # what the agent does: score only the context the last step depends on
    assert smoothed.context_steps == WINDOW - 1 + 3
    tail = smoothed.score(windows.tail(smoothed.context_steps + 1))
    assert tail.score[0, -1] == pytest.approx(scores.score[0, -1], rel=1e-5)


def test_checkpoint_round_trips_through_a_real_store_into_the_agent(smd, tmp_path: Path) -> None:
    config = Config.model_validate(
        {
            "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"m": "up"}}],
            "detectors": {"multiscale": {**TINY, "epochs": 1}},
        }
    )
    detector = build_detector("multiscale", config.detectors, torch.device("cpu"))
    windows = Windows.from_array(smd.train[:1000], features=smd.feature_names)
    model = FittedModel.fit(detector, windows)
    store = Store.open(f"sqlite:///{tmp_path / 'aiops.db'}")
    try:
        store.save_model_version(
            detector="multiscale",
            group="hosts",
            config_hash=config.model_hash("multiscale", "hosts"),
            state=model.to_bytes(),
            training_metrics={},
            n_entities=1,
            n_features=len(smd.feature_names),
        )
        agent = Agent(config, store=store)
        assert agent.load_models() == 1
    finally:
        store.close()
    restored = agent.models[("multiscale", "hosts")]
    assert model.train_end is not None and restored.train_end == model.train_end
    test = Windows.from_array(smd.test[:150], features=smd.feature_names)
    expected, actual = model.score(test), restored.score(test)
    np.testing.assert_array_equal(actual.score, expected.score)
    np.testing.assert_array_equal(actual.uncertainty, expected.uncertainty)
    np.testing.assert_array_equal(actual.contributions, expected.contributions)
    # the model's uncertainty is the detector's own, in raw score units (no threshold scaling)
    np.testing.assert_array_equal(expected.uncertainty, model.detector.score(test).uncertainty)
    weights = model.detector.scale_weights()
    assert restored.detector.scale_weights() == weights
    exported = generate_latest(agent.exporter.registry).decode()
    assert f'aiops_multiscale_scale_weight{{entity_group="hosts",scale="4"}} {weights["4"]}' in (
        exported
    )


def test_fusion_weights_are_exported_per_group_and_scale(fitted) -> None:
    weights = fitted.scale_weights()
    assert list(weights) == ["1", "2", "4", "8"]
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
    exporter = Exporter()
    exporter.publish_model_state("hosts", "multiscale", fitted)
    text = generate_latest(exporter.registry).decode()
    assert f'aiops_multiscale_scale_weight{{entity_group="hosts",scale="8"}} {weights["8"]}' in (
        text
    )
    # a refit replaces the group's series instead of adding to them
    exporter.publish_model_state("hosts", "multiscale", fitted)
    assert generate_latest(exporter.registry).decode().count("aiops_multiscale_scale_weight{") == 4


def test_a_change_of_levels_changes_the_model_hash() -> None:
    def config(levels: int) -> Config:
        return Config.model_validate(
            {
                "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"m": "up"}}],
                "detectors": {"multiscale": {"enabled": True, "levels": levels}},
            }
        )

    def model_hash(levels: int) -> str:
        return config(levels).model_hash("multiscale", "hosts")

    assert model_hash(3) != model_hash(4)
    assert model_hash(4) == model_hash(4)


def test_hyper_parameters_rebuild_the_same_detector(fitted) -> None:
    restored = MultiscaleDetector(training=TrainingSettings())
    restored.load_state_dict(fitted.state_dict())
    assert restored.hyper_parameters() == fitted.hyper_parameters()
    assert restored.window == WINDOW


def _fit_tiny(smd, **overrides) -> FittedModel:
    settings = {**TINY, "epochs": 2, "max_train_windows": 320, "mc_samples": 2, **overrides}
    detector = build_detector(
        "multiscale", DetectorsConfig(multiscale=settings), torch.device("cpu")
    )
    windows = Windows.from_array(smd.train[:1200], features=smd.feature_names)
    return FittedModel.fit(detector, windows)


def _busy_cpus(count: int, seconds: float) -> list[subprocess.Popen]:
    """``count`` processes spinning on a CPU each, for ``seconds`` at most."""
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]


def test_a_fit_gives_the_same_model_on_a_busy_machine(smd) -> None:
    """The budget is epochs, not seconds: a fit competing with CPU hogs trains as far as a fit
    on a quiet machine, so the weights and scores are identical."""
    quiet = _fit_tiny(smd)
    hogs = _busy_cpus(2, seconds=60)
    try:
        busy = _fit_tiny(smd)
        assert all(hog.poll() is None for hog in hogs), "the machine was busy during the fit"
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    for report in (quiet.report, busy.report):
        assert report.metrics["stopped_by"] == "epochs" and report.metrics["epochs"] == 2
    assert busy.report.metrics["steps"] == quiet.report.metrics["steps"] == 2 * 320 / 64
    expected, actual = quiet.detector.model_.state_dict(), busy.detector.model_.state_dict()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    test = Windows.from_array(smd.test[:200], features=smd.feature_names)
    np.testing.assert_array_equal(busy.score(test).score, quiet.score(test).score)


def test_max_steps_caps_training_in_optimiser_steps(smd) -> None:
    capped = _fit_tiny(smd, max_steps=7)
    again = _fit_tiny(smd, max_steps=7)
    assert capped.report.metrics["steps"] == 7 and capped.report.metrics["epochs"] == 2
    assert capped.report.metrics["stopped_by"] == "max_steps"
    expected, actual = capped.detector.model_.state_dict(), again.detector.model_.state_dict()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_a_hit_time_limit_is_logged_and_recorded_with_the_version(
    smd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiops_plugin.detectors.training"):
        model = _fit_tiny(smd, max_fit_seconds="1ms")
    metrics = model.report.metrics
    assert metrics["stopped_by"] == "time_limit" and metrics["steps"] == 1
    assert metrics["training_seconds"] > 0.001
    assert any(
        "detector 'multiscale'" in record.message and "safety limit" in record.message
        for record in caplog.records
        if record.levelno == logging.WARNING
    )
    store = Store.open(f"sqlite:///{tmp_path / 'aiops.db'}")
    try:
        store.save_model_version(
            detector="multiscale",
            group="hosts",
            config_hash="limit",
            state=model.to_bytes(),
            training_metrics=dict(metrics),
            n_entities=1,
            n_features=len(smd.feature_names),
        )
        stored = store.latest_model_version("multiscale", "hosts", "limit")
    finally:
        store.close()
    assert stored is not None and stored.training_metrics["stopped_by"] == "time_limit"
