"""Does feedback help? The next fit with and without an engineer's labels, on SMD.

Each machine's test split is cut in two halves in time; the product is replayed over it:

1. **While the first half streams in**, the model fitted on the train split alone scores it, and
   the agent's event rule (:func:`replay_events`: open at fused score >= ``open_score``, close
   after ``close_after_steps`` consecutive scored steps below ``close_score``) turns the fused
   score into anomaly events. The engineer labels every one: ``true_positive`` where it overlaps
   a labelled anomaly of the ground truth, else ``false_positive``.
2. **Before** (no feedback): the next fit reads the train split followed by the first half, its
   last ``calibration_fraction`` being the calibration slice (:meth:`FittedModel.fit_split`),
   with equal fused weights and the unlabelled beta-uniform probability; it scores the second
   half.
3. **After** (feedback): the same fit window, but the true-positive events, widened by
   ``margin_steps``, are left out of the training and calibration data
   (:mod:`aiops_plugin.fit_exclusions`), the fused combination is weighted by
   :func:`~aiops_plugin.feedback.detector_weights`, and the probability is
   :func:`~aiops_plugin.feedback.labelled_probability` (the calibration slice's fused p-values
   as normal); with fewer than ``min_labelled_events`` labels (or one kind only) it falls back
   to the mixture, and the machine is counted.

Both fits score the second half (each detector's context read from the end of the first), and are
measured on it alone: VUS-PR of the fused score, false alarms per day (false-positive events and
normal steps at score >= 1), event recall at score >= 1, ECE and Brier of the probability. No
setting is chosen on the second halves.

The unlabelled mixture is refitted every ``probability_refit_steps`` steps (the agent refits it
every cycle, ~30-50 ms each on 5000 p-values, which would cost ~10 min per machine here); each
block's probabilities come from the fit on the p-values before it, so nothing is looked up ahead.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aiops_plugin.calibration import score_from_p
from aiops_plugin.calibration.stage import GroupCalibration, RecentProbability
from aiops_plugin.config import (
    CalibrationConfig,
    DetectorsConfig,
    EventsConfig,
    FeedbackConfig,
    ScheduleConfig,
)
from aiops_plugin.detectors.registry import FittedModel
from aiops_plugin.evaluation import datasets, metrics
from aiops_plugin.evaluation.benchmark import (
    CALIBRATION_BINS,
    FUSED,
    OPERATING_THRESHOLD,
    _fit_detectors,
    _write_rows,
    machine_description,
    series_windows,
    write_markdown_section,
)
from aiops_plugin.feedback import (
    FALSE_POSITIVE,
    TRUE_POSITIVE,
    detector_weights,
    labelled_probability,
)
from aiops_plugin.fit_exclusions import exclusion_mask, incident_periods, without_excluded

DEFAULT_DETECTORS = ("mad", "pca")
DEFAULT_FALSE_ALARM_RATE = 0.01
SECTION = "feedback"
_SECONDS_PER_DAY = 86_400.0
_CALIBRATION = CalibrationConfig()
_EVENTS = EventsConfig()


@dataclass(frozen=True)
class FeedbackSettings:
    """Everything a run is configured with; the defaults are the product's."""

    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    calibration_fraction: float = _CALIBRATION.calibration_fraction
    tail_fraction: float = _CALIBRATION.tail_fraction
    recent_p_values: int = _CALIBRATION.recent_p_values
    open_score: float = ScheduleConfig().event_min_score
    close_score: float = _EVENTS.close_score
    close_after_steps: int = _EVENTS.close_after_steps
    min_labelled_events: int = FeedbackConfig().min_labelled_events
    #: rows excluded before and after each confirmed incident
    margin_steps: int = 5
    probability_refit_steps: int = 60


@dataclass(frozen=True)
class ReplayedEvent:
    """An anomaly event as the agent's event rule opens it over a scored span.

    ``start``: first row (score >= open_score); ``end``: the row after it, the first of the
    quiet steps that closed it (the span's end while still open); ``peak_score``: the fused
    exported score at the peak row; ``detector_scores``: each detector's exported score there.
    """

    start: int
    end: int
    peak: int
    peak_score: float
    detector_scores: dict[str, float] = field(default_factory=dict)


