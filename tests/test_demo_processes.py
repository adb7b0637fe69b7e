"""The local stack runs the real Prometheus / promtool / Alertmanager binaries.

These tests fail (never skip) when a binary is missing: the end-to-end tests and the demo depend
on them, and a silent skip would hide that the stack cannot run here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.demo import (
    AlertmanagerServer,
    BackfillError,
    BinaryNotFoundError,
    PrometheusServer,
    ReplayExporter,
    ScrapeJob,
    WebhookReceiver,
    backfill,
    backfill_timestamps,
    find_binary,
    load_demo_sample,
    write_openmetrics,
)

METRIC = "smd_metric_value"
DIMS = ["m00", "m01", "m02"]
LABELS = {"instance": "machine-1-2", "job": "smd"}


def _row_coded_values(rows: int) -> np.ndarray:
    """``(rows, 3)`` values whose integer part is the row index, so a sample names its row."""
    return np.arange(rows, dtype=np.float64)[:, None] + np.array([0.1, 0.2, 0.3])


def _raw_samples(prom: PrometheusServer, dim: str, window: str = "2h") -> np.ndarray:
    """All stored samples ``(n, 2)`` [timestamp s, value] of one dimension, from the TSDB."""
    result = prom.query(f'{METRIC}{{dim="{dim}"}}[{window}]')
    assert len(result) == 1, result
    return np.array(result[0]["values"], dtype=np.float64)


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """300 demo rows of 3 dims backfilled 1 s apart, ending just before now."""
    values = load_demo_sample().train[-300:, :3]
    timestamps = backfill_timestamps(len(values), end=time.time() - 1.0)
    openmetrics = tmp_path / "history.om"
    write_openmetrics(openmetrics, METRIC, LABELS, "dim", DIMS, values, timestamps)
    backfill(openmetrics, tmp_path / "tsdb")
    return tmp_path / "tsdb", values, timestamps


@pytest.fixture
def replay() -> Iterator[ReplayExporter]:
    """Serves nothing until started, so a test starts it once Prometheus scrapes it."""
    exporter = ReplayExporter(_row_coded_values(120), DIMS, {"instance": "machine-1-2"})
    yield exporter
    exporter.stop()


def test_every_binary_is_installed() -> None:
    for names in [("prometheus",), ("promtool",), ("prometheus-alertmanager", "alertmanager")]:
        assert Path(find_binary(*names)).exists()


def test_missing_binary_names_the_apt_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(BinaryNotFoundError, match="apt-get install prometheus"):
        PrometheusServer()


def test_demo_sample_holds_exactly_one_labelled_anomaly_segment() -> None:
    sample = load_demo_sample()
    assert sample.train.shape == (3000, 38) and sample.test.shape == (600, 38)
    assert sample.train.dtype == sample.test.dtype == np.float32
    assert sample.feature_names == [f"m{i:02d}" for i in range(38)]
    assert sample.train_rows.tolist() == list(range(20697, 23697))
    assert sample.test_rows.tolist() == list(range(17734, 18334))
    anomalous = sample.test_rows[sample.test_labels == 1]
    assert anomalous.tolist() == list(range(18109, 18150))
    assert sample.train.min() >= 0.0 and sample.test.max() <= 1.0


def test_write_openmetrics_refuses_what_promtool_would_silently_drop(tmp_path: Path) -> None:
    values = np.zeros((3, 1))
    with pytest.raises(ValueError, match="strictly increasing"):
        write_openmetrics(
            tmp_path / "a.om", METRIC, {}, "dim", ["m00"], values, np.array([1, 3, 2])
        )
    with pytest.raises(ValueError, match="milliseconds"):
        millis = np.array([1.7e12, 1.7e12 + 1000, 1.7e12 + 2000])
        write_openmetrics(tmp_path / "b.om", METRIC, {}, "dim", ["m00"], values, millis)


def test_backfill_error_carries_promtools_reason(tmp_path: Path) -> None:
    openmetrics = tmp_path / "truncated.om"
    openmetrics.write_text('# TYPE m gauge\nm{dim="m00"} 1 1700000000\n')
    with pytest.raises(BackfillError, match="does not end with # EOF"):
        backfill(openmetrics, tmp_path / "tsdb")


def test_backfilled_history_reads_back_through_promql(history) -> None:
    tsdb_dir, values, timestamps = history
    with PrometheusServer(tsdb_dir=tsdb_dir) as prom:
        for column, dim in enumerate(DIMS):
            samples = _raw_samples(prom, dim)
            assert len(samples) == len(values)
            np.testing.assert_allclose(samples[:, 0], timestamps, atol=1e-3)
            np.testing.assert_allclose(samples[:, 1], values[:, column], rtol=1e-6, atol=1e-9)


def test_replay_exporter_serves_one_whole_row_at_a_time() -> None:
    values = _row_coded_values(50)
    with ReplayExporter(values, DIMS, {"instance": "m"}, seconds_per_row=0.1) as exporter:
        exporter.wait_for_row(3, timeout=5)
        while True:
            before = exporter.current_row
            text = requests.get(exporter.url, timeout=5).text
            if exporter.current_row == before:
                break
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == METRIC]
        served = {s.labels["dim"]: s.value for s in family.samples}
        assert served == dict(zip(DIMS, values[before].tolist(), strict=True))
        assert exporter.row_started_at(3) - exporter.row_started_at(0) == pytest.approx(
            0.3, abs=0.05
        )


def test_prometheus_scrapes_the_row_the_replay_is_serving(replay: ReplayExporter) -> None:
    job = ScrapeJob("smd", [replay.target], honor_labels=True)
    with PrometheusServer(scrape_jobs=[job]) as prom:
        prom.wait_for('up{job="smd"} == 1')
        replay.start()
        prom.wait_for(f'{METRIC}{{dim="m00"}} >= 3')
        (series,) = prom.query(f'{METRIC}{{dim="m00"}}[1m]')
        assert series["metric"] == {"__name__": METRIC, "dim": "m00", **LABELS}
        for timestamp, value in series["values"]:
            scraped_at, row = float(timestamp), int(float(value))
            assert float(value) == pytest.approx(row + 0.1)
            # Stamped as the scrape starts, a few ms before the exporter reads its row.
            assert replay.row_started_at(row) <= scraped_at + 0.05
            if replay.current_row > row:
                assert scraped_at < replay.row_started_at(row + 1) + 0.01


def test_live_scrapes_continue_backfilled_history(history, replay: ReplayExporter) -> None:
    tsdb_dir, values, _ = history
    job = ScrapeJob("smd", [replay.target], honor_labels=True)
    with PrometheusServer(tsdb_dir=tsdb_dir, scrape_jobs=[job]) as prom:
        prom.wait_for('up{job="smd"} == 1')
        replay.start()
        prom.wait_for(f'count_over_time({METRIC}{{dim="m01"}}[2h]) >= {len(values) + 3}')
        samples = _raw_samples(prom, "m01")
        np.testing.assert_allclose(samples[: len(values), 1], values[:, 1], rtol=1e-6)
        live_rows = samples[len(values) :, 1].astype(int)
        assert live_rows[0] <= 1 and set(np.diff(live_rows)) <= {0, 1, 2}
        # The seam is Prometheus' target discovery (~6 s); afterwards one sample per second.
        seam = samples[len(values), 0] - samples[len(values) - 1, 0]
        assert seam < 15
        assert np.all(np.diff(samples[len(values) :, 0]) < 1.5)
        start, end = samples[0, 0], samples[-1, 0]
        (series,) = prom.query_range(f'{METRIC}{{dim="m01"}}', start, end, step=1)
        assert len(series["values"]) == int(end - start) + 1


def test_restarted_prometheus_keeps_history_and_resumes_scraping(
    history, replay: ReplayExporter
) -> None:
    tsdb_dir, values, _ = history
    job = ScrapeJob("smd", [replay.target], honor_labels=True)
    with PrometheusServer(tsdb_dir=tsdb_dir, scrape_jobs=[job]) as prom:
        prom.wait_for('up{job="smd"} == 1')
        replay.start()
        prom.wait_for(f'count_over_time({METRIC}{{dim="m02"}}[2h]) >= {len(values) + 2}')
        before = _raw_samples(prom, "m02")
        url = prom.url

        prom.restart()

        assert prom.url == url
        after = _raw_samples(prom, "m02")
        np.testing.assert_array_equal(after[: len(before)], before)
        prom.wait_for(f'count_over_time({METRIC}{{dim="m02"}}[2h]) > {len(after)}')


def test_alertmanager_delivers_a_posted_alert_to_the_webhook() -> None:
    with (
        WebhookReceiver() as webhook,
        AlertmanagerServer(webhook_url=webhook.url) as alertmanager,
    ):
        posted_at = time.time()
        alertmanager.post_alerts(
            [
                {
                    "labels": {"alertname": "AiopsAnomaly", "instance": "machine-1-2"},
                    "annotations": {"summary": "fused anomaly score above 1"},
                }
            ]
        )
        payload, received_at = webhook.wait_for_alert(
            "AiopsAnomaly", timeout=20, instance="machine-1-2"
        )
        assert payload["receiver"] == "webhook" and payload["status"] == "firing"
        (alert,) = payload["alerts"]
        assert alert["annotations"] == {"summary": "fused anomaly score above 1"}
        assert 0 <= received_at - posted_at < 10
