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

Prometheus answers at most 11,000 points per series, and an answer of many series is large
(about 150 bytes a point as JSON, and Prometheus refuses a query over ``query.max-samples``), so
a read is split in time: at most ``max_points_per_request`` points a series and
``max_samples_per_request`` samples an answer. Each answer is decoded into one float32 row per
series as it arrives (whole arrays, no Python object per point) and then dropped.
Transport errors (connection refused, timeouts, 5xx) are retried with exponential backoff by
the HTTP session; a PromQL error (HTTP 400/422) is not retried, and only that query's features go
missing for the cycle, the rest of the group and the other groups are still read.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import re
import socket
import ssl
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import BinaryIO

import ijson
import numpy as np
import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from aiops_plugin.config import EntityGroupConfig, PrometheusConfig
from aiops_plugin.sharding import shard_of
from aiops_plugin.sources.shard_filter import (
    NotRestrictable,
    owned_values,
    restrict_query,
    same_owned_series,
    selectors,
)
from aiops_plugin.windows import EntityLabels, Windows, entity_key

log = logging.getLogger(__name__)


class SourceUnavailable(Exception):
    """Prometheus could not be reached (after retries) or answered with a server error."""


_STATUS_CODE = re.compile(r"Status Code (\d{3})")


def _error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps (``__cause__``, ``__context__``, urllib3's ``reason``,
    exceptions passed as arguments), outermost first."""
    chain: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        wrapped = [getattr(current, "reason", None), current.__cause__, current.__context__]
        wrapped += list(current.args)
        pending += [item for item in wrapped if isinstance(item, BaseException)]
    return chain


def transport_cause(error: BaseException, timeout: float) -> str:
    """The cause at the bottom of a ``requests``/urllib3 error chain in a few words
    (``connection refused``, ``timed out after 10 s``), instead of the whole chain."""
    chain = _error_chain(error)
    for cause in reversed(chain):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, socket.gaierror):
            return "host name not resolved"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {getattr(cause, 'verify_message', None) or cause.reason}"
        if isinstance(cause, TimeoutError | Urllib3Timeout | requests.Timeout):
            return f"timed out after {timeout:g} s"
        if isinstance(cause, ProtocolError | http.client.RemoteDisconnected):
            return "connection closed without an answer"
    innermost = chain[-1]
    return f"{type(innermost).__name__}: {str(innermost).splitlines()[0][:200]}"


def _http_answer(status: int | None, error: Exception) -> str:
    """``HTTP 503 Service Unavailable`` (the body can be a whole HTML page)."""
    if status is None:
        return str(error).splitlines()[0][:200]
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


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
    #: series of the answers that were not in the Prometheus API's shape (skipped)
    malformed_series: int = 0
    #: series of other shards' entities received and skipped (0 where the queries were
    #: restricted to this shard's entities)
    foreign_series: int = 0


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


def sample_bounded_end(
    chunk_start: float, end: float, step: float, series: int, max_points: int, max_samples: int
) -> float:
    """End of the range request that starts at ``chunk_start``: at most ``max_points`` grid
    points a series and ``max_samples`` samples over ``series`` series (at least one point)."""
    points = max(1, min(max_points, max_samples // max(1, series)))
    return min(chunk_start + (points - 1) * step, end)


def align_start(timestamp: float, step: float) -> float:
    """The grid point at or before ``timestamp`` (grids are anchored at the Unix epoch)."""
    return math.floor(timestamp / step) * step


def drop_stale_samples(promql: str, max_age: float) -> str:
    """``promql`` restricted to points whose underlying sample is at most ``max_age`` s old.

    Set operators match on labels without the metric name, so the right-hand side (which loses
    ``__name__`` in the arithmetic) still pairs with each left-hand series.
    """
    return f"({promql}) and ((time() - timestamp({promql})) <= {max_age:g})"


def feature_name(
    query_name: str, series_labels: dict[str, str], entity_labels: Collection[str]
) -> str:
    """``query_name`` alone, or ``query_name{extra="labels"}`` when the query returns several
    series per entity (for example one per CPU)."""
    extra = {k: v for k, v in series_labels.items() if k != "__name__" and k not in entity_labels}
    if not extra:
        return query_name
    inner = ",".join(f'{k}="{extra[k]}"' for k in sorted(extra))
    return f"{query_name}{{{inner}}}"


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def decode_points(
    values: list, start: float, step: float, n_time: int
) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices and values of a range answer's ``[[time, "value"], ...]``, decoded as whole
    arrays (about 0.4 us a point; a dict per point was 1.1 us and ~100 bytes kept per point).

    Points off the grid ``[0, n_time)`` and non-finite values (``NaN``, ``+Inf``: a division by
    zero in the user's PromQL) are left out, so they stay missing, never a number; so are
    values beyond float32's range. Raises TypeError / ValueError for what is not such a list."""
    count = len(values)
    if count == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    times = np.fromiter((point[0] for point in values), dtype=np.float64, count=count)
    samples = np.array([point[1] for point in values], dtype=np.float64)
    if samples.shape != (count,):
        raise ValueError("a sample value is not a number")
    with np.errstate(invalid="ignore", over="ignore"):
        position = np.rint((times - start) / step)
        on_grid = np.isfinite(position) & (position >= 0) & (position < n_time)
        index = np.where(on_grid, position, -1).astype(np.int64)
        keep = on_grid & np.isfinite(samples) & (np.abs(samples) <= _FLOAT32_MAX)
    return index[keep], samples[keep].astype(np.float32)