def replay_events(
    fused: np.ndarray,
    detector_scores: dict[str, np.ndarray],
    open_score: float = 1.0,
    close_score: float = 0.7,
    close_after_steps: int = 3,
) -> list[ReplayedEvent]:
    """The events the agent would open on exported scores ``fused`` ``(T,)``.

    Same rule as the store's event tracking, vectorised: NaN steps say nothing (skipped); a run
    of at least ``close_after_steps`` scored steps below ``close_score`` separates segments, and
    in each segment an event opens at the first step >= ``open_score`` and lasts to the
    segment's end (shorter quiet runs inside do not close it). ``detector_scores``: detector ->
    ``(T,)`` exported scores, read at each event's peak.
    """
    if close_score > open_score:
        raise ValueError(f"close_score ({close_score}) must not exceed open_score ({open_score})")
    fused = np.asarray(fused, dtype=np.float64)
    scored = np.flatnonzero(~np.isnan(fused))
    s = fused[scored]
    n = s.size
    quiet = np.concatenate(([False], s < close_score, [False]))
    change = np.flatnonzero(quiet[1:] != quiet[:-1])
    quiet_starts, quiet_ends = change[0::2], change[1::2]
    closing = quiet_ends - quiet_starts >= close_after_steps
    segment_starts = np.concatenate(([0], quiet_ends[closing]))
    segment_ends = np.concatenate((quiet_starts[closing], [n]))
    opening = np.flatnonzero(s >= open_score)
    segment = np.searchsorted(segment_starts, opening, side="right") - 1
    segments, first = np.unique(segment, return_index=True)
    opens, closes = opening[first], segment_ends[segments]
    if not opens.size:
        return []
    positions = np.arange(n)
    owner = np.searchsorted(opens, positions, side="right") - 1
    inside = (owner >= 0) & (positions < closes[np.maximum(owner, 0)])
    candidates, owners = positions[inside], owner[inside]
    order = np.lexsort((-s[candidates], owners))
    peaks = scored[candidates[order][np.unique(owners[order], return_index=True)[1]]]
    starts = scored[opens]
    ends = np.where(closes < n, scored[np.minimum(closes, n - 1)], fused.size)
    at_peaks = {
        name: np.asarray(values, np.float64)[peaks] for name, values in detector_scores.items()
    }
    return [
        ReplayedEvent(
            int(start),
            int(end),
            int(peak),
            float(fused[peak]),
            {name: float(values[i]) for name, values in at_peaks.items()},
        )
        for i, (start, end, peak) in enumerate(zip(starts, ends, peaks, strict=True))
    ]


def label_events(
    events: Sequence[ReplayedEvent], labels: np.ndarray
) -> list[tuple[ReplayedEvent, str]]:
    """The engineer's labels: ``true_positive`` where the event's rows overlap a labelled
    anomaly (``labels`` ``(T,)``, 1 = anomalous), else ``false_positive``."""
    if not events:
        return []
    anomalous = np.concatenate(([0], np.cumsum(np.asarray(labels) > 0)))
    starts = np.array([event.start for event in events])
    ends = np.array([event.end for event in events])
    overlaps = anomalous[ends] > anomalous[starts]
    return [
        (event, TRUE_POSITIVE if hit else FALSE_POSITIVE)
        for event, hit in zip(events, overlaps, strict=True)
    ]


@dataclass
class FittedGroup:
    """One fit of a machine's detectors and their group calibration."""

    models: dict[str, FittedModel]
    calibration: GroupCalibration
    #: fit-window rows left out (confirmed incidents with their margin)
    excluded_steps: int = 0


