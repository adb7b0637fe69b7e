"""Evaluation metrics on cases small enough to compute on paper, plus VUS against TSB-AD."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from aiops_plugin.evaluation import metrics

FOUR_SCORES = np.array([0.1, 0.4, 0.35, 0.8])
FOUR_LABELS = np.array([0, 0, 1, 1])
STANDARD = metrics.NAB_PROFILES["standard"]["CostMatrix"]
STEP = 300.0
T0 = 1.4e9


def segments_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A few anomaly segments, some at the edges, and noisy scores that partly find them."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(400, 3000))
    labels = np.zeros(n, dtype=int)
    for _ in range(int(rng.integers(1, 6))):
        start = int(rng.integers(0, n - 5))
        labels[start : start + int(rng.integers(1, 80))] = 1
    if seed % 3 == 1:
        labels[:12] = 1
    if seed % 3 == 2:
        labels[-9:] = 1
    scores = rng.normal(size=n) + 1.5 * labels + 3.0 * (rng.random(n) < 0.01)
    if seed % 2:
        scores = np.round(scores, 1)
    return scores, labels


# --- threshold-free -------------------------------------------------------------------------


def test_auc_roc_is_one_when_separated_and_zero_when_reversed() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert metrics.auc_roc(scores, labels) == 1.0
    assert metrics.auc_roc(-scores, labels) == 0.0


def test_auc_roc_of_four_point_case_is_three_quarters() -> None:
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ranked right.
    assert metrics.auc_roc(FOUR_SCORES, FOUR_LABELS) == pytest.approx(0.75)


def test_auc_pr_is_average_precision_of_four_point_case() -> None:
    # Recall 0.5 at precision 1 (0.8), then recall 1 at precision 2/3 (0.35): 0.5 + 0.5 * 2/3.
    assert metrics.auc_pr(FOUR_SCORES, FOUR_LABELS) == pytest.approx(0.5 + 1 / 3)


def test_threshold_free_metrics_drop_unscored_steps() -> None:
    scores = np.concatenate(([np.nan, np.nan], FOUR_SCORES, [np.nan]))
    labels = np.concatenate(([1, 0], FOUR_LABELS, [1]))
    assert metrics.auc_roc(scores, labels) == pytest.approx(0.75)
    assert metrics.auc_pr(scores, labels) == pytest.approx(0.5 + 1 / 3)


def test_all_normal_test_set_gives_nan_not_an_error() -> None:
    scores = np.linspace(0.0, 1.0, 50)
    labels = np.zeros(50, dtype=int)
    for value in (
        metrics.auc_roc(scores, labels),
        metrics.auc_pr(scores, labels),
        metrics.vus_roc(scores, labels, window=10),
        metrics.vus_pr(scores, labels, window=10),
        metrics.best_f1(scores, labels).f1,
        metrics.point_adjusted_f1(scores, labels).f1,
        metrics.f1_at(scores, labels, 2.0).f1,
    ):
        assert math.isnan(value)
    events = metrics.event_metrics(scores, labels, 0.9, STEP)
    assert events.n_events == 0
    assert math.isnan(events.event_recall)
    assert events.false_alarms == 1


def test_metrics_of_a_series_without_any_scored_step_are_nan() -> None:
    scores = np.full(10, np.nan)
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    assert math.isnan(metrics.auc_roc(scores, labels))
    assert math.isnan(metrics.vus_pr(scores, labels, window=4))
    assert metrics.best_f1(scores, labels).f1 == 0.0
    assert metrics.event_metrics(scores, labels, -np.inf, STEP).detected_events == 0


@pytest.mark.parametrize("window", [0, 1, 5, 20])
def test_vus_is_one_for_perfectly_separated_scores(window: int) -> None:
    labels = np.zeros(200, dtype=int)
    labels[50:60] = 1
    labels[120:123] = 1
    scores = labels + np.linspace(0.0, 0.5, 200)
    assert metrics.vus_roc(scores, labels, window=window) == pytest.approx(1.0)
    assert metrics.vus_pr(scores, labels, window=window) == pytest.approx(1.0)


def test_vus_of_four_step_case_computed_by_hand() -> None:
    scores = np.array([0.0, 0.5, 0.9, 0.1])
    labels = np.array([0, 1, 0, 0])
    # Buffers 0 and 1 add no soft labels: the plain ROC / PR steps, AUC 2/3 and AP 1/2.
    # Buffer 2 gives steps 0 and 2 the soft label a = sqrt(1 - 1/2). With only step 2 alarmed,
    # TP = a, P' = 1 + a/2, TPR0 = a / P' (the one widened event holds an alarm),
    # FPR0 = (1 - a) / (4 - P'), precision a; the next threshold reaches TPR 1 at the same FPR
    # with precision (1 + a) / 2. So AUC = FPR0 * TPR0 / 2 + (1 - FPR0) and
    # AP = TPR0 * a + (1 - TPR0) * (1 + a) / 2.
    a = math.sqrt(0.5)
    tpr0 = a / (1 + a / 2)
    fpr0 = (1 - a) / (4 - 1 - a / 2)
    roc_2 = fpr0 * tpr0 / 2 + (1 - fpr0)
    pr_2 = tpr0 * a + (1 - tpr0) * (1 + a) / 2
    assert metrics.vus_roc(scores, labels, window=0, n_thresholds=4) == pytest.approx(2 / 3)
    assert metrics.vus_pr(scores, labels, window=0, n_thresholds=4) == pytest.approx(0.5)
    assert metrics.vus_roc(scores, labels, window=2, n_thresholds=4) == pytest.approx(
        (2 / 3 + 2 / 3 + roc_2) / 3
    )
    assert metrics.vus_pr(scores, labels, window=2, n_thresholds=4) == pytest.approx(
        (0.5 + 0.5 + pr_2) / 3
    )


def test_vus_trims_an_unscored_warm_up() -> None:
    scores, labels = segments_case(4)
    warm_up = np.full(30, np.nan)
    padded_scores = np.concatenate((warm_up, scores))
    padded_labels = np.concatenate((np.zeros(30, dtype=int), labels))
    assert metrics.vus_pr(padded_scores, padded_labels, window=20) == pytest.approx(
        metrics.vus_pr(scores, labels, window=20)
    )


@pytest.mark.parametrize("seed", range(6))
def test_vus_matches_the_tsb_ad_reference(seed: int) -> None:
    try:
        from TSB_AD.evaluation import basic_metrics as reference
    except ImportError as exc:  # .ci/run installs it; a missing reference is a failure
        pytest.fail(f"tsb-ad reference not installed ({exc}): pip install --no-deps tsb-ad==1.5")
    scores, labels = segments_case(seed)
    for window in (0, 1, 2, 7, 36, 100):
        *_, ref_roc, ref_pr = reference.generate_curve(labels, scores, window)
        assert metrics.vus_roc(scores, labels, window=window) == pytest.approx(ref_roc, abs=1e-9)
        assert metrics.vus_pr(scores, labels, window=window) == pytest.approx(ref_pr, abs=1e-9)


# --- thresholded ----------------------------------------------------------------------------


def test_best_f1_of_four_point_case() -> None:
    # Thresholds 0.8, 0.4, 0.35, 0.1 give F1 2/3, 1/2, 4/5, 2/3.
    result = metrics.best_f1(FOUR_SCORES, FOUR_LABELS)
    assert result == metrics.F1Result(
        f1=pytest.approx(0.8), precision=pytest.approx(2 / 3), recall=1.0, threshold=0.35
    )


def test_best_f1_is_the_maximum_over_the_precision_recall_curve() -> None:
    scores, labels = segments_case(3)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        expected = np.nanmax(2 * precision * recall / (precision + recall))
    assert metrics.best_f1(scores, labels).f1 == pytest.approx(expected)


def test_unscored_anomalous_steps_count_as_missed() -> None:
    result = metrics.best_f1(np.array([np.nan, 0.9, 0.1]), np.array([1, 1, 0]))
    assert result.f1 == pytest.approx(2 / 3)
    assert result.recall == 0.5
    assert result.threshold == 0.9


def test_f1_at_a_given_threshold() -> None:
    result = metrics.f1_at(FOUR_SCORES, FOUR_LABELS, 0.4)
    assert (result.f1, result.precision, result.recall) == (0.5, 0.5, 0.5)
    silent = metrics.f1_at(FOUR_SCORES, FOUR_LABELS, 5.0)
    assert silent.f1 == 0.0
    assert math.isnan(silent.precision)


def test_point_adjustment_inflates_a_long_event_with_a_single_hit() -> None:
    labels = np.zeros(200, dtype=int)
    labels[100:150] = 1
    scores = np.zeros(200)
    scores[120] = 1.0
    adjusted = metrics.point_adjusted_f1(scores, labels)
    point_wise = metrics.best_f1(scores, labels)
    assert adjusted.inflated is True
    assert adjusted.f1 == 1.0
    assert point_wise.f1 == pytest.approx(0.4)
    assert adjusted.f1 >= point_wise.f1


def test_point_adjusted_search_matches_adjusting_at_every_threshold() -> None:
    scores, labels = segments_case(5)
    scores[::17] = np.nan
    starts = np.flatnonzero(np.diff(labels, prepend=0) == 1)
    ends = np.flatnonzero(np.diff(labels, append=0) == -1) + 1
    best = -1.0
    for threshold in np.unique(scores[~np.isnan(scores)]):
        alarms = scores >= threshold
        for start, end in zip(starts, ends, strict=True):
            if alarms[start:end].any():
                alarms[start:end] = True
        tp = np.sum(alarms & (labels == 1))
        best = max(best, 2 * tp / (alarms.sum() + labels.sum()))
    result = metrics.point_adjusted_f1(scores, labels)
    assert result.f1 == pytest.approx(best)
    assert metrics.point_adjusted_f1(scores, labels, result.threshold).f1 == pytest.approx(best)


# --- events ---------------------------------------------------------------------------------


def test_event_metrics_counts_detections_alarm_runs_and_delays() -> None:
    labels = np.zeros(20, dtype=int)
    labels[5:8] = 1
    labels[12:15] = 1
    scores = np.zeros(20)
    scores[[1, 2, 6, 7, 17]] = 1.0
    result = metrics.event_metrics(scores, labels, threshold=0.5, step_seconds=60.0)
    assert result == metrics.EventResult(
        n_events=2,
        detected_events=1,
        event_recall=0.5,
        false_alarms=2,
        false_alarms_per_day=pytest.approx(2 / (20 * 60 / 86400)),
        mean_delay_seconds=60.0,
        median_delay_seconds=60.0,
        delays_seconds=[60.0],
    )


def test_alarm_inside_the_early_window_is_a_detection_with_negative_delay() -> None:
    labels = np.zeros(30, dtype=int)
    labels[10:15] = 1
    scores = np.zeros(30)
    scores[8] = 1.0
    early = metrics.event_metrics(scores, labels, 0.5, STEP, early_window_steps=3)
    assert early.delays_seconds == [-2 * STEP]
    assert early.false_alarms == 0
    strict = metrics.event_metrics(scores, labels, 0.5, STEP)
    assert strict.detected_events == 0
    assert strict.false_alarms == 1


def test_alarm_run_reaching_into_an_event_is_a_detection_not_a_false_alarm() -> None:
    labels = np.zeros(30, dtype=int)
    labels[10:15] = 1
    scores = np.where(np.isin(np.arange(30), [7, 8, 9, 10, 11]), 1.0, np.nan)
    result = metrics.event_metrics(scores, labels, 0.5, STEP)
    assert (result.detected_events, result.false_alarms, result.delays_seconds) == (1, 0, [0.0])


# --- calibration ----------------------------------------------------------------------------


def test_ece_of_calibrated_bins_is_zero() -> None:
    probabilities = np.array([0.2] * 10 + [0.7] * 10)
    labels = np.array([1, 1] + [0] * 8 + [1] * 7 + [0] * 3)
    assert metrics.expected_calibration_error(probabilities, labels) == pytest.approx(0.0)


def test_ece_of_an_overconfident_bin() -> None:
    # Bin 0.9 sees 50 % anomalies (gap 0.4), bin 0.1 sees 10 % (gap 0): half the weight each.
    probabilities = np.array([0.9] * 10 + [0.1] * 10 + [np.nan])
    labels = np.array([1] * 5 + [0] * 5 + [1] + [0] * 9 + [1])
    assert metrics.expected_calibration_error(probabilities, labels) == pytest.approx(0.2)


def test_reliability_table_bins_and_empty_bins() -> None:
    table = metrics.reliability_table(np.array([0.05, 0.15, 1.0, 0.95]), np.array([0, 1, 1, 0]), 10)
    assert table.count.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table.mean_predicted[9] == pytest.approx(0.975)
    assert table.observed_frequency[9] == 0.5
    assert math.isnan(table.mean_predicted[5])
    assert table.bin_edges.shape == (11,)


def test_brier_score_of_known_case() -> None:
    probabilities = np.array([1.0, 0.0, 0.5, 0.8])
    labels = np.array([1, 0, 1, 0])
    assert metrics.brier_score(probabilities, labels) == pytest.approx((0.25 + 0.64) / 4)


def test_probability_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.expected_calibration_error(np.array([0.2, 1.5]), np.array([0, 1]))


# --- NAB ------------------------------------------------------------------------------------


def nab_file(n_rows: int = 1000) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Rows every 5 min; one window on rows 400..449 (after the 150 probationary rows)."""
    timestamps = T0 + STEP * np.arange(n_rows)
    return timestamps, [(timestamps[400], timestamps[449])]


