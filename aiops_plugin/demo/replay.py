"""A dataset served live, one row per step, for Prometheus to scrape as if it were an exporter.

``ReplayExporter``: in-process exporter serving one row of an array per ``seconds_per_row``;
``current_row``, ``row_started_at(row)``, ``wait_for_row(row, timeout)``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Self

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aiops_plugin.demo.polling import poll_until


class _RowCollector(Collector):
    """Serves the current row of the replay as one gauge family, all features from one row."""

    def __init__(self, replay: ReplayExporter) -> None:
        self._replay = replay

    def collect(self) -> Iterator[GaugeMetricFamily]:
        replay = self._replay
        family = GaugeMetricFamily(
            replay.metric,
            "Replayed dataset value, one row per replay step.",
            labels=[*replay.labels, replay.feature_label],
        )
        row = replay.current_row
        if row >= 0:
            shared = list(replay.labels.values())
            for feature, value in zip(replay.feature_names, replay.values[row], strict=True):
                if not math.isnan(value):
                    family.add_metric([*shared, feature], float(value))
        yield family


class ReplayExporter:
    """Serves a dataset live, one row every ``seconds_per_row``, for Prometheus to scrape.

    Exposes ``metric{<labels>, <feature_label>="<feature>"}`` (default
    ``smd_metric_value{instance=..., dim="m00".."m37"}``) from its own registry, without
    timestamps, so Prometheus stamps each sample with its scrape time. The HTTP server runs from
    construction but serves no series until ``start()``: start it once Prometheus scrapes it, so
    that no row is missed. After the last row it keeps serving that row. Scrape it with
    ``ScrapeJob(..., honor_labels=True)`` so its ``instance`` label is kept. With scrapes and rows
    both 1 s apart, scrape jitter can occasionally repeat or skip one row.

    Args:
        values: ``(rows, features)``.
        feature_names: one per column.
        labels: labels shared by all series, e.g. ``{"instance": "machine-1-2"}``.
        seconds_per_row: wall-clock seconds each row is served.
    """

    def __init__(
        self,
        values: np.ndarray,
        feature_names: Sequence[str],
        labels: Mapping[str, str],
        metric: str = "smd_metric_value",
        feature_label: str = "dim",
        seconds_per_row: float = 1.0,
    ) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.ndim != 2 or self.values.shape[1] != len(feature_names):
            raise ValueError(f"values {self.values.shape} do not match {len(feature_names)} names")
        self.feature_names = list(feature_names)
        self.labels = dict(labels)
        self.metric = metric
        self.feature_label = feature_label
        self.seconds_per_row = seconds_per_row
        self._lock = threading.Lock()
        self._row = -1
        self._started_at: list[float] = []
        self._stop = threading.Event()
        self._advancer: threading.Thread | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_RowCollector(self))
        self._server, self._server_thread = start_http_server(
            0, addr="127.0.0.1", registry=self.registry
        )

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @property
    def target(self) -> str:
        """``host:port`` for a ``ScrapeJob``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.target}/metrics"

    @property
    def current_row(self) -> int:
        """Index of the row being served; -1 before ``start()``."""
        with self._lock:
            return self._row

    def row_started_at(self, row: int) -> float:
        """Unix time at which ``row`` began to be served; KeyError if not reached yet."""
        with self._lock:
            if not 0 <= row < len(self._started_at):
                raise KeyError(f"row {row} has not been served yet")
            return self._started_at[row]

    def wait_for_row(self, row: int, timeout: float) -> float:
        """Block until ``row`` is served; returns ``row_started_at(row)``."""
        if not 0 <= row < len(self.values):
            raise ValueError(f"row {row} outside 0..{len(self.values) - 1}")
        return poll_until(
            lambda: self.row_started_at(row) if self.current_row >= row else None,
            timeout,
            f"replay row {row}",
            interval=0.05,
        )

    def _advance(self) -> None:
        origin = time.time()
        for row in range(len(self.values)):
            if row > 0 and self._stop.wait(origin + row * self.seconds_per_row - time.time()):
                return
            with self._lock:
                self._row = row
                self._started_at.append(time.time())

    def start(self) -> Self:
        """Begin serving row 0 now, then advance on schedule (no drift: times are from start)."""
        if self._advancer is None:
            self._advancer = threading.Thread(target=self._advance, name="replay", daemon=True)
            self._advancer.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._advancer is not None:
            self._advancer.join()
        self._server.shutdown()
        self._server.server_close()
        self._server_thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
