"""The calibrate stage on simulated scores with known null distributions: the fused score of
strongly correlated detectors at the configured rate on fresh draws, log evidence where an entity
has logs and none where it has not, the state round trip, the time split, and the probability."""

from __future__ import annotations

import numpy as np
import pytest

from aiops_plugin.calibration import score_from_p
from aiops_plugin.calibration.stage import GroupCalibration, RecentProbability, split_point

KEYS = [f"e{i}" for i in range(4)]
RATE = 0.01


def correlated_raw(rng: np.random.Generator, steps: int, rho: float = 0.9) -> dict[str, np.ndarray]:
    """Two detectors' raw scores on the same normal data: a shared factor, different units."""
    shared = rng.standard_normal((len(KEYS), steps))
    own = rng.standard_normal((2, len(KEYS), steps))
    a = rho * shared + np.sqrt(1 - rho**2) * own[0]
    b = rho * shared + np.sqrt(1 - rho**2) * own[1]
    return {"mad": np.exp(a), "pca": 10.0 * np.abs(b)}


@pytest.fixture(scope="module")
def fitted() -> GroupCalibration:
    rng = np.random.default_rng(11)
    return GroupCalibration(["mad", "pca"]).fit(correlated_raw(rng, 5000), KEYS)


def test_every_score_and_the_fused_one_are_at_the_configured_rate_on_fresh_draws(
    fitted: GroupCalibration,
) -> None:
    fresh = correlated_raw(np.random.default_rng(12), 50_000)
    p = fitted.p_values(fresh, KEYS)
    for name in ("mad", "pca", "fused"):
        realised = float(np.mean(score_from_p(p[name], RATE) >= 1.0))
        assert RATE / 2 <= realised <= 2 * RATE, (name, realised)


def test_the_max_of_the_scores_would_alarm_more_than_the_fused_score(
    fitted: GroupCalibration,
) -> None:
    """What the fused calibration fixes: any-detector-alarms is above the configured rate."""
    rng = np.random.default_rng(13)
    shared = rng.standard_normal((len(KEYS), 50_000))
    fresh = {"mad": np.exp(shared), "pca": 10.0 * np.abs(rng.standard_normal(shared.shape))}
    p = fitted.p_values(fresh, KEYS)
    any_alarm = np.mean(np.minimum(p["mad"], p["pca"]) <= RATE)
    fused_alarm = np.mean(p["fused"] <= RATE)
    assert any_alarm > 1.5 * RATE and fused_alarm < any_alarm


def test_log_evidence_joins_only_where_the_entity_has_logs(fitted: GroupCalibration) -> None:
    raw = {"mad": np.full((4, 1), 1.0), "pca": np.full((4, 1), 8.0)}
    alone = fitted.p_values(raw, KEYS)["fused"]
    log_p = np.array([[1e-8], [np.nan], [0.5], [np.nan]])
    with_logs = fitted.p_values(raw, KEYS, log_p)["fused"]
    assert with_logs[0, 0] < alone[0, 0] / 100  # a very rare log burst raises the fused score
    # no fake logs: without a log p-value the fused p-value is the metrics' alone
    np.testing.assert_allclose(with_logs[[1, 3], 0], alone[[1, 3], 0], rtol=1e-12)
    assert with_logs[2, 0] > alone[2, 0]  # ordinary logs make the entity less anomalous


def test_state_round_trips_through_json(fitted: GroupCalibration) -> None:
    import json

    state = json.loads(json.dumps(fitted.state_dict(), allow_nan=False))
    restored = GroupCalibration.from_state_dict(state)
    fresh = correlated_raw(np.random.default_rng(14), 200)
    for name, values in fitted.p_values(fresh, KEYS).items():
        np.testing.assert_allclose(restored.p_values(fresh, KEYS)[name], values, rtol=1e-12)


def test_the_split_keeps_a_quarter_for_calibration_and_refuses_short_windows() -> None:
    assert split_point(1000, 0.25, 100) == 750
    with pytest.raises(ValueError, match="fit_window"):
        split_point(100, 0.25, 90)


def test_probability_is_monotone_and_calibrated_on_a_two_group_mixture() -> None:
    """Simulated: 95 % normal steps (uniform p), 5 % anomalous (Beta(0.1, 1) p, the model's
    alternative): the posterior must be monotone in p and match the anomalous frequency."""
    rng = np.random.default_rng(15)
    n = 20_000
    anomalous = rng.random(n) < 0.05
    p = np.where(anomalous, rng.beta(0.1, 1.0, n), rng.random(n))
    probability = RecentProbability(capacity=n).seed(p[: n // 2])
    predicted = probability.probability(p[n // 2 :])
    truth = anomalous[n // 2 :]
    order = np.argsort(p[n // 2 :])
    assert np.all(np.diff(predicted[order]) <= 1e-12)
    bins = np.clip((predicted * 10).astype(int), 0, 9)
    ece = sum(
        abs(predicted[bins == b].mean() - truth[bins == b].mean()) * np.mean(bins == b)
        for b in range(10)
        if np.any(bins == b)
    )
    assert ece < 0.03


def test_probability_of_a_fresh_extreme_p_value_is_high_with_a_quiet_history() -> None:
    rng = np.random.default_rng(16)
    probability = RecentProbability(capacity=5000).seed(rng.random(5000))
    low, high = probability.update(np.array([1e-12, 0.3]))
    assert low > 0.9 and high < 0.01


def test_a_shift_beyond_anything_the_detectors_saw_alarms_on_the_fused_score() -> None:
    """Real SMD rows (machine-1-7's train split), ``mad`` and ``pca`` fitted and calibrated as the
    agent does; then every metric is moved 6 standard deviations up for the last 30 steps.
    Both detectors call that extreme, so the fused score must too. (Fitting the fused calibrator
    on out-of-fold p-values once put this at 0.56, below the alarm.)"""
    from aiops_plugin.demo import load_demo_sample
    from aiops_plugin.detectors.baselines import PcaReconstructionDetector, RollingMadDetector
    from aiops_plugin.detectors.registry import FittedModel
    from aiops_plugin.windows import Windows

    rate, step, shifted_steps = 0.01, 60.0, 30
    train = load_demo_sample().train
    history = Windows.from_array(train, step=step)
    detectors = {"mad": RollingMadDetector(window=60), "pca": PcaReconstructionDetector(seed=0)}
    fitted = {name: FittedModel.fit_split(d, history, 0.25) for name, d in detectors.items()}
    calibration = GroupCalibration(list(detectors)).fit(
        {name: raw for name, (_, raw) in fitted.items()}, history.keys
    )

    shifted = train.copy()
    shifted[-shifted_steps:] += 6.0 * train.std(axis=0)
    windows = Windows.from_array(shifted, step=step)
    raw = {
        name: model.score(windows).score[:, -shifted_steps:] for name, (model, _) in fitted.items()
    }
    scores = {
        name: score_from_p(p, rate) for name, p in calibration.p_values(raw, windows.keys).items()
    }

    assert np.median(scores["mad"]) >= 1.0 and np.median(scores["pca"]) >= 1.0
    assert np.median(scores["fused"]) >= 1.0