def raw_with_alarms(rows: list[int], cost: dict[str, float] = STANDARD) -> float:
    timestamps, windows = nab_file()
    detections = np.zeros(timestamps.size, dtype=bool)
    detections[rows] = True
    return metrics.nab_raw_score(detections, timestamps, windows, cost)


def scaled(x: float) -> float:
    return 2 / (1 + math.exp(5 * x)) - 1


def test_scaled_sigmoid_matches_nab_values() -> None:
    positions = np.array([-1.0, -0.5, 0.0, 1.0, 3.5])
    expected = [0.98661, 0.84828, 0.0, -0.98661, -1.0]
    assert metrics.nab_scaled_sigmoid(positions) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("n_rows", "percent", "expected"),
    [(100, 0.15, 15), (4032, 0.15, 604), (6000, 0.1, 500), (22695, 0.15, 750)],
)
def test_probationary_period_is_capped_at_the_share_of_5000_rows(
    n_rows: int, percent: float, expected: int
) -> None:
    assert metrics.nab_probationary_rows(n_rows, percent) == expected


def test_alarm_at_window_start_earns_the_full_tp_weight() -> None:
    # Upstream divides by scaledSigmoid(-1) = 0.98661, so the left edge earns exactly tpWeight.
    assert raw_with_alarms([400]) == 1.0
    doubled = {**STANDARD, "tpWeight": 2.0}
    assert raw_with_alarms([400], doubled) == 2.0


