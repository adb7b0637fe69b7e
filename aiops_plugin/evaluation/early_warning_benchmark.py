"""How early, and how well calibrated, the early warning is on real labelled data.

Per entity of SMD, ASD and NAB (each entity one group, as in :mod:`.benchmark`), on the agent's
schedule (``schedule.fit_every`` / ``fit_window``, by default a refit every day on the trailing
week): before every day of the test split the detectors are fitted with
:meth:`~aiops_plugin.detectors.registry.FittedModel.fit_split` on the earlier 75 % of the
trailing week of history (the train split followed by the test rows before the refit) and the
group calibrated on the rest (:func:`.benchmark._fit_detectors`), the early warning
(:class:`~aiops_plugin.early_warning.GroupEarlyWarning`) is fitted on that calibration slice's
exported fused scores (and the forecaster's forecasts, when it is among the detectors), and the
day is scored as the agent would score it, cycle after cycle (:meth:`GroupEarlyWarning.replay`):
the fused score, the anomaly probability P(anomalous now) and the early-warning probability of
each default horizon (5, 15, 30 min, in steps of the dataset, rounded up). ``--single-fit``
fits once on the train split and scores the whole test split with it (the literature's
protocol; by the end of SMD's test split its calibration is 16 days old, which the agent never
lets happen). The beta-uniform mixtures behind both probabilities are refitted every
``refit_seconds`` of data instead of every step (the agent refits them every cycle), on the
p-values before the step, to keep the run within minutes on two cores. ``--ramp`` (the metrics'
own lines, ``early_warning.ramp``) and ``--trend-steps N`` run the early warning with those
settings, each into a section of its own beside the default's.

What is measured, per horizon ``h`` (``H`` steps):

- **Warned before the start**: the share of labelled events with an alarm in the ``H`` steps
  before their labelled start, and the median lead time of those alarms
  (:func:`~aiops_plugin.evaluation.metrics.event_metrics` with ``early_window_steps = H``); a
  false warning is an alarm run touching no event extended by ``H`` steps, counted per
  entity-day. Two signals at **the same false-warning rate**: the plain fused score crossing
  1.0 (the product's threshold, no early warning), and the early-warning probability above a
  threshold chosen so that it gives no more false warnings than the fused score does. The
  threshold is chosen on the other half of the dataset's entities (first half <-> second half,
  in load order; each half is evaluated at the threshold chosen on the other), never on the
  entities it is evaluated on; the rate it is matched to is the fused score's on that same
  other half. Candidate thresholds are scanned from the top down and the scan stops at the
  first one that gives more false warnings per entity-day, or more of the time outside events
  in alarm, than the fused score does there: alarms that merge into a few endless runs count as
  few false warnings, and the time bound rules such thresholds out. Beside it, as an upper
  bound, the early warning with its threshold tuned by the same rule on the very entities it is
  evaluated on. And the **early-warning score** (exported as ``aiops_early_warning_score``): the
  same evidence before the mixture, tempered by the gate where there is one, its combined
  p-value on the exported score's scale (1.0 at the false-alarm rate), per
  entity calibrated on its own calibration slice, at 1.0 (the rule the fused score is held to,
  nothing chosen on any data) and by the two threshold rules above. Event by event
  (:func:`paired_rows`): the events only the early-warning score at 1.0 warned of before their
  start against those only the fused score at 1.0 did, with the exact McNemar test, so a
  difference of an event or two reads as what it is.
- **Calibration**: ECE (10 equal-width bins) and Brier score of each horizon's probability
  against the label "a labelled event starts within the next ``H`` steps", over the steps
  outside labelled events (inside one the entity already is anomalous, which the anomaly
  probability reports), pooled per dataset; next to the Brier score of the constant base rate
  (no skill) and, for reference, the anomaly probability P(anomalous now) against the same label.
- **Before the labelled start** (what any threshold could warn of): for the fused score and
  each horizon's early-warning score, the share of events whose maximum over the ``H`` steps
  before their start exceeds the signal's 99th / 99.9th percentile of the entity's steps
  outside events, next to the share of the quiet ``H``-step windows (clear of every event
  extended by ``H``) that do (:func:`precursor_rows`). Where the two shares are alike, nothing
  the signal shows before an event sets it apart from any other stretch, and no threshold on
  it can warn of that event without warning as often for nothing.
- **NAB score** (NAB files only; standard, reward_low_FP_rate, reward_low_FN_rate profiles) of
  the anomaly probability and of each horizon's early warning (and of the fused score, for
  reference), with the threshold optimised on
  the other half of the files (NAB's own optimiser, :func:`~aiops_plugin.evaluation.metrics.
  nab_best_threshold`) and the files' raw scores summed into one normalised score; the
  threshold optimised over all files (tuned on the answers, as NAB reports it) is shown beside.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.stats import binomtest

from aiops_plugin.calibration import p_from_score, score_from_p
from aiops_plugin.calibration.stage import GroupCalibration, RecentProbability
from aiops_plugin.config import (
    CalibrationConfig,
    DetectorsConfig,
    EarlyWarningConfig,
    FeedbackConfig,
    ScheduleConfig,
)
from aiops_plugin.detectors.forecaster import ForecasterDetector
from aiops_plugin.detectors.registry import FittedModel
from aiops_plugin.early_warning import (
    GroupEarlyWarning,
    labelled_warning,
    replay_recent_probability,
)
from aiops_plugin.evaluation import datasets, metrics
from aiops_plugin.evaluation.benchmark import (
    CALIBRATION_BINS,
    OPERATING_THRESHOLD,
    ScoredEntity,
    _fit_detectors,
    _nab_file,
    _write_rows,
    draw_reliability,
    machine_description,
    refit_blocks,
    reliability_axes,
    save_reliability,
    series_windows,
    short_slice,
    write_markdown_section,
)
from aiops_plugin.evaluation.forecasting import horizon_steps_for
from aiops_plugin.exporter import horizon_label

log = logging.getLogger(__name__)

#: The section of docs/benchmarks.md each run writes; with the forecaster among the detectors
#: or with the metrics' lines (``early_warning.ramp``), its own section, so the variants stand
#: side by side.
SECTION = "early-warning"
FORECASTER_SECTION = "early-warning-forecaster"
RAMP_SECTION = "early-warning-ramp"
DEFAULT_DETECTORS = ("mad", "pca")
FUSED_SCORE = "fused score >= 1"
EARLY_WARNING = "early warning"
EARLY_WARNING_SCORE = "early-warning score"
EARLY_WARNING_SCORE_AT_ONE = "early-warning score >= 1"


def _tuned(signal: str) -> str:
    """The name of ``signal``'s row with its threshold tuned in-sample."""
    return f"{signal}, tuned in-sample"


EARLY_WARNING_TUNED = _tuned(EARLY_WARNING)
EARLY_WARNING_SCORE_TUNED = _tuned(EARLY_WARNING_SCORE)
ANOMALY_PROBABILITY = "P(anomalous now)"
#: the early warning on the second half of each test split, as the agent exports it and with
#: feedback on the first half's events (:func:`labelled_calibration_rows`)
EARLY_WARNING_SECOND_HALF = "early warning, second half"
EARLY_WARNING_LABELLED = "early warning, labelled on the first half, second half"


@dataclass(frozen=True)
class AlertRule:
    """One of the shipped alert rules (``alert_rules/aiops-plugin.rules.yml``) as the replay
    applies it: its signal above ``threshold`` (``>=`` where ``inclusive``) for
    ``for_seconds``."""

    name: str
    threshold: float
    for_seconds: float
    inclusive: bool = False

    @property
    def operator(self) -> str:
        return ">=" if self.inclusive else ">"

    def describe(self) -> str:
        return f"{self.operator} {self.threshold:g} for {horizon_label(self.for_seconds)}"

    def holds(self, values: np.ndarray) -> np.ndarray:
        """Where the condition holds (NaN: never, as an absent series)."""
        with np.errstate(invalid="ignore"):
            if self.inclusive:
                return np.asarray(values) >= self.threshold
            return np.asarray(values) > self.threshold


#: The rules as shipped; tests/test_early_warning.py checks them against the rule file:
#: the anomaly alert on P(anomalous now), the early warning on the early-warning score.
ANOMALY_ALERT = AlertRule("AiopsAnomalyDetected", 0.9, 120.0)
EARLY_WARNING_ALERT = AlertRule("AiopsEarlyWarning", 1.0, 300.0, inclusive=True)
#: The alternative the rule file documents: the early warning on its probability.
PROBABILITY_WARNING_ALERT = AlertRule("AiopsEarlyWarning on the probability", 0.8, 300.0)
#: The horizon the early-warning alert reads.
EARLY_WARNING_ALERT_HORIZON = "15m"
ALERT_SIGNALS = (
    f"alert {ANOMALY_ALERT.name}",
    f"alert {EARLY_WARNING_ALERT.name}",
    "either alert",
    f"alternative: {PROBABILITY_WARNING_ALERT.name}",
    "either, with the alternative",
)
#: Candidate thresholds of a probability per selection: quantiles this close to the top.
_CANDIDATES = 400
_DEFAULT_CALIBRATION = CalibrationConfig()
_MIN_LABELLED_EVENTS = FeedbackConfig().min_labelled_events
_DEFAULT_SCHEDULE = ScheduleConfig()