def fit_group(
    series: datasets.LabelledSeries,
    history: np.ndarray,
    settings: FeedbackSettings,
    device: torch.device,
    weights: dict[str, float] | None = None,
    incidents: Sequence[tuple[int, int]] = (),
    detectors: DetectorsConfig | None = None,
) -> FittedGroup:
    """Fit on ``history`` ``(time, features)`` as the agent's fit does, with fused ``weights``
    (None: equal); ``incidents``: confirmed ``[start, end)`` rows of ``history``, excluded with
    ``settings.margin_steps`` on both sides from training (values unobserved) and calibration
    (raw scores dropped)."""
    windows = series_windows(series, history)
    step = series.step_seconds
    periods = incident_periods(
        [((start * step), (end - 1) * step, windows.group, {}) for start, end in incidents],
        now=float(windows.timestamps[-1]),
    )
    mask, _ = exclusion_mask(windows, periods, settings.margin_steps * step)
    models, raw, _ = _fit_detectors(
        series,
        without_excluded(windows, mask).values[0],
        settings.detectors,
        detectors or DetectorsConfig(),
        device,
        settings.calibration_fraction,
    )
    raw = {name: np.where(mask[:, -r.shape[1] :], np.nan, r) for name, r in raw.items()}
    calibration = GroupCalibration(list(settings.detectors), settings.tail_fraction, weights).fit(
        raw, windows.keys
    )
    return FittedGroup(models, calibration, int(mask.sum()))


def score_span(
    series: datasets.LabelledSeries, full: np.ndarray, fitted: FittedGroup, start: int, end: int
) -> dict[str, np.ndarray]:
    """p-values ``(end - start,)`` per detector and ``fused`` of rows ``[start, end)`` of
    ``full`` (train followed by test), each detector's context read from the rows before."""
    keys = series_windows(series, full[:1]).keys
    raw = {}
    for name, model in fitted.models.items():
        context = min(model.detector.context_steps, start)
        values = series_windows(series, full[start - context : end])
        raw[name] = model.score(values).score[:, context:]
    return {
        name: np.asarray(p[0], np.float64)
        for name, p in fitted.calibration.p_values(raw, keys).items()
    }


def mixture_probability(
    calibration: GroupCalibration, fused_p: np.ndarray, capacity: int, refit_steps: int
) -> np.ndarray:
    """The unlabelled P(anomalous) of ``fused_p`` ``(T,)``: the agent's
    :class:`RecentProbability`, seeded from the calibration slice, refitted every
    ``refit_steps`` steps on the p-values before them."""
    recent = RecentProbability(capacity).seed(calibration.fused_calibration_p_)
    probability = np.full(fused_p.shape, np.nan)
    for begin in range(0, fused_p.size, refit_steps):
        block = fused_p[begin : begin + refit_steps]
        probability[begin : begin + refit_steps] = recent.probability(block)
        recent.update(block)
    return probability


@dataclass
class FeedbackMetrics:
    """One machine, measured on the second half of its test split, before and after feedback.

    ``false_events_per_day``: replayed events overlapping no labelled anomaly, per day;
    ``alarm_steps_per_day``: normal steps at fused score >= 1 per day; ``event_recall``: labelled
    anomalies with a step at score >= 1; ``brier_constant``: Brier of always predicting the
    half's anomaly share (a probability above it has no skill).
    """

    entity: str
    rows: int
    anomalous_rows: int
    #: labelled anomalies (segments) in the second half
    anomalies: int
    labelled_events: int
    true_positives: int
    false_positives: int
    labelled_probability: bool
    excluded_steps: int
    weights: str
    vus_pr_before: float
    vus_pr_after: float
    false_events_per_day_before: float
    false_events_per_day_after: float
    alarm_steps_per_day_before: float
    alarm_steps_per_day_after: float
    event_recall_before: float
    event_recall_after: float
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    brier_constant: float
    seconds: float


@dataclass(frozen=True)
class SpanCounts:
    """What an on-call engineer sees over a scored span: false-positive events, normal steps at
    score >= 1, labelled anomalies with a step at score >= 1, and all labelled anomalies."""

    false_events: int
    alarm_steps: int
    detected: int
    anomalies: int


@dataclass
class FeedbackEntity:
    """A machine's metrics and the second-half arrays that pooling needs."""

    metrics: FeedbackMetrics
    labels: np.ndarray
    scores_before: np.ndarray
    scores_after: np.ndarray
    probability_before: np.ndarray
    probability_after: np.ndarray
    counts_before: SpanCounts
    counts_after: SpanCounts
    step_seconds: float