def test_alarm_at_window_end_earns_almost_nothing() -> None:
    assert raw_with_alarms([449]) == pytest.approx(scaled(-1 / 50) / scaled(-1.0))


def test_only_the_earliest_alarm_in_a_window_counts() -> None:
    assert raw_with_alarms([400, 420]) == raw_with_alarms([400])
    assert raw_with_alarms([420, 410]) == pytest.approx(scaled(-40 / 50) / scaled(-1.0))


def test_alarm_in_probationary_period_is_ignored() -> None:
    assert raw_with_alarms([100]) == -1.0


def test_alarm_after_window_costs_the_sigmoid_weighted_fp_weight() -> None:
    assert raw_with_alarms([460]) == pytest.approx(-1.0 + 0.11 * scaled((460 - 449) / 49))
    assert raw_with_alarms([900]) == pytest.approx(-1.0 - 0.11)


def test_alarm_before_any_window_costs_the_full_fp_weight() -> None:
    assert raw_with_alarms([200]) == pytest.approx(-1.0 - 0.11)


def test_window_inside_probationary_period_is_not_scored() -> None:
    timestamps, windows = nab_file()
    early_window = [(timestamps[50], timestamps[60]), *windows]
    assert metrics.nab_null_raw_score(timestamps, early_window, STANDARD) == -1.0