@dataclass
class EntityWarnings:
    """One entity's test-split signals.

    ``early_warning``: ``(T, horizons)`` probabilities; ``early_warning_scores``: the same
    horizons' combined p-values on the exported score scale (``score_from_p``: 1.0 where the
    p-value is the false-alarm rate), per-entity calibrated; ``fused_scores``, ``probability``:
    ``(T,)`` exported fused score and P(anomalous now); ``labels``: ``(T,)``."""

    dataset: str
    entity: str
    step_seconds: float
    labels: np.ndarray
    fused_scores: np.ndarray
    probability: np.ndarray
    early_warning: np.ndarray
    early_warning_scores: np.ndarray
    horizons_steps: list[int]
    method: str
    seconds: float
    #: fits of the models over the test split (1: single fit)
    fits: int = 1


@dataclass
class LeadRow:
    """Warnings before labelled events at one horizon, one signal, one dataset."""

    dataset: str
    horizon: str
    horizon_steps: int
    signal: str
    #: per fold (first half of the entities, second half): the threshold it was evaluated at
    thresholds: str
    target_false_warnings_per_day: float
    false_warnings_per_day: float
    #: share of the steps outside the (extended) events in alarm, pooled over the entities
    alarm_share_outside: float
    events: int
    warned_before_start: float
    median_lead_seconds: float
    detected_by_end: float
    entity_days: float


@dataclass
class CalibrationRow:
    dataset: str
    horizon: str
    signal: str
    steps: int
    positives: int
    ece: float
    brier: float
    brier_constant: float


@dataclass
class PrecursorRow:
    """How far a signal is up in the horizon before labelled events, against quiet windows."""

    dataset: str
    horizon: str
    horizon_steps: int
    signal: str
    quantile: float
    #: events with at least one step before their start (not right after the previous event)
    events: int
    #: of those, the share whose maximum over the horizon before the start exceeds the quantile
    before_events: float
    #: windows of the horizon's length clear of every event extended by the horizon
    quiet_windows: int
    #: of those, the share whose maximum exceeds the quantile
    quiet: float


@dataclass
class PairedRow:
    """Two signals event by event: the events each warned of before their start."""

    dataset: str
    horizon: str
    horizon_steps: int
    signal: str
    versus: str
    events: int
    only_signal: int
    only_versus: int
    both: int
    #: exact McNemar test (two-sided) of ``only_signal`` against ``only_versus``
    p_value: float


@dataclass
class NabRow:
    signal: str
    profile: str
    score_cross_fold: float
    thresholds_cross_fold: str
    score_optimised_all: float
    threshold_optimised_all: float


@dataclass
class EarlyWarningRun:
    command: str
    datasets: list[str]
    detectors: list[str]
    false_alarm_rate: float
    refit_seconds: float
    entities: list[EntityWarnings]
    lead: list[LeadRow]
    calibration: list[CalibrationRow]
    nab: list[NabRow]
    wall_seconds: float
    machine: str
    methods: dict[str, list[str]] = field(default_factory=dict)
    #: the schedule replayed (seconds of data); None: single fit on the train split
    fit_every_seconds: float | None = None
    fit_window_seconds: float | None = None
    #: the early warning's settings (``early_warning``), None: the defaults
    settings: EarlyWarningConfig | None = None
    precursors: list[PrecursorRow] = field(default_factory=list)
    paired: list[PairedRow] = field(default_factory=list)
    #: why each entity whose first fit failed (too short) was left out, naming it
    skipped: list[str] = field(default_factory=list)


def variant(run: EarlyWarningRun) -> tuple[str, str, str]:
    """``(section, image suffix, title suffix)`` of a run: the default, with the forecaster,
    with the metrics' lines, or with another trend span."""
    if "forecaster" in run.detectors:
        if run.fit_every_seconds is not None:
            return (
                f"{FORECASTER_SECTION}-schedule",
                "_forecaster_schedule",
                ": with the forecaster's forecasts, on the agent's schedule",
            )
        return FORECASTER_SECTION, "_forecaster", ": with the forecaster's forecasts"
    if run.settings is not None and run.settings.ramp:
        return RAMP_SECTION, "_ramp", ": with the metrics' own lines"
    default = EarlyWarningConfig().trend_steps
    if run.settings is not None and run.settings.trend_steps != default:
        steps = run.settings.trend_steps
        return (
            f"{SECTION}-trend-{steps}",
            f"_trend_{steps}",
            f": the fused score's trend over {steps} steps (default {default})",
        )
    return SECTION, "", ""


# ----------------------------------------------------------------------------------- scoring
@dataclass
class _Fit:
    """One fit of an entity's models: detectors, their group calibration, the early warning."""

    models: dict[str, FittedModel]
    calibration: GroupCalibration
    warning: GroupEarlyWarning
    forecaster: ForecasterDetector | None


def _fit_models(
    series: datasets.LabelledSeries,
    history: np.ndarray,
    detector_names: Sequence[str],
    detectors: DetectorsConfig,
    false_alarm_rate: float,
    device: torch.device,
    horizons: list[int],
    settings: EarlyWarningConfig | None,
) -> _Fit:
    """Fit the detectors on ``history`` (its earlier 75 %), the group calibration and the early
    warning on its calibration slice, as one agent fit does; ValueError where it is too short."""
    fraction = _DEFAULT_CALIBRATION.calibration_fraction
    tail_fraction = _DEFAULT_CALIBRATION.tail_fraction
    models, raw_calibration, _ = _fit_detectors(
        series, history, detector_names, detectors, device, fraction
    )
    fit_windows = series_windows(series, history)
    calibration = GroupCalibration(list(detector_names), tail_fraction).fit(
        raw_calibration, fit_windows.keys
    )
    first = len(history) - next(iter(raw_calibration.values())).shape[1]
    forecaster = models["forecaster"].detector if "forecaster" in models else None
    warning = GroupEarlyWarning(
        horizons,
        settings or EarlyWarningConfig(),
        {},
        false_alarm_rate,
        tail_fraction,
        _DEFAULT_CALIBRATION.recent_p_values,
    ).fit(
        score_from_p(calibration.fused_calibration_p_, false_alarm_rate),
        fit_windows,
        first,
        forecaster,
    )
    return _Fit(models, calibration, warning, forecaster)


def _replay_block(
    series: datasets.LabelledSeries,
    fit: _Fit,
    full: np.ndarray,
    start: int,
    end: int,
    lead_in: int,
    refit_every: int,
) -> tuple[np.ndarray, ...]:
    """Rows ``start..end`` of ``full`` (train split then test split) scored with ``fit``, cycle
    by cycle: ``(fused scores, P(anomalous now), early warning, early-warning scores)``.

    The ``lead_in`` rows before ``start`` are scored too, with the same models, and give the
    trend of the first rows its score history, as the agent's history of exported scores does
    across a refit; nothing of them is returned or fed to the mixtures. Both mixtures start
    from their fit's calibration slice, as after an agent's refit."""
    first = start - lead_in
    detectors_context = max(model.detector.context_steps for model in fit.models.values())
    context = min(first, max(detectors_context, fit.warning.history_steps))
    windows = series_windows(series, full[first - context : end])
    keys = windows.keys
    raw = {name: model.score(windows).score[:, context:] for name, model in fit.models.items()}
    fused_p = fit.calibration.p_values(raw, keys)["fused"]
    fused_scores = score_from_p(fused_p, fit.warning.false_alarm_rate)
    warning_p, uncertainty = fit.warning.replay_p_values(
        fused_scores, windows, context, fit.forecaster
    )
    warning_p = warning_p[:, lead_in:]
    uncertainty = None if uncertainty is None else uncertainty[:, lead_in:]
    early_warning = fit.warning.replay_probabilities(warning_p, uncertainty, refit_every)
    early_warning_scores = fit.warning.scores(warning_p, uncertainty)
    recent = RecentProbability(_DEFAULT_CALIBRATION.recent_p_values).seed(
        fit.calibration.fused_calibration_p_
    )
    probability, _ = replay_recent_probability(recent, fused_p[:, lead_in:], refit_every)
    return (
        fused_scores[0, lead_in:],
        probability[0],
        early_warning[0],
        early_warning_scores[0],
    )


