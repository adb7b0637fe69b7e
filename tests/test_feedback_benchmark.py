"""The feedback benchmark: the agent's event rule replayed, labels, exclusions, before / after."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from aiops_plugin.calibration import score_from_p
from aiops_plugin.evaluation import datasets
from aiops_plugin.evaluation.benchmark import short_slice
from aiops_plugin.evaluation.feedback_benchmark import (
    FeedbackRun,
    FeedbackSettings,
    ReplayedEvent,
    evaluate_feedback,
    feedback_markdown,
    fit_group,
    label_events,
    main,
    replay_events,
    score_span,
)
from aiops_plugin.feedback import FALSE_POSITIVE, TRUE_POSITIVE
from aiops_plugin.store import Store
from aiops_plugin.windows import entity_key

DATA_ROOT = Path(__file__).parents[2] / "shared" / "data"
T0 = datetime(2024, 5, 1, tzinfo=UTC)
CPU = torch.device("cpu")
ENTITY = {"entity": "machine"}


@pytest.fixture(scope="module")
def smd_slice() -> datasets.LabelledSeries:
    if not (DATA_ROOT / "smd").is_dir():
        pytest.fail(f"{DATA_ROOT} not found: these tests need ../shared/data beside the repo")
    return short_slice(datasets.load("smd", "machine-1-2", DATA_ROOT), 1500)


def events_tracked_by_the_store(store: Store, fused: np.ndarray, pca: np.ndarray) -> list[tuple]:
    """What the agent's store makes of the same scores, one step per minute."""
    for step, (score, detector) in enumerate(zip(fused, pca, strict=True)):
        store.track_anomaly_events(
            group="smd",
            detector="fused",
            timestamp=T0 + timedelta(minutes=step),
            scores={entity_key(ENTITY): float(score)},
            labels={entity_key(ENTITY): ENTITY},
            close_score=0.7,
            close_after_steps=3,
            details={entity_key(ENTITY): {"detector_scores": {"pca": float(detector)}}},
        )
    rows = sorted(store.list_anomaly_events(group="smd", limit=1000), key=lambda e: e.start_at)
    minute = timedelta(minutes=1)
    return [
        (
            (event.start_at - T0) // minute,
            len(fused) if event.end_at is None else (event.end_at - T0) // minute,
            (event.peak_at - T0) // minute,
            event.peak_score,
            event.detector_scores,
        )
        for event in rows
    ]


def replayed(events: list[ReplayedEvent]) -> list[tuple]:
    return [(e.start, e.end, e.peak, e.peak_score, e.detector_scores) for e in events]


def test_replayed_events_follow_the_hysteresis_rule() -> None:
    fused = np.array(
        # opens at 1.2; 2 quiet steps, a 0.8 (above close_score), 2 quiet, then 3 quiet close it
        [0.1, 1.2, 0.5, 0.6, 0.8, 0.5, 0.5, 2.0, 0.1, 0.2, 0.3]
        # 0.9 does not open; NaN says nothing; still open at the end
        + [0.9, 0.5, 1.5, np.nan, 0.2, np.nan, 0.3, 1.1, 0.4]
    )
    events = replay_events(fused, {"pca": np.arange(fused.size, dtype=float)})
    assert replayed(events) == [(1, 8, 7, 2.0, {"pca": 7.0}), (13, 20, 13, 1.5, {"pca": 13.0})]


def test_replayed_events_equal_the_stores_on_real_scores(
    smd_slice: datasets.LabelledSeries, tmp_path: Path
) -> None:
    settings = FeedbackSettings(false_alarm_rate=0.05)
    fitted = fit_group(smd_slice, smd_slice.train, settings, CPU)
    full = np.concatenate([smd_slice.train, smd_slice.test])
    n_train = len(smd_slice.train)
    p = score_span(smd_slice, full, fitted, n_train, n_train + 400)
    fused, pca = score_from_p(p["fused"], 0.05), score_from_p(p["pca"], 0.05)
    fused[[50, 51, 200]] = np.nan
    events = replay_events(fused, {"pca": pca})
    assert len(events) >= 3
    with Store.open(f"sqlite:///{tmp_path / 'aiops.db'}") as store:
        assert replayed(events) == events_tracked_by_the_store(store, fused, pca)


