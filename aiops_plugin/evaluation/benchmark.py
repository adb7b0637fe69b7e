"""Benchmark detectors on real labelled data through the agent's own code path.

Each entity of a dataset is one entity group of one entity, calibrated exactly as the agent
calibrates a group (:mod:`aiops_plugin.calibration.stage`):

1. every requested detector is trained with :meth:`FittedModel.fit_split` on the earlier
   ``1 - calibration_fraction`` of the dataset's train split and scores the rest of it (the
   calibration slice, raw scores);
2. one :class:`GroupCalibration` over all of them is fitted on those slices;
3. the test split is scored raw with :meth:`FittedModel.score`, preceded by the detector's context
   from the end of the train split, exactly as the agent scores its buffer (the agent exports the
   last step of each cycle; scoring all test steps in one call gives the same numbers for these
   causal detectors, only faster), turned into p-values per detector and ``fused`` (Cauchy
   combination recalibrated on the calibration slice), and put on the exported scale with
   :func:`score_from_p` (1.0 = the configured false-alarm rate). ``fused`` is one more row per
   entity, also with a single detector (then it is that detector recalibrated once more).

Threshold-free metrics use the exported scores (monotone in the p-value, so they rank steps as
``-log p`` does; NaN = not scored, dropped as before); thresholded event metrics and the realised
false-alarm rate use the product's own operating point, score >= 1.0. The anomaly probability
(``fused`` only) is measured on the second half of each test split, two ways: unlabelled, the
:class:`RecentProbability` the agent exports (seeded from the calibration slice and updated every
step of the test split), and labelled, a :class:`LabelledProbability` fitted on the first half's
fused p-values and labels as if they were feedback. NAB is scored as NAB does it: one threshold
per detector and profile, optimised over the whole corpus, and normalised so that the null
detector scores 0 and the perfect one 100; and, with no threshold tuned on the answers, at the
operating point (detections = score >= 1.0).

That is one fit per entity, on the train split. The agent itself refits every
``schedule.fit_every`` on the trailing ``schedule.fit_window`` of whatever history it has, so its
calibration is never older than ``fit_every``; ``refit_every`` / ``fit_window`` (rows) measure
that operating point: before every block of ``refit_every`` test rows, steps 1 and 2 are redone on
the trailing ``fit_window`` rows of the train split followed by the test rows before the block,
and the block is scored with that fit (step 3; the probability is reseeded at each refit, as the
agent does). The blocks' p-values are concatenated and evaluated exactly as a single fit's.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from aiops_plugin.calibration import InsufficientLabelsError, LabelledProbability, score_from_p
from aiops_plugin.calibration.stage import GroupCalibration, RecentProbability
from aiops_plugin.config import CalibrationConfig, DetectorsConfig
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.evaluation import datasets, metrics
from aiops_plugin.windows import Windows

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DEFAULT_DETECTORS = ("mad", "iforest", "pca", "cblof")
OPERATING_THRESHOLD = 1.0
FUSED = "fused"
#: Equal-width probability bins of the ECE and the reliability diagram.
CALIBRATION_BINS = 10
_DEFAULT_CALIBRATION = CalibrationConfig()


@dataclass
class ScoredEntity:
    """One detector's exported test scores for one entity, with what is needed to evaluate them.

    ``probability`` and ``probability_labelled`` (``fused`` only): P(anomalous) per test step,
    NaN outside the measured steps ``[measured_from, T)`` (the second half); the labelled one is
    None where the first half held too few labels of either kind to fit it.
    """

    dataset: str
    entity: str
    detector: str
    scores: np.ndarray
    labels: np.ndarray
    step_seconds: float
    fit_seconds: float
    score_seconds: float
    notes: list[str] = field(default_factory=list)
    false_alarm_rate: float = math.nan
    p_values: np.ndarray | None = None
    probability: np.ndarray | None = None
    probability_labelled: np.ndarray | None = None
    measured_from: int = 0
    #: how many fits (and group calibrations) scored the test split: 1, or one per refit
    fits: int = 1


@dataclass
class EntityMetrics:
    dataset: str
    detector: str
    entity: str
    test_rows: int
    anomalous_rows: int
    auc_roc: float
    auc_pr: float
    vus_roc: float
    vus_pr: float
    best_f1: float
    best_f1_precision: float
    best_f1_recall: float
    pa_f1_inflated: float
    events: int
    event_recall_at_1: float
    false_alarms_per_day_at_1: float
    mean_delay_seconds_at_1: float
    configured_false_alarm_rate: float
    realised_false_alarm_rate: float
    #: ``fused`` only (None = empty cell elsewhere): unlabelled probability, second half
    ece: float | None
    brier: float | None
    #: ``fused`` only; None also where the first half had too few labels to fit
    ece_labelled: float | None
    brier_labelled: float | None
    #: ``fused`` only: Brier score of the best constant forecast on the measured half, its
    #: anomaly share ``a``: ``a (1 - a)``; a probability below it has skill, above it none
    brier_constant: float | None
    #: NAB files only: the file's normalised standard-profile NAB score at score >= 1.0
    nab_standard_operating: float | None
    fit_seconds: float
    score_seconds: float
    notes: str = ""


def series_windows(series: datasets.LabelledSeries, values: np.ndarray) -> Windows:
    """``values`` ``(time, features)`` of one dataset entity as the agent's one-entity windows."""
    return Windows.from_array(
        values[None],
        group=series.dataset,
        step=series.step_seconds,
        entities=[{"entity": series.entity}],
        features=list(series.feature_names),
    )


