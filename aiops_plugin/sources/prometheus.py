"""Reading entity groups from Prometheus (or any PromQL API) onto a fixed step grid.

Each named query of a group returns series for many entities; the group's identifying labels
split them into entities, and any further labels make separate features of the same query. Values
land on the grid ``start, start + step, ...``; a grid point without a sample stays NaN and is
marked unobserved, so a gap is never silently zero-filled.

PromQL repeats a series' last sample at every evaluation step for up to 5 minutes (the lookback
delta), which would hide a gap behind copies of the last value. Each query is therefore wrapped in
:func:`drop_stale_samples`, which keeps a point only where its sample is younger than
``max_sample_age``; for derived expressions (``rate(...)``) the sample time is the evaluation time,
so they pass through unchanged.

Prometheus answers at most 11,000 points per series, so long fit windows are read in chunks.
Transport errors (connection refused, timeouts, 5xx) are retried with exponential backoff by
the HTTP session; a PromQL error (HTTP 400/422) is not retried, and only that query's features go
missing for the cycle, the rest of the group and the other groups are still read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from aiops_plugin.config import EntityGroupConfig, PrometheusConfig
from aiops_plugin.windows import EntityLabels, Windows, entity_key

log = logging.getLogger(__name__)


class SourceUnavailable(Exception):
    """Prometheus could not be reached (after retries) or answered with a server error."""


@dataclass(frozen=True)
class QueryFailure:
    """A query of one group that Prometheus rejected; named so an operator can fix it."""

    group: str
    query_name: str
    promql: str
    message: str

    def __str__(self) -> str:
        return f"group {self.group!r} query {self.query_name!r} ({self.promql}): {self.message}"


@dataclass
class ReadResult:
    windows: Windows | None
    failures: list[QueryFailure] = field(default_factory=list)
    dropped_entities: int = 0


def plan_chunks(
    start: float, end: float, step: float, max_points: int
) -> list[tuple[float, float]]:
    """Split ``[start, end]`` into ranges of at most ``max_points`` grid points each."""
    if end < start:
        return []
    span = (max_points - 1) * step
    chunks = []
    chunk_start = start
    while chunk_start <= end:
        chunk_end = min(chunk_start + span, end)
        chunks.append((chunk_start, chunk_end))
        chunk_start = chunk_end + step
    return chunks


def align_start(timestamp: float, step: float) -> float:
    """The grid point at or before ``timestamp`` (grids are anchored at the Unix epoch)."""
    return math.floor(timestamp / step) * step


def drop_stale_samples(promql: str, max_age: float) -> str:
    """``promql`` restricted to points whose underlying sample is at most ``max_age`` s old.

    Set operators match on labels without the metric name, so the right-hand side (which loses
    ``__name__`` in the arithmetic) still pairs with each left-hand series.
    """
    return f"({promql}) and ((time() - timestamp({promql})) <= {max_age:g})"


def feature_name(query_name: str, series_labels: dict[str, str], entity_labels: list[str]) -> str:
    """``query_name`` alone, or ``query_name{extra="labels"}`` when the query returns several
    series per entity (for example one per CPU)."""
    extra = {
        k: v for k, v in series_labels.items() if k != "__name__" and k not in set(entity_labels)
    }
    if not extra:
        return query_name
    inner = ",".join(f'{k}="{extra[k]}"' for k in sorted(extra))
    return f"{query_name}{{{inner}}}"


class PrometheusReader:
    """Range reads of entity groups through ``prometheus-api-client``."""

    def __init__(self, config: PrometheusConfig) -> None:
        self.config = config
        headers = {}
        if config.bearer_token:
            headers["Authorization"] = f"Bearer {config.bearer_token}"
        retry = Retry(
            total=config.retries,
            connect=config.retries,
            read=config.retries,
            backoff_factor=config.backoff,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=("GET", "POST"),
            raise_on_status=False,
        )
        self.client = PrometheusConnect(
            url=config.url,
            headers=headers,
            disable_ssl=not config.verify_tls,
            retry=retry,
            timeout=config.timeout,
        )

    def ping(self) -> bool:
        try:
            return bool(self.client.check_prometheus_connection())
        except Exception:  # noqa: BLE001 - any failure means "not up"
            return False

    def _query_range(self, promql: str, start: float, end: float) -> list[dict]:
        try:
            return self.client.custom_query_range(
                promql,
                start_time=datetime.fromtimestamp(start, UTC),
                end_time=datetime.fromtimestamp(end, UTC),
                step=f"{self.config.step:g}s",
                timeout=self.config.timeout,
            )
        except PrometheusApiClientException as exc:
            text = str(exc)
            if any(code in text for code in ("Status Code 400", "Status Code 422")):
                raise
            raise SourceUnavailable(f"{self.config.url}: {text}") from exc
        except requests.RequestException as exc:
            raise SourceUnavailable(f"{self.config.url}: {exc}") from exc

    def read_range(self, group: EntityGroupConfig, start: float, end: float) -> ReadResult:
        """All queries of ``group`` over ``[start, end]`` on the step grid.

        Raises :class:`SourceUnavailable` when Prometheus cannot be reached; returns the failures
        of individual queries (bad PromQL) alongside whatever the other queries read.
        """
        step = self.config.step
        start = align_start(start, step)
        end = align_start(end, step)
        n_time = int(round((end - start) / step)) + 1
        chunks = plan_chunks(start, end, step, self.config.max_points_per_request)
        series: dict[tuple[str, str], dict[int, float]] = {}
        labels_by_key: dict[str, EntityLabels] = {}
        failures: list[QueryFailure] = []
        skipped_without_labels = 0
        max_age = self.config.max_sample_age or 2 * step
        for query_name, promql in group.queries.items():
            guarded = drop_stale_samples(promql, max_age)
            try:
                results = [
                    item
                    for chunk_start, chunk_end in chunks
                    for item in self._query_range(guarded, chunk_start, chunk_end)
                ]
            except PrometheusApiClientException as exc:
                failure = QueryFailure(group.name, query_name, promql, str(exc))
                log.error("query failed, its features are missing this cycle: %s", failure)
                failures.append(failure)
                continue
            for item in results:
                metric = item.get("metric", {})
                if any(label not in metric for label in group.labels):
                    skipped_without_labels += 1
                    continue
                labels = {label: metric[label] for label in group.labels}
                key = entity_key(labels)
                labels_by_key[key] = labels
                points = series.setdefault(
                    (key, feature_name(query_name, metric, group.labels)), {}
                )
                for timestamp, raw in item.get("values", []):
                    index = int(round((float(timestamp) - start) / step))
                    value = float(raw)
                    if 0 <= index < n_time and math.isfinite(value):
                        points[index] = value
        if skipped_without_labels:
            log.warning(
                "group %r: %d series lack an identifying label %s and were ignored",
                group.name,
                skipped_without_labels,
                group.labels,
            )
        keys = sorted(labels_by_key)
        dropped = max(0, len(keys) - group.max_entities)
        if dropped:
            log.warning(
                "group %r: %d entities over max_entities=%d were not read",
                group.name,
                dropped,
                group.max_entities,
            )
            keys = keys[: group.max_entities]
        features = sorted({feature for key, feature in series if key in set(keys)})
        if len(features) > group.max_features:
            log.warning(
                "group %r: %d features over max_features=%d were not read",
                group.name,
                len(features) - group.max_features,
                group.max_features,
            )
            features = features[: group.max_features]
        if not keys or not features:
            return ReadResult(None, failures, dropped)
        values = np.full((len(keys), n_time, len(features)), np.nan, dtype=np.float32)
        key_index = {key: i for i, key in enumerate(keys)}
        feature_index = {name: j for j, name in enumerate(features)}
        for (key, feature), points in series.items():
            if key in key_index and feature in feature_index and points:
                indices = np.fromiter(points.keys(), dtype=np.int64, count=len(points))
                samples = np.fromiter(points.values(), dtype=np.float32, count=len(points))
                values[key_index[key], indices, feature_index[feature]] = samples
        windows = Windows(
            group=group.name,
            values=values,
            observed=~np.isnan(values),
            timestamps=start + step * np.arange(n_time, dtype=np.float64),
            entities=[labels_by_key[key] for key in keys],
            features=features,
            step=step,
        )
        return ReadResult(windows, failures, dropped)


def merge_windows(old: Windows | None, new: Windows, keep_steps: int) -> Windows:
    """Append a newer read to a buffer, newer values winning where both have a point.

    Entities and features are the union of both, so an entity that appears mid-way starts with
    missing history and one that disappears keeps its (ever older) data until it falls out of the
    kept span. Only the last ``keep_steps`` grid points are kept: memory stays bounded.
    """
    if old is None:
        return new.tail(keep_steps)
    step = new.step
    start = min(old.timestamps[0], new.timestamps[0])
    end = max(old.timestamps[-1], new.timestamps[-1])
    start = max(start, end - (keep_steps - 1) * step)
    n_time = int(round((end - start) / step)) + 1
    keys = sorted(set(old.keys) | set(new.keys))
    labels = {entity_key(item): item for item in old.entities + new.entities}
    features = sorted(set(old.features) | set(new.features))
    values = np.full((len(keys), n_time, len(features)), np.nan, dtype=np.float32)
    key_index = {key: i for i, key in enumerate(keys)}
    feature_index = {name: j for j, name in enumerate(features)}
    for part in (old, new):
        rows = np.array([key_index[key] for key in part.keys])
        cols = np.array([feature_index[name] for name in part.features])
        times = np.rint((part.timestamps - start) / step).astype(np.int64)
        keep = (times >= 0) & (times < n_time)
        block = part.values[:, keep][:, :, :]
        present = part.observed[:, keep]
        target = values[np.ix_(rows, times[keep], cols)]
        values[np.ix_(rows, times[keep], cols)] = np.where(present, block, target)
    return Windows(
        group=new.group,
        values=values,
        observed=~np.isnan(values),
        timestamps=start + step * np.arange(n_time, dtype=np.float64),
        entities=[labels[key] for key in keys],
        features=features,
        step=step,
    )
