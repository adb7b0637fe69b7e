"""A tiny benchmark run, end to end through the CLI, on a short real SMD slice and a NAB file."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aiops_plugin.calibration import score_from_p
from aiops_plugin.calibration.stage import GroupCalibration, RecentProbability
from aiops_plugin.config import DetectorsConfig
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.evaluation import benchmark, datasets, metrics
from aiops_plugin.windows import Windows

DATA_ROOT = Path(__file__).parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_root() -> Path:
    if not (DATA_ROOT / "smd").is_dir():
        pytest.fail(
            f"{DATA_ROOT} not found: the benchmark tests need ../shared/data beside the repo"
        )
    return DATA_ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", "benchmark", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tiny_smd_benchmark_writes_table_csv_and_plots(data_root: Path, tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    done = run_cli(
        "--dataset",
        "smd",
        "--entities",
        "machine-1-2",
        "--detectors",
        "mad,pca",
        "--data-root",
        str(data_root),
        "--report-dir",
        str(report_dir),
        "--slice-rows",
        "1500",
        "--plots",
        "1",
        "--false-alarm-rate",
        "0.01",
    )
    assert done.returncode == 0, done.stderr
    report = (report_dir / "report.md").read_text()
    assert "\nCommand: `aiops-plugin benchmark --dataset smd" in report
    assert "| mad |" in report and "| pca |" in report and "| fused |" in report
    assert "PA-F1 (inflated)" in report and "ECE (labelled)" in report
    assert "realised false-alarm rate @1" in report and "false_alarm_rate=0.01" in report
    with (report_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["detector"] for row in rows] == ["mad", "pca", "fused"]
    for row in rows:
        prevalence = int(row["anomalous_rows"]) / int(row["test_rows"])
        # a random scorer has AUC-PR ~ prevalence (0.043 here) and AUC-ROC ~ 0.5
        assert float(row["auc_pr"]) > 2 * prevalence, row
        assert float(row["auc_roc"]) > 0.65, row
        assert float(row["pa_f1_inflated"]) >= float(row["best_f1"]) - 1e-9
        assert float(row["configured_false_alarm_rate"]) == 0.01
        assert 0.0 <= float(row["realised_false_alarm_rate"]) <= 1.0
        assert row["nab_standard_operating"] == ""  # not a NAB file
        calibration = [
            row[c] for c in ("ece", "brier", "ece_labelled", "brier_labelled", "brier_constant")
        ]
        if row["detector"] == "fused":
            assert all(0.0 <= float(value) <= 1.0 for value in calibration), row
        else:
            assert calibration == [""] * 5, row
    assert (report_dir / "smd-machine-1-2.png").stat().st_size > 10_000
    assert (report_dir / "smd-reliability.png").stat().st_size > 10_000


def test_benchmark_is_repeatable(data_root: Path) -> None:
    first, second = (
        benchmark.run_benchmark(
            ["smd"], ["iforest"], ["machine-1-2"], data_root, slice_rows=800, progress=False
        ).rows[0]
        for _ in range(2)
    )
    assert first.auc_pr == second.auc_pr and first.vus_pr == second.vus_pr
    assert first.realised_false_alarm_rate == second.realised_false_alarm_rate


@pytest.fixture(scope="module")
def short_series(data_root: Path) -> datasets.LabelledSeries:
    return benchmark.short_slice(datasets.load("smd", "machine-1-2", data_root), 600)


@pytest.fixture(scope="module")
def scored_short(short_series: datasets.LabelledSeries) -> list[benchmark.ScoredEntity]:
    return benchmark.score_series(
        short_series, ["mad", "pca"], DetectorsConfig(), 0.001, torch.device("cpu")
    )


def test_benchmark_scores_through_the_agents_fitted_model_and_calibration(
    short_series: datasets.LabelledSeries, scored_short: list[benchmark.ScoredEntity]
) -> None:
    """The harness' scores are exactly what FittedModel.fit_split and one GroupCalibration give
    the agent for the same history, per detector and fused."""
    keys = ["machine-1-2"]
    cpu = torch.device("cpu")

    def windows(values: np.ndarray) -> Windows:
        return Windows.from_array(values, step=60.0, entities=[{"entity": "machine-1-2"}])

    raw_calibration, raw_test = {}, {}
    for name in ("mad", "pca"):
        model, raw_calibration[name] = FittedModel.fit_split(
            build_detector(name, DetectorsConfig(), cpu), windows(short_series.train), 0.25
        )
        history = np.concatenate([short_series.train, short_series.test])
        raw_test[name] = model.score(windows(history)).score[:, len(short_series.train) :]
    calibration = GroupCalibration(["mad", "pca"], 0.05).fit(raw_calibration, keys)
    p = calibration.p_values(raw_test, keys)
    assert [item.detector for item in scored_short] == ["mad", "pca", "fused"]
    for item in scored_short:
        direct = score_from_p(p[item.detector][0], 0.001)
        np.testing.assert_allclose(item.scores, direct, rtol=1e-6)
        np.testing.assert_array_equal(np.isnan(item.scores), np.isnan(direct))
    # the exported probability is RecentProbability updated step by step over the test split
    fused = p["fused"][0]
    recent = RecentProbability(5000).seed(calibration.fused_calibration_p_)
    stepwise = np.array([recent.update(fused[t : t + 1])[0] for t in range(fused.size)])
    [item] = [item for item in scored_short if item.detector == "fused"]
    half = fused.size // 2
    assert item.measured_from == half and np.isnan(item.probability[:half]).all()
    np.testing.assert_allclose(item.probability[half:], stepwise[half:], rtol=1e-9, atol=1e-12)


def test_fused_subset_rows_equal_a_run_over_that_subset_alone(
    short_series: datasets.LabelledSeries, scored_short: list[benchmark.ScoredEntity]
) -> None:
    """A ``fused(mad)`` row is exactly the fused row of a run whose only detector is ``mad``,
    from the same fits; the other rows are unchanged by asking for it."""
    with_subset = benchmark.score_series(
        short_series,
        ["mad", "pca"],
        DetectorsConfig(),
        0.001,
        torch.device("cpu"),
        fused_subsets=[["mad"]],
    )
    assert [item.detector for item in with_subset] == ["mad", "pca", "fused(mad)", "fused"]
    [*_, mad_alone] = benchmark.score_series(
        short_series, ["mad"], DetectorsConfig(), 0.001, torch.device("cpu")
    )
    subset = with_subset[2]
    np.testing.assert_allclose(subset.p_values, mad_alone.p_values, rtol=1e-12)
    assert subset.probability is None  # the exported probability belongs to `fused` alone
    for before, after in zip(scored_short, [*with_subset[:2], with_subset[3]], strict=True):
        np.testing.assert_array_equal(before.p_values, after.p_values)
    with pytest.raises(ValueError, match="fused subset fused\\(iforest\\)"):
        benchmark.score_series(
            short_series,
            ["mad"],
            DetectorsConfig(),
            0.001,
            torch.device("cpu"),
            fused_subsets=[["iforest"]],
        )


def test_new_columns_match_hand_computation(scored_short: list[benchmark.ScoredEntity]) -> None:
    for item in scored_short:
        row = benchmark.evaluate_entity(item)
        normal = item.labels == 0
        alarms = sum(1 for s in item.scores[normal] if s >= 1.0)  # NaN never alarms
        assert row.realised_false_alarm_rate == pytest.approx(alarms / normal.sum())
        assert row.configured_false_alarm_rate == 0.001
        if item.detector != "fused":
            assert (row.ece, row.brier, row.ece_labelled, row.brier_labelled) == (None,) * 4
            assert row.brier_constant is None
            continue
        half = item.measured_from
        p, y = item.probability[half:], item.labels[half:]
        assert row.brier == pytest.approx(np.mean((p - y) ** 2))
        assert row.brier_constant == pytest.approx(y.mean() * (1 - y.mean()))
        assert row.ece == pytest.approx(metrics.expected_calibration_error(p, y, 10))
        assert 0.0 <= row.ece <= 1.0 and 0.0 <= row.brier <= 1.0
        # 600 test rows around the first anomaly: the first half holds >= 20 of each kind
        assert item.probability_labelled is not None
        assert row.ece_labelled == pytest.approx(
            metrics.expected_calibration_error(item.probability_labelled[half:], y, 10)
        )


def test_labelled_probability_columns_are_empty_without_enough_labels(
    short_series: datasets.LabelledSeries,
) -> None:
    quiet = dataclasses.replace(short_series, test_labels=np.zeros_like(short_series.test_labels))
    [*_, fused] = benchmark.score_series(
        quiet, ["mad"], DetectorsConfig(), 0.001, torch.device("cpu")
    )
    row = benchmark.evaluate_entity(fused)
    assert fused.probability_labelled is None
    assert row.ece_labelled is None and row.brier_labelled is None
    assert row.ece is not None and row.brier is not None
    assert "too few labels" in row.notes


def test_realised_false_alarm_rate_by_hand() -> None:
    scores = np.array([0.2, 1.0, np.nan, 3.0, 0.99, 5.0])
    labels = np.array([0, 0, 0, 1, 0, 1])
    # normal rows: 0.2, 1.0, NaN, 0.99 -> one of four at or above 1.0
    assert metrics.realised_false_alarm_rate(scores, labels, 1.0) == pytest.approx(0.25)
    assert np.isnan(metrics.realised_false_alarm_rate(scores[[3, 5]], labels[[3, 5]]))


def test_calibration_metrics_by_hand() -> None:
    # bins: [0.1, 0.1] both normal (gap 0.1), [0.9, 0.9] one anomalous (gap 0.4): ECE 0.25;
    # Brier (0.01 + 0.01 + 0.01 + 0.81) / 4
    probability = np.array([0.1, 0.1, 0.9, 0.9, np.nan])
    labels = np.array([0, 0, 1, 0, 1])
    assert metrics.expected_calibration_error(probability, labels, 10) == pytest.approx(0.25)
    assert metrics.brier_score(probability, labels) == pytest.approx(0.84 / 4)


def test_nab_benchmark_reports_the_nab_score_under_three_profiles(
    data_root: Path, tmp_path: Path
) -> None:
    run = benchmark.run_benchmark(
        ["nab"],
        ["mad"],
        ["ec2_cpu_utilization_24ae8d", "ec2_cpu_utilization_c6585a"],
        data_root,
        progress=False,
    )
    assert {result.profile for result in run.nab} == {
        "standard",
        "reward_low_FP_rate",
        "reward_low_FN_rate",
    }
    for result in run.nab:
        # the optimised threshold is at least as good as the operating one, and never below the
        # null detector's 0 (never alarming is one of the thresholds it tries)
        assert result.score_optimised >= result.score_at_1
        assert result.score_optimised >= 0.0, result
        # mad, and fused under the standard profile, are well above the null detector (random or
        # sign-reversed scores optimise to 0 here); fused's calibration slice is only the last
        # quarter of the probationary 15 %, and with reward_low_FP_rate silence scores best
        if result.detector == "mad" or result.profile == "standard":
            assert result.score_optimised > 25, result
    assert [(r.detector, r.profile) for r in run.nab][::3] == [
        ("mad", "standard"),
        ("fused", "standard"),
    ]
    all_normal = [
        row for row in run.rows if row.entity == "realAWSCloudwatch/ec2_cpu_utilization_c6585a"
    ][0]
    assert np.isnan(all_normal.auc_pr) and "all-normal" in all_normal.notes
    # the per-file NAB score at the operating point: NaN without a window to find
    assert np.isnan(all_normal.nab_standard_operating)
    with_window = [row for row in run.rows if row.entity.endswith("24ae8d")]
    assert [row.detector for row in with_window] == ["mad", "fused"]
    for row in with_window:
        assert -100.0 <= row.nab_standard_operating <= 100.0, row
    benchmark.write_nab_csv(run, tmp_path / "nab.csv")
    with (tmp_path / "nab.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(run.nab) == 6
    report = benchmark.markdown_report(run)
    assert "n/a" in report and "NaN" not in report and "nan" not in report
    # a NAB entity is "<category>/<file>"; its plot is one file in the report folder
    [plot] = benchmark.plot_timelines(run, tmp_path, per_dataset=1)
    assert plot == tmp_path / "nab-realAWSCloudwatch-ec2_cpu_utilization_24ae8d.png"
    assert plot.stat().st_size > 10_000


def test_missing_data_root_is_a_clear_error(tmp_path: Path) -> None:
    done = run_cli("--dataset", "smd", "--data-root", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert str(tmp_path / "nowhere") in done.stderr


def test_unknown_detector_is_a_clear_error(data_root: Path) -> None:
    done = run_cli("--dataset", "smd", "--detectors", "mad,lstm", "--data-root", str(data_root))
    assert done.returncode == 2 and "lstm" in done.stderr


def test_markdown_sections_are_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    benchmark.write_markdown_section(path, "metrics", "metrics v1")
    benchmark.write_markdown_section(path, "logs", "logs v1")
    benchmark.write_markdown_section(path, "metrics", "metrics v2")
    text = path.read_text()
    assert "metrics v1" not in text and "metrics v2" in text and "logs v1" in text
    assert text.index("metrics v2") < text.index("logs v1")


# ------------------------------------------------------------------- periodic refit (agent mode)
REFIT_EVERY = 150  # 600 test rows: blocks [0, 150), [150, 300), [300, 450), [450, 600)


@pytest.fixture(scope="module")
def refit_run(data_root: Path) -> benchmark.BenchmarkRun:
    return benchmark.run_benchmark(
        ["smd"],
        ["mad", "pca"],
        ["machine-1-2"],
        data_root,
        slice_rows=600,
        refit_every=REFIT_EVERY,
        progress=False,
    )


def test_refit_mode_scores_every_test_row_and_states_the_mode(
    refit_run: benchmark.BenchmarkRun, short_series: datasets.LabelledSeries
) -> None:
    assert [item.detector for item in refit_run.scored] == ["mad", "pca", "fused"]
    for item in refit_run.scored:
        assert item.fits == 4
        assert item.scores.shape == (len(short_series.test),)
        assert np.isfinite(item.p_values).all() and np.isfinite(item.scores).all()
    [fused] = [item for item in refit_run.scored if item.detector == "fused"]
    assert np.isfinite(fused.probability[fused.measured_from :]).all()
    report = benchmark.markdown_report(refit_run)
    mode = "refit every 150 rows on a trailing window as long as the train split"
    assert f"Mode: **{mode}, as the agent's schedule does**." in report
    assert "single fit" not in report and "fitted once" not in report
    assert "4 fits" in refit_run.rows[0].notes
    single = benchmark.markdown_report(dataclasses.replace(refit_run, refit_every=None))
    assert "Mode: **single fit on the train split, scoring the whole test split**." in single


def test_each_refit_is_the_agents_fit_on_the_trailing_rows_before_its_block(
    refit_run: benchmark.BenchmarkRun, short_series: datasets.LabelledSeries
) -> None:
    """Block [300, 450) is scored by fit_split on the 600 rows before it (train[300:] and
    test[:300]) and a GroupCalibration of that fit; its probability is reseeded from it."""
    keys, cpu = ["machine-1-2"], torch.device("cpu")
    start, end = 2 * REFIT_EVERY, 3 * REFIT_EVERY
    full = np.concatenate([short_series.train, short_series.test])
    before = len(short_series.train) + start

    def windows(values: np.ndarray) -> Windows:
        return Windows.from_array(values, step=60.0, entities=[{"entity": "machine-1-2"}])

    raw_calibration, raw_block = {}, {}
    for name in ("mad", "pca"):
        model, raw_calibration[name] = FittedModel.fit_split(
            build_detector(name, DetectorsConfig(), cpu), windows(full[before - 600 : before]), 0.25
        )
        context = model.detector.context_steps
        scores = model.score(windows(full[before - context : len(short_series.train) + end]))
        raw_block[name] = scores.score[:, context:]
    calibration = GroupCalibration(["mad", "pca"], 0.05).fit(raw_calibration, keys)
    p = calibration.p_values(raw_block, keys)
    for item in refit_run.scored:
        np.testing.assert_allclose(item.p_values[start:end], p[item.detector][0], rtol=1e-6)
    [item] = [item for item in refit_run.scored if item.detector == "fused"]
    assert item.measured_from == start  # the measured half starts with this block
    recent = RecentProbability(5000).seed(calibration.fused_calibration_p_)
    stepwise = [recent.update(p["fused"][0][t : t + 1])[0] for t in range(end - start)]
    np.testing.assert_allclose(item.probability[start:end], stepwise, rtol=1e-9, atol=1e-12)


def test_refits_never_read_the_rows_of_their_block_or_later(
    refit_run: benchmark.BenchmarkRun, short_series: datasets.LabelledSeries
) -> None:
    cut = 3 * REFIT_EVERY
    test = short_series.test.copy()
    test[cut:] = 1e3  # far outside anything seen: any leak would move the earlier p-values
    changed = benchmark.score_series(
        dataclasses.replace(short_series, test=test),
        ["mad", "pca"],
        DetectorsConfig(),
        0.001,
        torch.device("cpu"),
        refit_every=REFIT_EVERY,
    )
    for before, after in zip(refit_run.scored, changed, strict=True):
        np.testing.assert_array_equal(before.p_values[:cut], after.p_values[:cut])
        assert not np.array_equal(before.p_values[cut:], after.p_values[cut:])


def test_refit_every_beyond_the_test_split_is_the_single_fit(
    short_series: datasets.LabelledSeries, scored_short: list[benchmark.ScoredEntity]
) -> None:
    once = benchmark.score_series(
        short_series,
        ["mad", "pca"],
        DetectorsConfig(),
        0.001,
        torch.device("cpu"),
        refit_every=10**6,
    )
    for single, refit in zip(scored_short, once, strict=True):
        np.testing.assert_array_equal(single.scores, refit.scores)
        if single.probability is not None:
            np.testing.assert_array_equal(single.probability, refit.probability)
            np.testing.assert_array_equal(single.probability_labelled, refit.probability_labelled)


def test_a_failed_refit_keeps_the_previous_models(
    short_series: datasets.LabelledSeries,
    scored_short: list[benchmark.ScoredEntity],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fit = benchmark._fit_detectors
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a fit window of 3 steps is too short")
        return fit(*args, **kwargs)

    monkeypatch.setattr(benchmark, "_fit_detectors", second_fails)
    refit = benchmark.score_series(
        short_series, ["mad", "pca"], DetectorsConfig(), 0.001, torch.device("cpu"), refit_every=150
    )
    for single, item in zip(scored_short, refit, strict=True):
        assert item.fits == 3
        assert "refit before test row 150: a fit window of 3 steps" in "; ".join(item.notes)
        # blocks [0, 150) and [150, 300) are both scored by the first fit, the single one
        np.testing.assert_array_equal(single.scores[:300], item.scores[:300])
        assert not np.array_equal(single.scores[300:], item.scores[300:])


def test_cli_names_a_fused_subset_detector_that_is_not_run(data_root: Path) -> None:
    done = run_cli(
        "--dataset", "smd", "--detectors", "mad,pca", "--fused-subsets", "mad;pca,forecaster"
    )
    assert done.returncode != 0
    assert "['forecaster']" in done.stderr and "--detectors" in done.stderr


def test_an_entity_a_detector_cannot_fit_is_left_out_for_all_and_named(data_root: Path) -> None:
    """180 train rows are enough for ``mad`` and too few for the forecaster: the entity is
    reported as left out (with the detector's reason), not scored by ``mad`` alone, no crash."""
    run = benchmark.run_benchmark(
        ["smd"], ["mad", "forecaster"], ["machine-1-2"], data_root, slice_rows=180, progress=False
    )
    assert run.rows == [] and len(run.skipped) == 1
    assert run.skipped[0].startswith("smd machine-1-2, forecaster: ")
    assert "Left out for every detector" in benchmark.markdown_report(run)
