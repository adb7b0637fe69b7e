"""How good are a detector's anomaly scores? The metrics the benchmark harness reports.

Conventions shared by every function here:

* ``scores``: float array ``(T,)``, one value per time step, higher = more anomalous. ``NaN``
  means "not scored" (warm-up, missing data). Threshold-free metrics drop NaN steps before ranking,
  since such a step has no opinion to rank. Thresholded metrics keep the step but never count it as
  an alarm, so a labelled step the detector did not score is a miss, not a free pass.
* ``labels``: 0/1 (or bool) array ``(T,)``; 1 = the step lies in a labelled anomaly. A maximal
  run of 1s is one *event* (segment).
* An alarm at threshold ``t`` is ``score >= t``, as in NAB and in TSB-AD's VUS.
* A metric that is undefined on the data (an AUC with no positive label, a recall with no event)
  is ``NaN``, and the caller reports it as such. Such data never raises; malformed input does
  (arrays of different lengths, probabilities outside [0, 1], overlapping NAB windows).

Families: threshold-free ranking quality (AUC-ROC, AUC-PR, VUS-ROC, VUS-PR), point-wise F1 at the
best or a given threshold, the inflated point-adjusted F1 of older papers (kept only for comparison
with them), event-level recall / false alarms / detection delay, calibration of probabilities
(ECE, Brier score, reliability table), and the NAB score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

#: NAB's three application profiles, verbatim from upstream ``config/profiles.json``.
NAB_PROFILES: dict[str, dict[str, dict[str, float]]] = {
    "standard": {
        "CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}
    },
    "reward_low_FP_rate": {
        "CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22, "tnWeight": 1.0}
    },
    "reward_low_FN_rate": {
        "CostMatrix": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11, "tnWeight": 1.0}
    },
}
#: Share of each NAB file that is not scored (upstream ``probationaryPercent``).
NAB_PROBATIONARY_PERCENT = 0.15

_SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class F1Result:
    """Point-wise F1 at one threshold (alarm = ``score >= threshold``); NaN where undefined."""

    f1: float
    precision: float
    recall: float
    threshold: float


@dataclass(frozen=True)
class PointAdjustedF1Result:
    """INFLATED point-adjusted F1: a whole event counts as found if any step in it alarms.

    Only for comparison with papers that report it; ``inflated`` is always True so that a report
    cannot print it without knowing.
    """

    f1: float
    precision: float
    recall: float
    threshold: float
    inflated: bool = True


@dataclass(frozen=True)
class EventResult:
    """Event-level view at one threshold: what an operator paged by the alarms would see.

    Attributes:
        n_events: labelled events (maximal runs of 1s).
        detected_events: events with an alarm in ``[start - early_window_steps, end)``.
        event_recall: ``detected_events / n_events``; NaN without events.
        false_alarms: alarm runs (contiguous alarm steps, counted once per run) that touch no
            event, the event extended by the early window.
        false_alarms_per_day: ``false_alarms`` per 86 400 s of covered time ``T * step_seconds``.
        mean_delay_seconds: mean of ``delays_seconds``; NaN if no event was detected.
        median_delay_seconds: median of ``delays_seconds``; NaN if no event was detected.
        delays_seconds: per detected event, in event order, ``(first alarm - start) * step``;
            negative = lead time, the alarm came before the labelled start.
    """

    n_events: int
    detected_events: int
    event_recall: float
    false_alarms: int
    false_alarms_per_day: float
    mean_delay_seconds: float
    median_delay_seconds: float
    delays_seconds: list[float]


@dataclass(frozen=True)
class ReliabilityTable:
    """Per-bin calibration of probabilities, equal-width bins on [0, 1].

    Attributes:
        bin_edges: ``(n_bins + 1,)`` edges; bin ``b`` is ``[edges[b], edges[b + 1])``, the last
            bin also holds 1.0.
        mean_predicted: ``(n_bins,)`` mean predicted probability in the bin; NaN if empty.
        observed_frequency: ``(n_bins,)`` share of positive labels in the bin; NaN if empty.
        count: ``(n_bins,)`` number of probabilities in the bin.
    """

    bin_edges: np.ndarray
    mean_predicted: np.ndarray
    observed_frequency: np.ndarray
    count: np.ndarray


def _as_arrays(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(T,)`` float scores and ``(T,)`` bool labels, or ValueError naming the mismatch."""
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} steps but labels has {y.size}")
    return s, y