def warn_series(
    series: datasets.LabelledSeries,
    detector_names: Sequence[str],
    detectors: DetectorsConfig,
    false_alarm_rate: float,
    device: torch.device,
    refit_seconds: float = 3600.0,
    settings: EarlyWarningConfig | None = None,
    fit_every_seconds: float | None = None,
    fit_window_seconds: float | None = None,
) -> EntityWarnings:
    """Fit, then replay the test split cycle by cycle (module docstring).

    Single fit (``fit_every_seconds`` None): one fit on the train split scores the whole test
    split. On the agent's schedule (``schedule.fit_every`` / ``fit_window``): before every block
    of ``fit_every_seconds`` of the test split, everything is refitted on the trailing
    ``fit_window_seconds`` (default: the train split's length) of the history so far, the train
    split followed by the test rows before the block. A refit whose window is too short keeps
    the previous fit for its block (the first fit must succeed)."""
    started = time.perf_counter()
    horizons = horizon_steps_for(series.step_seconds)
    detectors = detectors.model_copy(deep=True)
    detectors.forecaster.horizon_steps = horizons
    n_train, n_test = len(series.train), len(series.test)
    step = series.step_seconds
    block = n_test if fit_every_seconds is None else _rows(fit_every_seconds, step)
    window = n_train if fit_window_seconds is None else _rows(fit_window_seconds, step)
    refit_every = _rows(refit_seconds, step)
    trend_steps = (settings or EarlyWarningConfig()).trend_steps
    full = np.concatenate([series.train, series.test])
    parts: list[tuple[np.ndarray, ...]] = []
    fit: _Fit | None = None
    fits = 0
    for start, end, history in refit_blocks(full, n_train, block, window):
        try:
            fit = _fit_models(
                series,
                history,
                detector_names,
                detectors,
                false_alarm_rate,
                device,
                horizons,
                settings,
            )
            fits += 1
        except ValueError:
            if fit is None:
                raise
        # the first block is the single fit's protocol: its trend starts with the test split
        lead_in = 0 if start == 0 else min(trend_steps - 1, start)
        parts.append(
            _replay_block(series, fit, full, n_train + start, n_train + end, lead_in, refit_every)
        )
    fused_scores, probability, early_warning, early_warning_scores = (
        np.concatenate(column) for column in zip(*parts, strict=True)
    )
    assert fit is not None
    return EntityWarnings(
        dataset=series.dataset,
        entity=series.entity,
        step_seconds=series.step_seconds,
        labels=series.test_labels.astype(np.int8),
        fused_scores=fused_scores,
        probability=probability,
        early_warning=early_warning,
        early_warning_scores=early_warning_scores,
        horizons_steps=horizons,
        method=fit.warning.method,
        seconds=time.perf_counter() - started,
        fits=fits,
    )


def _rows(seconds: float, step_seconds: float) -> int:
    """``seconds`` of data in rows of ``step_seconds``, rounded up, at least one."""
    return max(1, math.ceil(seconds / step_seconds - 1e-9))


# ------------------------------------------------------------------------------- evaluation
def halves(items: Sequence[EntityWarnings]) -> list[tuple[list[int], list[int]]]:
    """``(evaluated, selected on)`` index pairs: each half of the entities is evaluated at a
    threshold chosen on the other; a single entity is its own (the report says so)."""
    n = len(items)
    if n < 2:
        return [([0], [0])] if n else []
    cut = (n + 1) // 2
    first, second = list(range(cut)), list(range(cut, n))
    return [(first, second), (second, first)]


def _events(
    signals: Sequence[np.ndarray], items: Sequence[EntityWarnings], threshold: float, steps: int
) -> list[metrics.EventResult]:
    return [
        metrics.event_metrics(signal, item.labels, threshold, item.step_seconds, steps)
        for signal, item in zip(signals, items, strict=True)
    ]


def _false_warnings_per_day(results: Sequence[metrics.EventResult], days: float) -> float:
    return sum(result.false_alarms for result in results) / days if days > 0 else math.nan


def _days(items: Sequence[EntityWarnings]) -> float:
    return sum(item.labels.size * item.step_seconds for item in items) / 86400.0


def _outside_alarms(
    signals: Sequence[np.ndarray], items: Sequence[EntityWarnings], threshold: float, steps: int
) -> tuple[int, int]:
    """``(alarming, all)`` steps outside every event extended by ``steps`` before its start:
    the time spent in false warnings."""
    alarms = outside = 0
    for signal, item in zip(signals, items, strict=True):
        free = (item.labels == 0) & ~starts_within(item.labels, steps)
        with np.errstate(invalid="ignore"):
            alarms += int(np.count_nonzero(np.asarray(signal)[free] >= threshold))
        outside += int(free.sum())
    return alarms, outside


def _alarm_share_outside(
    signals: Sequence[np.ndarray], items: Sequence[EntityWarnings], threshold: float, steps: int
) -> float:
    alarms, outside = _outside_alarms(signals, items, threshold, steps)
    return alarms / outside if outside else math.nan


def choose_threshold(
    signals: Sequence[np.ndarray],
    items: Sequence[EntityWarnings],
    steps: int,
    target_per_day: float,
    target_share: float,
) -> float:
    """The lowest threshold, scanning down from "never alarm", before the first one that gives
    more false warnings per entity-day than ``target_per_day`` or more of the time outside
    events in alarm than ``target_share`` on ``items``; ``inf`` when even the highest candidate
    does. The second bound keeps the scan from reaching thresholds so low that the alarms merge
    into a few endless runs, which count as few false warnings."""
    values = np.concatenate([np.asarray(s, dtype=np.float64) for s in signals])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf
    levels = 1.0 - np.geomspace(1e-6, 0.5, _CANDIDATES)
    candidates = np.unique(np.quantile(values, levels))[::-1]
    days = _days(items)
    chosen = math.inf
    for candidate in candidates:
        threshold = float(candidate)
        per_day = _false_warnings_per_day(_events(signals, items, threshold, steps), days)
        share = _alarm_share_outside(signals, items, threshold, steps)
        if per_day > target_per_day or share > target_share:
            break
        chosen = threshold
    return chosen


def _fused_target(
    fused: Sequence[np.ndarray], items: Sequence[EntityWarnings], chosen: list[int], steps: int
) -> tuple[float, float]:
    """The fused score's false warnings per entity-day and time in false alarm at 1.0 on the
    entities ``chosen``: what the early warning's threshold is matched to there."""
    signals = [fused[i] for i in chosen]
    on = [items[i] for i in chosen]
    return (
        _false_warnings_per_day(_events(signals, on, OPERATING_THRESHOLD, steps), _days(on)),
        _alarm_share_outside(signals, on, OPERATING_THRESHOLD, steps),
    )


def _lead_row(
    dataset: str,
    steps: int,
    step_seconds: float,
    signal: str,
    thresholds: str,
    target: float,
    parts: Sequence[tuple[Sequence[np.ndarray], Sequence[EntityWarnings], float]],
) -> LeadRow:
    """One row from ``(signals, their entities, threshold)`` parts, pooled."""
    results: list[metrics.EventResult] = []
    alarms = outside = 0
    scored: list[EntityWarnings] = []
    for signals, on, threshold in parts:
        results += _events(signals, on, threshold, steps)
        counts = _outside_alarms(signals, on, threshold, steps)
        alarms, outside = alarms + counts[0], outside + counts[1]
        scored += list(on)
    delays = np.array([d for result in results for d in result.delays_seconds])
    n_events = sum(result.n_events for result in results)
    leads = -delays[delays < 0]
    return LeadRow(
        dataset=dataset,
        horizon=horizon_label(steps * step_seconds),
        horizon_steps=steps,
        signal=signal,
        thresholds=thresholds,
        target_false_warnings_per_day=target,
        false_warnings_per_day=_false_warnings_per_day(results, _days(scored)),
        alarm_share_outside=alarms / outside if outside else math.nan,
        events=n_events,
        warned_before_start=leads.size / n_events if n_events else math.nan,
        median_lead_seconds=float(np.median(leads)) if leads.size else math.nan,
        detected_by_end=sum(r.detected_events for r in results) / n_events
        if n_events
        else math.nan,
        entity_days=_days(scored),
    )


def _at_one_row(
    dataset: str,
    items: Sequence[EntityWarnings],
    steps: int,
    signal: str,
    values: Sequence[np.ndarray],
    target: float,
) -> LeadRow:
    """A signal on the exported score's scale alarming at 1.0, the threshold nothing chose."""
    return _lead_row(
        dataset,
        steps,
        items[0].step_seconds,
        signal,
        _fmt(OPERATING_THRESHOLD),
        target,
        [(values, items, OPERATING_THRESHOLD)],
    )


