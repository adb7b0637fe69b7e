"""The calibration library: tail p-values, their combination, and probabilities.

Everything is checked on synthetic scores with known null distributions, and always on *fresh*
draws, never on the draws a calibrator was fitted on: what matters is how often normal data that
the calibrator has not seen crosses the threshold.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import kstest, norm

from aiops_plugin.calibration import (
    BetaUniformMixture,
    FusedCalibrator,
    InsufficientLabelsError,
    LabelledProbability,
    LocalFdr,
    TailCalibrator,
    cauchy_combination,
    fuse_scores,
    p_from_score,
    score_from_p,
)
from aiops_plugin.evaluation.metrics import expected_calibration_error

SCALES = np.geomspace(0.5, 2.0, 8)
KEYS = [f"pod-{i}" for i in range(SCALES.size)]


def _null_scores(rng: np.random.Generator, family: str, steps: int) -> np.ndarray:
    """``(entities, steps)`` normal-behaviour raw scores, each entity at its own scale."""
    if family == "lognormal":
        return SCALES[:, None] * rng.lognormal(0.0, 0.6, (SCALES.size, steps))
    return SCALES[:, None] * rng.gamma(2.0, 1.0, (SCALES.size, steps))


def _realised_over_nominal(p: np.ndarray, alpha: float) -> float:
    return float(np.mean(p <= alpha) / alpha)


@pytest.fixture(scope="module", params=["lognormal", "gamma"])
def fresh_null_p(request: pytest.FixtureRequest) -> np.ndarray:
    """p-values of fresh null draws ``(8, 50000)`` from a calibrator fitted on 20000 steps each."""
    rng = np.random.default_rng(7)
    calibrator = TailCalibrator().fit(_null_scores(rng, request.param, 20_000), KEYS)
    return calibrator.p_values(_null_scores(rng, request.param, 50_000), KEYS)


# --- TailCalibrator ---------------------------------------------------------------------------


def test_fresh_null_p_values_are_uniform(fresh_null_p: np.ndarray) -> None:
    for alpha in (0.1, 0.01, 0.001):
        ratio = _realised_over_nominal(fresh_null_p, alpha)
        assert 1 / 1.3 <= ratio <= 1.3, f"P(p <= {alpha}) is {ratio:.2f} x nominal"
    sample = np.random.default_rng(0).choice(fresh_null_p.ravel(), 5000, replace=False)
    assert kstest(sample, "uniform").pvalue > 0.01


def test_score_is_one_at_configured_false_alarm_rate(fresh_null_p: np.ndarray) -> None:
    for rate in (0.01, 0.001):
        assert score_from_p(rate, rate) == pytest.approx(1.0)
        assert score_from_p(rate**2, rate) == pytest.approx(2.0)
        assert score_from_p(1.0, rate) == 0.0
        realised = float(np.mean(score_from_p(fresh_null_p, rate) >= 1.0))
        assert rate / 1.5 <= realised <= rate * 1.5, f"rate {rate}: realised {realised:.5f}"


def test_score_and_p_are_inverse_and_pass_nan() -> None:
    p = np.array([1.0, 0.3, 1e-3, 1e-12, np.nan])
    assert np.allclose(p_from_score(score_from_p(p, 0.001), 0.001), p, equal_nan=True)
    assert np.isnan(score_from_p(np.nan, 0.01)) and np.isnan(p_from_score(np.nan, 0.01))
    with pytest.raises(ValueError, match="false_alarm_rate"):
        score_from_p(0.5, 1.0)


def test_entity_with_ten_times_the_scale_gets_its_own_tail() -> None:
    rng = np.random.default_rng(3)
    raw = np.full((10, 100_000), np.nan)
    raw[:9, :3000] = rng.lognormal(0.0, 0.6, (9, 3000))
    raw[9] = 10.0 * rng.lognormal(0.0, 0.6, 100_000)
    keys = [f"pod-{i}" for i in range(10)]
    calibrator = TailCalibrator().fit(raw, keys)
    big = 10.0 * rng.lognormal(0.0, 0.6, (1, 400_000))
    own = calibrator.p_values(big, ["pod-9"])
    normal = rng.lognormal(0.0, 0.6, (9, 50_000))
    others = calibrator.p_values(normal, keys[:9])
    others_pooled = calibrator.p_values(normal, ["never-seen"] * 9)
    for alpha in (0.01, 0.001):
        assert 1 / 1.3 <= _realised_over_nominal(own, alpha) <= 1.3
        assert 1 / 1.5 <= _realised_over_nominal(others, alpha) <= 1.5
        assert _realised_over_nominal(others_pooled, alpha) < 0.1, "the pool alone is blind"


def test_entity_with_twenty_steps_is_close_to_pooled() -> None:
    rng = np.random.default_rng(4)
    raw = rng.lognormal(0.0, 0.6, (11, 3000))
    raw[10, 20:] = np.nan
    keys = [f"pod-{i}" for i in range(11)]
    calibrator = TailCalibrator().fit(raw, keys)
    grid = np.linspace(0.05, 30.0, 4000)[None, :]
    ratio = calibrator.p_values(grid, ["pod-10"]) / calibrator.p_values(grid, ["never-seen"])
    assert np.all((ratio > 0.75) & (ratio < 1.33)), (ratio.min(), ratio.max())


def test_p_values_decrease_continuously_beyond_the_largest_calibration_score() -> None:
    rng = np.random.default_rng(5)
    raw = rng.gamma(2.0, 1.0, (3, 2000))
    calibrator = TailCalibrator().fit(raw, ["a", "b", "c"])
    top, n = raw.max(), raw.size
    grid = np.linspace(0.0, 20.0 * top, 20_001)
    for key in ("a", "never-seen"):
        p = calibrator.p_values(grid[None, :], [key])[0]
        assert np.all(np.diff(p) <= 0), "p-values must be non-increasing in the score"
        assert np.all(np.abs(np.diff(np.log(p))) < 0.1), "no jumps on a fine grid"
        beyond = p[grid > top]
        assert np.all(np.diff(beyond) < 0) and beyond[-1] < 1e-6 / (n + 1)
        assert np.all((p > 0) & (p <= 1))


def test_far_tail_follows_the_true_tail() -> None:
    """10x and 10^4 x beyond the data (1e5 steps); the GPD shape's noise is on the safe side."""
    calibrator = TailCalibrator().fit(
        np.random.default_rng(6).exponential(size=(1, 100_000)), ["a"]
    )
    true_p = np.array([1e-6, 1e-9])
    p = calibrator.p_values(-np.log(true_p)[None, :], ["a"])[0]
    assert np.all((p / true_p > 0.5) & (p / true_p < [10.0, 100.0])), p / true_p
    error = score_from_p(p, 0.001) - score_from_p(true_p, 0.001)
    assert np.all(np.abs(error) < 0.7), error