def _span_counts(
    scores: np.ndarray, labels: np.ndarray, step_seconds: float, settings: FeedbackSettings
) -> SpanCounts:
    """:class:`SpanCounts` of exported fused scores ``(T,)`` against ``labels``."""
    events = replay_events(
        scores, {}, settings.open_score, settings.close_score, settings.close_after_steps
    )
    false_events = sum(label == FALSE_POSITIVE for _, label in label_events(events, labels))
    alarms = int(np.count_nonzero((scores >= OPERATING_THRESHOLD) & (labels == 0)))
    found = metrics.event_metrics(scores, labels, OPERATING_THRESHOLD, step_seconds)
    return SpanCounts(false_events, alarms, found.detected_events, found.n_events)


def evaluate_feedback(
    series: datasets.LabelledSeries,
    settings: FeedbackSettings | None = None,
    device: torch.device | None = None,
    detectors: DetectorsConfig | None = None,
) -> FeedbackEntity:
    """One machine through the three fits (module docstring): its before / after metrics."""
    started = time.perf_counter()
    settings = settings or FeedbackSettings()
    device = device or torch.device("cpu")
    rate = settings.false_alarm_rate
    n_train, n_test = len(series.train), len(series.test)
    half = n_test // 2
    full = np.concatenate([series.train, series.test])
    labels = series.test_labels.astype(np.int8)

    running = fit_group(series, series.train, settings, device, detectors=detectors)
    first = score_span(series, full, running, n_train, n_train + half)
    exported = {name: score_from_p(p, rate) for name, p in first.items()}
    events = replay_events(
        exported.pop(FUSED),
        exported,
        settings.open_score,
        settings.close_score,
        settings.close_after_steps,
    )
    labelled = label_events(events, labels[:half])
    incidents = [
        (n_train + event.start, n_train + event.end)
        for event, label in labelled
        if label == TRUE_POSITIVE
    ]

    history = full[: n_train + half]
    before = fit_group(series, history, settings, device, detectors=detectors)
    weights = detector_weights(labelled, list(settings.detectors))
    after = fit_group(series, history, settings, device, weights, incidents, detectors)

    second = labels[half:]
    p_before = score_span(series, full, before, n_train + half, n_train + n_test)[FUSED]
    p_after = score_span(series, full, after, n_train + half, n_train + n_test)[FUSED]
    probability_before = mixture_probability(
        before.calibration, p_before, settings.recent_p_values, settings.probability_refit_steps
    )
    model = labelled_probability(
        labelled, rate, after.calibration.fused_calibration_p_, settings.min_labelled_events
    )
    probability_after = (
        mixture_probability(
            after.calibration, p_after, settings.recent_p_values, settings.probability_refit_steps
        )
        if model is None
        else model.probability(p_after)
    )
    scores_before, scores_after = score_from_p(p_before, rate), score_from_p(p_after, rate)
    days = second.size * series.step_seconds / _SECONDS_PER_DAY
    counts_before = _span_counts(scores_before, second, series.step_seconds, settings)
    counts_after = _span_counts(scores_after, second, series.step_seconds, settings)
    share = float(second.mean()) if second.size else math.nan
    true_positives = sum(label == TRUE_POSITIVE for _, label in labelled)
    row = FeedbackMetrics(
        entity=series.entity,
        rows=int(second.size),
        anomalous_rows=int(second.sum()),
        labelled_events=len(labelled),
        true_positives=true_positives,
        false_positives=len(labelled) - true_positives,
        labelled_probability=model is not None,
        excluded_steps=after.excluded_steps,
        weights=", ".join(f"{name}={w:.2f}" for name, w in weights.items()) or "equal",
        vus_pr_before=metrics.vus_pr(scores_before, second),
        vus_pr_after=metrics.vus_pr(scores_after, second),
        anomalies=counts_before.anomalies,
        false_events_per_day_before=counts_before.false_events / days,
        false_events_per_day_after=counts_after.false_events / days,
        alarm_steps_per_day_before=counts_before.alarm_steps / days,
        alarm_steps_per_day_after=counts_after.alarm_steps / days,
        event_recall_before=_ratio(counts_before.detected, counts_before.anomalies),
        event_recall_after=_ratio(counts_after.detected, counts_after.anomalies),
        ece_before=metrics.expected_calibration_error(probability_before, second, CALIBRATION_BINS),
        ece_after=metrics.expected_calibration_error(probability_after, second, CALIBRATION_BINS),
        brier_before=metrics.brier_score(probability_before, second),
        brier_after=metrics.brier_score(probability_after, second),
        brier_constant=share * (1.0 - share),
        seconds=time.perf_counter() - started,
    )
    return FeedbackEntity(
        row,
        second,
        scores_before,
        scores_after,
        probability_before,
        probability_after,
        counts_before,
        counts_after,
        series.step_seconds,
    )


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


