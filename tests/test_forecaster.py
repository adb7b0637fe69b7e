"""The ``forecaster`` detector on the shipped real SMD slice (machine-1-7): the network, the
one-step-ahead score, masking, checkpoints through a real store, forecasts in original units and
the configuration that shapes it. Trained on the earlier 75 % of the train rows and calibrated
(TailCalibrator) on the rest, as the agent does. The /metrics path through the agent is in
test_agent.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aiops_plugin.calibration import TailCalibrator, score_from_p
from aiops_plugin.config import Config, DetectorsConfig
from aiops_plugin.demo import DemoSample, load_demo_sample
from aiops_plugin.detectors.forecaster import (
    MIN_SIGMA,
    ForecasterDetector,
    LongShortForecaster,
    gaussian_nll,
    resolve_export_metrics,
)
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.detectors.scaling import RobustScaler
from aiops_plugin.detectors.training import TrainingSettings
from aiops_plugin.evaluation.datasets import LabelledSeries
from aiops_plugin.evaluation.forecasting import METHODS, evaluate_series
from aiops_plugin.exporter import horizon_label
from aiops_plugin.store import Store
from aiops_plugin.windows import Windows

STEP = 60.0
EXPORTED = ["m05", "m20"]
RATE = 0.01
CALIBRATION_FRACTION = 0.25


@pytest.fixture(scope="module")
def smd() -> DemoSample:
    return load_demo_sample()


def windows(smd: DemoSample, values: np.ndarray, entity: str = "machine-1-7") -> Windows:
    return Windows.from_array(
        values, step=STEP, features=smd.feature_names, entities=[{"instance": entity}]
    )


def small_detector(**overrides) -> ForecasterDetector:
    settings = {
        "window": 24,
        "hidden": 16,
        "heads": 2,
        "horizon_steps": [1, 5, 15],
        "score_steps": 3,
        "export_metrics": EXPORTED,
        "max_train_windows": 2000,
        "training": TrainingSettings(epochs=4, batch_size=64, patience=10),
        **overrides,
    }
    return ForecasterDetector(**settings)


@pytest.fixture(scope="module")
def calibrated(smd: DemoSample) -> tuple[FittedModel, TailCalibrator]:
    history = windows(smd, smd.train)
    model, calibration_raw = FittedModel.fit_split(small_detector(), history, CALIBRATION_FRACTION)
    return model, TailCalibrator().fit(calibration_raw, history.keys)


@pytest.fixture(scope="module")
def fitted(calibrated: tuple[FittedModel, TailCalibrator]) -> FittedModel:
    return calibrated[0]


@pytest.fixture(scope="module")
def calibrator(calibrated: tuple[FittedModel, TailCalibrator]) -> TailCalibrator:
    return calibrated[1]


def exported(calibrator: TailCalibrator, raw: np.ndarray, keys: list[str]) -> np.ndarray:
    """Raw scores on the exported scale (1.0 = the configured false-alarm rate)."""
    return score_from_p(calibrator.p_values(raw, keys), RATE)


def test_network_shapes_and_gate_between_zero_and_one() -> None:
    torch.manual_seed(0)
    network = LongShortForecaster(n_features=38, context=23, horizon=15, hidden=16, heads=2)
    values, mask = torch.randn(7, 23, 38), torch.ones(7, 23, 38)
    output = network(values, mask)
    assert output.mean.shape == output.log_var.shape == (7, 15, 38)
    assert output.gate.shape == (7, 16)
    assert ((output.gate > 0) & (output.gate < 1)).all()


def test_training_lowers_the_loss_on_a_real_slice(fitted: FittedModel) -> None:
    report = fitted.detector.training_report_
    assert report["epochs"] == 4
    assert report["final_train_loss"] < report["first_train_loss"] - 0.2
    assert np.isfinite(report["best_loss"])


def test_loss_ignores_masked_targets() -> None:
    torch.manual_seed(0)
    network = LongShortForecaster(n_features=4, context=8, horizon=3, hidden=8, heads=2)
    output = network(torch.randn(5, 8, 4), torch.ones(5, 8, 4))
    target, mask = torch.randn(5, 3, 4), torch.ones(5, 3, 4)
    mask[:, :, 0] = 0
    changed = target.clone()
    changed[:, :, 0] = 1e6
    assert torch.equal(gaussian_nll(output, target, mask), gaussian_nll(output, changed, mask))


def test_score_is_the_one_step_residual_scaled_by_the_predicted_spread(
    fitted: FittedModel, smd: DemoSample
) -> None:
    """The network reads the steps before the scored one, never the value it scores."""
    detector = fitted.detector
    assert isinstance(detector, ForecasterDetector)
    one_step = small_detector()
    one_step.load_state_dict(detector.state_dict())
    one_step.score_steps = 1
    values = smd.test[:100].copy()
    raw = one_step.score(windows(smd, values)).score[0]
    standard, mask = one_step.scaler_.transform(windows(smd, values))
    context = detector.context
    mean, sigma = one_step.predict(standard[:, -1 - context : -1], mask[:, -1 - context : -1])
    spread = sigma[0, 0]
    expected = np.sqrt(np.mean(((standard[0, -1] - mean[0, 0]) / spread) ** 2))
    assert raw[-1] == pytest.approx(expected, rel=1e-4)
    values[-1, 3] += 5.0
    moved = one_step.score(windows(smd, values)).score[0]
    np.testing.assert_allclose(moved[:-1], raw[:-1], rtol=1e-6, equal_nan=True)
    assert moved[-1] > raw[-1]


def test_agent_context_gives_the_same_latest_score(fitted: FittedModel, smd: DemoSample) -> None:
    history = windows(smd, np.concatenate([smd.train[-200:], smd.test[:200]]))
    whole = fitted.score(history)
    latest = fitted.score(history.tail(fitted.detector.context_steps + 1))
    assert latest.score[0, -1] == pytest.approx(whole.score[0, -1], rel=1e-5)
    np.testing.assert_allclose(latest.forecast.mean, whole.forecast.mean, rtol=1e-5)


def test_missing_values_are_masked_not_scored(fitted: FittedModel, smd: DemoSample) -> None:
    values = smd.test[:160].copy()
    values[:40] = np.nan  # nothing observed: no context for steps up to 40
    values[100:104] = np.nan  # whole steps missing
    values[120:130, :10] = np.nan  # some features missing
    scores = fitted.score(windows(smd, values))
    assert np.isnan(scores.score[0, :41]).all()  # step 40's context is all imputed
    assert np.isfinite(scores.score[0, 41:100]).all()
    assert np.isnan(scores.score[0, 100:104]).all()
    assert np.isfinite(scores.score[0, 104:]).all()
    # the uncertainty is the score's predictive spread in raw units: positive where scored
    assert np.isfinite(scores.uncertainty[0, 120:130]).all()
    assert (scores.uncertainty[0, 41:100] > 0).all()
    assert np.allclose(scores.contributions[0, 125].sum(), 1.0, atol=1e-4)
    # a missing feature contributes nothing to a step scored on its own
    detector = fitted.detector
    assert isinstance(detector, ForecasterDetector)
    detector.score_steps = 1
    try:
        alone = fitted.score(windows(smd, values[:130]))
    finally:
        detector.score_steps = 3
    assert (alone.contributions[0, -1, :10] == 0).all()


def test_planted_level_shift_and_spike_score_above_normal_data(
    fitted: FittedModel, calibrator: TailCalibrator, smd: DemoSample
) -> None:
    """Deviations planted in units of each metric's own spread on the fit window; each scores
    above everything the unplanted data scored in the hour before it, and above the threshold
    on the calibrated scale."""
    normal = smd.test[:300]  # the labelled anomaly starts at test row 375
    spread = smd.train.std(axis=0)
    values = normal.copy()
    values[150] += 10.0 * spread  # a one-minute spike on every metric that moves
    values[240:] += 6.0 * spread  # a level shift from minute 240 on
    before = windows(smd, np.concatenate([smd.train[-60:], normal]))
    planted = windows(smd, np.concatenate([smd.train[-60:], values]))
    baseline = exported(calibrator, fitted.score(before).score, before.keys)[0, 60:]
    scores = exported(calibrator, fitted.score(planted).score, planted.keys)[0, 60:]
    assert scores[150] > max(np.nanmax(baseline[90:150]), 1.0)
    assert scores[240] > max(np.nanmax(baseline[180:240]), 1.0)
    np.testing.assert_array_equal(scores[:150], baseline[:150])


def test_forecast_interval_holds_the_mean_in_original_units(
    fitted: FittedModel, smd: DemoSample
) -> None:
    history = np.concatenate([smd.train[-100:], smd.test[:100]])
    forecast = fitted.score(windows(smd, history)).forecast
    assert forecast is not None
    assert forecast.features == EXPORTED
    np.testing.assert_array_equal(forecast.horizons_seconds, [60.0, 300.0, 900.0])
    assert forecast.mean.shape == (1, 3, 2)
    assert (forecast.lower <= forecast.mean).all() and (forecast.mean <= forecast.upper).all()
    assert (forecast.lower < forecast.upper).all()
    columns = [smd.feature_names.index(name) for name in EXPORTED]
    future = smd.test[100:115, columns]
    low, high = smd.train[:, columns].min(axis=0), smd.train[:, columns].max(axis=0)
    span = high - low
    assert ((forecast.mean > low - 0.5 * span) & (forecast.mean < high + 0.5 * span)).all()
    # one step ahead the forecast is close to what came next, in the metric's own units
    assert np.all(np.abs(forecast.mean[0, 0] - future[0]) < 0.25 * span)


def test_no_forecast_without_exported_metrics(fitted: FittedModel, smd: DemoSample) -> None:
    detector = fitted.detector
    assert isinstance(detector, ForecasterDetector)
    detector.export_metrics = []
    try:
        assert fitted.score(windows(smd, smd.test[:60])).forecast is None
    finally:
        detector.export_metrics = EXPORTED


def test_forecast_distribution_covers_every_feature_whatever_is_exported(
    fitted: FittedModel, smd: DemoSample
) -> None:
    """The early warning needs the forecasts of all features; ``export_metrics`` only bounds
    the exported series, and those are this distribution mapped back to original units."""
    detector = fitted.detector
    assert isinstance(detector, ForecasterDetector)
    history = windows(smd, np.concatenate([smd.train[-100:], smd.test[:100]]))
    detector.export_metrics = []
    try:
        assert detector.forecast(history) is None
        distribution = detector.forecast_distribution(history)
    finally:
        detector.export_metrics = EXPORTED
    assert distribution.features == smd.feature_names
    assert distribution.mean.shape == distribution.sigma.shape == (1, 1, 15, 38)
    np.testing.assert_array_equal(distribution.origins, [199])
    assert distribution.valid.all() and (distribution.sigma >= MIN_SIGMA * 0.999).all()
    standard, mask = detector.scaler_.transform(history)
    context = detector.context
    mean, sigma = detector.predict(standard[:, -context:], mask[:, -context:])
    np.testing.assert_allclose(distribution.mean[:, 0], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(distribution.sigma[:, 0], sigma, rtol=1e-5)
    forecast = detector.forecast(history)
    assert forecast is not None
    columns = [smd.feature_names.index(name) for name in EXPORTED]
    rows = np.array(detector.horizon_steps) - 1
    center = distribution.center[:, None, columns]
    scale = distribution.scale[:, None, columns]
    at_horizons = distribution.mean[:, 0][:, rows][:, :, columns]
    np.testing.assert_allclose(forecast.mean, center + scale * at_horizons, rtol=1e-6)


def test_forecasts_at_every_step_come_in_bounded_chunks(
    fitted: FittedModel, smd: DemoSample
) -> None:
    detector = fitted.detector
    assert isinstance(detector, ForecasterDetector)
    history = windows(smd, np.concatenate([smd.train[-60:], smd.test[:60]]))
    per_step = max(detector.context, detector.horizon) * len(smd.feature_names)
    chunks = list(detector.forecast_distributions(history, first=50, max_elements=7 * per_step))
    assert [chunk.origins.size for chunk in chunks] == [7] * 10
    origins = np.concatenate([chunk.origins for chunk in chunks])
    np.testing.assert_array_equal(origins, np.arange(50, 120))
    at_once = detector.forecast_distribution(history, origins)
    np.testing.assert_allclose(
        np.concatenate([chunk.mean for chunk in chunks], axis=1),
        at_once.mean,
        rtol=1e-5,
        atol=1e-5,
    )
    # the forecast made at step 80 of a long window is the one made at the end of its first 81
    cut = detector.forecast_distribution(history.head(81))
    np.testing.assert_allclose(cut.mean[:, 0], at_once.mean[:, 30], rtol=1e-5, atol=1e-5)
    # before a full context there is no forecast to make
    starts = [chunk.origins[0] for chunk in detector.forecast_distributions(history)]
    assert starts[0] == detector.context - 1
    with pytest.raises(ValueError, match="full 23-step context"):
        detector.forecast_distribution(history, np.array([10]))


def test_no_forecast_from_a_step_or_context_without_data(
    fitted: FittedModel, smd: DemoSample
) -> None:
    detector = fitted.detector
    assert isinstance(detector, ForecasterDetector)
    values = smd.test[:80].copy()
    values[-1] = np.nan
    values[:, 4] = np.nan
    distribution = detector.forecast_distribution(windows(smd, values), np.array([78, 79]))
    np.testing.assert_array_equal(distribution.valid, [[True, False]])
    assert np.isnan(distribution.mean[0, 1]).all() and np.isfinite(distribution.mean[0, 0]).all()
    # a feature never observed in the context is forecast, but flagged as imputed
    assert not distribution.observed[0, 0, 4] and distribution.observed[0, 0, 3]


def test_checkpoint_round_trip_through_the_store(
    fitted: FittedModel, smd: DemoSample, tmp_path: Path
) -> None:
    config = DetectorsConfig.model_validate(
        {"forecaster": {"window": 24, "hidden": 16, "heads": 2, "export_metrics": EXPORTED}}
    )
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.save_model_version(
            detector="forecaster",
            group="smd",
            config_hash="test",
            state=fitted.to_bytes(),
            training_metrics={},
            n_entities=1,
            n_features=38,
        )
        version = store.latest_model_version("forecaster", "smd", "test")
        assert version is not None
        restored = FittedModel.from_bytes(version.state, config, torch.device("cpu"))
    assert fitted.train_end is not None and restored.train_end == fitted.train_end
    history = windows(smd, np.concatenate([smd.train[-50:], smd.test[:150]]))
    before, after = fitted.score(history), restored.score(history)
    np.testing.assert_array_equal(after.score, before.score)
    np.testing.assert_array_equal(after.uncertainty, before.uncertainty)
    for part in ("mean", "lower", "upper"):
        np.testing.assert_array_equal(getattr(after.forecast, part), getattr(before.forecast, part))


def test_unknown_entity_uses_the_group_normalisation_and_the_pooled_tail(
    fitted: FittedModel, calibrator: TailCalibrator, smd: DemoSample
) -> None:
    """An entity first seen after the fit is scored with the detector's group normalisation
    and calibrated with the group's pooled tail (it has no calibration steps of its own)."""
    new = fitted.score(windows(smd, smd.test[:80], entity="new-host"))
    known_windows = windows(smd, smd.test[:80])
    known = fitted.score(known_windows)
    assert np.isfinite(new.score[0, -1]) and new.forecast is not None
    np.testing.assert_array_equal(new.score, known.score)  # a group of one: its normalisation
    assert "new-host" not in calibrator.entities_
    p_new = calibrator.p_values(new.score, ["new-host"])
    scored = np.isfinite(new.score[0])
    assert scored[-30:].all() and ((p_new[0, scored] > 0) & (p_new[0, scored] <= 1)).all()
    # the pooled tail does not depend on which unseen key asks
    np.testing.assert_array_equal(p_new, calibrator.p_values(new.score, ["another-host"]))
    # the pool of a group of one is that entity's tail: the known entity's p-values, shrunk
    # toward the pool, are within a few percent of it
    p_known = calibrator.p_values(known.score, known_windows.keys)
    ratio = p_new[0, scored] / p_known[0, scored]
    assert np.all((ratio > 0.9) & (ratio < 1.1)), (ratio.min(), ratio.max())