def test_state_dict_round_trip_is_identical_and_json() -> None:
    rng = np.random.default_rng(8)
    raw = _null_scores(rng, "lognormal", 500)
    raw[0, :100] = np.nan
    calibrator = TailCalibrator().fit(raw, KEYS)
    state = json.loads(json.dumps(calibrator.state_dict(), allow_nan=False))
    restored = TailCalibrator()
    restored.load_state_dict(state)
    test = np.concatenate([_null_scores(rng, "lognormal", 200), 50 * np.ones((8, 1))], axis=1)
    keys = KEYS[:-1] + ["never-seen"]
    assert np.array_equal(calibrator.p_values(test, keys), restored.p_values(test, keys))
    assert all(len(values) <= calibrator.entity_knots for values in state["entities"]["values"])


def test_nan_is_an_unscored_step() -> None:
    rng = np.random.default_rng(9)
    raw = rng.gamma(2.0, 1.0, (3, 400))
    raw[0, ::2] = np.nan
    raw[2] = np.nan
    calibrator = TailCalibrator().fit(raw, ["half", "full", "empty"])
    assert "empty" not in calibrator.entities_
    test = np.array([[np.nan, 2.0, 30.0], [1.0, np.nan, 3.0], [np.nan, np.nan, 5.0]])
    p = calibrator.p_values(test, ["half", "full", "empty"])
    assert np.array_equal(np.isnan(p), np.isnan(test))
    assert np.all((p[~np.isnan(p)] > 0) & (p[~np.isnan(p)] <= 1))
    assert p[2, 2] == calibrator.p_values(np.array([[5.0]]), ["never-seen"])[0, 0]
    with pytest.raises(ValueError, match="no finite"):
        TailCalibrator().fit(np.full((2, 3), np.nan), ["a", "b"])


