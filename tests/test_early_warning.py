"""The early-warning probability on a real SMD slice (machine-1-2, eight of its metrics, the
first 40 hours of its train split): fitted as the agent fits it (mad + pca trained on the earlier
75 %, the fused calibration and the early warning on the rest, with and without a tiny
forecaster), then fed the next hours with planted ramps. Plus the pieces by hand (the trend
line, the SLO features, the gate) and the benchmark on a tiny NAB slice."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from aiops_plugin import early_warning
from aiops_plugin.calibration import score_from_p
from aiops_plugin.calibration.stage import GroupCalibration
from aiops_plugin.config import DetectorsConfig, EarlyWarningConfig, SloThreshold
from aiops_plugin.detectors.forecaster import ForecasterDetector
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.detectors.training import TrainingSettings
from aiops_plugin.early_warning import (
    FORECAST,
    RAMP,
    SLO,
    GroupEarlyWarning,
    forecast_evidence,
    gate,
    line_extrapolation,
    slo_columns,
    trend_extrapolation,
)
from aiops_plugin.evaluation import datasets
from aiops_plugin.evaluation import early_warning_benchmark as benchmark
from aiops_plugin.exporter import horizon_label
from aiops_plugin.windows import Windows

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
RATE = 0.001
HORIZONS = [5, 15, 30]
#: machine-1-2's metrics 0-6 and 23; 2-6 are smooth (lag-1 autocorrelation >= 0.95)
COLUMNS = [0, 1, 2, 3, 4, 5, 6, 23]
FIT_ROWS = 2400
CONTEXT = 100
#: test steps (after the context) at which the planted ramps start
RAMP_START = 150
#: mixtures refitted every this many steps in the replays (the equivalence test uses 1)
REFIT = 20


def machine_windows(values: np.ndarray, features: list[str]) -> Windows:
    return Windows.from_array(
        values, step=60.0, features=features, entities=[{"instance": "machine-1-2"}]
    )


@dataclass
class Fitted:
    """A group of one SMD machine fitted as the agent fits it."""

    values: np.ndarray  # (FIT_ROWS + 400, features): the fit read and the hours after it
    features: list[str]
    models: dict[str, FittedModel]
    calibration: GroupCalibration
    fused_slice: np.ndarray
    first: int
    forecaster: ForecasterDetector

    def windows(self, values: np.ndarray) -> Windows:
        return machine_windows(values, self.features)

    def fused(self, windows: Windows) -> np.ndarray:
        raw = {name: model.score(windows).score for name, model in self.models.items()}
        return score_from_p(self.calibration.p_values(raw, windows.keys)["fused"], RATE)

    def early_warning(
        self,
        with_forecaster: bool,
        slo: dict[str, SloThreshold] | None = None,
        settings: EarlyWarningConfig | None = None,
    ) -> GroupEarlyWarning:
        return GroupEarlyWarning(HORIZONS, settings or EarlyWarningConfig(), slo or {}, RATE).fit(
            self.fused_slice,
            self.windows(self.values[:FIT_ROWS]),
            self.first,
            self.forecaster if with_forecaster else None,
        )

    def after_fit(self) -> np.ndarray:
        """The context and the 300 steps after the fit read, unplanted."""
        return self.values[FIT_ROWS - CONTEXT : FIT_ROWS + 300].copy()

    def replay(
        self, warning: GroupEarlyWarning, values: np.ndarray, with_forecaster: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities (steps, horizons), fused scores (steps,))`` after the context, from
        a copy of ``warning`` (its recent p-values are fed)."""
        windows = self.windows(values)
        fused = self.fused(windows)[:, CONTEXT:]
        forecaster = self.forecaster if with_forecaster else None
        probability = copy.deepcopy(warning).replay(fused, windows, CONTEXT, forecaster, REFIT)
        return probability[0], fused[0]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny forecaster gains nothing from a second thread, and two threads spin against any
    other busy process on a 2-core machine (its fit here: 2 s with one, 230 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    series = datasets.load("smd", "machine-1-2", DATA_ROOT)
    values = series.train[: FIT_ROWS + 400, COLUMNS]
    features = [series.feature_names[c] for c in COLUMNS]
    history = machine_windows(values[:FIT_ROWS], features)
    models, raw = {}, {}
    for name in ("mad", "pca"):
        detector = build_detector(name, DetectorsConfig(), torch.device("cpu"))
        models[name], raw[name] = FittedModel.fit_split(detector, history, 0.25)
    forecaster = ForecasterDetector(
        window=32,
        hidden=16,
        heads=2,
        horizon_steps=HORIZONS,
        score_steps=3,
        max_train_windows=2000,
        training=TrainingSettings(epochs=5, batch_size=64, patience=10),
    )
    FittedModel.fit_split(forecaster, history, 0.25)
    calibration = GroupCalibration(["mad", "pca"]).fit(raw, history.keys)
    fused_slice = score_from_p(calibration.fused_calibration_p_, RATE)
    return Fitted(
        values,
        features,
        models,
        calibration,
        fused_slice,
        FIT_ROWS - fused_slice.shape[1],
        forecaster,
    )


@pytest.fixture(scope="module")
def trend_only(fitted: Fitted) -> GroupEarlyWarning:
    """The default without a forecaster: the fused score's trend alone."""
    return fitted.early_warning(with_forecaster=False)


@pytest.fixture(scope="module")
def with_ramp(fitted: Fitted) -> GroupEarlyWarning:
    """``early_warning.ramp`` without a forecaster: the metrics' own lines and the fused
    score's trend."""
    return fitted.early_warning(with_forecaster=False, settings=EarlyWarningConfig(ramp=True))


@pytest.fixture(scope="module")
def with_forecast(fitted: Fitted) -> GroupEarlyWarning:
    """The default with a forecaster: the forecast's evidence and the fused score's trend (the
    metrics' lines join them in the state round trip)."""
    return fitted.early_warning(with_forecaster=True)


def plant_ramp(
    fitted: Fitted, values: np.ndarray, features: list[int], length: int, beyond: float
) -> np.ndarray:
    """A linear ramp from each feature's value at ``RAMP_START`` to ``max + beyond * range`` of
    its fit read, over ``length`` steps, held after; the other features untouched."""
    planted = values.copy()
    steps = np.arange(len(values))
    start = CONTEXT + RAMP_START
    share = np.clip((steps - start) / length, 0.0, 1.0)
    for j in features:
        fit = fitted.values[:FIT_ROWS, j]
        target = fit.max() + beyond * (fit.max() - fit.min())
        ramp = planted[start, j] + share * (target - planted[start, j])
        planted[:, j] = np.where(steps >= start, ramp, planted[:, j])
    return planted


def first_at_or_above(values: np.ndarray, level: float) -> int | None:
    hits = np.flatnonzero(values >= level)
    return int(hits[0]) if hits.size else None


# ---------------------------------------------------------------------------- the pieces
def test_trend_is_a_nan_tolerant_least_squares_line_extrapolated() -> None:
    y = 2.0 + 0.5 * np.arange(12, dtype=np.float64)
    y[[3, 7]] = np.nan
    line = trend_extrapolation(y[None], 5, [1, 10])
    # step 11 sees steps 7..11, step 7 missing: the line through the other four
    assert line[0, 11] == pytest.approx([2.0 + 0.5 * 12, 2.0 + 0.5 * 21])
    noisy = np.array([[1.0, 3.0, 2.0, 4.0, np.nan]])
    expected = np.polyfit(np.arange(4.0), noisy[0, :4], 1)
    assert trend_extrapolation(noisy[:, :4], 10, [2])[0, 3, 0] == pytest.approx(
        np.polyval(expected, 5.0)
    )
    # fewer than three finite values in the span: no trend
    assert np.isnan(trend_extrapolation(noisy, 3, [1])[0, [0, 1, 4]]).all()


def test_metric_lines_match_a_least_squares_fit_across_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every feature's own line, by windowed cumulative sums a chunk at a time: the same as
    ``polyfit`` over each window's finite values, also across chunk boundaries (chunks of 16
    steps here), from any first step on, and NaN where too few values are finite."""
    monkeypatch.setattr(early_warning, "LINE_CHUNK", 16)
    rng = np.random.default_rng(3)
    values = rng.normal(size=(2, 70, 3)).cumsum(axis=1)
    values[rng.random(values.shape) < 0.2] = np.nan
    values[1, 30:40, 2] = np.nan  # a gap longer than the span
    span, ahead, first = 8, [1, 12], 5
    lines = line_extrapolation(values, span, ahead, first)
    assert lines.shape == (2, 65, 3, 2)
    for e, t, f in [(0, 5, 0), (0, 15, 1), (0, 16, 2), (1, 33, 0), (1, 69, 2), (1, 17, 1)]:
        x = np.arange(max(0, t - span + 1), t + 1, dtype=np.float64)
        y = values[e, x.astype(int), f]
        finite = np.isfinite(y)
        if finite.sum() >= span // 2:
            coefficients = np.polyfit(x[finite], y[finite], 1)
            expected = np.polyval(coefficients, t + np.asarray(ahead, dtype=np.float64))
            np.testing.assert_allclose(lines[e, t - first, f], expected, rtol=1e-9, atol=1e-9)
        else:
            assert np.isnan(lines[e, t - first, f]).all()
    assert np.isnan(lines[1, 39 - first, 2]).all()  # the window 32..39 holds no value


def test_slo_thresholds_apply_to_every_feature_of_their_query() -> None:
    features = ["cpu", 'cpu{mode="user"}', "cpu_busy", "mem"]
    slo = {"cpu": SloThreshold(above=0.9), "mem": SloThreshold(below=1e9)}
    columns, sign, threshold = slo_columns(features, slo)
    np.testing.assert_array_equal(columns, [0, 1, 3])
    np.testing.assert_array_equal(sign, [1.0, 1.0, -1.0])
    np.testing.assert_array_equal(threshold, [0.9, 0.9, 1e9])


def test_gate_tempers_the_evidence_toward_the_prior_in_proportion() -> None:
    prior, threshold = 0.01, 2.0
    p = np.array([0.9, 0.9, 0.9, 0.9, 0.001, np.nan])
    u = np.array([1.0, 2.0, 4.0, 400.0, 4.0, 4.0])
    gated = gate(p, prior, u, threshold)
    assert gated[:2] == pytest.approx([0.9, 0.9])  # at or below the gate: all the evidence
    logit = lambda q: math.log(q / (1 - q))  # noqa: E731
    # twice the gate's uncertainty keeps half the log-odds above the prior
    assert logit(gated[2]) - logit(prior) == pytest.approx((logit(0.9) - logit(prior)) / 2)
    assert gated[3] == pytest.approx(prior, rel=0.05)  # almost nothing is left
    assert prior > gated[4] > 0.001  # below the prior, it is pulled up toward it
    assert np.isnan(gated[5])
    np.testing.assert_array_equal(gate(p, prior, None, threshold), p)


# ------------------------------------------------------------------- the planted ramps
def test_stays_low_on_normal_data(
    fitted: Fitted,
    trend_only: GroupEarlyWarning,
    with_ramp: GroupEarlyWarning,
    with_forecast: GroupEarlyWarning,
) -> None:
    values = fitted.after_fit()
    for warning, forecasting, from_the_start in (
        (trend_only, False, False),
        (with_ramp, False, True),
        (with_forecast, True, True),
    ):
        probability, fused = fitted.replay(warning, values, forecasting)
        # the trend needs three scores: the replay's first two steps have only the evidence
        # read off the metrics (the forecast, the ramp: their history is the context's)
        assert np.isfinite(probability[2:]).all()
        assert np.isfinite(probability[:2]).all() == from_the_start
        assert np.nanmax(probability) < 0.05, (warning.method, np.nanmax(probability, axis=0))
    assert np.nanmax(fused) < 1.0  # the stretch is normal by the fused score too


def test_forecast_warns_on_a_slow_ramp_before_the_fused_score_alarms(
    fitted: Fitted, with_forecast: GroupEarlyWarning
) -> None:
    """Three smooth metrics (memory-like) climb over two hours to their fit maximum plus their
    range: the forecast sees them leave the normal band while the fused score of mad + pca is
    still below 1."""
    assert with_forecast.method == "ew-forecast-trend-tail-cauchy-bum-gated-v1"
    values = plant_ramp(fitted, fitted.after_fit(), [2, 3, 4], length=120, beyond=1.0)
    probability, fused = fitted.replay(with_forecast, values, True)
    assert np.nanmax(probability[:RAMP_START]) < 0.05
    warned = first_at_or_above(probability[:, 2], 0.5)  # the 30-minute horizon
    assert warned is not None and RAMP_START < warned < RAMP_START + 120
    alarmed = first_at_or_above(fused, 1.0)
    assert alarmed is None or alarmed > warned
    assert probability[warned:, 2].min() > 0.5  # it holds while the level stays beyond


def test_metric_lines_warn_on_a_slow_ramp_before_the_fused_score_alarms(
    fitted: Fitted, with_ramp: GroupEarlyWarning, trend_only: GroupEarlyWarning
) -> None:
    """No forecaster (the default detectors), ``early_warning.ramp`` on: three smooth metrics
    climb over two hours to their fit maximum plus their range. Their own lines, extrapolated
    over the 30-minute horizon, leave the metrics' band before the fused score of mad + pca
    reaches 1; the exported score (no mixture behind it) says so first, the probability
    follows, and neither moved before."""
    assert with_ramp.method == "ew-ramp-trend-tail-cauchy-bum-v1"
    values = plant_ramp(fitted, fitted.after_fit(), [2, 3, 4], length=120, beyond=1.0)
    windows = fitted.windows(values)
    fused = fitted.fused(windows)[:, CONTEXT:]
    p, uncertainty = with_ramp.replay_p_values(fused, windows, CONTEXT, None)
    scores = with_ramp.scores(p, uncertainty)[0]
    alarmed = first_at_or_above(fused[0], 1.0)
    warned = first_at_or_above(scores[:, 2], 1.0)
    assert alarmed is not None and warned is not None
    assert RAMP_START < warned < alarmed - 10, (warned, alarmed)
    assert np.nanmax(scores[:RAMP_START]) < 1.0
    # the fused score's trend alone says nothing before the fused score itself does
    trend_p, _ = trend_only.replay_p_values(fused, windows, CONTEXT, None)
    later = first_at_or_above(trend_only.scores(trend_p, None)[0, :, 2], 1.0)
    assert later is None or later >= alarmed
    probability, _ = fitted.replay(with_ramp, values, False)
    assert np.nanmax(probability[:RAMP_START]) < 0.05
    assert probability[alarmed, 2] > 0.5


def test_trend_alone_warns_while_the_fused_score_climbs(
    fitted: Fitted, trend_only: GroupEarlyWarning
) -> None:
    """Without a forecaster only the fused score's trend is left: on a fast ramp of five
    metrics to far beyond their range it warns during the climb."""
    assert trend_only.method == "ew-trend-tail-bum-v1"
    values = plant_ramp(fitted, fitted.after_fit(), [2, 3, 4, 5, 6], length=60, beyond=3.0)
    probability, fused = fitted.replay(trend_only, values, False)
    assert np.nanmax(probability[:RAMP_START]) < 0.05
    warned = first_at_or_above(probability[:, 0], 0.5)
    assert warned is not None and RAMP_START < warned < RAMP_START + 60
    assert first_at_or_above(fused, 1.0) is not None


@pytest.mark.parametrize("model", ["with_forecast", "with_ramp"])
def test_update_cycle_by_cycle_is_what_the_replay_gives(
    fitted: Fitted, model: str, request: pytest.FixtureRequest
) -> None:
    """The agent's path: one ``update`` per cycle with the recent fused scores and the scored
    windows (only the forecaster's context, or the metric lines' longest span: what the agent
    keeps), also while the history is shorter than the trend; the benchmark's ``replay`` of
    the same steps gives the same probabilities."""
    warning: GroupEarlyWarning = request.getfixturevalue(model)
    forecaster = fitted.forecaster if FORECAST in warning.evidence_ else None
    context = max(fitted.forecaster.context_steps + 1, warning.history_steps)
    assert (warning.history_steps > 1) == (RAMP in warning.evidence_)
    values = plant_ramp(fitted, fitted.after_fit(), [2, 3, 4], length=120, beyond=1.0)
    windows = fitted.windows(values)
    fused = fitted.fused(windows)
    steps = range(CONTEXT + 200, CONTEXT + 215)
    cycles = copy.deepcopy(warning)
    by_update = []
    for i, step in enumerate(steps):
        history = fused[:, max(CONTEXT + 200, step - 20) : step + 1]
        if i == 0:
            assert history.shape[1] < cycles.settings.trend_steps
        scored = windows.head(step + 1).tail(context)
        by_update.append(cycles.update_scored(history, scored, forecaster))
    start = steps[0]
    end = steps[-1] + 1
    replayed = copy.deepcopy(warning).replay(
        fused[:, start:end], windows.head(end), start, forecaster, refit_every=1
    )
    probabilities = np.stack([probability for probability, _ in by_update], axis=1)
    np.testing.assert_allclose(probabilities, replayed, rtol=1e-4, atol=1e-7)
    assert probabilities.shape == (1, 15, 3)
    # the exported early-warning score: the same evidence, on the anomaly score's scale
    p, uncertainty = warning.replay_p_values(
        fused[:, start:end], windows.head(end), start, forecaster
    )
    scores = np.stack([score for _, score in by_update], axis=1)
    np.testing.assert_allclose(scores, warning.scores(p, uncertainty), rtol=1e-4)
    assert (scores >= 0).all()


def test_nothing_to_say_without_scores_forecasts_or_metrics(
    fitted: Fitted, with_forecast: GroupEarlyWarning, with_ramp: GroupEarlyWarning
) -> None:
    windows = fitted.windows(fitted.after_fit())
    unobserved = dataclasses.replace(windows, observed=np.zeros_like(windows.observed))
    warning = copy.deepcopy(with_forecast)
    nothing = warning.update(np.full((1, 4), np.nan), unobserved, None)
    assert nothing.shape == (1, 3) and np.isnan(nothing).all()
    # a forecaster alone is enough, and so are the metrics' own lines
    forecast_only = warning.update(np.full((1, 4), np.nan), windows, fitted.forecaster)
    assert np.isfinite(forecast_only).all()
    ramp_only = copy.deepcopy(with_ramp).update(np.full((1, 4), np.nan), windows, None)
    assert np.isfinite(ramp_only).all()


def test_gate_holds_back_warnings_when_the_forecast_is_unsure(
    fitted: Fitted, with_forecast: GroupEarlyWarning
) -> None:
    """The same ramp, judged by a gate at a quarter of these forecasts' uncertainty (as if the
    calibration slice's forecasts had been four times surer): every probability moves toward
    the mixture's prior and the warning is held back; with the fitted gate these
    forecasts are within the usual uncertainty and nothing is held back."""
    values = plant_ramp(fitted, fitted.after_fit(), [2, 3, 4], length=120, beyond=1.0)
    windows = fitted.windows(values)
    distribution = fitted.forecaster.forecast_distribution(windows, np.arange(CONTEXT, 400))
    _, _, uncertainty = forecast_evidence(distribution, with_forecast.band_, {}, HORIZONS)
    assert with_forecast.gate_threshold_ is not None
    assert (uncertainty[0] <= with_forecast.gate_threshold_).mean() > 0.95
    open_gate = copy.deepcopy(with_forecast)
    open_gate.gate_threshold_ = np.full(3, np.inf)
    ungated, _ = fitted.replay(open_gate, values, True)
    gated, _ = fitted.replay(with_forecast, values, True)
    np.testing.assert_allclose(
        gated[uncertainty[0] <= with_forecast.gate_threshold_],
        ungated[uncertainty[0] <= with_forecast.gate_threshold_],
    )
    strict = copy.deepcopy(with_forecast)
    strict.gate_threshold_ = uncertainty[0].min(axis=0) / 4.0
    held, _ = fitted.replay(strict, values, True)
    prior = np.array([recent.model.anomalous_share_ for recent in with_forecast.recent_])
    assert (np.abs(held - prior) <= np.abs(ungated - prior) + 1e-9).all()
    warned = first_at_or_above(ungated[:, 2], 0.5)
    assert warned is not None and held[warned, 2] < 0.1
    later = first_at_or_above(held[:, 2], 0.5)
    assert later is None or later > warned + 10
    # the score is tempered by the same weight: the p-value's power likelihood p ** tau
    fused = fitted.fused(windows)[:, CONTEXT:]
    p, spread = with_forecast.replay_p_values(fused, windows, CONTEXT, fitted.forecaster)
    assert spread is not None
    tau = np.minimum(1.0, strict.gate_threshold_ / spread)
    assert (tau < 1).any()
    np.testing.assert_allclose(strict.scores(p, spread), open_gate.scores(p, spread) * tau)


def test_slo_crossing_raises_the_probability_as_the_forecast_approaches(
    fitted: Fitted, with_forecast: GroupEarlyWarning
) -> None:
    """``m03 above`` a threshold inside its normal band: climbing toward it (but staying below
    it, and inside the band) raises the SLO evidence step by step and the warning with it;
    without the SLO the same climb says nothing."""
    j = fitted.features.index("m03")
    key = fitted.windows(fitted.values[:1]).keys[0]
    center = float(fitted.forecaster.scaler_.centers_[key][j])
    scale = float(fitted.forecaster.scaler_.scales_[key][j])
    assert with_forecast.band_["m03"] > 3.0
    slo = {"m03": SloThreshold(above=center + 3.0 * scale)}
    warning = fitted.early_warning(with_forecaster=True, slo=slo)
    assert SLO in warning.evidence_ and "slo" in warning.method
    values = fitted.after_fit()
    start = CONTEXT + RAMP_START
    target = center + 2.7 * scale
    climb = np.clip((np.arange(len(values)) - start) / 100.0, 0.0, 1.0)
    values[start:, j] = values[start, j] + climb[start:] * (target - values[start, j])
    windows = fitted.windows(values)
    distribution = fitted.forecaster.forecast_distribution(windows, np.arange(CONTEXT, 400))
    _, breach, _ = forecast_evidence(distribution, warning.band_, slo, HORIZONS)
    assert breach is not None
    approach = breach[0, RAMP_START : RAMP_START + 100 : 10, 2]
    assert (np.diff(approach) > -0.2).all() and approach[-1] - approach[0] > 1.5
    with_slo, _ = fitted.replay(warning, values, True)
    without, _ = fitted.replay(with_forecast, values, True)
    assert with_slo[:RAMP_START].max() < 0.05
    assert without.max() < 0.05 < 0.5 < with_slo[RAMP_START : RAMP_START + 100, 2].max()


def test_state_round_trip_is_small_plain_json(
    fitted: Fitted, with_forecast: GroupEarlyWarning
) -> None:
    """With a forecaster and the metrics' lines (every evidence kind); a state saved before the
    metric lines existed (no ``ramp`` key) still loads."""
    warning = fitted.early_warning(with_forecaster=True, settings=EarlyWarningConfig(ramp=True))
    assert warning.method == "ew-forecast-ramp-trend-tail-cauchy-bum-gated-v1"
    text = json.dumps(warning.state_dict(), allow_nan=False)
    assert len(text) < 400_000
    restored = GroupEarlyWarning.from_state_dict(json.loads(text))
    assert restored.method == warning.method
    assert restored.band_ == warning.band_
    assert restored.ramp_features_ == warning.ramp_features_
    assert warning.ramp_band_ is not None and restored.ramp_band_ is not None
    np.testing.assert_allclose(restored.ramp_band_, warning.ramp_band_, rtol=1e-5)
    values = plant_ramp(fitted, fitted.after_fit(), [2, 3, 4], length=120, beyond=1.0)
    before, _ = fitted.replay(warning, values, True)
    after, _ = fitted.replay(restored, values, True)
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="version"):
        GroupEarlyWarning.from_state_dict({**json.loads(text), "version": 99})
    older = with_forecast.state_dict()
    del older["ramp"]
    assert RAMP not in GroupEarlyWarning.from_state_dict(older).method


def test_feedback_labels_calibrate_each_horizon_on_what_came_before_incidents(
    fitted: Fitted, trend_only: GroupEarlyWarning
) -> None:
    """Scores of 2-4 came before the confirmed incidents, 0.5-1.5 before false alarms: with
    those labels a horizon's probability is "how often an incident followed a score like this"
    (monotone, high at the incidents' scores, near 0 at ordinary ones), the mixtures are still
    fed, and the labels survive the state; a horizon no incident spoke of keeps the mixture."""
    incidents, false_alarms = np.linspace(2.0, 4.0, 15), np.linspace(0.5, 1.5, 15)
    empty = np.zeros(0)
    labelled = GroupEarlyWarning(HORIZONS, EarlyWarningConfig(), {}, RATE).fit(
        fitted.fused_slice,
        fitted.windows(fitted.values[:FIT_ROWS]),
        fitted.first,
        None,
        [(incidents, false_alarms), (incidents, false_alarms), (empty, false_alarms)],
    )
    assert labelled.method == "ew-trend-tail-bum-labelled-v1"
    assert [m is not None for m in labelled.labelled_] == [True, True, False]
    values = plant_ramp(fitted, fitted.after_fit(), [2, 3, 4], length=120, beyond=1.0)
    with_labels, _ = fitted.replay(labelled, values, False)
    without, _ = fitted.replay(trend_only, values, False)
    # the unlabelled horizon is the mixture's, exactly as without feedback
    np.testing.assert_allclose(with_labels[:, 2], without[:, 2])
    scores = np.linspace(0.0, 5.0, 51)
    model = labelled.labelled_[0]
    assert model is not None
    probability = model.probability(RATE**scores)
    assert np.all(np.diff(probability) >= 0)
    assert probability[scores >= 2.0].min() > 0.5 > probability[scores <= 1.5].max()
    # on the replay: where the score is ordinary the labelled probability is near 0
    windows = fitted.windows(values)
    fused = fitted.fused(windows)[:, CONTEXT:]
    p, _ = labelled.replay_p_values(fused, windows, CONTEXT, None)
    replay_scores = labelled.scores(p, None)[0]
    ordinary = np.isfinite(replay_scores[:, 0]) & (replay_scores[:, 0] < 0.5)
    assert ordinary.any() and (with_labels[ordinary, 0] < 0.05).all()
    # the scores are what they were: labels change the probability only
    unlabelled_p, _ = trend_only.replay_p_values(fused, windows, CONTEXT, None)
    np.testing.assert_allclose(labelled.scores(p, None), trend_only.scores(unlabelled_p, None))
    text = json.dumps(labelled.state_dict(), allow_nan=False)
    restored = GroupEarlyWarning.from_state_dict(json.loads(text))
    assert restored.method == labelled.method
    again, _ = fitted.replay(restored, values, False)
    np.testing.assert_allclose(again, with_labels, rtol=1e-3, atol=1e-6)
    older = trend_only.state_dict()
    del older["labelled"]  # saved before labels reached the early warning
    assert GroupEarlyWarning.from_state_dict(older).labelled_ == [None, None, None]


# ------------------------------------------------------------------------- the benchmark
def test_warning_threshold_is_matched_to_a_false_warning_rate_from_the_top_down() -> None:
    """Two days, one event, three isolated false warnings at 0.9 above a 0.2 baseline."""
    labels = np.zeros(2880, dtype=np.int8)
    labels[2000:2010] = 1
    signal = np.full(2880, 0.2)
    signal[[100, 900, 1700]] = 0.9
    signal[1990:2010] = 0.95
    item = benchmark.EntityWarnings(
        "x", "x", 60.0, labels, signal, signal, signal[:, None], signal[:, None], [5], "m", 0.0
    )
    # one false warning per day allowed: the threshold stays above the three
    assert benchmark.choose_threshold([signal], [item], 5, 1.0, 1.0) > 0.9
    # 1.5 per day (3 in 2 days) lets them in, but not the baseline, whose alarms would merge
    # into one endless run touching the event (no false warning, all the time in alarm)
    chosen = benchmark.choose_threshold([signal], [item], 5, 1.5, 0.01)
    assert 0.2 < chosen <= 0.9
    assert benchmark.choose_threshold([signal], [item], 5, 0.0, 0.0) > 0.9
    np.testing.assert_array_equal(
        np.flatnonzero(benchmark.starts_within(labels, 5)), np.arange(1995, 2000)
    )


def test_benchmark_on_a_tiny_nab_slice(tmp_path: Path) -> None:
    entities = [
        "realAWSCloudwatch/ec2_cpu_utilization_24ae8d",
        "realAWSCloudwatch/ec2_cpu_utilization_53ea38",
    ]
    run = benchmark.run_early_warning_benchmark(
        ["nab"], entities=entities, data_root=DATA_ROOT, slice_rows=400, refit_seconds=3600
    )
    assert [item.entity for item in run.entities] == entities
    assert {item.method for item in run.entities} == {"ew-trend-tail-bum-v1"}
    for item in run.entities:
        assert item.early_warning.shape == (400, 3) and item.horizons_steps == [1, 3, 6]
        finite = item.early_warning[np.isfinite(item.early_warning)]
        assert finite.size > 1000 and ((finite >= 0) & (finite <= 1)).all()
    for item in run.entities:
        scores = item.early_warning_scores
        assert scores.shape == (400, 3) and (scores[np.isfinite(scores)] >= 0).all()
    signals = (
        benchmark.FUSED_SCORE,
        benchmark.EARLY_WARNING,
        benchmark.EARLY_WARNING_TUNED,
        benchmark.EARLY_WARNING_SCORE_AT_ONE,
        benchmark.EARLY_WARNING_SCORE,
        benchmark.EARLY_WARNING_SCORE_TUNED,
    )
    alerts = [(benchmark.EARLY_WARNING_ALERT_HORIZON, s) for s in benchmark.ALERT_SIGNALS]
    assert [(row.horizon, row.signal) for row in run.lead] == [
        *[("5m", s) for s in signals],
        *[("15m", s) for s in signals],
        *alerts,
        *[("30m", s) for s in signals],
    ]
    either = [row for row in run.lead if row.signal == "either alert"][0]
    alone = [row for row in run.lead if row.signal.startswith("alert ")]
    assert either.detected_by_end >= max(row.detected_by_end for row in alone)
    fused = [row for row in run.lead if row.signal == benchmark.FUSED_SCORE]
    assert all(row.thresholds == "1.000" and row.entity_days > 2.5 for row in fused)
    at_one = [row for row in run.lead if row.signal == benchmark.EARLY_WARNING_SCORE_AT_ONE]
    assert all(row.thresholds == "1.000" for row in at_one)
    # each half is evaluated at a threshold chosen on the other: one per half
    warned = [row for row in run.lead if row.signal == benchmark.EARLY_WARNING]
    assert all(len(row.thresholds.split(" / ")) == 2 for row in warned)
    assert len(run.calibration) == 6
    images = benchmark.plot_reliability(run, tmp_path)
    assert [path.name for path in images] == ["early_warning_nab.png"]
    text = benchmark.early_warning_markdown(run, {"nab": "img/early_warning_nab.png"})
    assert text.startswith("## Early warning") and "Command: " in text
    assert "| 30m (6 steps) | early warning |" in text and "early_warning_nab.png" in text
    assert "### Reading" in text and "events warned before their start" in text
    assert "### Before the labelled start" in text and "exact McNemar p" in text
    assert len(run.paired) == 3
    assert len(run.precursors) == 3 * 2 * len(benchmark.PRECURSOR_QUANTILES)
    assert benchmark.variant(run) == (benchmark.SECTION, "", "")
    shorter = dataclasses.replace(run, settings=EarlyWarningConfig(trend_steps=5))
    assert benchmark.variant(shorter)[:2] == ("early-warning-trend-5", "_trend_5")
    forecasting = dataclasses.replace(run, detectors=["mad", "pca", "forecaster"])
    assert benchmark.variant(forecasting)[0] == benchmark.FORECASTER_SECTION
    scheduled = dataclasses.replace(forecasting, fit_every_seconds=86400.0)
    assert benchmark.variant(scheduled)[0] == f"{benchmark.FORECASTER_SECTION}-schedule"
    # with the metrics' lines: their own section and images, beside the default's
    with_ramp = benchmark.run_early_warning_benchmark(
        ["nab"],
        entities=entities[:1],
        data_root=DATA_ROOT,
        slice_rows=400,
        settings=EarlyWarningConfig(ramp=True),
    )
    assert {item.method for item in with_ramp.entities} == {"ew-ramp-trend-tail-cauchy-bum-v1"}
    assert benchmark.variant(with_ramp)[0] == benchmark.RAMP_SECTION
    images = benchmark.plot_reliability(with_ramp, tmp_path)
    assert [path.name for path in images] == ["early_warning_nab_ramp.png"]
    text = benchmark.early_warning_markdown(with_ramp, {})
    assert text.startswith("## Early warning: with the metrics' own lines")


def test_schedule_refits_before_each_block_as_the_agent_does() -> None:
    """On the agent's schedule every block of ``fit_every`` is scored by a fresh fit on the
    trailing ``fit_window``; the first block is the single fit's, the later ones are not."""
    (series,) = datasets.load_datasets(
        ["nab"], ["realAWSCloudwatch/ec2_cpu_utilization_24ae8d"], DATA_ROOT
    )
    series = benchmark.short_slice(series, 400)
    args = (series, ["mad", "pca"], DetectorsConfig(), 0.001, torch.device("cpu"), 3600.0)
    single = benchmark.warn_series(*args)
    block = 144  # 12 h of 5-minute steps
    scheduled = benchmark.warn_series(
        *args, fit_every_seconds=block * 300.0, fit_window_seconds=400 * 300.0
    )
    assert (single.fits, scheduled.fits) == (1, 3)
    assert scheduled.early_warning.shape == single.early_warning.shape == (400, 3)
    for name in ("fused_scores", "probability", "early_warning", "early_warning_scores"):
        ours, theirs = getattr(scheduled, name), getattr(single, name)
        np.testing.assert_array_equal(ours[:block], theirs[:block], err_msg=name)
        assert not np.allclose(ours[block:], theirs[block:], equal_nan=True), name
    later = scheduled.early_warning[block:]
    assert np.isfinite(later).mean() > 0.9 and (later[np.isfinite(later)] <= 1).all()
    run = benchmark.EarlyWarningRun(
        "cmd",
        ["nab"],
        ["mad", "pca"],
        0.001,
        3600.0,
        [scheduled],
        [],
        [],
        [],
        1.0,
        "cpu",
        fit_every_seconds=block * 300.0,
        fit_window_seconds=7 * 86400.0,
    )
    assert "refitted every 0.5 days of data on the trailing 7 days" in benchmark._protocol(run)
    assert "(3 to 3 fits per entity)" in benchmark._protocol(run)


def one_entity(
    labels: np.ndarray, fused: np.ndarray, early_scores: np.ndarray, horizons: list[int]
) -> benchmark.EntityWarnings:
    """A hand-built entity's replayed signals (1-minute steps; probabilities all 0)."""
    return benchmark.EntityWarnings(
        dataset="x",
        entity="e",
        step_seconds=60.0,
        labels=labels,
        fused_scores=fused,
        probability=np.zeros(len(labels)),
        early_warning=np.zeros(early_scores.shape),
        early_warning_scores=early_scores,
        horizons_steps=horizons,
        method="m",
        seconds=0.0,
    )


def test_precursors_count_the_events_a_signal_is_up_before_and_the_quiet_windows_alike() -> None:
    """Two events; the signal is up in the 3 steps before the first only, and once far from
    both (a quiet window). The quantile is the signal's outside events; the windows before an
    event (and the event) are not quiet; the second event's window stops at the first's end."""
    labels = np.zeros(60, dtype=np.int8)
    labels[20:25] = 1
    labels[26:30] = 1
    signal = np.zeros(60)
    signal[18] = 5.0  # in the 3 steps before the first event
    signal[45] = 4.0  # a quiet spike
    signal[22] = 9.0  # inside the first event: not among the quantile's values
    signal[50] = np.nan  # NaN never exceeds
    before, quiet = benchmark.precursor_windows(signal, labels, 3, 0.9)
    # outside events: 50 finite values, two of them up: the 0.9 quantile is 0
    assert before.tolist() == [True, False]
    clear = [t for t in range(58) if all(t + k not in range(17, 30) for k in range(3))]
    assert quiet.size == len(clear)
    assert quiet.sum() == 3  # the three windows holding step 45
    rows = benchmark.precursor_rows(
        "x",
        [one_entity(labels, signal, np.zeros((60, 1)), [3])],
    )
    # at the 0.99 quantile (4.51 of the 50 finite values outside events) only the 5 exceeds
    fused = [row for row in rows if row.signal == "fused score" and row.quantile == 0.99]
    assert fused[0].events == 2 and fused[0].before_events == 0.5
    assert fused[0].quiet_windows == len(clear) and fused[0].quiet == 0.0
    flat = [row for row in rows if row.signal == benchmark.EARLY_WARNING_SCORE]
    assert all(row.before_events == 0.0 and row.quiet == 0.0 for row in flat)


def test_paired_events_count_what_each_signal_alone_warned_of_before_the_start() -> None:
    """Three events: the early-warning score (horizon 3) is at 1 before the first, the fused
    score before the second, both before the third; the fused score inside the first event, or
    the early warning more than 3 steps before the second, do not count."""
    labels = np.zeros(80, dtype=np.int8)
    for start in (20, 40, 60):
        labels[start : start + 5] = 1
    fused, early = np.zeros(80), np.zeros((80, 1))
    early[18, 0] = 1.2  # before event 1
    fused[22] = 3.0  # inside event 1
    fused[38] = 1.0  # before event 2
    early[35, 0] = 2.0  # 5 steps before event 2: outside its horizon
    fused[59], early[57, 0] = 1.5, 1.0  # both before event 3
    item = one_entity(labels, fused, early, [3])
    (row,) = benchmark.paired_rows("x", [item])
    assert (row.events, row.only_signal, row.only_versus, row.both) == (3, 1, 1, 1)
    assert row.p_value == pytest.approx(1.0)
    lead = {r.signal: r for r in benchmark.lead_rows("x", [item])}
    assert lead[benchmark.EARLY_WARNING_SCORE_AT_ONE].warned_before_start == pytest.approx(2 / 3)
    assert lead[benchmark.FUSED_SCORE].warned_before_start == pytest.approx(2 / 3)
    maxima, windowed = benchmark.pre_event_maxima(fused, labels, 3)
    assert maxima.tolist() == [0.0, 1.0, 1.5] and windowed.all()


def test_replayed_alert_rules_fire_as_prometheus_would() -> None:
    """``for:`` is held without a break; a step stands for its whole duration."""
    held = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], dtype=bool)
    np.testing.assert_array_equal(benchmark.firing(held, 120, 60), [0, 0, 1, 0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(benchmark.firing(held, 120, 300), held.astype(float))
    np.testing.assert_array_equal(benchmark.firing(held, 300, 300), [0, 1, 1, 0, 0, 1, 1, 1, 0, 0])


def test_replayed_alert_rules_are_the_shipped_ones() -> None:
    rules_file = Path(__file__).resolve().parents[1] / "alert_rules" / "aiops-plugin.rules.yml"
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(rules_file.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    anomaly = rules[benchmark.ANOMALY_ALERT.name]
    assert anomaly["expr"].strip() == (
        f"aiops_anomaly_probability > {benchmark.ANOMALY_ALERT.threshold:g}"
    )
    assert anomaly["for"] == horizon_label(benchmark.ANOMALY_ALERT.for_seconds)
    warning = rules[benchmark.EARLY_WARNING_ALERT.name]
    assert (
        warning["expr"].split()
        == (
            f'aiops_early_warning_score{{horizon="{benchmark.EARLY_WARNING_ALERT_HORIZON}"}} '
            f"{benchmark.EARLY_WARNING_ALERT.operator} {benchmark.EARLY_WARNING_ALERT.threshold:g} "
            "unless on(entity_group, entity) "
            f"aiops_anomaly_probability > {benchmark.ANOMALY_ALERT.threshold:g}"
        ).split()
    )
    assert warning["for"] == horizon_label(benchmark.EARLY_WARNING_ALERT.for_seconds)


def test_an_entity_too_short_for_a_detector_is_left_out_and_named() -> None:
    """NAB's NetworkIn file of instance i-a2eb1cd9 has a train split of 186 steps, too short for
    the forecaster's first fit: the benchmark goes on with the other entities and says so."""
    short = "realAWSCloudwatch/iio_us-east-1_i-a2eb1cd9_NetworkIn"
    kept = "realAWSCloudwatch/ec2_cpu_utilization_24ae8d"
    detectors = DetectorsConfig()
    detectors.forecaster = detectors.forecaster.model_copy(
        update={"window": 200, "hidden": 8, "heads": 2, "epochs": 1, "max_train_windows": 50}
    )
    run = benchmark.run_early_warning_benchmark(
        ["nab"],
        ["mad", "pca", "forecaster"],
        entities=[short, kept],
        data_root=DATA_ROOT,
        slice_rows=600,
        detectors=detectors,
    )
    assert [item.entity for item in run.entities] == [kept]
    assert len(run.skipped) == 1 and run.skipped[0].startswith(f"nab {short}, forecaster: ")
    assert "186 steps is too short" in run.skipped[0]
    text = benchmark.early_warning_markdown(run, {})
    assert f"Left out (a detector could not fit the train split): nab {short}, " in text


def test_labelled_calibration_learns_the_scores_that_came_before_the_first_halfs_events() -> None:
    """Twelve events in the first half and thirteen in the second, each after 3 steps of
    early-warning score 2 (the score is 0.1 elsewhere): fitted on the first half, the labelled
    probability is 1 before the second half's events and 0 elsewhere, where the unlabelled one
    (all 0.5 here) is far off. With fewer events in the first half than feedback needs, no
    rows."""
    steps, horizon = 4000, 3
    labels = np.zeros(steps, dtype=np.int8)
    scores = np.full((steps, 1), 0.1)
    for start in np.arange(100, steps, 160):
        labels[start : start + 5] = 1
        scores[start - horizon : start, 0] = 2.0
    item = one_entity(labels, np.zeros(steps), scores, [horizon])
    item.early_warning[:] = 0.5
    rows = benchmark.labelled_calibration_rows("x", [item], RATE)
    assert [row.signal for row in rows] == [
        benchmark.EARLY_WARNING_SECOND_HALF,
        benchmark.EARLY_WARNING_LABELLED,
    ]
    unlabelled, labelled = rows
    assert unlabelled.steps == labelled.steps and labelled.positives == 13 * horizon
    assert labelled.brier == pytest.approx(0.0, abs=1e-12) and labelled.ece < 1e-9
    assert unlabelled.brier > 0.2
    few = one_entity(labels[:1000], np.zeros(1000), scores[:1000], [horizon])
    assert benchmark.labelled_calibration_rows("x", [few], RATE) == []