@dataclass
class FeedbackRun:
    command: str
    settings: FeedbackSettings
    entities: list[FeedbackEntity]
    wall_seconds: float
    machine: str

    @property
    def rows(self) -> list[FeedbackMetrics]:
        return [entity.metrics for entity in self.entities]

    @cached_property
    def pooled(self) -> dict[str, float]:
        """The metrics over all machines' second halves concatenated (false alarms: totals
        over total days), keyed as :class:`FeedbackMetrics` ``*_before`` / ``*_after``."""
        y = np.concatenate([e.labels for e in self.entities])
        days = sum(e.labels.size * e.step_seconds for e in self.entities) / _SECONDS_PER_DAY
        pooled = {"brier_constant": float(y.mean() * (1.0 - y.mean()))}
        for when in ("before", "after"):
            scores = np.concatenate([getattr(e, f"scores_{when}") for e in self.entities])
            probability = np.concatenate([getattr(e, f"probability_{when}") for e in self.entities])
            counts = [getattr(e, f"counts_{when}") for e in self.entities]
            pooled |= {
                f"vus_pr_{when}": metrics.vus_pr(scores, y),
                f"false_events_per_day_{when}": sum(c.false_events for c in counts) / days,
                f"alarm_steps_per_day_{when}": sum(c.alarm_steps for c in counts) / days,
                f"event_recall_{when}": _ratio(
                    sum(c.detected for c in counts), sum(c.anomalies for c in counts)
                ),
                f"ece_{when}": metrics.expected_calibration_error(probability, y, CALIBRATION_BINS),
                f"brier_{when}": metrics.brier_score(probability, y),
            }
        return pooled


def run_feedback_benchmark(
    entities: Sequence[str] | None = None,
    data_root: Path | None = None,
    settings: FeedbackSettings | None = None,
    device: torch.device | None = None,
    command: str = "",
    progress: bool = True,
) -> FeedbackRun:
    """Every SMD machine found (or ``entities``) through :func:`evaluate_feedback`."""
    started = time.perf_counter()
    settings = settings or FeedbackSettings()
    torch.manual_seed(0)
    device = device or torch.device("cpu")
    all_series = datasets.load_datasets(["smd"], entities, data_root)
    evaluated = [
        evaluate_feedback(series, settings, device)
        for series in tqdm(all_series, desc="feedback", unit="machine", disable=not progress)
    ]
    return FeedbackRun(
        command,
        settings,
        evaluated,
        time.perf_counter() - started,
        machine_description(device),
    )


# ------------------------------------------------------------------------------------ report
_COLUMNS = (
    ("vus_pr", "VUS-PR (fused)", 3),
    ("false_events_per_day", "false-positive events/day", 1),
    ("alarm_steps_per_day", "normal steps >= 1 per day", 1),
    ("event_recall", "event recall @1", 3),
    ("ece", "ECE of P(anomalous)", 4),
    ("brier", "Brier of P(anomalous)", 4),
)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _change(before: float, after: float, digits: int) -> str:
    if not (math.isfinite(before) and math.isfinite(after)):
        return "n/a"
    return f"{after - before:+.{digits}f}"


#: metric key -> whether a higher value is better
_HIGHER_IS_BETTER = {
    "vus_pr": True,
    "false_events_per_day": False,
    "alarm_steps_per_day": False,
    "event_recall": True,
    "ece": False,
    "brier": False,
}