def test_tied_and_scarce_calibration_scores_still_give_a_tail() -> None:
    tied = TailCalibrator().fit(np.zeros((2, 500)), ["a", "b"])
    assert tied.pool_["tail"] == "degenerate"
    p = tied.p_values(np.array([[-1.0, 0.0, 1e-3, 1e-2, 1.0]]), ["a"])[0]
    assert p[0] == p[1] == 1.0 and np.all(np.diff(p[1:]) < 0) and p[-1] > 0
    rng = np.random.default_rng(10)
    mostly_zero = np.where(rng.random((5, 2000)) < 0.96, 0.0, rng.exponential(size=(5, 2000)))
    atom = TailCalibrator().fit(mostly_zero, list("abcde"))
    just_above = atom.p_values(np.array([[0.0, 0.01, 1.0]]), ["a"])[0]
    share_above = np.mean(mostly_zero >= 0.01)
    assert just_above[0] == 1.0 and just_above[1] == pytest.approx(share_above, rel=0.1)
    scarce = TailCalibrator().fit(rng.gamma(2.0, 1.0, (1, 200)), ["a"])
    assert scarce.pool_["tail"] == "exponential"
    p = scarce.p_values(np.array([[5.0, 10.0, 20.0, 40.0]]), ["a"])[0]
    assert np.all(np.diff(p) < 0) and p[-1] > 0


# --- Cauchy combination -----------------------------------------------------------------------


def test_cauchy_combination_of_two_detectors_by_hand() -> None:
    t = 0.5 * math.tan((0.5 - 0.01) * math.pi) + 0.5 * math.tan(0.0)
    assert cauchy_combination(np.array([0.01, 0.5]))[()] == pytest.approx(
        0.5 - math.atan(t) / math.pi, rel=1e-12
    )
    t = 0.75 * math.tan((0.5 - 0.02) * math.pi) + 0.25 * math.tan((0.5 - 0.3) * math.pi)
    combined = cauchy_combination(np.array([0.02, 0.3]), weights=np.array([3.0, 1.0]))
    assert combined[()] == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12)


def test_cauchy_combination_of_equal_p_values_is_that_p_value() -> None:
    p = np.array([0.9, 0.5, 0.1, 1e-3, 1e-8])
    assert np.allclose(cauchy_combination(p[None, :]), p, rtol=1e-9)
    assert np.allclose(cauchy_combination(np.stack([p, p, p])), p, rtol=1e-9)


def test_cauchy_combination_leaves_nan_out() -> None:
    p = np.array([[0.01, np.nan, np.nan], [0.2, 0.2, np.nan]])
    combined = cauchy_combination(p)
    assert combined[0] == pytest.approx(cauchy_combination(np.array([0.01, 0.2]))[()])
    assert combined[1] == pytest.approx(0.2) and np.isnan(combined[2])


def test_cauchy_combination_is_finite_at_the_extremes() -> None:
    combined = cauchy_combination(np.array([[1e-300, 1.0, 1e-20], [0.5, 1.0, 1.0]]))
    assert combined[0] == pytest.approx(2e-300, rel=1e-6)
    assert combined[1] == pytest.approx(1.0) and combined[2] == pytest.approx(2e-20, rel=1e-6)
    assert np.all((combined > 0) & (combined <= 1))


