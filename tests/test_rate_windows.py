"""How a query's ``rate()`` window shapes what the detectors see, on a real Prometheus.

A node's counter grows 1000/s, with a 90-second burst at ten times that, scraped every 15 s.
Read at the agent's 1-minute step, ``rate(...[5m])`` spreads the burst over about five minutes
at a third of its height, and its end, five minutes after its start, is a second step change of
the same size: the "second alarm about five minutes later" an evaluation saw on a real host.
``rate(...[2m])`` (four scrape intervals, the example queries' window) shows it twice as high
for about two minutes. README ("Choosing the rate window") says how to choose it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from aiops_plugin.config import Config
from aiops_plugin.demo import PrometheusServer, backfill, write_openmetrics
from aiops_plugin.sources.prometheus import PrometheusReader

SCRAPE = 15.0
BASE_RATE, BURST_RATE, BURST_SECONDS = 1000.0, 10_000.0, 90.0


@pytest.fixture(scope="module")
def burst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float, float]]:
    workdir = tmp_path_factory.mktemp("rate-windows")
    end = np.floor(time.time() / 60) * 60 - 60
    timestamps = np.arange(end - 3600, end + SCRAPE / 2, SCRAPE)
    burst_start = end - 1800
    rate = np.where(
        (timestamps > burst_start) & (timestamps <= burst_start + BURST_SECONDS),
        BURST_RATE,
        BASE_RATE,
    )
    counter = np.cumsum(rate * SCRAPE)[:, None]
    path = workdir / "counter.om"
    write_openmetrics(
        path,
        "bytes_total",
        {"instance": "node-1", "job": "node"},
        "device",
        ["eth0"],
        counter,
        timestamps,
    )
    backfill(path, workdir / "tsdb")
    with PrometheusServer(tsdb_dir=workdir / "tsdb", workdir=workdir / "prometheus") as server:
        server.start()
        yield server.url, burst_start, end


def _read(url: str, window: str, start: float, end: float) -> np.ndarray:
    config = Config.model_validate(
        {
            "prometheus": {"url": url, "step": "1m", "max_sample_age": "1h"},
            "entities": [
                {
                    "name": "node",
                    "labels": ["instance"],
                    "queries": {"rx": f"sum by (instance) (rate(bytes_total[{window}]))"},
                }
            ],
        }
    )
    result = PrometheusReader(config.prometheus).read_range(config.entities[0], start, end)
    assert result.windows is not None
    return result.windows.values[0, :, 0]


def test_the_rate_window_sets_how_long_and_how_high_a_burst_looks(
    burst: tuple[str, float, float],
) -> None:
    url, burst_start, end = burst
    start = burst_start - 900
    wide, narrow = (_read(url, window, start, end) for window in ("5m", "2m"))
    for series in (wide, narrow):
        assert np.nanmedian(series) == pytest.approx(BASE_RATE, rel=0.01)
    above_wide = np.flatnonzero(wide > 1.5 * BASE_RATE)
    above_narrow = np.flatnonzero(narrow > 1.5 * BASE_RATE)
    # [5m]: about five steps raised, to about a third of the burst's height
    assert 5 <= len(above_wide) <= 7
    assert np.nanmax(wide) < 0.45 * BURST_RATE
    # [2m]: about two steps, more than twice as high
    assert 2 <= len(above_narrow) <= 4
    assert np.nanmax(narrow) > 2 * np.nanmax(wide) - BASE_RATE
    # the burst leaving the 5-minute window is a fall as large as its arrival, 5 min later
    rise, fall = np.nanmax(np.diff(wide)), -np.nanmin(np.diff(wide))
    assert fall == pytest.approx(rise, rel=0.35)
    assert (np.nanargmin(np.diff(wide)) - np.nanargmax(np.diff(wide))) in (4, 5, 6)