def feedback_reading(run: FeedbackRun) -> str:
    """Which pooled metrics feedback improved, which it worsened, and on how many machines,
    whether the probability has skill, stated from the numbers (so it cannot drift from them)."""
    pooled = run.pooled
    verdicts: dict[str, list[str]] = {"Improved": [], "Worsened": [], "Unchanged": []}
    for key, title, digits in _COLUMNS:
        before, after = pooled[f"{key}_before"], pooled[f"{key}_after"]
        sign = 1.0 if _HIGHER_IS_BETTER[key] else -1.0
        changes = [
            sign * (getattr(row, f"{key}_after") - getattr(row, f"{key}_before"))
            for row in run.rows
        ]
        better = sum(change > 0 for change in changes if math.isfinite(change))
        worse = sum(change < 0 for change in changes if math.isfinite(change))
        phrase = (
            f"{title} {_fmt(before, digits)} -> {_fmt(after, digits)} "
            f"(better on {better}, worse on {worse} of {len(run.rows)} machines)"
        )
        finite = math.isfinite(before) and math.isfinite(after)
        if not finite or round(after, digits) == round(before, digits):
            verdicts["Unchanged"].append(phrase)
        elif sign * (after - before) > 0:
            verdicts["Improved"].append(phrase)
        else:
            verdicts["Worsened"].append(phrase)
    said = [f"{verdict}: {'; '.join(phrases)}." for verdict, phrases in verdicts.items() if phrases]
    constant = pooled["brier_constant"]
    skill = [
        f"{when} {_fmt(pooled[f'brier_{when}'], 4)}"
        + (" (skill)" if pooled[f"brier_{when}"] < constant else " (no skill)")
        for when in ("before", "after")
    ]
    said.append(
        f"Brier of P(anomalous) against the constant forecast's {_fmt(constant, 4)}: "
        + ", ".join(skill)
        + "."
    )
    unlabelled = [row.entity for row in run.rows if not row.labelled_events]
    if unlabelled:
        said.append(
            f"{len(unlabelled)} machine(s) ({', '.join(unlabelled)}) raised no event in the "
            "first half (the model fitted on the train split never reached fused score 1 there), "
            "so they had nothing to label and are the same before and after."
        )
    said.append(
        "The labels here are the ground truth, given to every event of the first half; real "
        "feedback is sparser and sometimes wrong, so this is about the most labels can do with "
        "these detectors, not what a typical team will see."
    )
    return "Reading (pooled unless said otherwise). " + " ".join(said)