def test_events_are_labelled_by_overlap_with_the_ground_truth() -> None:
    labels = np.zeros(30, dtype=np.int8)
    labels[10:14] = 1
    events = [
        ReplayedEvent(2, 5, 3, 1.5),
        ReplayedEvent(8, 11, 9, 2.0),
        ReplayedEvent(14, 18, 15, 1.1),
    ]
    assert [label for _, label in label_events(events, labels)] == [
        FALSE_POSITIVE,
        TRUE_POSITIVE,
        FALSE_POSITIVE,
    ]


def test_confirmed_incidents_leave_training_and_calibration(
    smd_slice: datasets.LabelledSeries,
) -> None:
    settings = FeedbackSettings(margin_steps=5)
    history = np.concatenate([smd_slice.train, smd_slice.test[:750]])
    incident = (len(history) - 200, len(history) - 150)
    fitted = fit_group(smd_slice, history, settings, CPU, incidents=[incident])
    assert fitted.excluded_steps == 50 + 2 * 5
    calibration_p = fitted.calibration.fused_calibration_p_[0]
    offset = len(history) - calibration_p.size
    excluded = slice(incident[0] - 5 - offset, incident[1] + 5 - offset)
    assert np.isnan(calibration_p[excluded]).all()
    assert np.isfinite(calibration_p[: excluded.start]).mean() > 0.9


def test_before_and_after_on_a_real_smd_slice(smd_slice: datasets.LabelledSeries) -> None:
    settings = FeedbackSettings(false_alarm_rate=0.05, min_labelled_events=4)
    result = evaluate_feedback(smd_slice, settings, CPU)
    row = result.metrics
    assert row.rows == len(smd_slice.test) - len(smd_slice.test) // 2
    assert row.labelled_events == row.true_positives + row.false_positives
    assert row.true_positives >= 1 and row.false_positives >= 1
    assert row.excluded_steps > 0
    assert row.labelled_probability == (row.labelled_events >= 4)
    assert row.weights != "equal"
    weights = [float(part.split("=")[1]) for part in row.weights.split(", ")]
    assert np.mean(weights) == pytest.approx(1.0, abs=0.01)
    for when in ("before", "after"):
        probability = getattr(result, f"probability_{when}")
        assert probability.shape == result.labels.shape
        assert np.nanmin(probability) >= 0 and np.nanmax(probability) <= 1
        assert 0 <= getattr(row, f"vus_pr_{when}") <= 1
        assert getattr(row, f"false_events_per_day_{when}") >= 0
    # the exclusions and weights changed the fused score the after fit exports
    assert not np.allclose(result.scores_before, result.scores_after, equal_nan=True)

    run = FeedbackRun(
        "python -m aiops_plugin.evaluation.feedback_benchmark", settings, [result], 1.0, "cpu"
    )
    text = feedback_markdown(run)
    assert text.startswith("## Feedback: before and after")
    assert "Command: `python -m aiops_plugin.evaluation.feedback_benchmark`" in text
    assert f"| {smd_slice.entity} | {row.labelled_events} " in text
    assert "Reading (pooled" in text


def test_fewer_labels_than_the_minimum_keep_the_mixture(
    smd_slice: datasets.LabelledSeries,
) -> None:
    tiny = dataclasses.replace(
        smd_slice, test=smd_slice.test[:600], test_labels=smd_slice.test_labels[:600]
    )
    settings = FeedbackSettings(false_alarm_rate=0.05, min_labelled_events=1000)
    row = evaluate_feedback(tiny, settings, CPU).metrics
    assert not row.labelled_probability


def test_the_command_line_names_its_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--false-alarm-rate" in out and "--markdown" in out