def _gaussian_copula_null(rng: np.random.Generator, rho: float, draws: int) -> np.ndarray:
    """``(5, draws)`` one-sided null p-values with pairwise correlation ``rho``."""
    shared = rng.standard_normal(draws)
    z = math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.standard_normal((5, draws))
    return norm.sf(z)


def test_cauchy_combination_stays_valid_under_strong_correlation() -> None:
    p = _gaussian_copula_null(np.random.default_rng(11), 0.9, 200_000)
    combined = cauchy_combination(p)
    for alpha in (0.01, 0.001):
        assert 1 / 1.5 <= _realised_over_nominal(combined, alpha) <= 1.5


def test_max_score_rule_inflates_false_alarms_under_independence() -> None:
    p = _gaussian_copula_null(np.random.default_rng(12), 0.0, 200_000)
    for alpha in (0.01, 0.001):
        fused = fuse_scores([score_from_p(row, alpha) for row in p])
        assert np.mean(fused >= 1.0) / alpha > 4.0, "the max rule alarms ~5x as often"
        assert 1 / 1.5 <= _realised_over_nominal(cauchy_combination(p), alpha) <= 1.5


# --- probabilities ----------------------------------------------------------------------------


def _two_group(
    rng: np.random.Generator, n: int, pi0: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """``(p, anomalous)``: uniform null p-values, anomalies with ``p ~ Beta(0.05, 1)``."""
    anomalous = rng.random(n) > pi0
    p = np.where(anomalous, rng.beta(0.05, 1.0, n), rng.random(n))
    return np.clip(p, 1e-300, 1.0), anomalous


def test_local_fdr_is_calibrated_on_a_two_group_mixture() -> None:
    rng = np.random.default_rng(13)
    model = LocalFdr().fit(_two_group(rng, 5000)[0])
    p, anomalous = _two_group(rng, 200_000)
    probability = model.probability(p)
    assert expected_calibration_error(probability, anomalous) <= 0.05
    assert model.pi0_ == pytest.approx(0.95, abs=0.03)


def test_local_fdr_is_non_increasing_in_p() -> None:
    model = LocalFdr().fit(_two_group(np.random.default_rng(14), 5000)[0])
    probability = model.probability(np.geomspace(1e-300, 1.0, 5000))
    assert np.all(np.diff(probability) <= 0) and probability[0] > 0.9 and probability[-1] == 0


def test_local_fdr_on_pure_null_p_values_is_small() -> None:
    rng = np.random.default_rng(15)
    recent = rng.random(5000)
    model = LocalFdr().fit(recent)
    assert np.quantile(model.probability(recent), 0.99) < 0.1
    assert np.quantile(model.probability(rng.random(100_000)), 0.99) < 0.1


def test_local_fdr_with_few_p_values_uses_the_stated_prior() -> None:
    model = LocalFdr().fit(np.array([0.2, 0.5, np.nan, 0.9]))
    assert model.mode_ == "prior"
    probability = model.probability(np.array([1e-6, 1e-4, 1e-3, 0.5, np.nan]))
    assert probability[:3] == pytest.approx([0.996, 0.80, 0.35], abs=0.01)
    assert probability[3] == pytest.approx(0.01) and np.isnan(probability[4])


def test_local_fdr_state_round_trip_is_identical_and_json() -> None:
    model = LocalFdr().fit(_two_group(np.random.default_rng(16), 50_000)[0])
    state = json.loads(json.dumps(model.state_dict(), allow_nan=False))
    assert len(state["edges"]) <= model.max_knots
    restored = LocalFdr()
    restored.load_state_dict(state)
    p = np.geomspace(1e-30, 1.0, 1000)
    assert np.array_equal(model.probability(p), restored.probability(p))


def test_labelled_probability_is_calibrated_and_monotone() -> None:
    rng = np.random.default_rng(17)
    model = LabelledProbability().fit(*_two_group(rng, 5000))
    p, anomalous = _two_group(rng, 200_000)
    assert expected_calibration_error(model.probability(p), anomalous) <= 0.05
    grid = model.probability(np.geomspace(1e-300, 1.0, 2000))
    assert np.all(np.diff(grid) <= 0) and np.all((grid >= 0) & (grid <= 1))


def test_labelled_probability_needs_enough_labels_of_both_kinds() -> None:
    model = LabelledProbability(min_positives=20, min_negatives=20)
    p, labels = np.full(500, 0.5), np.zeros(500, dtype=bool)
    labels[:5] = True
    assert not model.has_enough_labels(labels)
    with pytest.raises(InsufficientLabelsError, match=">= 20 anomalous"):
        model.fit(p, labels)


def test_labelled_probability_state_round_trip_is_identical_and_json() -> None:
    model = LabelledProbability().fit(*_two_group(np.random.default_rng(18), 20_000))
    state = json.loads(json.dumps(model.state_dict(), allow_nan=False))
    assert len(state["x"]) <= model.max_knots
    restored = LabelledProbability()
    restored.load_state_dict(state)
    p = np.append(np.geomspace(1e-30, 1.0, 1000), np.nan)
    assert np.array_equal(model.probability(p), restored.probability(p), equal_nan=True)


# ------------------------------------------------------------- beta-uniform mixture and fusion
def test_beta_uniform_mixture_is_calibrated_on_its_own_model() -> None:
    rng = np.random.default_rng(21)
    model = BetaUniformMixture().fit(_two_group(rng, 20_000)[0])
    p, anomalous = _two_group(rng, 200_000)
    probability = model.probability(p)
    assert expected_calibration_error(probability, anomalous) <= 0.05
    assert model.anomalous_share_ == pytest.approx(0.05, abs=0.02)
    grid = np.logspace(-12, 0, 200)
    assert np.all(np.diff(model.probability(grid)) <= 1e-12), "non-increasing in p"


def test_beta_uniform_mixture_flags_an_extreme_p_value_after_a_quiet_spell() -> None:
    """The first anomaly after normal history is when an alert matters; a nonparametric
    estimate of f(p) has no mass below the smallest recent p-value and answers ~0 there."""
    quiet = np.random.default_rng(22).random(20_000)
    mixture = BetaUniformMixture().fit(quiet)
    assert mixture.probability(np.array([1e-9]))[0] > 0.9
    assert mixture.probability(np.array([0.05]))[0] < 0.01
    assert np.quantile(mixture.probability(quiet), 0.99) < 0.05
    assert np.isnan(mixture.probability(np.array([np.nan]))[0])


def test_fused_calibrator_is_at_the_rate_under_strongly_correlated_detectors() -> None:
    """Three detectors of the same data (correlation 0.9): the calibrated Cauchy combination
    alarms at the configured rate on fresh normal data; the max of their scores does not."""
    rng = np.random.default_rng(11)
    rate = 0.01

    def correlated_null_p(steps: int) -> dict[str, np.ndarray]:
        shared = rng.standard_normal(steps)
        z = 0.9**0.5 * shared + 0.1**0.5 * rng.standard_normal((3, steps))
        p = norm.sf(z)
        return {name: p[i][None] for i, name in enumerate(("a", "b", "c"))}

    fused = FusedCalibrator(["a", "b", "c"]).fit(correlated_null_p(40_000), ["e"])
    fresh = correlated_null_p(200_000)
    realised = np.mean(score_from_p(fused.p_values(fresh, ["e"]), rate) >= 1.0)
    assert rate / 1.5 < realised < rate * 1.5, realised
    scores = np.stack([score_from_p(p, rate) for p in fresh.values()])
    assert np.mean(scores.max(axis=0) >= 1.0) > 1.5 * rate
    restored = FusedCalibrator.from_state_dict(
        json.loads(json.dumps(fused.state_dict(), allow_nan=False))
    )
    np.testing.assert_array_equal(restored.p_values(fresh, ["e"]), fused.p_values(fresh, ["e"]))