def _config(**forecaster) -> dict:
    return {
        "prometheus": {"step": "1m"},
        "entities": [{"name": "smd", "labels": ["instance"], "queries": {"m05": "x", "m20": "y"}}],
        "detectors": {"forecaster": {"enabled": True, **forecaster}},
    }


def test_horizons_become_steps_and_a_horizon_change_refits() -> None:
    config = Config.model_validate(_config())
    assert config.detectors.forecaster.horizon_steps == [5, 15, 30]
    longer = Config.model_validate({**_config(), "calibration": {"horizons": ["5m", "1h"]}})
    assert longer.detectors.forecaster.horizon_steps == [5, 60]
    assert longer.model_hash("forecaster", "smd") != config.model_hash("forecaster", "smd")
    odd = Config.model_validate({**_config(), "calibration": {"horizons": ["90s"]}})
    assert odd.detectors.forecaster.horizon_steps == [2]
    detector = build_detector("forecaster", longer.detectors, torch.device("cpu"))
    assert isinstance(detector, ForecasterDetector) and detector.horizon == 60


def test_exported_metrics_and_interval_need_no_refit() -> None:
    plain = Config.model_validate(_config())
    exporting = Config.model_validate(_config(export_metrics=["m05"], interval=0.5))
    wider = Config.model_validate(_config(hidden=32))
    assert exporting.model_hash("forecaster", "smd") == plain.model_hash("forecaster", "smd")
    assert wider.model_hash("forecaster", "smd") != plain.model_hash("forecaster", "smd")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"export_metrics": ["nope"]}, "detectors.forecaster.export_metrics.0"),
        ({"horizon_steps": [3]}, "derived from calibration.horizons"),
        ({"hidden": 30, "heads": 4}, "multiple of heads"),
        ({"export_metrics": [f"m{i}" for i in range(17)]}, "at most 16"),
    ],
)
def test_bad_forecaster_settings_name_the_field(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.model_validate(_config(**settings))


def test_horizon_labels_are_prometheus_durations() -> None:
    assert [horizon_label(s) for s in (300, 900, 3600, 5400, 90, 86400)] == [
        "5m",
        "15m",
        "1h",
        "90m",
        "90s",
        "1d",
    ]


def test_forecast_benchmark_compares_every_method_at_every_horizon(smd: DemoSample) -> None:
    series = LabelledSeries(
        dataset="smd",
        entity=smd.machine,
        train=smd.train,
        test=smd.test,
        test_labels=smd.test_labels.astype(np.int8),
        step_seconds=STEP,
        test_timestamps=None,
        feature_names=smd.feature_names,
        segments=[],
        notes=[],
    )
    detectors = DetectorsConfig.model_validate(
        {"forecaster": {"window": 24, "hidden": 16, "heads": 2, "epochs": 2}}
    )
    rows, _, origins = evaluate_series(series, detectors, 20, torch.device("cpu"))
    assert origins == len(range(len(smd.train) - 1, len(smd.train) + len(smd.test) - 30, 20))
    assert {(row.method, row.horizon_steps) for row in rows} == {
        (method, steps) for method in METHODS for steps in (5, 15, 30)
    }
    # the baselines' errors, recomputed here from the raw rows: origins, horizons, scaling
    full = np.concatenate([smd.train, smd.test])
    scaler = RobustScaler().fit(windows(smd, smd.train))
    standard = scaler.transform(windows(smd, full))[0][0]
    center, scale = next(iter(scaler.centers_.values())), next(iter(scaler.scales_.values()))
    at = np.arange(len(smd.train) - 1, len(full) - 30, 20)
    season = 1440
    floor = 0.1 * np.quantile(np.abs(smd.train), 0.99, axis=0)
    eligible = (np.abs(full) >= floor) & (floor > 0)
    by_method = {(row.method, row.horizon_steps): row for row in rows}
    for h in (5, 15, 30):
        target = standard[at + h]
        last, seasonal = standard[at], standard[at + h - season]
        for method, predicted in (("last value", last), ("seasonal-naive", seasonal)):
            row = by_method[(method, h)]
            assert row.mse == pytest.approx(np.mean((predicted - target) ** 2), rel=1e-5)
            assert row.mae == pytest.approx(np.mean(np.abs(predicted - target)), rel=1e-5)
            chosen = eligible[at + h]
            assert row.mape_coverage == pytest.approx(chosen.mean(), rel=1e-9)
            error = np.abs(center + scale * predicted - full[at + h])[chosen]
            assert row.mape == pytest.approx(100 * np.mean(error / np.abs(full[at + h][chosen])))
    # skill: the forecaster beats always forecasting the train median (0 in standard units)
    median_mse = np.mean(standard[at + 5] ** 2)
    assert by_method[("forecaster", 5)].mse < 0.9 * median_mse
    # one day of history is there (3000 one-minute rows): seasonal-naive is not persistence
    assert by_method[("seasonal-naive", 5)].mse != by_method[("last value", 5)].mse


def test_export_names_resolve_to_the_groups_features_or_say_why_not() -> None:
    """The example queries keep ``job``, so ``mem_available_ratio`` is the feature
    ``mem_available_ratio{job="node"}``: the bare name means it. A query with several features
    needs the full name; a name of another group's query is not this group's problem."""
    features = ['mem_available_ratio{job="node"}', 'cpu{cpu="0"}', 'cpu{cpu="1"}', "load1"]
    exported, problems = resolve_export_metrics(
        ["mem_available_ratio", "cpu", 'cpu{cpu="1"}', "load1", "disk_busy", "load1"], features
    )
    assert exported == ['mem_available_ratio{job="node"}', 'cpu{cpu="1"}', "load1"]
    assert problems == [
        "detectors.forecaster.export_metrics: 'cpu' matches no feature; the query 'cpu' gives "
        '2: cpu{cpu="0"}, cpu{cpu="1"}'
    ]
    assert resolve_export_metrics(['cpu{cpu="7"}'], features)[1][0].startswith(
        "detectors.forecaster.export_metrics: 'cpu{cpu=\"7\"}' matches no feature"
    )