def feedback_markdown(run: FeedbackRun) -> str:
    """The "Feedback: before and after" section: command, settings, the pooled summary, the
    per-machine table and the reading."""
    s = run.settings
    rows = run.rows
    pooled = run.pooled
    fallback = sum(not row.labelled_probability for row in rows)
    lines = [
        "## Feedback: before and after",
        "",
        f"Command: `{run.command}`",
        "",
        f"Machine: {run.machine}. Wall time: {run.wall_seconds:.0f} s. Data: SMD, "
        f"{len(rows)} machines ({', '.join(row.entity for row in rows)}), each test split cut "
        "in two halves in time. Detectors: "
        + " + ".join(f"`{name}`" for name in s.detectors)
        + f", fused; false_alarm_rate = {s.false_alarm_rate} (a user's setting: 1.0 on the "
        "exported scale is that rate), calibration_fraction = "
        f"{s.calibration_fraction}, tail_fraction = {s.tail_fraction}.",
        "",
        "- **Feedback**: the model fitted on the train split scores the first half; the "
        f"agent's event rule (open at fused score >= {s.open_score}, close after "
        f"{s.close_after_steps} consecutive steps below {s.close_score}) raises events, each "
        "labelled true_positive if it overlaps a labelled anomaly, else false_positive.",
        "- **Before**: fit on the train split followed by the first half (its last "
        f"{s.calibration_fraction:.0%} the calibration slice), equal weights, the unlabelled "
        "beta-uniform probability (refitted every "
        f"{s.probability_refit_steps} steps on the p-values before them).",
        "- **After**: the same fit window without the true-positive events "
        f"(+- {s.margin_steps} steps), `detector_weights` in the fused combination, and the "
        "labelled (isotonic) probability with the calibration slice's fused p-values as normal; "
        f"{fallback} of {len(rows)} machines had fewer than {s.min_labelled_events} labelled "
        "events (or one kind only) and kept the mixture. The calibration slice lies in the "
        "first half, so before feedback it holds that half's incidents, whose extreme scores "
        "raise the thresholds; leaving them out lowers the thresholds toward what normal data "
        "gives, which moves alarms on incidents and false alarms alike.",
        "- Measured on the second half only, which no choice here looked at.",
        "",
        "Pooled over the machines' second halves (false alarms: total over total days; "
        "VUS-PR, ECE, Brier of the concatenation; event recall over all labelled anomalies), "
        "and the mean over machines:",
        "",
        "| metric | before | after | change | mean before | mean after |",
        "|---|---|---|---|---|---|",
    ]
    for key, title, digits in _COLUMNS:
        b, a = pooled[f"{key}_before"], pooled[f"{key}_after"]
        mean_b = float(np.nanmean([getattr(r, f"{key}_before") for r in rows]))
        mean_a = float(np.nanmean([getattr(r, f"{key}_after") for r in rows]))
        lines.append(
            f"| {title} | {_fmt(b, digits)} | {_fmt(a, digits)} | {_change(b, a, digits)} | "
            f"{_fmt(mean_b, digits)} | {_fmt(mean_a, digits)} |"
        )
    lines += [
        "",
        f"Brier of the constant forecast (the pooled anomaly share): "
        f"{_fmt(pooled['brier_constant'], 4)}. Labelled events: "
        f"{sum(r.labelled_events for r in rows)} ({sum(r.true_positives for r in rows)} true, "
        f"{sum(r.false_positives for r in rows)} false positives).",
        "",
        "Per machine (before -> after):",
        "",
        "| machine | labelled (TP/FP) | P model after | excluded rows | weights | "
        + " | ".join(title for _, title, _ in _COLUMNS)
        + " |",
        "|" + "---|" * (5 + len(_COLUMNS)),
    ]
    for row in rows:
        cells = [
            row.entity,
            f"{row.labelled_events} ({row.true_positives}/{row.false_positives})",
            "labelled" if row.labelled_probability else "mixture",
            str(row.excluded_steps),
            row.weights,
        ]
        cells += [
            f"{_fmt(getattr(row, f'{key}_before'), digits)} -> "
            f"{_fmt(getattr(row, f'{key}_after'), digits)}"
            for key, _, digits in _COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", feedback_reading(run)]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    defaults = FeedbackSettings()
    parser = argparse.ArgumentParser(
        prog="python -m aiops_plugin.evaluation.feedback_benchmark",
        description="The next fit without and with feedback labels on SMD (before / after).",
    )
    parser.add_argument("--entities", help="comma-separated SMD machines (default: all found)")
    parser.add_argument(
        "--data-root", type=Path, help="folder holding smd/ (default ../shared/data)"
    )
    parser.add_argument(
        "--detectors", default=",".join(defaults.detectors), help="comma-separated detectors"
    )
    parser.add_argument(
        "--false-alarm-rate",
        type=float,
        default=defaults.false_alarm_rate,
        help="configured false-alarm rate: score 1.0 (default %(default)s)",
    )
    parser.add_argument(
        "--margin-steps",
        type=int,
        default=defaults.margin_steps,
        help="rows excluded around each confirmed incident (default %(default)s)",
    )
    parser.add_argument(
        "--probability-refit-steps",
        type=int,
        default=defaults.probability_refit_steps,
        help="steps between refits of the unlabelled mixture (default %(default)s)",
    )
    parser.add_argument("--csv", type=Path, help="write the per-machine rows to this CSV")
    parser.add_argument(
        "--markdown", type=Path, help="write the 'feedback' section of this file (at the end)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = FeedbackSettings(
        detectors=tuple(name.strip() for name in args.detectors.split(",") if name.strip()),
        false_alarm_rate=args.false_alarm_rate,
        margin_steps=args.margin_steps,
        probability_refit_steps=args.probability_refit_steps,
    )
    command = "python -m aiops_plugin.evaluation.feedback_benchmark " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    try:
        run = run_feedback_benchmark(
            [name.strip() for name in args.entities.split(",")] if args.entities else None,
            args.data_root,
            settings,
            command=command.strip(),
        )
    except datasets.DatasetError as exc:
        raise SystemExit(f"error: {exc}") from exc
    text = feedback_markdown(run)
    if args.csv:
        _write_rows(run.rows, FeedbackMetrics, args.csv)
    if args.markdown:
        write_markdown_section(args.markdown, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