def _drop_unscored(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The steps with a score: threshold-free metrics rank only these."""
    scored = ~np.isnan(s)
    return s[scored], y[scored]


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of True in ``mask`` as ``(starts, ends)`` step indices, ends exclusive."""
    padded = np.concatenate(([False], mask, [False]))
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return change[0::2], change[1::2]


def _last_of_each_value(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal values in a sorted array."""
    if sorted_values.size == 0:
        return np.empty(0, dtype=int)
    changes = np.flatnonzero(sorted_values[1:] != sorted_values[:-1])
    return np.append(changes, sorted_values.size - 1)


def auc_roc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn ``roc_auc_score``), NaN steps dropped.

    The probability that a random anomalous step outscores a random normal one; 0.5 is chance.
    NaN unless both classes remain after dropping unscored steps.
    """
    s, y = _drop_unscored(*_as_arrays(scores, labels))
    if not (y.any() and (~y).any()):
        return math.nan
    return float(roc_auc_score(y, s))


def auc_pr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (scikit-learn ``average_precision_score``), NaN steps dropped.

    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds: the step-wise area under the
    precision-recall curve, without the optimistic trapezoid. Its chance level is the share of
    anomalous steps, so it is the threshold-free metric to read on rare anomalies. NaN without a
    positive label among the scored steps.
    """
    s, y = _drop_unscored(*_as_arrays(scores, labels))
    if not y.any():
        return math.nan
    return float(average_precision_score(y, s))


def _buffer_weights(
    starts: np.ndarray, last: np.ndarray, n_steps: int, buffer: int, y: np.ndarray
) -> np.ndarray:
    """TSB-AD's soft labels for one buffer length ``buffer`` (their ``sequencing``).

    Every step within ``buffer // 2`` of an event gets ``sqrt(1 - d / buffer)`` per event at
    distance ``d`` (summed over events), labelled steps get 1, and the sum is clipped to 1.
    """
    soft = y.astype(float)
    half = buffer // 2
    if half == 0:
        return soft
    d = np.arange(1, half + 1)
    weight = np.sqrt(1.0 - d / buffer)
    after = last[:, None] + d[None, :]
    before = starts[:, None] - d[None, :]
    weights = np.broadcast_to(weight, after.shape)
    idx = np.concatenate((after[after < n_steps], before[before >= 0]))
    val = np.concatenate((weights[after < n_steps], weights[before >= 0]))
    soft += np.bincount(idx, weights=val, minlength=n_steps)
    return np.minimum(soft, 1.0)


def _volume_under_surface(
    scores: np.ndarray, labels: np.ndarray, window: int, n_thresholds: int
) -> tuple[float, float]:
    """(VUS-ROC, VUS-PR) exactly as TSB-AD's ``RangeAUC_volume_opt``, vectorised.

    For each buffer length ``w = 0..window`` TSB-AD builds range-based curves over
    ``n_thresholds`` thresholds taken from the sorted scores at ``linspace(0, T - 1, n)`` and
    averages their areas. At threshold ``k`` and buffer ``w``, with ``E`` the soft label mass of
    alarmed unlabelled steps near events (:func:`_buffer_weights`) and ``P`` the labelled steps:
    ``TP = alarmed labelled steps + E``, ``P' = P + E / 2``,
    ``TPR = min(TP / P', 1) * (events, each widened by w // 2 and merged, holding an alarm) /
    (number of such merged events)``, ``FPR = (alarms - TP) / (T - P')``,
    ``precision = TP / alarms``; ROC is the trapezoid over ``(0, 0), ..., (1, 1)`` and PR
    ``sum_k (TPR_k - TPR_{k-1}) precision_k``. Instead of one pass per threshold, each step's
    first alarming threshold is found once and the counts are cumulative sums over thresholds.
    """
    if window < 0 or n_thresholds < 1:
        raise ValueError(f"need window >= 0 and n_thresholds >= 1, got {window}, {n_thresholds}")
    s, y = _drop_unscored(*_as_arrays(scores, labels))
    if not y.any():
        return math.nan, math.nan
    n_steps = s.size
    starts, ends = runs(y)
    last = ends - 1
    n_pos = float(y.sum())

    thresholds = np.sort(s)[::-1][np.linspace(0, n_steps - 1, n_thresholds).astype(int)]
    first_alarm = n_thresholds - np.searchsorted(thresholds[::-1], s, side="right")

    def alarmed(mask: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        counts = np.bincount(first_alarm[mask], weights=weights, minlength=n_thresholds + 1)
        return np.cumsum(counts)[:n_thresholds]

    n_alarms = alarmed(np.ones(n_steps, dtype=bool))
    tp_labelled = alarmed(y)
    first_alarm_padded = np.append(first_alarm, n_thresholds)
    vus_roc_sum = 0.0
    vus_pr_sum = 0.0
    for buffer in range(window + 1):
        half = buffer // 2
        soft = _buffer_weights(starts, last, n_steps, buffer, y)
        tp = tp_labelled + alarmed(~y, soft[~y])
        pos = n_pos + (tp - tp_labelled) / 2.0

        new_group = np.concatenate(([True], starts[1:] - half > last[:-1] + half))
        group_start = np.maximum(starts[new_group] - half, 0)
        group_end = np.minimum(
            last[np.append(np.flatnonzero(new_group)[1:] - 1, -1)] + half, n_steps - 1
        )
        bounds = np.column_stack((group_start, group_end + 1)).ravel()
        group_first = np.minimum.reduceat(first_alarm_padded, bounds)[::2]
        hit_groups = np.cumsum(np.bincount(group_first, minlength=n_thresholds + 1))
        existence = hit_groups[:n_thresholds] / group_start.size

        with np.errstate(divide="ignore", invalid="ignore"):
            tpr = np.minimum(tp / pos, 1.0) * existence
            fpr = (n_alarms - tp) / (n_steps - pos)
        precision = tp / n_alarms
        tpr_curve = np.concatenate(([0.0], tpr, [1.0]))
        fpr_curve = np.concatenate(([0.0], fpr, [1.0]))
        vus_roc_sum += float(np.dot(np.diff(fpr_curve), (tpr_curve[1:] + tpr_curve[:-1]) / 2))
        vus_pr_sum += float(np.dot(np.diff(tpr_curve[:-1]), precision))
    vus_roc_value = vus_roc_sum / (window + 1) if (~y).any() else math.nan
    return vus_roc_value, vus_pr_sum / (window + 1)


def vus_roc(
    scores: np.ndarray, labels: np.ndarray, window: int = 100, n_thresholds: int = 250
) -> float:
    """VUS-ROC: volume under the range-ROC surface over buffer lengths ``0..window`` steps.

    Paparrizos et al., "Volume Under the Surface: a new accuracy evaluation measure for
    time-series anomaly detection", VLDB 2022; the variant of the TSB-AD benchmark (Liu &
    Paparrizos, NeurIPS 2024), which ranks detectors by it because, unlike AUC-ROC, it credits
    alarms just before or after a labelled event (a soft buffer) and needs no threshold.
    Computed as TSB-AD's ``RangeAUC_volume_opt`` (definition in :func:`_volume_under_surface`),
    agreeing with package ``tsb-ad`` 1.5 to rounding error (the tests hold it to 1e-9).

    Args:
        window: largest buffer in steps. TSB-AD passes the series' dominant period
            (``find_length_rank`` on the raw data, 3..300, 125 by default); 100 is the default of
            its ``get_metrics``. Pass the same value to compare with published numbers.
        n_thresholds: thresholds per curve (TSB-AD: 250).

    NaN steps are dropped first, joining the scored parts (a NaN warm-up prefix is simply
    trimmed). NaN unless both classes remain.
    """
    return _volume_under_surface(scores, labels, window, n_thresholds)[0]


def vus_pr(
    scores: np.ndarray, labels: np.ndarray, window: int = 100, n_thresholds: int = 250
) -> float:
    """VUS-PR: volume under the range-precision-recall surface, buffers ``0..window`` steps.

    Same construction and reference as :func:`vus_roc`; TSB-AD's headline metric, being
    threshold-free, robust to small misalignment of labels and sensitive to false alarms on rare
    anomalies. NaN steps are dropped first; NaN without a positive label.
    """
    return _volume_under_surface(scores, labels, window, n_thresholds)[1]


def _f1_from_counts(tp: np.ndarray, n_alarms: np.ndarray, n_pos: float) -> np.ndarray:
    """``2 TP / (2 TP + FP + FN) = 2 TP / (alarms + positives)``; NaN where both are zero."""
    denominator = n_alarms + n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, 2.0 * tp / denominator, np.nan)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def best_f1(scores: np.ndarray, labels: np.ndarray) -> F1Result:
    """Best point-wise F1 over every distinct score threshold, without point adjustment.

    The "oracle threshold" F1 of TSB-AD's Standard-F1: an upper bound on what a tuned threshold
    reaches. Sorting once gives the precision-recall curve at every distinct score (alarm =
    ``score >= t``), so the search is exact and ``O(T log T)``. NaN-scored steps never alarm but
    their labels still count as positives to find. Ties go to the highest threshold. All fields
    NaN without a positive label (F1 is undefined); with positives but no scored step F1 is 0.
    """
    s, y = _as_arrays(scores, labels)
    n_pos = float(y.sum())
    if n_pos == 0:
        return F1Result(math.nan, math.nan, math.nan, math.nan)
    scored = ~np.isnan(s)
    if not scored.any():
        return F1Result(0.0, math.nan, 0.0, math.nan)
    order = np.argsort(-s[scored], kind="stable")
    s_sorted = s[scored][order]
    tp_cum = np.cumsum(y[scored][order])
    last_of_value = _last_of_each_value(s_sorted)
    tp = tp_cum[last_of_value].astype(float)
    n_alarms = (last_of_value + 1).astype(float)
    f1 = _f1_from_counts(tp, n_alarms, n_pos)
    best = int(np.argmax(f1))
    return F1Result(
        f1=float(f1[best]),
        precision=float(tp[best] / n_alarms[best]),
        recall=float(tp[best] / n_pos),
        threshold=float(s_sorted[last_of_value[best]]),
    )


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> F1Result:
    """Point-wise F1, precision and recall with alarm = ``score >= threshold``.

    NaN scores never alarm. Precision is NaN without alarms, recall NaN without positive labels,
    F1 (``2 TP / (2 TP + FP + FN)``) NaN only when there are neither.
    """
    s, y = _as_arrays(scores, labels)
    alarms = s >= threshold
    tp = float(np.sum(alarms & y))
    n_alarms = float(alarms.sum())
    n_pos = float(y.sum())
    return F1Result(
        f1=float(_f1_from_counts(np.array(tp), np.array(n_alarms), n_pos)),
        precision=_ratio(tp, n_alarms),
        recall=_ratio(tp, n_pos),
        threshold=float(threshold),
    )


def point_adjusted_f1(
    scores: np.ndarray, labels: np.ndarray, threshold: float | None = None
) -> PointAdjustedF1Result:
    """INFLATED point-adjusted F1 (PA-F1), for comparison with older papers only.

    Point adjustment (Xu et al., WWW 2018, "Donut"; used by OmniAnomaly, USAD, Anomaly
    Transformer...) marks every step of a labelled event as detected as soon as one step in it
    alarms, then computes point-wise F1. A long event with one lucky alarm counts as fully found,
    so even random scores reach high PA-F1 (Kim et al., AAAI 2022, "Towards a rigorous evaluation
    of time-series anomaly detection"): never rank detectors by it.

    With ``threshold=None`` the best PA-F1 over every distinct score is returned (the common
    reporting practice), computed exactly from each event's maximum score; ties go to the
    highest threshold. NaN scores never alarm. All fields NaN without a positive label.
    """
    s, y = _as_arrays(scores, labels)
    n_pos = float(y.sum())
    if n_pos == 0:
        return PointAdjustedF1Result(math.nan, math.nan, math.nan, math.nan)
    filled = np.append(np.where(np.isnan(s), -np.inf, s), -np.inf)
    starts, ends = runs(y)
    event_max = np.maximum.reduceat(filled, np.column_stack((starts, ends)).ravel())[::2]
    event_max_sorted = np.sort(event_max)
    length_sorted = (ends - starts)[np.argsort(event_max, kind="stable")]
    length_above = np.concatenate((np.cumsum(length_sorted[::-1])[::-1], [0]))
    normal_sorted = np.sort(s[~y & ~np.isnan(s)])

    if threshold is None:
        candidates = np.unique(s[~np.isnan(s)])[::-1]
        if candidates.size == 0:
            return PointAdjustedF1Result(0.0, math.nan, 0.0, math.nan)
    else:
        candidates = np.array([float(threshold)])
    tp = length_above[np.searchsorted(event_max_sorted, candidates, side="left")].astype(float)
    fp = (normal_sorted.size - np.searchsorted(normal_sorted, candidates, side="left")).astype(
        float
    )
    f1 = _f1_from_counts(tp, tp + fp, n_pos)
    best = 0 if threshold is not None else int(np.argmax(f1))
    return PointAdjustedF1Result(
        f1=float(f1[best]),
        precision=_ratio(float(tp[best]), float(tp[best] + fp[best])),
        recall=float(tp[best] / n_pos),
        threshold=float(candidates[best]),
    )


def event_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    step_seconds: float,
    early_window_steps: int = 0,
) -> EventResult:
    """Event recall, false alarms per day and detection delay at one threshold.

    What an on-call engineer experiences: was each incident caught, how late (or how early), and
    how many pages came with no incident. Events are maximal runs of 1s in ``labels``. An event
    ``[start, end)`` is detected by the first alarm (``score >= threshold``; NaN never alarms) in
    ``[start - early_window_steps, end)``; the early window never reaches back into the previous
    event. Delay ``= (first alarm - start) * step_seconds``, negative = lead time. A false alarm is
    a run of consecutive alarm steps, counted once, that overlaps no event extended by the early
    window; false alarms per day divide by the covered time ``T * step_seconds``.

    Args:
        step_seconds: seconds between consecutive steps (> 0).
        early_window_steps: steps before an event's labelled start in which an alarm counts as an
            early detection (>= 0); 0 = only alarms inside the event count.
    """
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
    if early_window_steps < 0:
        raise ValueError(f"early_window_steps must be >= 0, got {early_window_steps}")
    s, y = _as_arrays(scores, labels)
    n_steps = s.size
    alarms = s >= threshold
    starts, ends = runs(y)
    previous_end = np.concatenate(([0], ends[:-1]))
    reach = np.maximum(starts - early_window_steps, previous_end)

    alarm_steps = np.append(np.flatnonzero(alarms), n_steps)
    first_alarm = alarm_steps[np.searchsorted(alarm_steps, reach, side="left")]
    detected = first_alarm < ends
    delays = ((first_alarm[detected] - starts[detected]) * float(step_seconds)).tolist()

    covered_change = np.zeros(n_steps + 1)
    np.add.at(covered_change, reach, 1.0)
    np.add.at(covered_change, ends, -1.0)
    covered_before = np.concatenate(([0], np.cumsum(np.cumsum(covered_change)[:n_steps] > 0)))
    alarm_starts, alarm_ends = runs(alarms)
    false_alarms = int(np.sum(covered_before[alarm_ends] == covered_before[alarm_starts]))
    days = n_steps * float(step_seconds) / _SECONDS_PER_DAY
    return EventResult(
        n_events=int(starts.size),
        detected_events=int(detected.sum()),
        event_recall=_ratio(float(detected.sum()), float(starts.size)),
        false_alarms=false_alarms,
        false_alarms_per_day=_ratio(false_alarms, days),
        mean_delay_seconds=float(np.mean(delays)) if delays else math.nan,
        median_delay_seconds=float(np.median(delays)) if delays else math.nan,
        delays_seconds=delays,
    )


def realised_false_alarm_rate(
    scores: np.ndarray, labels: np.ndarray, threshold: float = 1.0
) -> float:
    """Share of the normal steps (label 0) that alarm, ``score >= threshold``.

    What a configured false-alarm rate promises: on normal data, the share of steps above the
    operating threshold. Every normal step counts in the denominator; a NaN (unscored) step never
    alarms, as in the other thresholded metrics. NaN when there is no normal step.
    """
    s, y = _as_arrays(scores, labels)
    normal = ~y
    if not normal.any():
        return math.nan
    with np.errstate(invalid="ignore"):
        alarms = s[normal] >= threshold
    return float(np.count_nonzero(alarms) / normal.sum())


def reliability_table(
    probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10
) -> ReliabilityTable:
    """Mean predicted probability vs observed anomaly frequency per equal-width bin.

    The data behind a reliability diagram: a calibrated detector's ``P(anomaly) = 0.8`` steps are
    anomalous 80 % of the time. Bin ``b`` holds ``floor(p * n_bins)`` (1.0 in the last bin).
    NaN probabilities are dropped; values outside [0, 1] raise ValueError.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _drop_unscored(*_as_arrays(probabilities, labels))
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"probabilities must lie in [0, 1], got [{p.min()}, {p.max()}]")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_predicted = np.bincount(bins, weights=p, minlength=n_bins) / count
        observed = np.bincount(bins, weights=y.astype(float), minlength=n_bins) / count
    return ReliabilityTable(
        bin_edges=np.linspace(0.0, 1.0, n_bins + 1),
        mean_predicted=mean_predicted,
        observed_frequency=observed,
        count=count,
    )


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10
) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |mean p_b - observed frequency_b|``.

    Equal-width bins on [0, 1], weighted by bin count (Naeini et al., AAAI 2015; Guo et al.,
    ICML 2017). In probability units: 0 = calibrated, 0.1 = the stated probability is off by 10
    percentage points on average. NaN probabilities are dropped; NaN if none remain.
    """
    table = reliability_table(probabilities, labels, n_bins)
    total = table.count.sum()
    if total == 0:
        return math.nan
    filled = table.count > 0
    gap = np.abs(table.mean_predicted[filled] - table.observed_frequency[filled])
    return float(np.sum(table.count[filled] * gap) / total)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Brier score ``mean((p - y)^2)`` (Brier 1950): calibration and sharpness in one number.

    0 is perfect, 0.25 is a constant 0.5. NaN probabilities are dropped; NaN if none remain.
    """
    p, y = _drop_unscored(*_as_arrays(probabilities, labels))
    if p.size == 0:
        return math.nan
    return float(np.mean((p - y) ** 2))


def nab_scaled_sigmoid(relative_position: np.ndarray | float) -> np.ndarray:
    """NAB's ``scaledSigmoid``: ``2 / (1 + exp(5 x)) - 1``, and -1 beyond ``x > 3``.

    ``x = -1`` is a window's left edge (0.98661), 0 its right edge (0), positive values lie past
    the window (-0.98661 at 1). Written as the identical ``-tanh(2.5 x)`` to avoid overflow.
    """
    x = np.asarray(relative_position, dtype=float)
    return np.where(x > 3.0, -1.0, -np.tanh(2.5 * x))


def nab_probationary_rows(
    n_rows: int, probationary_percent: float = NAB_PROBATIONARY_PERCENT
) -> int:
    """Rows at the start of a NAB file that are not scored (detectors are still learning).

    Upstream ``getProbationPeriod``: ``min(floor(p * n_rows), p * 5000)``, i.e. at most 750 rows
    with p = 0.15 (the cap is 15 % of 5000 rows, not 5000 rows); rows with index below it are
    skipped.
    """
    return math.ceil(min(math.floor(probationary_percent * n_rows), probationary_percent * 5000))


@dataclass(frozen=True)
class _NabRows:
    """Per-row NAB scoring weights of one file, independent of the detector.

    Attributes:
        weight: ``(T,)`` what an alarm at the row is worth: within a window its TP reward,
            outside its FP cost (negative); NaN in the probationary period.
        window_id: ``(T,)`` index of the window holding the row, -1 outside every window.
        first_row: ``(W,)`` first row of each window.
        scored_window: ``(W,)`` whether the window has a row after the probationary period;
            only those can be missed.
    """

    weight: np.ndarray
    window_id: np.ndarray
    first_row: np.ndarray
    scored_window: np.ndarray


def _nab_rows(
    timestamps: np.ndarray,
    windows: Sequence[tuple[float, float]],
    cost_matrix: Mapping[str, float],
    probationary_percent: float,
) -> _NabRows:
    """Upstream ``Sweeper.calcSweepScore`` as arrays.

    A window ``[t1, t2]`` (Unix s, inclusive) holds the rows whose timestamp lies in it, which is
    upstream's window whenever ``t1`` and ``t2`` are row timestamps, as in NAB's label files; a
    window holding no row is dropped. Row ``i`` of a window with rows ``a..b`` (width ``b - a +
    1``) is worth ``tpWeight * S(-(b - i + 1) / width) / S(-1)``, so exactly ``tpWeight`` at the
    left edge. A row outside every window, after window ``a..b``, costs
    ``fpWeight * S((i - b) / (width - 1))``, and ``-fpWeight`` if no window precedes it. Upstream
    divides by zero after a one-row window; there its older ``Scorer`` convention, relative
    position 2.0, is used.
    """
    t = np.asarray(timestamps, dtype=float).ravel()
    n_rows = t.size
    limits = np.asarray(sorted(windows), dtype=float).reshape(-1, 2)
    left = np.searchsorted(t, limits[:, 0], side="left")
    right = np.searchsorted(t, limits[:, 1], side="right") - 1
    keep = left <= right
    left, right = left[keep], right[keep]
    if np.any(left[1:] <= right[:-1]):
        raise ValueError("NAB windows overlap; upstream scoring assumes disjoint windows")
    width = (right - left + 1).astype(float)
    rows = np.arange(n_rows)

    containing = np.searchsorted(left, rows, side="right") - 1
    inside = np.zeros(n_rows, dtype=bool)
    if left.size:
        inside = (containing >= 0) & (rows <= right[np.maximum(containing, 0)])
    window_id = np.where(inside, containing, -1)
    weight = np.empty(n_rows)
    k = window_id[inside]
    max_tp = nab_scaled_sigmoid(-1.0)
    weight[inside] = (
        cost_matrix["tpWeight"]
        * nab_scaled_sigmoid(-(right[k] - rows[inside] + 1) / width[k])
        / max_tp
    )

    outside = ~inside
    preceding = np.searchsorted(right, rows[outside], side="left") - 1
    prev = np.maximum(preceding, 0)
    if left.size:
        span = width[prev] - 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            position = np.where(span > 0, (rows[outside] - right[prev]) / span, 2.0)
        past = np.where(preceding >= 0, nab_scaled_sigmoid(position), -1.0)
    else:
        past = np.full(int(outside.sum()), -1.0)
    weight[outside] = cost_matrix["fpWeight"] * past

    probation = nab_probationary_rows(n_rows, probationary_percent)
    weight[:probation] = np.nan
    return _NabRows(
        weight=weight, window_id=window_id, first_row=left, scored_window=right >= probation
    )


def _nab_score_rows(rows: _NabRows, detections: np.ndarray, fn_weight: float) -> float:
    """Raw NAB score of alarms ``detections`` (T,) bool on a file's precomputed rows."""
    alarms = np.asarray(detections, dtype=bool).ravel()
    if alarms.size != rows.weight.size:
        raise ValueError(f"detections has {alarms.size} rows but timestamps has {rows.weight.size}")
    active = alarms & ~np.isnan(rows.weight)
    false_positives = float(rows.weight[active & (rows.window_id < 0)].sum())
    window_score = np.full(rows.first_row.size, -float(fn_weight))
    hit = active & (rows.window_id >= 0)
    np.maximum.at(window_score, rows.window_id[hit], rows.weight[hit])
    return float(window_score[rows.scored_window].sum()) + false_positives


def nab_raw_score(
    detections: np.ndarray,
    timestamps: np.ndarray,
    windows: Sequence[tuple[float, float]],
    cost_matrix: Mapping[str, float],
    probationary_percent: float = NAB_PROBATIONARY_PERCENT,
) -> float:
    """Raw NAB score of one file (Lavin & Ahmad, "Evaluating real-time anomaly detection
    algorithms - the Numenta Anomaly Benchmark", ICMLA 2015; upstream ``nab/sweeper.py``).

    Rewards early detection inside a labelled window and penalises alarms outside it:

    * the first :func:`nab_probationary_rows` rows are ignored entirely;
    * each window counts once: the best (= earliest) alarm in it earns
      ``tpWeight * S(-(b - i + 1) / width) / S(-1)`` (``tpWeight`` at the left edge, about 0 at
      the right edge; :func:`nab_scaled_sigmoid` is ``S``); a window without an alarm costs
      ``-fnWeight`` (a window wholly inside the probationary period counts neither way);
    * every alarm row outside the windows adds ``fpWeight * S((i - b) / (width - 1))``, measured
      from the end ``b`` of the previous window (so about ``-fpWeight`` far after it), or
      ``-fpWeight`` when no window precedes it.

    Args:
        detections: ``(T,)`` bool, True = the detector alarms at the row.
        timestamps: ``(T,)`` increasing Unix seconds of the rows.
        windows: labelled windows ``(start, end)``, Unix seconds, inclusive, disjoint.
        cost_matrix: one profile's ``CostMatrix``, e.g.
            ``NAB_PROFILES["standard"]["CostMatrix"]``.
    """
    rows = _nab_rows(timestamps, windows, cost_matrix, probationary_percent)
    return _nab_score_rows(rows, detections, cost_matrix["fnWeight"])


def _nab_perfect_rows(rows: _NabRows, fn_weight: float) -> float:
    """Raw score of one alarm at each window's first row on a file's precomputed rows."""
    detections = np.zeros(rows.weight.size, dtype=bool)
    detections[rows.first_row] = True
    return _nab_score_rows(rows, detections, fn_weight)


def nab_null_raw_score(
    timestamps: np.ndarray,
    windows: Sequence[tuple[float, float]],
    cost_matrix: Mapping[str, float],
    probationary_percent: float = NAB_PROBATIONARY_PERCENT,
) -> float:
    """Raw score of a detector that never alarms: ``-fnWeight`` per scored window.

    Upstream's null detector (constant score, best threshold) reaches exactly this on NAB, where
    alarming everywhere costs more; it is the 0 of the normalised score.
    """
    rows = _nab_rows(timestamps, windows, cost_matrix, probationary_percent)
    return -float(cost_matrix["fnWeight"]) * float(rows.scored_window.sum())


def nab_perfect_raw_score(
    timestamps: np.ndarray,
    windows: Sequence[tuple[float, float]],
    cost_matrix: Mapping[str, float],
    probationary_percent: float = NAB_PROBATIONARY_PERCENT,
) -> float:
    """Raw score of one alarm at each window's first row and none elsewhere: the 100 of NAB.

    Equals upstream's ``tpWeight * number of windows`` whenever no window overlaps the
    probationary period, as in the NAB corpus.
    """
    rows = _nab_rows(timestamps, windows, cost_matrix, probationary_percent)
    return _nab_perfect_rows(rows, cost_matrix["fnWeight"])


def nab_normalized_score(raw_total: float, null_total: float, perfect_total: float) -> float:
    """NAB's reported score ``100 * (raw - null) / (perfect - null)`` (upstream ``normalize``).

    Totals are summed over the files of the corpus: 0 = never alarming, 100 = every window found
    at its first row without false alarms; negative is worse than silence. NaN when
    ``perfect == null`` (no window to find).
    """
    span = perfect_total - null_total
    if span == 0:
        return math.nan
    return 100.0 * (raw_total - null_total) / span


def _nab_corpus(
    scores_per_file: Sequence[np.ndarray],
    timestamps_per_file: Sequence[np.ndarray],
    windows_per_file: Sequence[Sequence[tuple[float, float]]],
    cost_matrix: Mapping[str, float],
    probationary_percent: float,
) -> tuple[list[tuple[np.ndarray, _NabRows]], float, float]:
    """Per file ``(scores, rows)``, and the corpus' null and perfect raw totals."""
    fn_weight = float(cost_matrix["fnWeight"])
    files = []
    null_total = 0.0
    perfect_total = 0.0
    for scores, timestamps, windows in zip(
        scores_per_file, timestamps_per_file, windows_per_file, strict=True
    ):
        rows = _nab_rows(timestamps, windows, cost_matrix, probationary_percent)
        s = np.asarray(scores, dtype=float).ravel()
        if s.size != rows.weight.size:
            raise ValueError(f"scores has {s.size} rows but timestamps has {rows.weight.size}")
        files.append((s, rows))
        null_total -= fn_weight * float(rows.scored_window.sum())
        perfect_total += _nab_perfect_rows(rows, fn_weight)
    return files, null_total, perfect_total


def nab_score_at(
    scores_per_file: Sequence[np.ndarray],
    timestamps_per_file: Sequence[np.ndarray],
    windows_per_file: Sequence[Sequence[tuple[float, float]]],
    cost_matrix: Mapping[str, float],
    threshold: float,
    probationary_percent: float = NAB_PROBATIONARY_PERCENT,
) -> float:
    """Normalised NAB score of the corpus with alarm = ``score >= threshold`` (NaN never alarms).

    The score at a threshold fixed in advance (e.g. the product's operating threshold), as
    opposed to :func:`nab_best_threshold`'s tuned-on-the-answers one.
    """
    files, null_total, perfect_total = _nab_corpus(
        scores_per_file, timestamps_per_file, windows_per_file, cost_matrix, probationary_percent
    )
    raw_total = sum(
        _nab_score_rows(rows, s >= threshold, cost_matrix["fnWeight"]) for s, rows in files
    )
    return nab_normalized_score(raw_total, null_total, perfect_total)


def nab_best_threshold(
    scores_per_file: Sequence[np.ndarray],
    timestamps_per_file: Sequence[np.ndarray],
    windows_per_file: Sequence[Sequence[tuple[float, float]]],
    cost_matrix: Mapping[str, float],
    probationary_percent: float = NAB_PROBATIONARY_PERCENT,
) -> tuple[float, float]:
    """One threshold for the whole corpus maximising the summed raw NAB score, as ``--optimize``.

    Like upstream's optimiser (``Sweeper.calcScoreByThreshold`` over the rows of all files), the
    search is exact over every distinct score in the corpus, plus "never alarm": the summed score
    at threshold ``t`` is the never-alarm score plus per-row increments of the rows with
    ``score >= t`` (an FP row's cost; for a window row, how much it raises its window's best
    alarm), so one sort and a cumulative sum give every threshold. Ties go to the highest
    threshold. NaN scores never alarm.

    Returns:
        ``(threshold, normalised score)``; alarm = ``score >= threshold``, and ``inf`` when never
        alarming scores best.
    """
    files, null_total, perfect_total = _nab_corpus(
        scores_per_file, timestamps_per_file, windows_per_file, cost_matrix, probationary_percent
    )
    fn_weight = float(cost_matrix["fnWeight"])
    row_scores: list[np.ndarray] = [np.empty(0)]
    increments: list[np.ndarray] = [np.empty(0)]
    for s, rows in files:
        active = ~np.isnan(s) & ~np.isnan(rows.weight)
        false_positive = active & (rows.window_id < 0)
        row_scores.append(s[false_positive])
        increments.append(rows.weight[false_positive])
        for window in np.flatnonzero(rows.scored_window):
            in_window = active & (rows.window_id == window)
            order = np.argsort(-s[in_window], kind="stable")
            best_so_far = np.maximum.accumulate(
                np.concatenate(([-fn_weight], rows.weight[in_window][order]))
            )
            row_scores.append(s[in_window][order])
            increments.append(np.diff(best_so_far))

    all_scores = np.concatenate(row_scores)
    order = np.argsort(-all_scores, kind="stable")
    sorted_scores = all_scores[order]
    cumulative = np.cumsum(np.concatenate(increments)[order])
    last_of_value = _last_of_each_value(sorted_scores)
    totals = np.concatenate(([null_total], null_total + cumulative[last_of_value]))
    thresholds = np.concatenate(([math.inf], sorted_scores[last_of_value]))
    best = int(np.argmax(totals))
    return float(thresholds[best]), nab_normalized_score(
        float(totals[best]), null_total, perfect_total
    )
