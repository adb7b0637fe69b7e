"""Benchmark detectors on real labelled data through the agent's own code path.

Each entity of a dataset is one entity group of one entity, fitted on the dataset's train split
with :meth:`FittedModel.fit` (detector fit + the same threshold scaling as the agent, so a score of
1.0 is the threshold for ``false_alarm_rate``) and scored with :meth:`FittedModel.score` on the test
split, preceded by the detector's context from the end of the train split, exactly as the agent
scores its buffer. The agent exports the last step of each cycle; scoring all test steps in one
call gives the same numbers for these causal detectors, only faster.

Threshold-free metrics use the scaled scores; thresholded event metrics use the product's own
operating point, score >= 1.0. NAB is scored as NAB does it: one threshold per detector and
profile, optimised over the whole corpus, and normalised so that the null detector scores 0 and
the perfect one 100.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aiops_plugin.config import DetectorsConfig
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.evaluation import datasets, metrics
from aiops_plugin.windows import Windows

DEFAULT_DETECTORS = ("mad", "iforest", "pca", "cblof")
OPERATING_THRESHOLD = 1.0


@dataclass
class ScoredEntity:
    """One detector's scaled test scores for one entity, with what is needed to evaluate them."""

    dataset: str
    entity: str
    detector: str
    scores: np.ndarray
    labels: np.ndarray
    step_seconds: float
    fit_seconds: float
    score_seconds: float
    notes: list[str] = field(default_factory=list)


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
    fit_seconds: float
    score_seconds: float
    notes: str = ""


def score_entity(
    series: datasets.LabelledSeries,
    detector_name: str,
    detectors: DetectorsConfig,
    false_alarm_rate: float,
    device: torch.device,
) -> ScoredEntity:
    """Fit on the train split and score the test split through :class:`FittedModel`."""
    labels = [{"entity": series.entity}]

    def windows(values: np.ndarray) -> Windows:
        return Windows.from_array(
            values[None],
            group=series.dataset,
            step=series.step_seconds,
            entities=labels,
            features=list(series.feature_names),
        )

    started = time.perf_counter()
    detector = build_detector(detector_name, detectors, device)
    model = FittedModel.fit(detector, windows(series.train), false_alarm_rate)
    fitted = time.perf_counter()
    context = min(model.detector.context_steps, len(series.train))
    history = np.concatenate([series.train[len(series.train) - context :], series.test])
    scores = model.score(windows(history)).score[0, context:]
    return ScoredEntity(
        dataset=series.dataset,
        entity=series.entity,
        detector=detector_name,
        scores=scores.astype(np.float64),
        labels=series.test_labels.astype(np.int8),
        step_seconds=series.step_seconds,
        fit_seconds=fitted - started,
        score_seconds=time.perf_counter() - fitted,
        notes=list(series.notes),
    )


def evaluate_entity(scored: ScoredEntity) -> EntityMetrics:
    """Every metric of the harness for one scored entity (NaN where undefined, with a note)."""
    scores, labels = scored.scores, scored.labels
    notes = list(scored.notes)
    if not labels.any():
        notes.append("all-normal test set: threshold-free metrics and F1 undefined")
    best = metrics.best_f1(scores, labels)
    adjusted = metrics.point_adjusted_f1(scores, labels)
    events = metrics.event_metrics(scores, labels, OPERATING_THRESHOLD, scored.step_seconds)
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


