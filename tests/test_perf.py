"""``aiops-plugin perf`` at CI size: a real Prometheus, the agent's reader, fit and cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from aiops_plugin.evaluation import perf

DATA_ROOT = Path(__file__).parents[2] / "shared" / "data"


def test_fleet_entities_are_real_rows_and_never_identical() -> None:
    rows = np.arange(2000 * 3, dtype=np.float64).reshape(2000, 3) + 1.0
    machines = [rows, rows * 2]
    fleet = [perf.fleet_values(machines, i, 100) for i in range(6)]
    assert all(values.shape == (100, 3) for values in fleet)
    assert len({values.tobytes() for values in fleet}) == 6
    np.testing.assert_array_equal(fleet[3], perf.fleet_values(machines, 3, 100))  # seeded
    # entity 2 is machine 0's rows from some offset, each value within the jitter
    deviation = [
        np.abs(fleet[2] / rows[offset : offset + 100] - 1.0).max() for offset in range(1901)
    ]
    assert min(deviation) < 6 * perf.JITTER


def test_perf_measures_fit_cycle_and_scrape_per_fleet_size(tmp_path: Path) -> None:
    markdown, image = tmp_path / "benchmarks.md", tmp_path / "perf.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiops_plugin.cli",
            "perf",
            "--entities",
            "3,6",
            "--detectors",
            "mad",
            "--fit-steps",
            "200",
            "--cycles",
            "1",
            "--device",
            "cpu",
            "--data-root",
            str(DATA_ROOT),
            "--markdown",
            str(markdown),
            "--image",
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = markdown.read_text()
    assert "<!-- BEGIN perf -->" in text and "\nCommand: `aiops-plugin perf --entities 3,6" in text
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| 3 |") or line.startswith("| 6 |")
    }
    assert set(rows) == {"3", "6"}
    header = next(line for line in text.splitlines() if line.startswith("| entities | fit s"))
    columns = [cell.strip() for cell in header.split("|")[2:-1]]
    for size, cells in rows.items():
        if len(cells) != len(columns):
            continue  # the per-detector fit table
        values = dict(zip(columns, cells, strict=True))
        # every entity scored by mad and fused, read back from a real scrape
        assert int(values["score series"]) == 2 * int(size)
        assert float(values["cycle s"]) > 0 and float(values["peak RSS MB"]) > 50
        assert float(values["fetch s"]) > 0 and float(values["fit s"]) > 0
    assert "Notes:" not in text  # no cycle error, every entity scored
    assert image.stat().st_size > 5_000


def test_every_deep_detector_has_a_bare_reference_kernel_of_its_widths() -> None:
    import torch

    from aiops_plugin.config import DetectorsConfig

    settings = DetectorsConfig()
    for name in ("multiscale", "forecaster", "diffusion", "fusion"):
        kernel = perf.reference_kernel(name, settings, n_features=5)
        assert kernel is not None, name
        out = kernel(torch.randn(3, 16, 5))
        assert out.shape[:2] == (3, 16) and torch.isfinite(out).all(), name
    assert perf.reference_kernel("mad", settings, 5) is None