def probabilities(
    calibration: GroupCalibration | Sequence[tuple[int, GroupCalibration]],
    fused_p: np.ndarray,
    labels: np.ndarray,
    capacity: int,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The two anomaly probabilities of one entity's test split, on its second half.

    ``fused_p``, ``labels``: ``(T,)``. Returns ``(unlabelled, labelled or None, measured_from)``,
    both ``(T,)`` and NaN before ``measured_from = T // 2``.

    Unlabelled: what the agent exports each cycle, :meth:`RecentProbability.update`'s answer for
    the step, seeded from the calibration slice's fused p-values. ``calibration``
    is the one calibration of the whole test split, or, with periodic refits, ``(first test
    step, calibration)`` per successful refit: like the agent, each refit seeds a new
    :class:`RecentProbability` from its own calibration slice, updated step by step until the
    next refit. The mixture is refit from its buffer alone (a fixed start, no state carried
    over), so seeding with the calibration p-values followed by the steps before the measured
    half gives the buffer, and so every later answer, that updating step by step would; only the
    answers of the measured half are computed step by step.
    """
    fused_p = np.asarray(fused_p, dtype=np.float64)
    n_steps = fused_p.size
    half = n_steps // 2
    refits = [(0, calibration)] if isinstance(calibration, GroupCalibration) else list(calibration)
    unlabelled = np.full(n_steps, np.nan)
    for index, (start, fitted) in enumerate(refits):
        end = refits[index + 1][0] if index + 1 < len(refits) else n_steps
        first = max(start, half)
        if first >= end:
            continue
        seed = np.concatenate(
            [np.asarray(fitted.fused_calibration_p_), fused_p[None, start:first]], 1
        )
        recent = RecentProbability(capacity).seed(seed)
        for step in range(first, end):
            unlabelled[step] = recent.update(fused_p[step : step + 1])[0]
    labelled: np.ndarray | None = None
    try:
        model = LabelledProbability().fit(fused_p[:half], labels[:half])
    except InsufficientLabelsError:
        pass
    else:
        labelled = np.full(n_steps, np.nan)
        labelled[half:] = model.probability(fused_p[half:])
    return unlabelled, labelled, half


def refit_blocks(
    full: np.ndarray, n_train: int, block: int, window: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The blocks of a periodic refit: ``(start, end, history)`` for every ``block`` rows of the
    test split (``full``: the train split's ``n_train`` rows, then the test split), ``start..end``
    in test rows and ``history`` the trailing ``window`` rows before the block, what its refit
    reads (one empty block where the test split is empty)."""
    n_test = len(full) - n_train
    for start in range(0, max(n_test, 1), max(block, 1)):
        end = min(start + block, n_test)
        yield start, end, full[max(0, n_train + start - window) : n_train + start]


def _fit_detectors(
    series: datasets.LabelledSeries,
    history: np.ndarray,
    detector_names: Sequence[str],
    detectors: DetectorsConfig,
    device: torch.device,
    calibration_fraction: float,
) -> tuple[dict[str, FittedModel], dict[str, np.ndarray], dict[str, float]]:
    """Every detector fitted with :meth:`FittedModel.fit_split` on ``history`` (one fit
    window): ``(models, raw calibration slices, fit seconds)``; ValueError names the detector."""
    models: dict[str, FittedModel] = {}
    raw_calibration: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    windows = series_windows(series, history)
    for name in detector_names:
        started = time.perf_counter()
        detector = build_detector(name, detectors, device)
        try:
            models[name], raw_calibration[name] = FittedModel.fit_split(
                detector, windows, calibration_fraction
            )
        except ValueError as exc:
            raise ValueError(f"{series.dataset} {series.entity}, {name}: {exc}") from exc
        seconds[name] = time.perf_counter() - started
    return models, raw_calibration, seconds


def score_series(
    series: datasets.LabelledSeries,
    detector_names: Sequence[str],
    detectors: DetectorsConfig,
    false_alarm_rate: float,
    device: torch.device,
    calibration_fraction: float = _DEFAULT_CALIBRATION.calibration_fraction,
    tail_fraction: float = _DEFAULT_CALIBRATION.tail_fraction,
    recent_p_values: int = _DEFAULT_CALIBRATION.recent_p_values,
    refit_every: int | None = None,
    fit_window: int | None = None,
    fused_subsets: Sequence[Sequence[str]] = (),
) -> list[ScoredEntity]:
    """Fit and calibrate the detectors as one group, score the test split.

    Single fit (``refit_every`` None): one fit on the train split (its last ``fit_window`` rows,
    default all of it) scores the whole test split. Periodic refit (``refit_every = N`` rows), as
    the agent's schedule (``fit_every``, ``fit_window``) does: the test split is cut into blocks
    of N rows (the last one may be shorter); before each block all detectors are refitted with
    :meth:`FittedModel.fit_split` on the trailing ``fit_window`` rows (default: the train
    split's length) of the history so far (the train split followed by the test rows before the
    block, whatever they hold), a new :class:`GroupCalibration` is fitted on that fit's
    calibration slice, and the block is scored with them, its context reaching back into the
    rows before it. A refit whose window is too short for ``fit_split`` (ValueError) keeps the
    previous models and calibration for its block (the first fit must succeed).

    ``fused_subsets``: more fused rows, one per subset of ``detector_names`` (named by
    :func:`fused_subset_name`), each the same combination and recalibration over that subset
    alone, from the same fits: which detectors pay their way in the fused score, measured
    without fitting anything twice.

    One :class:`ScoredEntity` per detector, in order, then one per fused subset, then ``fused``.
    Timings: a detector's fit
    is :meth:`FittedModel.fit_split` (training and scoring its calibration slice), the mean per
    fit, its score the raw scoring of the test split; ``fused``'s fit is the group calibration
    (mean per fit), its score the p-values of every detector and the probabilities.
    """
    if not detector_names:
        raise ValueError("the benchmark needs at least one detector")
    if refit_every is not None and refit_every < 1:
        raise ValueError(f"refit_every must be >= 1 row, got {refit_every}")
    if fit_window is not None and fit_window < 1:
        raise ValueError(f"fit_window must be >= 1 row, got {fit_window}")
    subsets = {fused_subset_name(subset): list(subset) for subset in fused_subsets}
    for name, subset in subsets.items():
        if not subset or set(subset) - set(detector_names):
            raise ValueError(f"fused subset {name}: detectors must be among {list(detector_names)}")
    keys = series_windows(series, series.train[:1]).keys
    n_train, n_test = len(series.train), len(series.test)
    window = fit_window or n_train
    block = refit_every or max(n_test, 1)
    full = np.concatenate([series.train, series.test])
    row_names = [*detector_names, *subsets, FUSED]
    fit_seconds: dict[str, list[float]] = {name: [] for name in row_names}
    score_seconds = dict.fromkeys(row_names, 0.0)
    p_blocks: dict[str, list[np.ndarray]] = {name: [] for name in row_names}
    refits: list[tuple[int, GroupCalibration]] = []
    subset_calibrations: dict[str, GroupCalibration] = {}
    models: dict[str, FittedModel] = {}
    calibration: GroupCalibration | None = None
    kept: list[str] = []
    for start, end, history in refit_blocks(full, n_train, block, window):
        try:
            fitted, raw_calibration, seconds = _fit_detectors(
                series, history, detector_names, detectors, device, calibration_fraction
            )
        except ValueError as exc:
            if calibration is None:
                raise
            kept.append(f"{start}: {exc}")
        else:
            models = fitted
            for name, value in seconds.items():
                fit_seconds[name].append(value)
            calibrating = time.perf_counter()
            calibration = GroupCalibration(list(detector_names), tail_fraction).fit(
                raw_calibration, keys
            )
            fit_seconds[FUSED].append(time.perf_counter() - calibrating)
            refits.append((start, calibration))
            for name, subset in subsets.items():
                calibrating = time.perf_counter()
                subset_calibrations[name] = GroupCalibration(subset, tail_fraction).fit(
                    {detector: raw_calibration[detector] for detector in subset}, keys
                )
                fit_seconds[name].append(time.perf_counter() - calibrating)
        raw_block: dict[str, np.ndarray] = {}
        for name in detector_names:
            scoring = time.perf_counter()
            model = models[name]
            context = min(model.detector.context_steps, n_train + start)
            values = full[n_train + start - context : n_train + end]
            raw_block[name] = model.score(series_windows(series, values)).score[:, context:]
            score_seconds[name] += time.perf_counter() - scoring
        scoring = time.perf_counter()
        for name, p in calibration.p_values(raw_block, keys).items():
            p_blocks[name].append(np.asarray(p[0], dtype=np.float64))
        score_seconds[FUSED] += time.perf_counter() - scoring
        for name, subset in subsets.items():
            scoring = time.perf_counter()
            p = subset_calibrations[name].p_values(
                {detector: raw_block[detector] for detector in subset}, keys
            )[FUSED]
            p_blocks[name].append(np.asarray(p[0], dtype=np.float64))
            score_seconds[name] += time.perf_counter() - scoring
    p_values = {name: np.concatenate(blocks) for name, blocks in p_blocks.items()}
    labels = series.test_labels.astype(np.int8)
    scoring = time.perf_counter()
    unlabelled, labelled, measured_from = probabilities(
        refits, p_values[FUSED], labels, recent_p_values
    )
    score_seconds[FUSED] += time.perf_counter() - scoring
    notes = list(series.notes)
    if refit_every is not None:
        notes.append(
            f"refit every {refit_every} rows on the trailing {window} rows: {len(refits)} fits"
        )
    notes += [f"refit before test row {why}; kept the previous models" for why in kept]
    scored = []
    for name in row_names:
        p = p_values[name]
        scored.append(
            ScoredEntity(
                dataset=series.dataset,
                entity=series.entity,
                detector=name,
                scores=score_from_p(p, false_alarm_rate),
                labels=labels,
                step_seconds=series.step_seconds,
                fit_seconds=float(np.mean(fit_seconds[name])),
                score_seconds=score_seconds[name],
                notes=list(notes),
                false_alarm_rate=false_alarm_rate,
                p_values=p,
                probability=unlabelled if name == FUSED else None,
                probability_labelled=labelled if name == FUSED else None,
                measured_from=measured_from if name == FUSED else 0,
                fits=len(refits),
            )
        )
    return scored


def fused_subset_name(subset: Sequence[str]) -> str:
    """The row name of a fused subset: ``fused(multiscale+forecaster)``."""
    return f"{FUSED}({'+'.join(subset)})"


def _optional(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def evaluate_entity(
    scored: ScoredEntity, nab_standard_operating: float | None = None
) -> EntityMetrics:
    """Every metric of the harness for one scored entity (NaN where undefined, with a note)."""
    scores, labels = scored.scores, scored.labels
    notes = list(scored.notes)
    if not labels.any():
        notes.append("all-normal test set: threshold-free metrics and F1 undefined")
    best = metrics.best_f1(scores, labels)
    adjusted = metrics.point_adjusted_f1(scores, labels)
    events = metrics.event_metrics(scores, labels, OPERATING_THRESHOLD, scored.step_seconds)
    calibration: dict[str, float | None] = dict.fromkeys(
        ("ece", "brier", "ece_labelled", "brier_labelled", "brier_constant")
    )
    if scored.probability is not None:
        measured = slice(scored.measured_from, None)
        y = labels[measured]
        share = float(np.mean(y)) if y.size else math.nan
        calibration["brier_constant"] = _optional(share * (1.0 - share))
        for suffix, probability in (
            ("", scored.probability),
            ("_labelled", scored.probability_labelled),
        ):
            if probability is None:
                continue
            p = probability[measured]
            calibration["ece" + suffix] = _optional(
                metrics.expected_calibration_error(p, y, CALIBRATION_BINS)
            )
            calibration["brier" + suffix] = _optional(metrics.brier_score(p, y))
        if scored.probability_labelled is None:
            notes.append("too few labels in the first half to fit the labelled probability")
    return EntityMetrics(
        dataset=scored.dataset,
        detector=scored.detector,
        entity=scored.entity,
        test_rows=len(labels),
        anomalous_rows=int(labels.sum()),
        auc_roc=metrics.auc_roc(scores, labels),
        auc_pr=metrics.auc_pr(scores, labels),
        vus_roc=metrics.vus_roc(scores, labels),
        vus_pr=metrics.vus_pr(scores, labels),
        best_f1=best.f1,
        best_f1_precision=best.precision,
        best_f1_recall=best.recall,
        pa_f1_inflated=adjusted.f1,
        events=events.n_events,
        event_recall_at_1=events.event_recall,
        false_alarms_per_day_at_1=events.false_alarms_per_day,
        mean_delay_seconds_at_1=events.mean_delay_seconds,
        configured_false_alarm_rate=scored.false_alarm_rate,
        realised_false_alarm_rate=metrics.realised_false_alarm_rate(
            scores, labels, OPERATING_THRESHOLD
        ),
        ece=calibration["ece"],
        brier=calibration["brier"],
        ece_labelled=calibration["ece_labelled"],
        brier_labelled=calibration["brier_labelled"],
        brier_constant=calibration["brier_constant"],
        nab_standard_operating=nab_standard_operating,
        fit_seconds=scored.fit_seconds,
        score_seconds=scored.score_seconds,
        notes="; ".join(notes),
    )


@dataclass
class NabResult:
    detector: str
    profile: str
    threshold: float
    score_optimised: float
    score_at_1: float


def _nab_file(item: ScoredEntity, data_root: Path | None) -> tuple[np.ndarray, ...]:
    """A scored NAB file as NAB scores it: the whole file, probationary rows unscored (NaN)."""
    timestamps, _, _, windows = datasets.nab_full(item.entity, data_root)
    probation = len(timestamps) - len(item.scores)
    return np.concatenate([np.full(probation, np.nan), item.scores]), timestamps, windows


def nab_file_score_at_operating_point(
    item: ScoredEntity, data_root: Path | None, profile: str = "standard"
) -> float:
    """One NAB file's normalised NAB score with detections = score >= 1.0 (NaN: no window)."""
    cost = datasets.nab_profiles(data_root)[profile]["CostMatrix"]
    scores, timestamps, windows = _nab_file(item, data_root)
    return metrics.nab_score_at([scores], [timestamps], [windows], cost, OPERATING_THRESHOLD)


def nab_scores(scored: Sequence[ScoredEntity], data_root: Path | None) -> list[NabResult]:
    """NAB's normalised score per detector and profile, over every scored NAB file."""
    profiles = datasets.nab_profiles(data_root)
    results = []
    for detector in list(dict.fromkeys(item.detector for item in scored)):
        files = [_nab_file(item, data_root) for item in scored if item.detector == detector]
        per_file_scores = [scores for scores, _, _ in files]
        per_file_times = [timestamps for _, timestamps, _ in files]
        per_file_windows = [windows for _, _, windows in files]
        for profile, spec in profiles.items():
            cost = spec["CostMatrix"]
            threshold, optimised = metrics.nab_best_threshold(
                per_file_scores, per_file_times, per_file_windows, cost
            )
            at_1 = metrics.nab_score_at(
                per_file_scores, per_file_times, per_file_windows, cost, OPERATING_THRESHOLD
            )
            results.append(NabResult(detector, profile, threshold, optimised, at_1))
    return results


@dataclass
class BenchmarkRun:
    command: str
    datasets: list[str]
    detectors: list[str]
    false_alarm_rate: float
    rows: list[EntityMetrics]
    nab: list[NabResult]
    scored: list[ScoredEntity]
    wall_seconds: float
    machine: str
    hyper_parameters: dict[str, dict] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)
    #: rows between refits (None: one fit on the train split) and rows each fit reads (None:
    #: the train split's length, per entity)
    refit_every: int | None = None
    fit_window: int | None = None
    #: subsets of ``detectors`` with a fused row of their own
    fused_subsets: list[list[str]] = field(default_factory=list)
    #: entities left out, with why (a detector could not fit them):
    #: ``"dataset entity, detector: why"``
    skipped: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str:
        """How the detectors were fitted, in words (the report's header states it)."""
        if self.refit_every is None:
            where = (
                "the train split"
                if self.fit_window is None
                else f"the trailing {self.fit_window} rows of the train split"
            )
            return f"single fit on {where}, scoring the whole test split"
        return (
            f"refit every {self.refit_every} rows on {self.fit_window_words}, as the agent's "
            "schedule does"
        )

    @property
    def fit_window_words(self) -> str:
        if self.fit_window is None:
            return "a trailing window as long as the train split"
        return f"the trailing {self.fit_window} rows"

    @property
    def rows_detectors(self) -> list[str]:
        """The detectors of the rows: the requested ones, the fused subsets, then ``fused``."""
        return [*self.detectors, *map(fused_subset_name, self.fused_subsets), FUSED]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    described = (
        f"{platform.system()} {platform.machine()}, {_cpu_model()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads"
    )
    if device.type == "cuda":
        described += f", {torch.cuda.get_device_name(device)}"
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    return f"{described}; {versions}, device {device}"


def short_slice(series: datasets.LabelledSeries, rows: int) -> datasets.LabelledSeries:
    """The last ``rows`` train rows and ``rows`` test rows around the first labelled anomaly, for
    quick runs (tests, smoke checks); never used for the published tables."""
    starts = [segment[0] for segment in series.segments]
    begin = max(0, min(starts[0] - rows // 4, len(series.test) - rows)) if starts else 0
    end = begin + rows
    return dataclasses.replace(
        series,
        train=series.train[-rows:],
        test=series.test[begin:end],
        test_labels=series.test_labels[begin:end],
        test_timestamps=None
        if series.test_timestamps is None
        else series.test_timestamps[begin:end],
        segments=[
            (max(a, begin) - begin, min(b, end) - begin, culprits)
            for a, b, culprits in series.segments
            if a < end and b > begin
        ],
        notes=[*series.notes, f"short slice: train[-{rows}:], test[{begin}:{end}]"],
    )


def run_benchmark(
    dataset_names: Sequence[str],
    detector_names: Sequence[str] = DEFAULT_DETECTORS,
    entities: Sequence[str] | None = None,
    data_root: Path | None = None,
    false_alarm_rate: float = 0.001,
    detectors: DetectorsConfig | None = None,
    device: torch.device | None = None,
    command: str = "",
    progress: bool = True,
    slice_rows: int | None = None,
    calibration_fraction: float = _DEFAULT_CALIBRATION.calibration_fraction,
    tail_fraction: float = _DEFAULT_CALIBRATION.tail_fraction,
    recent_p_values: int = _DEFAULT_CALIBRATION.recent_p_values,
    refit_every: int | None = None,
    fit_window: int | None = None,
    fused_subsets: Sequence[Sequence[str]] = (),
) -> BenchmarkRun:
    """Score every (dataset, entity) with all detectors and ``fused``, and evaluate it; seeds are
    fixed in the configs.

    ``refit_every`` (rows; None = one fit on the train split): refit and recalibrate before every
    block of that many test rows on the trailing ``fit_window`` rows of history (default: the
    train split's length), as the agent's ``schedule.fit_every`` / ``fit_window`` do
    (:func:`score_series`). ``fused_subsets``: extra fused rows over subsets of the detectors.
    """
    started = time.perf_counter()
    torch.manual_seed(0)
    detectors = detectors or DetectorsConfig()
    device = device or torch.device("cpu")
    if not detector_names:
        raise ValueError("the benchmark needs at least one detector")
    all_series = datasets.load_datasets(dataset_names, entities, data_root)
    if slice_rows:
        all_series = [short_slice(series, slice_rows) for series in all_series]
    rows: list[EntityMetrics] = []
    scored_all: list[ScoredEntity] = []
    skipped: list[str] = []
    for series in tqdm(all_series, desc="benchmark", unit="entity", disable=not progress):
        try:
            entity_scores = score_series(
                series,
                detector_names,
                detectors,
                false_alarm_rate,
                device,
                calibration_fraction,
                tail_fraction,
                recent_p_values,
                refit_every,
                fit_window,
                fused_subsets,
            )
        except ValueError as exc:
            # one detector cannot fit this entity (a file too short for its window): the entity
            # is left out for every detector, so all rows are means over the same entities
            log.warning("benchmark: %s left out: %s", series.entity, exc)
            skipped.append(str(exc))
            continue
        for scored in entity_scores:
            # NAB scores whole files; a short slice is not one
            nab_operating = (
                nab_file_score_at_operating_point(scored, data_root)
                if series.dataset == "nab" and not slice_rows
                else None
            )
            scored_all.append(scored)
            rows.append(evaluate_entity(scored, nab_operating))
    nab = [] if slice_rows else nab_scores([s for s in scored_all if s.dataset == "nab"], data_root)
    return BenchmarkRun(
        command=command,
        datasets=list(dataset_names),
        detectors=list(detector_names),
        false_alarm_rate=false_alarm_rate,
        rows=rows,
        nab=nab,
        scored=scored_all,
        wall_seconds=time.perf_counter() - started,
        machine=machine_description(device),
        hyper_parameters={
            name: getattr(detectors, name).model_dump(exclude={"enabled"})
            for name in detector_names
        },
        calibration={
            "calibration_fraction": calibration_fraction,
            "tail_fraction": tail_fraction,
            "recent_p_values": recent_p_values,
        },
        refit_every=refit_every,
        fit_window=fit_window,
        fused_subsets=[list(subset) for subset in fused_subsets],
        skipped=skipped,
    )


# ----------------------------------------------------------------------------------- reports
SUMMARY_COLUMNS = (
    ("auc_roc", "AUC-ROC"),
    ("auc_pr", "AUC-PR"),
    ("vus_roc", "VUS-ROC"),
    ("vus_pr", "VUS-PR"),
    ("best_f1", "best F1"),
    ("pa_f1_inflated", "PA-F1 (inflated)"),
    ("event_recall_at_1", "event recall @1"),
    ("false_alarms_per_day_at_1", "false alarms/day @1"),
    ("mean_delay_seconds_at_1", "mean delay s @1"),
    ("realised_false_alarm_rate", "realised false-alarm rate @1"),
    ("fit_seconds", "fit s"),
    ("score_seconds", "score s"),
)
CALIBRATION_COLUMNS = (
    ("ece", "ECE (unlabelled)"),
    ("brier", "Brier (unlabelled)"),
    ("ece_labelled", "ECE (labelled)"),
    ("brier_labelled", "Brier (labelled)"),
    ("brier_constant", "Brier (constant forecast)"),
)
_DIGITS = {
    "false_alarms_per_day_at_1": 1,
    "mean_delay_seconds_at_1": 1,
    "fit_seconds": 1,
    "score_seconds": 1,
    "realised_false_alarm_rate": 4,
}


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _mean(values: list[float | None]) -> tuple[float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), len(values) - len(finite)


def _pooled_probabilities(
    run: BenchmarkRun, dataset: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(unlabelled p, its labels, labelled p, its labels)`` over the measured halves of a
    dataset's entities (the labelled ones only where it could be fitted)."""
    fused = [s for s in run.scored if s.dataset == dataset and s.probability is not None]

    def pool(items: list[ScoredEntity], attribute: str) -> tuple[np.ndarray, np.ndarray]:
        if not items:
            return np.empty(0), np.empty(0, dtype=np.int8)
        return (
            np.concatenate([getattr(s, attribute)[s.measured_from :] for s in items]),
            np.concatenate([s.labels[s.measured_from :] for s in items]),
        )

    unlabelled = pool(fused, "probability")
    labelled = pool(
        [s for s in fused if s.probability_labelled is not None], "probability_labelled"
    )
    return (*unlabelled, *labelled)


def markdown_report(run: BenchmarkRun) -> str:
    calibration = ", ".join(f"{key}={value}" for key, value in run.calibration.items())
    if run.refit_every is None:
        fitting = (
            "Per entity, all detectors are fitted once on the "
            + (
                "train split's earlier part"
                if run.fit_window is None
                else f"earlier part of the train split's last {run.fit_window} rows"
            )
            + f" and calibrated as one group on the rest, as the agent does ({calibration}), "
            "and that one fit scores the whole test split"
        )
        seeded = "seeded from the calibration slice"
    else:
        rows = "the train split's length" if run.fit_window is None else f"{run.fit_window}"
        fitting = (
            f"Per entity, the test split is cut into blocks of {run.refit_every} rows; before "
            f"each block all detectors are refitted on {run.fit_window_words} of the history "
            "so far (the train split followed by the test rows before the block, whatever they "
            "hold, as the agent's fit reads them: "
            f"schedule.fit_every = {run.refit_every} steps, schedule.fit_window = {rows} steps), "
            "trained on its earlier part and calibrated as one group on the rest "
            f"({calibration}); each fit scores its block only. 'fit s' is the mean per fit"
        )
        seeded = "reseeded from each refit's calibration slice"
    lines = [
        "## Detectors on labelled metrics"
        + ("" if run.refit_every is None else f", refit every {run.refit_every} rows"),
        "",
        f"Command: `{run.command}`",
        "",
        f"Mode: **{run.mode}**.",
        "",
        f"Machine: {run.machine}. Wall time: {run.wall_seconds:.0f} s. "
        f"{fitting}; a score is the p-value on "
        f"the exported scale at configured false_alarm_rate={run.false_alarm_rate}, and "
        "`fused` is the group's Cauchy-combined p-value recalibrated on the calibration slice"
        + (
            "; `fused(a+b)` is the same over detectors a and b alone, from the same fits. "
            if run.fused_subsets
            else ". "
        )
        + "'@1' = at the product's threshold, score >= 1.0; the realised false-alarm rate is the "
        "share of the test split's normal rows with score >= 1.0, to compare with the "
        "configured one. PA-F1 is point-adjusted F1, INFLATED: it credits a whole "
        "labelled segment for a single detected point; shown only to compare with older papers.",
        "",
        "Detectors (hyper-parameters as run; every seed fixed):",
        "",
        *(f"- `{name}`: {params}" for name, params in run.hyper_parameters.items()),
        "",
        "Anomaly probability (`fused` only; ECE over 10 equal-width bins, weighted by count, and "
        "Brier score, on the second half of each test split): *unlabelled* is what the agent "
        "exports, the beta-uniform mixture of the group's recent fused p-values, "
        f"{seeded} and updated every test step; *labelled* is the isotonic map fitted "
        "on the first half's fused p-values and labels, as if every step had been given "
        "feedback (n/a where that half held fewer than 20 anomalous or 20 normal steps). "
        "*Constant forecast* is the Brier score of always predicting the measured half's own "
        "anomaly share, the reference a probability must beat to have any skill.",
        "",
    ]
    if run.skipped:
        lines += [
            "Left out for every detector (a detector could not fit them): "
            + " / ".join(run.skipped),
            "",
        ]
    for dataset in run.datasets:
        rows = [row for row in run.rows if row.dataset == dataset]
        if not rows:
            continue
        entities = list(dict.fromkeys(row.entity for row in rows))
        lines += [f"### {dataset.upper()} ({len(entities)} entities)", ""]
        header = ["detector", *(title for _, title in SUMMARY_COLUMNS)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        undefined_notes = []
        for detector in run.rows_detectors:
            mine = [row for row in rows if row.detector == detector]
            cells = [detector]
            for column, title in SUMMARY_COLUMNS:
                mean, undefined = _mean([getattr(row, column) for row in mine])
                cells.append(_fmt(mean, _DIGITS.get(column, 3)))
                if undefined and detector == run.detectors[0]:
                    undefined_notes.append(f"{title}: undefined for {undefined} entit(y/ies)")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "Means over entities where the metric is defined."
            + (
                " " + "; ".join(undefined_notes) + " (excluded from the mean)."
                if undefined_notes
                else ""
            )
        )
        fused_rows = [row for row in rows if row.detector == FUSED]
        lines += [
            "",
            "Anomaly probability of `fused` (means over entities; pooled in brackets):",
            "",
        ]
        lines += [
            "| " + " | ".join(title for _, title in CALIBRATION_COLUMNS) + " |",
            "|" + "---|" * len(CALIBRATION_COLUMNS),
        ]
        p, y, p_labelled, y_labelled = _pooled_probabilities(run, dataset)
        pooled = {
            "ece": metrics.expected_calibration_error(p, y, CALIBRATION_BINS) if p.size else None,
            "brier": metrics.brier_score(p, y) if p.size else None,
            "ece_labelled": metrics.expected_calibration_error(
                p_labelled, y_labelled, CALIBRATION_BINS
            )
            if p_labelled.size
            else None,
            "brier_labelled": metrics.brier_score(p_labelled, y_labelled)
            if p_labelled.size
            else None,
            "brier_constant": float(np.mean(y) * (1.0 - np.mean(y))) if y.size else None,
        }
        cells = []
        for column, _ in CALIBRATION_COLUMNS:
            mean, undefined = _mean([getattr(row, column) for row in fused_rows])
            cell = f"{_fmt(mean)} [{_fmt(pooled[column])}]"
            if undefined:
                cell += f" (n/a for {undefined})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
        for column, title in (("vus_pr", "VUS-PR"), ("best_f1", "best F1")):
            lines += ["", f"{title} per entity:", ""]
            lines += [
                "| detector | " + " | ".join(entities) + " |",
                "|" + "---|" * (len(entities) + 1),
            ]
            for detector in run.rows_detectors:
                by_entity = {
                    row.entity: getattr(row, column) for row in rows if row.detector == detector
                }
                lines.append(
                    f"| {detector} | "
                    + " | ".join(_fmt(by_entity.get(e, float("nan"))) for e in entities)
                    + " |"
                )
        notes = sorted({f"{row.entity}: {row.notes}" for row in rows if row.notes})
        if notes:
            lines += ["", "Data notes: " + " / ".join(notes)]
        lines.append("")
        if dataset == "nab" and run.nab:
            lines += [
                "NAB score (normalised: null detector 0, perfect 100; probationary 15 % not "
                "scored; threshold optimised over these files per detector and profile as NAB's "
                "`--optimize` does, and at the product's operating point, detections = score "
                ">= 1.0, with no threshold tuned on these files):",
                "",
                "| detector | profile | threshold | NAB score (optimised) | "
                "NAB score @1 (operating point) |",
                "|---|---|---|---|---|",
            ]
            for result in run.nab:
                lines.append(
                    f"| {result.detector} | {result.profile} | {_fmt(result.threshold)} | "
                    f"{_fmt(result.score_optimised, 1)} | {_fmt(result.score_at_1, 1)} |"
                )
            lines.append("")
    return "\n".join(lines)


def write_markdown_section(path: Path, section: str, text: str) -> None:
    """Replace (or append) one named section of a shared results file, leaving the others, so the
    metric and the log benchmarks can each regenerate their own part of docs/benchmarks.md."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    current = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        _, tail = rest.split(end, 1)
        updated = head + block + tail.lstrip("\n")
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)


def write_csv(run: BenchmarkRun, path: Path) -> None:
    """One row per (entity, detector incl. ``fused``); an empty cell = not applicable."""
    _write_rows(run.rows, EntityMetrics, path)


def write_nab_csv(run: BenchmarkRun, path: Path) -> None:
    """The corpus-level NAB scores (optimised and at the operating point) per detector, profile."""
    _write_rows(run.nab, NabResult, path)


def _write_rows(rows: Sequence[object], row_type: type, path: Path) -> None:
    """Dataclass rows as CSV, one column per field in declaration order."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row_type.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def plot_reliability(run: BenchmarkRun, directory: Path) -> list[Path]:
    """Per dataset, a reliability diagram of ``fused``'s anomaly probability, both variants,
    pooled over the measured (second) halves of its entities' test splits."""
    written = []
    for dataset in run.datasets:
        p, y, p_labelled, y_labelled = _pooled_probabilities(run, dataset)
        if not p.size:
            continue
        figure, (diagram, counts) = reliability_axes()
        for slot, (name, probability, labels, colour) in enumerate(
            (
                ("unlabelled", p, y, "tab:blue"),
                ("labelled", p_labelled, y_labelled, "tab:orange"),
            )
        ):
            if probability.size:
                draw_reliability(
                    diagram, counts, probability, labels, name, colour, slot, 2, brier=True
                )
        path = directory / f"{dataset}-reliability.png"
        save_reliability(
            figure,
            path,
            "observed anomaly frequency",
            f"{dataset}: fused P(anomalous), second half of each test split",
        )
        written.append(path)
    return written


def reliability_axes() -> tuple[Figure, tuple[Axes, Axes]]:
    """A reliability figure: the diagram above the diagonal it should follow, and below it the
    steps per bin on a log scale (how much each point of the diagram rests on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (diagram, counts) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    diagram.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    return figure, (diagram, counts)


def draw_reliability(
    diagram: Axes,
    counts: Axes,
    probability: np.ndarray,
    labels: np.ndarray,
    name: str,
    colour: str,
    slot: int,
    slots: int,
    *,
    linestyle: str = "-",
    brier: bool = False,
) -> None:
    """One probability's curve (its ECE, and Brier score with ``brier``, in the legend) and
    its bars, the ``slot``-th of ``slots`` side by side in each bin."""
    table = metrics.reliability_table(probability, labels, CALIBRATION_BINS)
    ece = metrics.expected_calibration_error(probability, labels, CALIBRATION_BINS)
    label = f"{name}: ECE {_fmt(ece)}"
    if brier:
        label += f", Brier {_fmt(metrics.brier_score(probability, labels))}"
    filled = table.count > 0
    diagram.plot(
        table.mean_predicted[filled],
        table.observed_frequency[filled],
        marker="o",
        color=colour,
        linestyle=linestyle,
        label=label,
    )
    width = 1.0 / CALIBRATION_BINS
    counts.bar(
        table.bin_edges[:-1][filled] + width * (0.5 + slot) / slots,
        table.count[filled],
        width=width / slots,
        color=colour,
    )


def save_reliability(figure: Figure, path: Path, observed: str, title: str) -> None:
    """Label the axes of a :func:`reliability_axes` figure and write it to ``path``."""
    import matplotlib.pyplot as plt

    diagram, counts = figure.axes
    diagram.set_xlim(0, 1)
    diagram.set_ylim(0, 1)
    diagram.set_ylabel(observed)
    diagram.set_title(title)
    diagram.legend(loc="upper left", fontsize=8)
    counts.set_yscale("log")
    counts.set_ylabel("steps per bin")
    counts.set_xlabel("predicted probability (bin)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_timelines(run: BenchmarkRun, directory: Path, per_dataset: int = 3) -> list[Path]:
    """Score timelines (log scale) with labelled anomalies shaded and the threshold drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset in run.datasets:
        entities = list(dict.fromkeys(s.entity for s in run.scored if s.dataset == dataset))
        for entity in entities[:per_dataset]:
            items = [s for s in run.scored if s.dataset == dataset and s.entity == entity]
            figure, axes = plt.subplots(len(items), 1, figsize=(12, 1.8 * len(items)), sharex=True)
            axes = np.atleast_1d(axes)
            for axis, item in zip(axes, items, strict=True):
                x = np.arange(len(item.scores))
                axis.fill_between(
                    x,
                    0,
                    1,
                    where=item.labels > 0,
                    transform=axis.get_xaxis_transform(),
                    color="tab:red",
                    alpha=0.25,
                    linewidth=0,
                )
                axis.plot(x, np.clip(item.scores, 1e-3, None), linewidth=0.6)
                axis.axhline(OPERATING_THRESHOLD, color="black", linewidth=0.6, linestyle="--")
                axis.set_yscale("log")
                axis.set_ylabel(item.detector)
            axes[0].set_title(
                f"{dataset} {entity}: exported score (1.0 = threshold), labelled anomalies shaded"
            )
            axes[-1].set_xlabel("test step")
            figure.tight_layout()
            path = directory / f"{dataset}-{entity.replace('/', '-')}.png"
            figure.savefig(path, dpi=90)
            plt.close(figure)
            written.append(path)
    return written


def write_report(run: BenchmarkRun, directory: Path, plots_per_dataset: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    report = directory / "report.md"
    report.write_text(markdown_report(run))
    write_csv(run, directory / "metrics.csv")
    if run.nab:
        write_nab_csv(run, directory / "nab.csv")
    plot_timelines(run, directory, plots_per_dataset)
    plot_reliability(run, directory)
    return report