class _ChunkReader:
    """A ``read(size)`` file over an iterator of non-empty byte chunks: b"" only at its end."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def read(self, size: int = -1) -> bytes:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = chunk
        if size < 0:
            size = len(self._pending)
        out, self._pending = self._pending[:size], self._pending[size:]
        return out


def answer_series(stream: BinaryIO | _ChunkReader) -> Iterator[dict]:
    """The items of ``data.result`` of a query's JSON answer read from ``stream``, one at a
    time, numbers as floats (a range answer's series: ``{"metric": ..., "values": ...}``)."""
    return ijson.items(stream, "data.result.item", use_float=True)


class PrometheusReader:
    """Range reads of entity groups through ``prometheus-api-client``."""

    def __init__(self, config: PrometheusConfig, shard: int = 0, shards: int = 1) -> None:
        """``shard`` of ``shards``: only the entities that shard owns are kept
        (:mod:`aiops_plugin.sharding`); the others' series are skipped while decoding."""
        self.config = config
        self.shard, self.shards = shard, shards
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
        # our own session (the client mounts its retries on it), so that the long queries of
        # a shard (its entities' label values) can go in a POST body instead of the URL
        self.session = requests.Session()
        self.session.verify = config.verify_tls
        self.client = PrometheusConnect(
            url=config.url,
            headers=headers,
            disable_ssl=not config.verify_tls,
            retry=retry,
            session=self.session,
            timeout=config.timeout,
        )
        # per (identifying labels, query): whether the query restricted to this shard's
        # entities was checked to give its series unchanged (shard_filter)
        self._restrictable: dict[tuple[tuple[str, ...], str], bool] = {}

    def ping(self) -> bool:
        try:
            return bool(self.client.check_prometheus_connection())
        except Exception:  # noqa: BLE001 - any failure means "not up"
            return False

    def _query_range(self, promql: str, start: float, end: float) -> list[dict]:
        return self._call(
            lambda: self.client.custom_query_range(
                promql,
                start_time=datetime.fromtimestamp(start, UTC),
                end_time=datetime.fromtimestamp(end, UTC),
                step=f"{self.config.step:g}s",
                timeout=self.config.timeout,
            )
        )

    def _request(
        self, api: str, form: Mapping[str, object], method: str = "POST", stream: bool = False
    ) -> requests.Response:
        """``/api/v1/<api>`` with ``form`` in a POST body (Prometheus takes both; a URL of a
        shard's query can pass the limits of servers and proxies), or as GET parameters where
        the API takes no POST; an answer other than 200 raised as the client library does."""
        response = self.session.request(
            method,
            f"{self.config.url.rstrip('/')}/api/v1/{api}",
            **({"data": form} if method == "POST" else {"params": form}),
            headers=self.client.headers,
            timeout=self.config.timeout,
            stream=stream,
        )
        if response.status_code != 200:
            content = response.content
            response.close()
            raise PrometheusApiClientException(
                f"HTTP Status Code {response.status_code} ({content!r})"
            )
        return response

    def _api(self, api: str, form: Mapping[str, object], method: str = "POST") -> list:
        """:meth:`_request`'s answer's ``data`` (the result, for a query)."""

        def request() -> list:
            data = self._request(api, form, method).json()["data"]
            return data["result"] if isinstance(data, dict) else data

        return self._call(request)

    def _instant(self, promql: str, at: float) -> list[dict]:
        return self._api("query", {"query": promql, "time": f"{at:.3f}"})

    def _call(self, request: Callable[[], list]) -> list:
        """``request()``, its failures told apart (:meth:`_answer_errors`)."""
        with self._answer_errors():
            return request()

    @contextlib.contextmanager
    def _answer_errors(self) -> Iterator[None]:
        """A PromQL error (HTTP 400/422) raised as it is; anything else that goes wrong with a
        request or its answer as :class:`SourceUnavailable` naming the cause."""
        try:
            yield
        except PrometheusApiClientException as exc:
            match = _STATUS_CODE.search(str(exc))
            status = int(match.group(1)) if match else None
            if status in (400, 422):
                raise
            raise SourceUnavailable(
                f"Prometheus at {self.config.url} answered {_http_answer(status, exc)}"
                f"{self._tries()}"
            ) from exc
        except (requests.JSONDecodeError, ijson.JSONError, KeyError, TypeError) as exc:
            raise SourceUnavailable(
                f"Prometheus at {self.config.url} answered with something other than the "
                "Prometheus API's JSON; is that the base URL of its HTTP API?"
            ) from exc
        except (requests.RequestException, Urllib3HTTPError, OSError) as exc:
            cause = transport_cause(exc, self.config.timeout)
            raise SourceUnavailable(
                f"Prometheus at {self.config.url} is unreachable: {cause}{self._tries()}"
            ) from exc

    def _range_answer(
        self, promql: str, start: float, end: float, post: bool = False
    ) -> Iterator[dict]:
        """The series of a range query's answer, each parsed off the wire as it arrives
        (``ijson``): an answer's JSON is never held whole, nor as one tree of Python objects
        (about 300 bytes a sample, 600 MB for an answer of 2M samples). ``post``: the query in
        the request's body (a shard's pinned label values make it long)."""
        form = {
            "query": promql,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{self.config.step:g}s",
        }
        with self._answer_errors():
            response = self._request("query_range", form, "POST" if post else "GET", stream=True)
            try:
                # the decoded body chunk by chunk (requests skips the empty reads a compressed
                # stream can give before its end, which the parser would take for its end)
                yield from answer_series(_ChunkReader(response.iter_content(1 << 16)))
            finally:
                response.close()

    def _tries(self) -> str:
        tries = self.config.retries + 1
        return f" ({tries} tries)" if tries > 1 else ""

    def alert_series(self, alert_names: list[str], start: float, end: float) -> list[dict]:
        """The firing ``ALERTS`` series of ``alert_names`` over ``[start, end]`` (Prometheus
        records every active alert as one): ``[{"metric": labels, "values": [[t, "1"], ...]}]``.

        Raises :class:`SourceUnavailable` when Prometheus cannot be reached."""
        if not alert_names:
            return []
        names = "|".join(re.escape(name) for name in alert_names)
        promql = f'ALERTS{{alertname=~"{names}", alertstate="firing"}}'
        step = self.config.step
        chunks = plan_chunks(
            align_start(start, step),
            align_start(end, step),
            step,
            self.config.max_points_per_request,
        )
        return [
            item
            for chunk_start, chunk_end in chunks
            for item in self._query_range(promql, chunk_start, chunk_end)
        ]

    def read_range(self, group: EntityGroupConfig, start: float, end: float) -> ReadResult:
        """All queries of ``group`` over ``[start, end]`` on the step grid.

        Raises :class:`SourceUnavailable` when Prometheus cannot be reached; returns the failures
        of individual queries (bad PromQL) alongside whatever the other queries read.
        """
        step = self.config.step
        start = align_start(start, step)
        end = align_start(end, step)
        n_time = int(round((end - start) / step)) + 1
        series: dict[tuple[str, str], np.ndarray] = {}
        labels_by_key: dict[str, EntityLabels] = {}
        failures: list[QueryFailure] = []
        skipped_without_labels = malformed = 0
        max_age = self.config.max_sample_age or 2 * step
        identifying = frozenset(group.labels)
        owned: dict[str, bool] = {}  # entity key -> this shard owns it
        foreign = 0  # series of other shards' entities received and skipped

        def is_owned(metric: Mapping[str, object]) -> bool:
            if not isinstance(metric, Mapping) or any(
                label not in metric for label in group.labels
            ):
                return False
            key = entity_key({label: str(metric[label]) for label in group.labels})
            mine = owned.get(key)
            if mine is None:
                mine = owned[key] = shard_of(key, self.shards) == self.shard
            return mine

        for query_name, promql in group.queries.items():
            guarded = drop_stale_samples(promql, max_age)
            # decoded chunk by chunk, so only one answer's JSON is held at a time; the query's
            # rows join the group only when every chunk was read (a query is all or nothing)
            rows: dict[tuple[str, str], np.ndarray] = {}
            labels_here: dict[str, EntityLabels] = {}
            # chunks sized by the series count of the answer before (before the first: the
            # group's bounds, entities x features, so the first is short), so no answer holds
            # more than max_samples_per_request samples
            chunk_start, seen = start, group.max_entities * group.max_features
            try:
                pinned = None
                verdict = self._restricts(group, promql, max_age, end, is_owned)
                if self.shards > 1 and verdict is not False:
                    # this shard's own entities' series only: their label values pinned (until
                    # the check has decided, the whole answer, if the shard has entities at all)
                    pins = self._own_values(group, promql, start, end, is_owned)
                    if pins is None:
                        chunk_start = end + step  # none of the query's entities is this shard's
                    elif verdict:
                        pinned = drop_stale_samples(restrict_query(promql, pins), max_age)
                while chunk_start <= end:
                    chunk_end = sample_bounded_end(
                        chunk_start,
                        end,
                        step,
                        seen,
                        self.config.max_points_per_request,
                        self.config.max_samples_per_request,
                    )
                    if pinned is None:
                        answer = self._range_answer(guarded, chunk_start, chunk_end)
                    else:
                        answer = self._range_answer(pinned, chunk_start, chunk_end, post=True)
                    chunk_start = chunk_end + step
                    received = 0
                    for item in answer:
                        received += 1
                        try:
                            metric = item.get("metric", {})
                            if any(label not in metric for label in group.labels):
                                skipped_without_labels += 1
                                continue
                            labels = {label: str(metric[label]) for label in group.labels}
                            key = entity_key(labels)
                            if self.shards > 1 and not is_owned(metric):
                                foreign += 1
                                continue
                            name = feature_name(query_name, metric, identifying)
                            index, samples = decode_points(
                                item.get("values", []), start, step, n_time
                            )
                        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
                            malformed += 1  # not the Prometheus API's shape: skipped, counted
                            continue
                        labels_here[key] = labels
                        row = rows.get((key, name))
                        if row is None:
                            row = rows[(key, name)] = np.full(n_time, np.nan, dtype=np.float32)
                        row[index] = samples
                    seen = received or seen
            except PrometheusApiClientException as exc:
                failure = QueryFailure(group.name, query_name, promql, str(exc))
                log.error("query failed, its features are missing this cycle: %s", failure)
                failures.append(failure)
                continue
            series.update(rows)
            labels_by_key.update(labels_here)
        if malformed:
            log.warning(
                "group %r: %d series of Prometheus' answers were not in the API's shape "
                '(metric labels and [time, "value"] pairs) and were ignored',
                group.name,
                malformed,
            )
        if skipped_without_labels:
            log.warning(
                "group %r: %d series lack an identifying label %s and were ignored",
                group.name,
                skipped_without_labels,
                group.labels,
            )
        windows, dropped = assemble_windows(group, series, labels_by_key, start, step, n_time)
        return ReadResult(windows, failures, dropped, malformed, foreign)

    def _restricts(
        self,
        group: EntityGroupConfig,
        promql: str,
        max_age: float,
        at: float,
        is_owned: Callable[[Mapping[str, object]], bool],
    ) -> bool | None:
        """Whether ``promql`` is read restricted to this shard's entities: it can be rewritten
        (:func:`~.shard_filter.restrict_query`) and, evaluated once at ``at`` both ways, gives
        this shard's series with the same values. The verdict is kept for the process; a check
        that finds none of this shard's series at ``at`` decides nothing (None) and is repeated.
        False when not sharded."""
        if self.shards == 1:
            return False
        cache_key = (tuple(group.labels), promql)
        verdict = self._restrictable.get(cache_key)
        if verdict is not None:
            return verdict
        try:
            restrict_query(promql, {label: {"x"} for label in group.labels})
            if not selectors(promql)[0]:
                raise NotRestrictable("it selects no series")
        except NotRestrictable as exc:
            log.info(
                "group %r: query %r is read in full by each shard (%s)", group.name, promql, exc
            )
            self._restrictable[cache_key] = False
            return False
        full = [
            item
            for item in self._instant(drop_stale_samples(promql, max_age), at)
            if isinstance(item, dict)
        ]
        mine = [item.get("metric", {}) for item in full if is_owned(item.get("metric", {}))]
        if not mine:
            return None
        values = owned_values(mine, group.labels)
        try:
            narrowed = self._instant(
                drop_stale_samples(restrict_query(promql, values), max_age), at
            )
            verdict = same_owned_series(full, narrowed, is_owned)
        except PrometheusApiClientException as exc:
            log.warning("group %r: query %r restricted is refused: %s", group.name, promql, exc)
            verdict = False
        except (TypeError, ValueError, IndexError):  # an answer not in the API's shape
            verdict = False
        if not verdict:
            log.warning(
                "group %r: query %r gives other series or values when restricted to this "
                "shard's entities (it aggregates across entities, or takes the identifying "
                "labels from elsewhere): each shard reads it in full and skips the others' series",
                group.name,
                promql,
            )
        self._restrictable[cache_key] = verdict
        return verdict

    def _own_values(
        self,
        group: EntityGroupConfig,
        promql: str,
        start: float,
        end: float,
        is_owned: Callable[[Mapping[str, object]], bool],
    ) -> dict[str, set[str]] | None:
        """The identifying label values of this shard's entities among the raw series the
        selectors of ``promql`` match over ``[start, end]`` (widened by how far back the query
        reads), from Prometheus' index (the label-values API for one identifying label, the
        series API for several); None when this shard owns none of them."""
        found, reach = selectors(promql)
        form = {"match[]": found, "start": f"{start - reach:.3f}", "end": f"{end:.3f}"}
        if len(group.labels) == 1:
            (label,) = group.labels
            values = self._api(f"label/{label}/values", form, method="GET")
            entities: list[Mapping[str, object]] = [{label: value} for value in values]
        else:
            entities = [m for m in self._api("series", form) if isinstance(m, Mapping)]
        mine = [entity for entity in entities if is_owned(entity)]
        return owned_values(mine, group.labels) if mine else None


def assemble_windows(
    group: EntityGroupConfig,
    series: dict[tuple[str, str], np.ndarray],
    labels_by_key: dict[str, EntityLabels],
    start: float,
    step: float,
    n_time: int,
) -> tuple[Windows | None, int]:
    """The group's ``(entities, time, features)`` block from points keyed by (entity, feature).

    ``series`` maps ``(entity key, feature)`` to its float32 ``(n_time,)`` row on the grid (NaN
    where no sample); it is emptied as the block is filled. Entities and features
    beyond the group's bounds are dropped (the count of dropped entities is returned). Linear in
    the number of series and points: at 10k entities x 40 features a read is 400k series.
    """
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
    kept = set(keys)
    features = sorted({feature for key, feature in series if key in kept})
    if len(features) > group.max_features:
        log.warning(
            "group %r: %d features over max_features=%d were not read",
            group.name,
            len(features) - group.max_features,
            group.max_features,
        )
        features = features[: group.max_features]
    if not keys or not features:
        return None, dropped
    values = np.full((len(keys), n_time, len(features)), np.nan, dtype=np.float32)
    key_index = {key: i for i, key in enumerate(keys)}
    feature_index = {name: j for j, name in enumerate(features)}
    # each row is dropped once copied, so the rows and the block are not both held whole
    for key, feature in list(series):
        row = series.pop((key, feature))
        if key in key_index and feature in feature_index:
            values[key_index[key], :, feature_index[feature]] = row
    observed = np.isnan(values)
    np.logical_not(observed, out=observed)
    windows = Windows(
        group=group.name,
        values=values,
        observed=observed,
        timestamps=start + step * np.arange(n_time, dtype=np.float64),
        entities=[labels_by_key[key] for key in keys],
        features=features,
        step=step,
    )
    return windows, dropped


def merge_windows(old: Windows | None, new: Windows, keep_steps: int) -> Windows:
    """Append a newer read to a buffer, newer values winning where both have a point.

    Entities and features are the union of both, so an entity that appears mid-way starts with
    missing history and one that disappears keeps its (ever older) data until it falls out of the
    kept span; then it is dropped, like a feature with no sample left in the span. Only the last
    ``keep_steps`` grid points of the entities and features that still have data are kept, so
    memory stays bounded when entities come and go (pods of a rolling deploy).
    """
    if old is None:
        return _without_empty(new.tail(keep_steps))
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
        rows = np.array([key_index[key] for key in part.keys], dtype=np.int64)
        cols = np.array([feature_index[name] for name in part.features], dtype=np.int64)
        times = np.rint((part.timestamps - start) / step).astype(np.int64)
        keep = (times >= 0) & (times < n_time)
        block = part.values[:, keep][:, :, :]
        present = part.observed[:, keep]
        target = values[np.ix_(rows, times[keep], cols)]
        values[np.ix_(rows, times[keep], cols)] = np.where(present, block, target)
    return _without_empty(
        Windows(
            group=new.group,
            values=values,
            observed=~np.isnan(values),
            timestamps=start + step * np.arange(n_time, dtype=np.float64),
            entities=[labels[key] for key in keys],
            features=features,
            step=step,
        )
    )


def _without_empty(windows: Windows) -> Windows:
    """``windows`` without the entities and features that have no sample at all."""
    live_entities = windows.observed.any(axis=(1, 2))
    live_features = windows.observed.any(axis=(0, 1))
    if live_entities.all() and live_features.all():
        return windows
    entities = np.flatnonzero(live_entities)
    features = np.flatnonzero(live_features)
    index = np.ix_(entities, np.arange(len(windows.timestamps)), features)
    return Windows(
        group=windows.group,
        values=windows.values[index],
        observed=windows.observed[index],
        timestamps=windows.timestamps,
        entities=[windows.entities[i] for i in entities],
        features=[windows.features[j] for j in features],
        step=windows.step,
    )
