"""A tiny benchmark run, end to end through the CLI, on a short real SMD slice and a NAB file."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aiops_plugin.config import DetectorsConfig
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.evaluation import benchmark, datasets
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
    )
    assert done.returncode == 0, done.stderr
    report = (report_dir / "report.md").read_text()
    assert "\nCommand: `aiops-plugin benchmark --dataset smd" in report
    assert "| mad |" in report and "| pca |" in report and "PA-F1 (inflated)" in report
    with (report_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["detector"] for row in rows] == ["mad", "pca"]
    for row in rows:
        prevalence = int(row["anomalous_rows"]) / int(row["test_rows"])
        # a random scorer has AUC-PR ~ prevalence (0.043 here) and AUC-ROC ~ 0.5
        assert float(row["auc_pr"]) > 2 * prevalence, row
        assert float(row["auc_roc"]) > 0.65, row
        assert float(row["pa_f1_inflated"]) >= float(row["best_f1"]) - 1e-9
    assert (report_dir / "smd-machine-1-2.png").stat().st_size > 10_000


def test_benchmark_is_repeatable(data_root: Path) -> None:
    first, second = (
        benchmark.run_benchmark(
            ["smd"], ["iforest"], ["machine-1-2"], data_root, slice_rows=800, progress=False
        ).rows[0]
        for _ in range(2)
    )
    assert first.auc_pr == second.auc_pr and first.vus_pr == second.vus_pr


def test_benchmark_scores_through_the_agents_fitted_model(data_root: Path) -> None:
    """The harness' scores are exactly what FittedModel gives the agent for the same history."""
    series = benchmark.short_slice(datasets.load("smd", "machine-1-2", data_root), 600)
    scored = benchmark.score_entity(
        series, "mad", DetectorsConfig(), 0.001, device=__import__("torch").device("cpu")
    )
    model = FittedModel.fit(
        build_detector("mad", DetectorsConfig(), __import__("torch").device("cpu")),
        Windows.from_array(series.train, step=60.0, entities=[{"entity": "machine-1-2"}]),
        0.001,
    )
    history = np.concatenate([series.train, series.test])
    direct = model.score(
        Windows.from_array(history, step=60.0, entities=[{"entity": "machine-1-2"}])
    ).score[0, len(series.train) :]
    np.testing.assert_allclose(scored.scores, direct, rtol=1e-6)


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
        # the optimised threshold is at least as good as the operating one, and well above the
        # null detector's 0 (random or sign-reversed scores optimise to 0 here: never alarm)
        assert result.score_optimised >= result.score_at_1
        assert result.score_optimised > 25, result
    all_normal = [
        row for row in run.rows if row.entity == "realAWSCloudwatch/ec2_cpu_utilization_c6585a"
    ][0]
    assert np.isnan(all_normal.auc_pr) and "all-normal" in all_normal.notes
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