def test_null_detector_normalises_to_zero_and_perfect_to_one_hundred() -> None:
    timestamps, windows = nab_file()
    cost = metrics.NAB_PROFILES["reward_low_FN_rate"]["CostMatrix"]
    null = metrics.nab_null_raw_score(timestamps, windows, cost)
    perfect = metrics.nab_perfect_raw_score(timestamps, windows, cost)
    assert (null, perfect) == (-2.0, 1.0)
    assert metrics.nab_normalized_score(null, null, perfect) == 0.0
    assert metrics.nab_normalized_score(perfect, null, perfect) == 100.0
    perfect_scores = np.zeros(timestamps.size)
    perfect_scores[400] = 1.0
    assert metrics.nab_score_at([perfect_scores], [timestamps], [windows], cost, 0.5) == 100.0


def test_best_threshold_is_the_best_of_every_corpus_threshold() -> None:
    rng = np.random.default_rng(11)
    files = []
    for n_rows, window_rows in [(800, [(300, 340), (600, 612)]), (1200, [(700, 800)])]:
        timestamps = T0 + STEP * np.arange(n_rows)
        scores = np.round(rng.random(n_rows), 2)
        scores[[a + 3 for a, _ in window_rows]] = 0.995
        scores[::50] = np.nan
        files.append((scores, timestamps, [(timestamps[a], timestamps[b]) for a, b in window_rows]))
    scores_per_file, timestamps_per_file, windows_per_file = zip(*files, strict=True)

    def normalised_at(threshold: float) -> float:
        return metrics.nab_score_at(
            scores_per_file, timestamps_per_file, windows_per_file, STANDARD, threshold
        )

    candidates = [math.inf, *np.unique(np.concatenate(scores_per_file))]
    expected = max(normalised_at(t) for t in candidates if not math.isnan(t))
    threshold, score = metrics.nab_best_threshold(
        scores_per_file, timestamps_per_file, windows_per_file, STANDARD
    )
    assert score == pytest.approx(expected)
    assert normalised_at(threshold) == pytest.approx(score)
    assert threshold == 0.995


def test_constant_scores_are_best_never_alarming() -> None:
    timestamps, windows = nab_file()
    threshold, score = metrics.nab_best_threshold(
        [np.full(timestamps.size, 0.5)], [timestamps], [windows], STANDARD
    )
    assert (threshold, score) == (math.inf, 0.0)