def _cross_fold_rows(
    dataset: str,
    items: Sequence[EntityWarnings],
    steps: int,
    signal: str,
    values: Sequence[np.ndarray],
    targets: Sequence[tuple[float, float]],
    overall: tuple[float, float],
) -> list[LeadRow]:
    """One early-warning signal's rows at the fused score's false-warning rate: its threshold
    chosen on the other half of the entities (``targets``: the fused score's rate on each
    half's other half, in :func:`halves` order), and tuned in-sample (``overall``: the rate on
    all of them)."""
    cross, thresholds = [], []
    for (evaluated, selected), target in zip(halves(items), targets, strict=True):
        picked = [items[i] for i in selected]
        threshold = choose_threshold([values[i] for i in selected], picked, steps, *target)
        cross.append(([values[i] for i in evaluated], [items[i] for i in evaluated], threshold))
        thresholds.append(threshold)
    tuned = choose_threshold(values, items, steps, *overall)
    step_seconds = items[0].step_seconds
    return [
        _lead_row(
            dataset,
            steps,
            step_seconds,
            signal,
            " / ".join(_fmt(t) for t in thresholds),
            float(np.mean([target[0] for target in targets])),
            cross,
        ),
        _lead_row(
            dataset,
            steps,
            step_seconds,
            _tuned(signal),
            _fmt(tuned),
            overall[0],
            [(values, items, tuned)],
        ),
    ]


def lead_rows(dataset: str, items: Sequence[EntityWarnings]) -> list[LeadRow]:
    """Per horizon: the fused score at 1.0; the early-warning probability at the same
    false-warning rate, its threshold chosen on the other half of the entities, and, as an upper
    bound, tuned on the entities it is evaluated on; the early-warning score at 1.0 (its
    p-value at the false-alarm rate, no threshold chosen) and by the same two rules; at the
    early-warning alert's horizon, the shipped alert rules (:func:`alert_signals`)."""
    rows: list[LeadRow] = []
    if not items:
        return rows
    fused = [item.fused_scores for item in items]
    for j, steps in enumerate(items[0].horizons_steps):
        targets = [_fused_target(fused, items, selected, steps) for _, selected in halves(items)]
        overall = _fused_target(fused, items, list(range(len(items))), steps)
        scores = [item.early_warning_scores[:, j] for item in items]
        probabilities = [item.early_warning[:, j] for item in items]
        folds = (targets, overall)
        rows += [
            _at_one_row(dataset, items, steps, FUSED_SCORE, fused, overall[0]),
            *_cross_fold_rows(dataset, items, steps, EARLY_WARNING, probabilities, *folds),
            _at_one_row(dataset, items, steps, EARLY_WARNING_SCORE_AT_ONE, scores, overall[0]),
            *_cross_fold_rows(dataset, items, steps, EARLY_WARNING_SCORE, scores, *folds),
        ]
        if horizon_label(steps * items[0].step_seconds) == EARLY_WARNING_ALERT_HORIZON:
            rows += _alert_rows(dataset, items, j, overall[0])
    return rows


#: Quantiles of a signal's steps outside events the precursor table holds windows against.
PRECURSOR_QUANTILES = (0.99, 0.999)