def nab_scores(scored: Sequence[ScoredEntity], data_root: Path | None) -> list[NabResult]:
    """NAB's normalised score per detector and profile, over every scored NAB file."""
    profiles = datasets.nab_profiles(data_root)
    results = []
    for detector in sorted({item.detector for item in scored}):
        files = [item for item in scored if item.detector == detector]
        per_file_scores, per_file_times, per_file_windows = [], [], []
        for item in files:
            timestamps, _, _, windows = datasets.nab_full(item.entity, data_root)
            probation = len(timestamps) - len(item.scores)
            per_file_scores.append(np.concatenate([np.full(probation, np.nan), item.scores]))
            per_file_times.append(timestamps)
            per_file_windows.append(windows)
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
) -> BenchmarkRun:
    """Score every (dataset, entity, detector) and evaluate it; seeds are fixed in the configs."""
    started = time.perf_counter()
    torch.manual_seed(0)
    detectors = detectors or DetectorsConfig()
    device = device or torch.device("cpu")
    all_series = datasets.load_datasets(dataset_names, entities, data_root)
    if slice_rows:
        all_series = [short_slice(series, slice_rows) for series in all_series]
    jobs = [(series, detector) for series in all_series for detector in detector_names]
    rows: list[EntityMetrics] = []
    scored_all: list[ScoredEntity] = []
    for series, detector in tqdm(jobs, desc="benchmark", unit="fit", disable=not progress):
        scored = score_entity(series, detector, detectors, false_alarm_rate, device)
        scored_all.append(scored)
        rows.append(evaluate_entity(scored))
    # NAB scores whole files; a short slice is not one
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
    ("fit_seconds", "fit s"),
    ("score_seconds", "score s"),
)


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _mean(values: list[float]) -> tuple[float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), len(values) - len(finite)


def markdown_report(run: BenchmarkRun) -> str:
    lines = [
        "## Detectors on labelled metrics",
        "",
        f"Command: `{run.command}`",
        "",
        f"Machine: {run.machine}. Wall time: {run.wall_seconds:.0f} s. "
        f"Scores scaled at false_alarm_rate={run.false_alarm_rate}; '@1' = at the product's "
        "threshold, score >= 1.0. PA-F1 is point-adjusted F1, INFLATED: it credits a whole "
        "labelled segment for a single detected point; shown only to compare with older papers.",
        "",
        "Detectors (hyper-parameters as run; every seed fixed):",
        "",
        *(f"- `{name}`: {params}" for name, params in run.hyper_parameters.items()),
        "",
        "Calibration (ECE, Brier) is reported for detectors that output probabilities; none of "
        "these baselines does.",
        "",
    ]
    for dataset in run.datasets:
        rows = [row for row in run.rows if row.dataset == dataset]
        if not rows:
            continue
        entities = sorted(
            {row.entity for row in rows},
            key=lambda e: [rows.index(r) for r in rows if r.entity == e][0],
        )
        lines += [f"### {dataset.upper()} ({len(entities)} entities)", ""]
        header = ["detector", *(title for _, title in SUMMARY_COLUMNS)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        undefined_notes = []
        for detector in run.detectors:
            mine = [row for row in rows if row.detector == detector]
            cells = [detector]
            for column, title in SUMMARY_COLUMNS:
                mean, undefined = _mean([getattr(row, column) for row in mine])
                digits = (
                    1
                    if column
                    in (
                        "false_alarms_per_day_at_1",
                        "mean_delay_seconds_at_1",
                        "fit_seconds",
                        "score_seconds",
                    )
                    else 3
                )
                cells.append(_fmt(mean, digits))
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
        for column, title in (("vus_pr", "VUS-PR"), ("best_f1", "best F1")):
            lines += ["", f"{title} per entity:", ""]
            lines += [
                "| detector | " + " | ".join(entities) + " |",
                "|" + "---|" * (len(entities) + 1),
            ]
            for detector in run.detectors:
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
                "`--optimize` does, and at the product threshold 1.0):",
                "",
                "| detector | profile | threshold | NAB score (optimised) | NAB score @1 |",
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
    fields = list(EntityMetrics.__dataclass_fields__)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in run.rows:
            writer.writerow(asdict(row))


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
                f"{dataset} {entity}: scaled score (1.0 = threshold), labelled anomalies shaded"
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
    plot_timelines(run, directory, plots_per_dataset)
    return report