def pre_event_maxima(
    signal: np.ndarray, labels: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per labelled event, in order: the signal's maximum over the ``steps`` before its start
    (back to the previous event's end at most: the steps in which an alarm counts as warned
    before the start, as :func:`~aiops_plugin.evaluation.metrics.event_metrics` counts them),
    and whether there is any such step. NaN never alarms (``-inf``), nor does an empty window."""
    values = np.nan_to_num(np.asarray(signal, dtype=np.float64), nan=-np.inf)
    starts, ends = metrics.runs(np.asarray(labels).astype(bool))
    reach = np.maximum(starts - steps, np.concatenate([[0], ends])[: len(starts)])
    maxima = np.array(
        [values[lo:start].max(initial=-np.inf) for lo, start in zip(reach, starts, strict=True)],
        dtype=np.float64,
    )
    return maxima, reach < starts


def precursor_windows(
    signal: np.ndarray, labels: np.ndarray, steps: int, quantile: float
) -> tuple[np.ndarray, np.ndarray]:
    """For one entity: per event with at least one step before its start after the previous
    one (:func:`pre_event_maxima`), whether the signal's maximum over the ``steps`` before its
    start exceeds the ``quantile`` of the signal outside events; and the same for every quiet
    window of ``steps`` steps (none of them within an event or the ``steps`` before one). NaN
    never exceeds. Returns two bool arrays."""
    values = np.nan_to_num(np.asarray(signal, dtype=np.float64), nan=-np.inf)
    labelled = np.asarray(labels).astype(bool)
    outside = values[~labelled]
    level = (
        np.quantile(outside[np.isfinite(outside)], quantile)
        if np.isfinite(outside).any()
        else np.inf
    )
    maxima, windowed = pre_event_maxima(values, labelled, steps)
    before = maxima[windowed] > level
    quiet = ~labelled
    for start in metrics.runs(labelled)[0]:
        quiet[max(0, start - steps) : start] = False
    if len(values) < steps:
        return before, np.zeros(0, dtype=bool)
    clear = sliding_window_view(quiet, steps).all(axis=1)
    return before, sliding_window_view(values, steps)[clear].max(axis=1) > level


def paired_rows(dataset: str, items: Sequence[EntityWarnings]) -> list[PairedRow]:
    """Per horizon, event by event: which events the early-warning score at 1.0 and the fused
    score at 1.0 warned of before their start, and the exact McNemar test of the events only
    one of them warned of (two-sided binomial test of one count against their sum at 1/2)."""
    rows: list[PairedRow] = []
    if not items:
        return rows
    for j, steps in enumerate(items[0].horizons_steps):
        early, base = [], []
        for item in items:
            early.append(
                pre_event_maxima(item.early_warning_scores[:, j], item.labels, steps)[0]
                >= OPERATING_THRESHOLD
            )
            base.append(
                pre_event_maxima(item.fused_scores, item.labels, steps)[0] >= OPERATING_THRESHOLD
            )
        warned, versus = np.concatenate(early), np.concatenate(base)
        alone, other = int((warned & ~versus).sum()), int((versus & ~warned).sum())
        rows.append(
            PairedRow(
                dataset=dataset,
                horizon=horizon_label(steps * items[0].step_seconds),
                horizon_steps=steps,
                signal=EARLY_WARNING_SCORE_AT_ONE,
                versus=FUSED_SCORE,
                events=int(warned.size),
                only_signal=alone,
                only_versus=other,
                both=int((warned & versus).sum()),
                p_value=float(binomtest(alone, alone + other, 0.5).pvalue)
                if alone + other
                else 1.0,
            )
        )
    return rows


def precursor_rows(dataset: str, items: Sequence[EntityWarnings]) -> list[PrecursorRow]:
    """Per horizon, for the fused score and the horizon's early-warning score at each of
    ``PRECURSOR_QUANTILES``: the events' and the quiet windows' shares above it, pooled over
    the entities (module docstring)."""
    rows: list[PrecursorRow] = []
    if not items:
        return rows
    for j, steps in enumerate(items[0].horizons_steps):
        signals = {
            "fused score": [item.fused_scores for item in items],
            EARLY_WARNING_SCORE: [item.early_warning_scores[:, j] for item in items],
        }
        for name, values in signals.items():
            for quantile in PRECURSOR_QUANTILES:
                parts = [
                    precursor_windows(signal, item.labels, steps, quantile)
                    for signal, item in zip(values, items, strict=True)
                ]
                before = np.concatenate([part[0] for part in parts])
                quiet = np.concatenate([part[1] for part in parts])
                rows.append(
                    PrecursorRow(
                        dataset=dataset,
                        horizon=horizon_label(steps * items[0].step_seconds),
                        horizon_steps=steps,
                        signal=name,
                        quantile=quantile,
                        events=int(before.size),
                        before_events=float(before.mean()) if before.size else math.nan,
                        quiet_windows=int(quiet.size),
                        quiet=float(quiet.mean()) if quiet.size else math.nan,
                    )
                )
    return rows


def firing(condition: np.ndarray, for_seconds: float, step_seconds: float) -> np.ndarray:
    """1.0 at the steps where a rule with this ``condition`` (bool per step) and ``for:`` fires,
    else 0.0. Prometheus fires once the condition has held without a break for ``for_seconds``;
    a step's value stands for the whole step, so that is ``for_seconds // step_seconds + 1``
    consecutive steps (the last ones a fraction of a step early where ``for`` is not a whole
    number of steps)."""
    held = np.asarray(condition, dtype=bool)
    index = np.arange(held.size)
    last_break = np.maximum.accumulate(np.where(held, -1, index))
    needed = int(for_seconds // step_seconds) + 1
    return ((index - last_break) >= needed).astype(np.float64)


def alert_signals(item: EntityWarnings, horizon: int) -> list[np.ndarray]:
    """The shipped rules on one entity's replayed signals, as :func:`firing` gives them, in
    :data:`ALERT_SIGNALS` order: the anomaly alert, the early-warning alert on the score's
    horizon column ``horizon`` (held back while the anomaly alert's condition holds, as its
    ``unless`` does), either of the two; then the documented alternative, the early warning on
    the probability instead, alone and with the anomaly alert."""
    anomalous = ANOMALY_ALERT.holds(item.probability)
    step = item.step_seconds
    anomaly = firing(anomalous, ANOMALY_ALERT.for_seconds, step)
    warning = firing(
        EARLY_WARNING_ALERT.holds(item.early_warning_scores[:, horizon]) & ~anomalous,
        EARLY_WARNING_ALERT.for_seconds,
        step,
    )
    alternative = firing(
        PROBABILITY_WARNING_ALERT.holds(item.early_warning[:, horizon]) & ~anomalous,
        PROBABILITY_WARNING_ALERT.for_seconds,
        step,
    )
    return [
        anomaly,
        warning,
        np.maximum(anomaly, warning),
        alternative,
        np.maximum(anomaly, alternative),
    ]


def _alert_rows(
    dataset: str, items: Sequence[EntityWarnings], horizon: int, target: float
) -> list[LeadRow]:
    """The shipped alert rules replayed on every entity, events counted at the early-warning
    alert's horizon."""
    signals = [alert_signals(item, horizon) for item in items]
    steps = items[0].horizons_steps[horizon]
    return [
        _lead_row(
            dataset,
            steps,
            items[0].step_seconds,
            name,
            rule,
            target,
            [([signal[k] for signal in signals], items, 0.5)],
        )
        for k, (name, rule) in enumerate(
            zip(
                ALERT_SIGNALS,
                (
                    ANOMALY_ALERT.describe(),
                    EARLY_WARNING_ALERT.describe(),
                    "as shipped",
                    PROBABILITY_WARNING_ALERT.describe(),
                    "anomaly alert or the alternative",
                ),
                strict=True,
            )
        )
    ]


def starts_within(labels: np.ndarray, steps: int) -> np.ndarray:
    """``(T,)`` bool: a labelled event starts in the next ``steps`` steps ``(t, t + steps]``."""
    y = np.asarray(labels).astype(bool)
    out = np.zeros(y.size, dtype=bool)
    for start in metrics.runs(y)[0]:
        out[max(0, start - steps) : start] = True
    return out


def _calibration_data(
    items: Sequence[EntityWarnings], j: int | None, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled ``(probability, label)`` over the steps outside labelled events; ``j`` a horizon
    index of the early warning, None for P(anomalous now)."""
    p, y = [], []
    for item in items:
        outside = item.labels == 0
        signal = item.probability if j is None else item.early_warning[:, j]
        p.append(signal[outside])
        y.append(starts_within(item.labels, steps)[outside])
    return np.concatenate(p), np.concatenate(y).astype(np.int8)


def calibration_rows(dataset: str, items: Sequence[EntityWarnings]) -> list[CalibrationRow]:
    rows: list[CalibrationRow] = []
    if not items:
        return rows
    for j, steps in enumerate(items[0].horizons_steps):
        horizon = horizon_label(steps * items[0].step_seconds)
        for signal, index in ((EARLY_WARNING, j), (ANOMALY_PROBABILITY, None)):
            rows.append(
                _calibration_row(dataset, horizon, signal, *_calibration_data(items, index, steps))
            )
    return rows


def _calibration_row(
    dataset: str, horizon: str, signal: str, probability: np.ndarray, labels: np.ndarray
) -> CalibrationRow:
    """ECE and Brier score of ``probability`` against ``labels`` (NaN steps left out) and the
    Brier score of the constant base rate."""
    keep = np.isfinite(probability)
    share = float(labels[keep].mean()) if keep.any() else math.nan
    return CalibrationRow(
        dataset=dataset,
        horizon=horizon,
        signal=signal,
        steps=int(keep.sum()),
        positives=int(labels[keep].sum()),
        ece=metrics.expected_calibration_error(probability, labels, CALIBRATION_BINS),
        brier=metrics.brier_score(probability, labels),
        brier_constant=share * (1.0 - share),
    )


def labelled_calibration_rows(
    dataset: str, items: Sequence[EntityWarnings], false_alarm_rate: float
) -> list[CalibrationRow]:
    """The early warning with feedback, as the agent's next fit would learn it: every event
    starting in the first half of a test split is labelled a confirmed incident, the scores of
    the horizon's steps before it are the positives, the first half's other steps outside
    events the normal steps (the agent: its calibration slice), pooled over the dataset's
    entities (one group); the labelled probability (:func:`~aiops_plugin.early_warning.
    labelled_warning`) and the unlabelled one are measured on the second halves, against "an
    event starts within the horizon". None with fewer labelled events than the agent needs
    (``feedback.min_labelled_events``)."""
    rows: list[CalibrationRow] = []
    if not items:
        return rows
    for j, steps in enumerate(items[0].horizons_steps):
        horizon = horizon_label(steps * items[0].step_seconds)
        positives, normal, measured, labels, unlabelled = [], [], [], [], []
        events = 0
        for item in items:
            mid = item.labels.size // 2
            anomalous = item.labels.astype(bool)
            ahead = starts_within(item.labels, steps)
            scores = item.early_warning_scores[:, j]
            for start in metrics.runs(anomalous[:mid])[0]:
                if start > 0:
                    events += 1
                    positives.append(scores[max(0, start - steps) : start])
            first = np.arange(item.labels.size) < mid
            normal.append(scores[first & ~anomalous & ~ahead])
            second = ~first & ~anomalous
            measured.append(scores[second])
            labels.append(ahead[second])
            unlabelled.append(item.early_warning[second, j])
        if events < _MIN_LABELLED_EVENTS:
            continue
        model = labelled_warning(
            np.concatenate(positives), np.zeros(0), np.concatenate(normal), false_alarm_rate
        )
        if model is None:
            continue
        score = np.concatenate(measured)
        y = np.concatenate(labels).astype(np.int8)
        keep = np.isfinite(score)
        labelled = model.probability(p_from_score(np.maximum(score[keep], 0.0), false_alarm_rate))
        rows += [
            _calibration_row(
                dataset, horizon, EARLY_WARNING_SECOND_HALF, np.concatenate(unlabelled), y
            ),
            _calibration_row(dataset, horizon, EARLY_WARNING_LABELLED, labelled, y[keep]),
        ]
    return rows


def _nab_arrays(
    items: Sequence[EntityWarnings], signals: Sequence[np.ndarray], root: Path | None
) -> list[tuple[np.ndarray, np.ndarray, list]]:
    """Whole-file ``(scores, timestamps, windows)`` of one signal per NAB file (its test
    split's values), probationary rows NaN."""
    files = []
    for item, signal in zip(items, signals, strict=True):
        scored = ScoredEntity(
            dataset=item.dataset,
            entity=item.entity,
            detector="early-warning",
            scores=signal,
            labels=item.labels,
            step_seconds=item.step_seconds,
            fit_seconds=0.0,
            score_seconds=0.0,
        )
        files.append(_nab_file(scored, root))
    return files


def nab_rows(items: Sequence[EntityWarnings], root: Path | None) -> list[NabRow]:
    """NAB scores of the fused score (for reference), P(anomalous now) and each horizon's early
    warning, thresholds optimised on the other half of the files, and on all of them (module
    docstring)."""
    rows: list[NabRow] = []
    if len(items) < 2:
        return rows
    profiles = datasets.nab_profiles(root)
    signals: list[tuple[str, list[np.ndarray]]] = [
        ("fused score", [item.fused_scores for item in items]),
        (ANOMALY_PROBABILITY, [item.probability for item in items]),
    ]
    signals += [
        (
            f"{EARLY_WARNING} {horizon_label(steps * items[0].step_seconds)}",
            [item.early_warning[:, j] for item in items],
        )
        for j, steps in enumerate(items[0].horizons_steps)
    ]
    for name, values in signals:
        files = _nab_arrays(items, values, root)
        for profile, spec in profiles.items():
            cost = spec["CostMatrix"]
            raw = null = perfect = 0.0
            thresholds = []
            for evaluated, selected in halves(items):
                picked = [files[i] for i in selected]
                threshold, _ = metrics.nab_best_threshold(
                    [f[0] for f in picked], [f[1] for f in picked], [f[2] for f in picked], cost
                )
                thresholds.append(threshold)
                for i in evaluated:
                    scores, timestamps, windows = files[i]
                    with np.errstate(invalid="ignore"):
                        detections = scores >= threshold
                    raw += metrics.nab_raw_score(detections, timestamps, windows, cost)
                    null += metrics.nab_null_raw_score(timestamps, windows, cost)
                    perfect += metrics.nab_perfect_raw_score(timestamps, windows, cost)
            best, optimised = metrics.nab_best_threshold(
                [f[0] for f in files], [f[1] for f in files], [f[2] for f in files], cost
            )
            rows.append(
                NabRow(
                    signal=name,
                    profile=profile,
                    score_cross_fold=metrics.nab_normalized_score(raw, null, perfect),
                    thresholds_cross_fold=" / ".join(_fmt(t) for t in thresholds),
                    score_optimised_all=optimised,
                    threshold_optimised_all=best,
                )
            )
    return rows


# ---------------------------------------------------------------------------------- running
def run_early_warning_benchmark(
    dataset_names: Sequence[str],
    detector_names: Sequence[str] = DEFAULT_DETECTORS,
    entities: Sequence[str] | None = None,
    data_root: Path | None = None,
    false_alarm_rate: float = 0.001,
    refit_seconds: float = 3600.0,
    max_entities: int | None = None,
    slice_rows: int | None = None,
    device: torch.device | None = None,
    detectors: DetectorsConfig | None = None,
    command: str = "",
    fit_every_seconds: float | None = None,
    fit_window_seconds: float | None = None,
    settings: EarlyWarningConfig | None = None,
) -> EarlyWarningRun:
    """Score every requested entity (the first ``max_entities`` of each dataset when given;
    ``slice_rows`` cuts each to a short slice, for smoke tests) and evaluate; single fit, or the
    schedule ``fit_every_seconds`` / ``fit_window_seconds`` (:func:`warn_series`)."""
    started = time.perf_counter()
    torch.manual_seed(0)
    device = device or torch.device("cpu")
    detectors = detectors or DetectorsConfig()
    scored: list[EntityWarnings] = []
    skipped: list[str] = []
    for dataset in dataset_names:
        all_series = datasets.load_datasets([dataset], entities, data_root)
        if max_entities is not None:
            all_series = all_series[:max_entities]
        for series in all_series:
            if slice_rows:
                series = short_slice(series, slice_rows)
            try:
                warned = warn_series(
                    series,
                    detector_names,
                    detectors,
                    false_alarm_rate,
                    device,
                    refit_seconds,
                    settings,
                    fit_every_seconds=fit_every_seconds,
                    fit_window_seconds=fit_window_seconds,
                )
            except ValueError as exc:
                # a detector cannot fit this entity's train split (shorter than its window):
                # it is left out, as the detector benchmark leaves it out, and the report says so
                log.warning("early-warning benchmark: %s left out: %s", series.entity, exc)
                named = series.entity in str(exc)
                skipped.append(str(exc) if named else f"{series.dataset} {series.entity}: {exc}")
                continue
            scored.append(warned)
            print(
                f"{series.dataset} {series.entity}: {scored[-1].seconds:.1f} s, "
                f"{scored[-1].fits} fits",
                file=sys.stderr,
                flush=True,
            )
    lead, calibration, nab = [], [], []
    precursors: list[PrecursorRow] = []
    paired: list[PairedRow] = []
    methods: dict[str, list[str]] = {}
    for dataset in dataset_names:
        items = [item for item in scored if item.dataset == dataset]
        methods[dataset] = sorted({item.method for item in items})
        lead += lead_rows(dataset, items)
        precursors += precursor_rows(dataset, items)
        paired += paired_rows(dataset, items)
        calibration += calibration_rows(dataset, items)
        calibration += labelled_calibration_rows(dataset, items, false_alarm_rate)
        if dataset == "nab" and not slice_rows:
            nab += nab_rows(items, data_root)
    return EarlyWarningRun(
        command=command,
        datasets=list(dataset_names),
        detectors=list(detector_names),
        false_alarm_rate=false_alarm_rate,
        refit_seconds=refit_seconds,
        entities=scored,
        lead=lead,
        calibration=calibration,
        nab=nab,
        wall_seconds=time.perf_counter() - started,
        machine=machine_description(device),
        methods=methods,
        fit_every_seconds=fit_every_seconds,
        fit_window_seconds=fit_window_seconds,
        settings=settings,
        precursors=precursors,
        paired=paired,
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------- reports
def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "never" if value == math.inf else "n/a"
    return f"{value:.{digits}f}"


def plot_reliability(run: EarlyWarningRun, directory: Path) -> list[Path]:
    """Per dataset, ``early_warning_<dataset>.png`` (``..._forecaster.png`` with the forecaster
    among the detectors): each horizon's reliability diagram (and P(anomalous now) against the
    shortest horizon's label, dashed) with the steps per bin."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in run.datasets:
        items = [item for item in run.entities if item.dataset == dataset]
        if not items:
            continue
        figure, (diagram, counts) = reliability_axes()
        curves: list[tuple[str, int | None, int, str]] = [
            (f"early warning {horizon_label(s * items[0].step_seconds)}", j, s, colour)
            for (j, s), colour in zip(
                enumerate(items[0].horizons_steps),
                ("tab:blue", "tab:orange", "tab:green"),
                strict=False,
            )
        ]
        first_steps = items[0].horizons_steps[0]
        curves.append(
            (
                f"P(anomalous now) vs {horizon_label(first_steps * items[0].step_seconds)}",
                None,
                first_steps,
                "tab:grey",
            )
        )
        for slot, (name, j, steps, colour) in enumerate(curves):
            p, y = _calibration_data(items, j, steps)
            keep = np.isfinite(p)
            if keep.any():
                linestyle = "--" if j is None else "-"
                # one slot more than curves: a gap between the bins' bars
                draw_reliability(
                    diagram, counts, p[keep], y[keep], name, colour, slot, 5, linestyle=linestyle
                )
        path = directory / f"early_warning_{dataset}{variant(run)[1]}.png"
        save_reliability(
            figure,
            path,
            "observed: an event starts within the horizon",
            f"{dataset}: early-warning probability, test steps outside events",
        )
        written.append(path)
    return written


def _protocol(run: EarlyWarningRun) -> str:
    """How the models were fitted over the test split, in a sentence."""
    split = (
        "(detectors on the earlier 75 %, the fused calibration and the early warning on the "
        "later 25 %)"
    )
    if run.fit_every_seconds is None:
        return f"Single fit per entity on its train split {split}."
    window = (
        "the train split's length"
        if run.fit_window_seconds is None
        else f"{run.fit_window_seconds / 86400:g} days"
    )
    fits = [item.fits for item in run.entities]
    return (
        f"The agent's schedule: refitted every {run.fit_every_seconds / 86400:g} days of data "
        f"on the trailing {window} of history {split}, the train split followed by the test "
        "rows before the refit; each refit starts both mixtures afresh from its own calibration "
        f"slice ({min(fits, default=0)} to {max(fits, default=0)} fits per entity)."
    )


def _labelled_reading(
    calibration: dict[tuple[str, str], CalibrationRow], horizons: Sequence[str]
) -> str:
    """One sentence on the early warning with feedback, where the run measured it."""
    pairs = [
        (calibration[(h, EARLY_WARNING_SECOND_HALF)], calibration[(h, EARLY_WARNING_LABELLED)])
        for h in horizons
        if (h, EARLY_WARNING_LABELLED) in calibration
    ]
    if not pairs:
        return ""
    return (
        " With feedback on the first half's events, on the second halves, ECE / Brier (constant "
        "base rate) unlabelled -> labelled: "
        + "; ".join(
            f"{labelled.horizon} {_fmt(plain.ece)} / {_fmt(plain.brier, 4)} -> "
            f"{_fmt(labelled.ece)} / {_fmt(labelled.brier, 4)} "
            f"({_fmt(labelled.brier_constant, 4)})"
            for plain, labelled in pairs
        )
        + "."
    )


def _calibration_line(row: CalibrationRow) -> str:
    return (
        f"| {row.horizon} | {row.signal} | {row.steps} | {row.positives} "
        f"| {_fmt(row.ece)} | {_fmt(row.brier, 4)} | {_fmt(row.brier_constant, 4)} |"
    )


def early_warning_markdown(run: EarlyWarningRun, image_links: dict[str, str]) -> str:
    """The "Early warning" section of docs/benchmarks.md."""
    refit = f"{run.refit_seconds:g} s"
    lines = [
        "## Early warning" + variant(run)[2],
        "",
        f"Command: `{run.command}`",
        "",
        f"Machine: {run.machine}. Wall time: {run.wall_seconds:.0f} s. Detectors: "
        f"{', '.join(run.detectors)} (fused); false_alarm_rate={run.false_alarm_rate}. "
        + _protocol(run)
        + " The test split is replayed cycle by cycle as the agent would score it; the "
        "beta-uniform mixtures behind both "
        f"probabilities are refitted every {refit} of data (the agent: every cycle) on the "
        "p-values before the step. Early-warning variants fitted: "
        + "; ".join(f"{d.upper()}: {', '.join(m)}" for d, m in run.methods.items() if m)
        + ".",
        "",
        "*Warned before start*: share of labelled events with an alarm in the horizon before "
        "their labelled start; *median lead*: of those alarms, seconds before the start; "
        "*detected by end*: an alarm anywhere from the horizon before the start to the end. A "
        "false warning is an alarm run touching no event extended by the horizon, per "
        "entity-day of test data; *time in false alarm* is the share of the steps outside "
        "the extended events that alarm. The early warning is compared at the fused score's "
        "own false-warning rate: its threshold is chosen on the other half of the dataset's "
        "entities (first half <-> second half, each evaluated at the threshold chosen on the "
        "other, listed in that order) as the lowest, scanning down, giving no more false "
        "warnings per day and no more time in false alarm there than the fused score at 1.0 "
        "gave on that half (*target*: its false warnings per day). *Evaluated*: the realised "
        "numbers on the entities scored. *Tuned in-sample*: the same rule applied on all the "
        "dataset's entities and evaluated on them, an upper bound on what a threshold chosen "
        "elsewhere can give. *Early-warning score*: the same evidence's combined p-value before "
        "the mixture (tempered by the gate where there is one), on the exported score's scale "
        "(1.0 at the false-alarm rate, "
        "calibrated per entity on its calibration slice), at 1.0 (nothing chosen on any data) "
        "and by the same two rules. *Alert ...*: the shipped alert rules replayed on the "
        f"replayed signals, at the {EARLY_WARNING_ALERT_HORIZON} horizon the "
        f"early-warning alert reads: {ANOMALY_ALERT.name} (P(anomalous now) "
        f"{ANOMALY_ALERT.describe()}), {EARLY_WARNING_ALERT.name} (the "
        f"{EARLY_WARNING_ALERT_HORIZON} early-warning score {EARLY_WARNING_ALERT.describe()}, "
        "unless "
        f"P(anomalous now) > {ANOMALY_ALERT.threshold:g}) and *either alert*, what pages the "
        "on-call; a `for:` is the steps it spans. *Alternative*: the early-warning alert on its "
        f"probability {PROBABILITY_WARNING_ALERT.describe()} instead of the score, as the rule "
        "file documents.",
        "",
    ]
    if run.skipped:
        lines += [
            "Left out (a detector could not fit the train split): " + " / ".join(run.skipped),
            "",
        ]
    for dataset in run.datasets:
        rows = [row for row in run.lead if row.dataset == dataset]
        if not rows:
            continue
        n_entities = len([item for item in run.entities if item.dataset == dataset])
        lines += [
            f"### {dataset.upper()} ({n_entities} entities, {rows[0].entity_days:.1f} "
            f"entity-days, {rows[0].events} events)",
            "",
        ]
        if n_entities < 2:
            lines += [
                "One entity only: its early-warning threshold was chosen on itself (in-sample).",
                "",
            ]
        lines += [
            "| horizon | signal | threshold | false warnings/day target | false warnings/day "
            "evaluated | time in false alarm | warned before start | median lead s | "
            "detected by end |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row.horizon} ({row.horizon_steps} steps) | {row.signal} | {row.thresholds} "
                f"| {_fmt(row.target_false_warnings_per_day, 2)} "
                f"| {_fmt(row.false_warnings_per_day, 2)} | {_fmt(row.alarm_share_outside, 4)} "
                f"| {_fmt(row.warned_before_start)} "
                f"| {_fmt(row.median_lead_seconds, 0)} | {_fmt(row.detected_by_end)} |"
            )
        calibration = [row for row in run.calibration if row.dataset == dataset]
        halves_only = (EARLY_WARNING_SECOND_HALF, EARLY_WARNING_LABELLED)
        header = [
            "| horizon | probability | steps | positives | ECE | Brier | Brier (constant) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            "",
            'Calibration against "an event starts within the horizon" (steps outside events, '
            "pooled):",
            "",
            *header,
            *[_calibration_line(row) for row in calibration if row.signal not in halves_only],
        ]
        labelled = [row for row in calibration if row.signal in halves_only]
        if labelled:
            lines += [
                "",
                "With feedback: every event starting in the first half of a test split labelled "
                "a confirmed incident, the early warning's labelled probability fitted on the "
                "scores of the horizon's steps before them against the first half's other "
                "steps outside events (the dataset's entities as one group), both "
                "probabilities measured on the second halves:",
                "",
                *header,
                *[_calibration_line(row) for row in labelled],
            ]
        if dataset in image_links:
            lines += ["", f"![{dataset} early-warning reliability]({image_links[dataset]})"]
        lines.append("")
    lines += ["### Reading", "", *early_warning_reading(run), ""]
    if run.precursors:
        lines += [*precursor_markdown(run), ""]
    if run.nab:
        lines += [
            "### NAB score",
            "",
            "Normalised NAB score (null detector 0, perfect 100); *cross-fold*: thresholds "
            "optimised by NAB's optimiser on the other half of the files (listed per half), "
            "raw scores summed over all files; *optimised on all*: NAB's own report, the "
            "threshold tuned on the answers of every file.",
            "",
            "| signal | profile | cross-fold | thresholds | optimised on all | threshold |",
            "|---|---|---|---|---|---|",
        ]
        for row in run.nab:
            lines.append(
                f"| {row.signal} | {row.profile} | {_fmt(row.score_cross_fold, 1)} "
                f"| {row.thresholds_cross_fold} | {_fmt(row.score_optimised_all, 1)} "
                f"| {_fmt(row.threshold_optimised_all)} |"
            )
        lines.append("")
    return "\n".join(lines)


def precursor_markdown(run: EarlyWarningRun) -> list[str]:
    """The "Before the labelled start" table and its reading."""
    lines = [
        "### Before the labelled start",
        "",
        "Whether a signal is up in the horizon before the labelled events more often than in "
        "any other stretch as long: *before events*, the share of events whose maximum over "
        "the horizon before their start exceeds the signal's quantile (per entity, over its "
        "steps outside events); *quiet windows*, the share of the windows of the horizon's "
        "length clear of every event (and of the horizon before one) that do. A threshold at "
        "that quantile can warn of at most the first share of the events, and alarms in about "
        "the second share of the quiet windows.",
        "",
        "| dataset | horizon | signal | quantile | events | before events | quiet windows "
        "| in quiet windows | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in run.precursors:
        ratio = row.before_events / row.quiet if row.quiet > 0 else math.nan
        lines.append(
            f"| {row.dataset.upper()} | {row.horizon} | {row.signal} | {row.quantile:g} "
            f"| {row.events} | {_fmt(row.before_events)} | {row.quiet_windows} "
            f"| {_fmt(row.quiet)} | {_fmt(ratio, 1)} |"
        )
    lines += ["", *_precursor_reading(run)]
    return lines


def _precursor_reading(run: EarlyWarningRun) -> list[str]:
    """Per dataset, at the longest horizon and the higher quantile: the fused score's and the
    early-warning score's shares, read against the quiet windows'."""
    out = []
    for dataset in run.datasets:
        rows = [row for row in run.precursors if row.dataset == dataset]
        if not rows:
            continue
        steps = max(row.horizon_steps for row in rows)
        quantile = max(row.quantile for row in rows)
        parts = []
        for row in rows:
            if row.horizon_steps == steps and row.quantile == quantile:
                parts.append(
                    f"the {row.signal} {_fmt(row.before_events)} of the events, "
                    f"{_fmt(row.quiet)} of the quiet windows"
                )
        out.append(
            f"- **{dataset.upper()}**, above the {quantile:g} quantile in the "
            f"{_horizon_of(rows, steps)} before: " + "; ".join(parts) + "."
        )
    return out


def _horizon_of(rows: Sequence[PrecursorRow], steps: int) -> str:
    return next(row.horizon for row in rows if row.horizon_steps == steps)


def _paired_reading(run: EarlyWarningRun, dataset: str) -> str:
    """Event by event, the early-warning score at 1.0 against the fused score at 1.0."""
    rows = [row for row in run.paired if row.dataset == dataset]
    if not rows:
        return ""
    return (
        " Event by event, warned before the start by the early-warning score at 1.0 alone / by "
        "the fused score alone (exact McNemar p): "
        + ", ".join(
            f"{row.horizon} {row.only_signal} / {row.only_versus} (p {row.p_value:.2f})"
            for row in rows
        )
        + "."
    )


def _before(row: LeadRow) -> str:
    """``k/n (median lead m min) at f false warnings/day``."""
    warned = round(row.warned_before_start * row.events) if row.events else 0
    lead = (
        f", median {row.median_lead_seconds / 60:.0f} min"
        if math.isfinite(row.median_lead_seconds)
        else ""
    )
    return f"{warned}/{row.events}{lead} at {_fmt(row.false_warnings_per_day, 2)}/day"


def early_warning_reading(run: EarlyWarningRun) -> list[str]:
    """What the tables say, one line per dataset, from the numbers themselves."""
    lines = []
    for dataset in run.datasets:
        rows = {(row.horizon, row.signal): row for row in run.lead if row.dataset == dataset}
        if not rows:
            continue
        horizons = list(dict.fromkeys(h for h, _ in rows))
        parts, earlier, carried, silent, untuned, level = [], 0, 0, 0, 0, 0
        for horizon in horizons:
            fused = rows[(horizon, FUSED_SCORE)]
            cross = rows[(horizon, EARLY_WARNING)]
            tuned = rows[(horizon, EARLY_WARNING_TUNED)]
            at_one = rows[(horizon, EARLY_WARNING_SCORE_AT_ONE)]
            parts.append(
                f"{horizon}: early warning {_before(cross)} (threshold from the other half), "
                f"{_before(tuned)} (tuned in-sample), early-warning score at 1.0 "
                f"{_before(at_one)}; fused score {_before(fused)}"
            )
            earlier += tuned.warned_before_start > fused.warned_before_start
            untuned += (
                at_one.warned_before_start > fused.warned_before_start
                and at_one.false_warnings_per_day <= fused.false_warnings_per_day
            )
            level += (
                0 < at_one.warned_before_start == fused.warned_before_start
                and at_one.false_warnings_per_day < fused.false_warnings_per_day
            )
            carried += cross.false_warnings_per_day <= 1.25 * fused.false_warnings_per_day
            silent += "never" in cross.thresholds or "never" in tuned.thresholds
        calibration = {
            (row.horizon, row.signal): row for row in run.calibration if row.dataset == dataset
        }
        skill = sum(
            calibration[(h, EARLY_WARNING)].brier < calibration[(h, EARLY_WARNING)].brier_constant
            for h in horizons
        )
        sharper = sum(
            calibration[(h, EARLY_WARNING)].ece < calibration[(h, ANOMALY_PROBABILITY)].ece
            for h in horizons
        )
        n = len(horizons)
        alerts = [rows.get((EARLY_WARNING_ALERT_HORIZON, name)) for name in ALERT_SIGNALS]
        alerting = (
            ""
            if None in alerts
            else " The shipped alert rules ("
            + f"{EARLY_WARNING_ALERT_HORIZON} horizon): "
            + ", ".join(
                f"{name.removeprefix('alert ')} warned {_before(row)}, detected "
                f"{round(row.detected_by_end * row.events)}/{row.events} by their end"
                for name, row in zip(ALERT_SIGNALS, alerts, strict=True)
                if row is not None
            )
            + "."
        )
        lines.append(
            f"- **{dataset.upper()}**, events warned before their start: "
            + "; ".join(parts)
            + f". At the fused score's own false-warning rate (tuned in-sample) the early warning "
            f"warned more events before their start than the fused score at {earlier} of {n} "
            f"horizons; with the threshold carried over from the other half of the entities its "
            f"false warnings stayed within 1.25x the fused score's at {carried} of {n}"
            + (
                f" (at {silent} of the {n} a threshold is 'never': none kept to the fused "
                "score's false-warning rate there, the early warning's highest values already "
                "alarm more often)"
                if silent
                else ""
            )
            + f"; the early-warning score at 1.0, with no threshold chosen at all, warned more "
            f"events before their start than the fused score with no more false warnings at "
            f"{untuned} of {n}, as many (at least one) with fewer false warnings at {level} of "
            f"{n}. Its Brier "
            f"score beats the constant base rate at {skill} of {n} horizons, and its ECE is "
            f"below P(anomalous now)'s against the same label at {sharper} of {n}."
            + _labelled_reading(calibration, horizons)
            + _paired_reading(run, dataset)
            + alerting
        )
    lines += [
        "",
        'Where P(anomalous now) is as far from the "event starts within the horizon" label as '
        "the early warning, the miscalibration is the recent p-values' drift away from the "
        "calibration slice's"
        + (
            " (this protocol never refits over the test split)"
            if run.fit_every_seconds is None
            else f" (within the {run.fit_every_seconds / 86400:g} days between refits)"
        )
        + ", not the early-warning evidence. Refitting the mixtures every "
        f"{run.refit_seconds:g} s of data instead of every step makes them slower to follow an "
        "event's onset, so the lead times here err on the short side.",
    ]
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aiops_plugin.evaluation.early_warning_benchmark",
        description="Lead time, calibration and NAB score of the early-warning probability.",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        choices=datasets.DATASETS,
        help="dataset to run (repeat; default: smd, asd and nab)",
    )
    parser.add_argument("--entities", help="comma-separated entities (default: all found)")
    parser.add_argument("--max-entities", type=int, help="first N entities of each dataset")
    parser.add_argument("--data-root", type=Path, help="data folder (default ../shared/data)")
    parser.add_argument(
        "--detectors",
        default=",".join(DEFAULT_DETECTORS),
        help="comma-separated detectors, fused; with forecaster its forecasts join the "
        "evidence (default %(default)s)",
    )
    parser.add_argument("--false-alarm-rate", type=float, default=0.001)
    parser.add_argument(
        "--refit-seconds",
        type=float,
        default=3600.0,
        help="data seconds between refits of the probability mixtures (default %(default)s)",
    )
    parser.add_argument(
        "--fit-every",
        type=float,
        default=_DEFAULT_SCHEDULE.fit_every,
        help="data seconds between refits of the models, as schedule.fit_every "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--fit-window",
        type=float,
        default=_DEFAULT_SCHEDULE.fit_window,
        help="seconds of history each refit uses, as schedule.fit_window (default %(default)s)",
    )
    parser.add_argument(
        "--single-fit",
        action="store_true",
        help="one fit on the train split scores the whole test split (no schedule)",
    )
    parser.add_argument(
        "--ramp",
        action="store_true",
        help="with early_warning.ramp: every metric's own line joins the evidence",
    )
    parser.add_argument(
        "--trend-steps",
        type=int,
        default=EarlyWarningConfig().trend_steps,
        help="early_warning.trend_steps: recent steps of the fused score whose trend is "
        "extrapolated (default %(default)s)",
    )
    parser.add_argument("--slice-rows", type=int, help="short slices of N rows (smoke tests)")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument("--csv-dir", type=Path, help="write lead/calibration/nab CSVs here")
    parser.add_argument(
        "--image-dir",
        type=Path,
        help="write early_warning_<dataset>.png reliability diagrams here",
    )
    parser.add_argument(
        "--markdown", type=Path, help="write the 'Early warning' section of this file"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (
        (f"OMP_NUM_THREADS={threads} " if threads else "")
        + "python -m aiops_plugin.evaluation.early_warning_benchmark "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    try:
        run = run_early_warning_benchmark(
            args.dataset or list(datasets.DATASETS),
            [name.strip() for name in args.detectors.split(",") if name.strip()],
            [name.strip() for name in args.entities.split(",")] if args.entities else None,
            args.data_root,
            args.false_alarm_rate,
            args.refit_seconds,
            args.max_entities,
            args.slice_rows,
            torch.device(args.device),
            command=command.strip(),
            fit_every_seconds=None if args.single_fit else args.fit_every,
            fit_window_seconds=None if args.single_fit else args.fit_window,
            settings=EarlyWarningConfig(ramp=args.ramp, trend_steps=args.trend_steps),
        )
    except datasets.DatasetError as exc:
        raise SystemExit(f"error: {exc}") from exc
    links: dict[str, str] = {}
    if args.image_dir:
        for path in plot_reliability(run, args.image_dir):
            dataset = path.stem.removeprefix("early_warning_").removesuffix(variant(run)[1])
            base = args.markdown.parent if args.markdown else Path.cwd()
            links[dataset] = os.path.relpath(path, base)
    if args.csv_dir:
        args.csv_dir.mkdir(parents=True, exist_ok=True)
        _write_rows(run.lead, LeadRow, args.csv_dir / "early_warning_lead.csv")
        _write_rows(run.calibration, CalibrationRow, args.csv_dir / "early_warning_calibration.csv")
        _write_rows(run.precursors, PrecursorRow, args.csv_dir / "early_warning_precursors.csv")
        _write_rows(run.paired, PairedRow, args.csv_dir / "early_warning_paired.csv")
        if run.nab:
            _write_rows(run.nab, NabRow, args.csv_dir / "early_warning_nab.csv")
        # every entity's signals, to evaluate other rules without scoring again
        with (args.csv_dir / "early_warning_entities.pkl").open("wb") as handle:
            pickle.dump([asdict(item) for item in run.entities], handle)
    text = early_warning_markdown(run, links)
    if args.markdown:
        write_markdown_section(args.markdown, variant(run)[0], text)
    print(text)


if __name__ == "__main__":
    main()
