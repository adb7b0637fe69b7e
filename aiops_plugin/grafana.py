"""Grafana's HTTP API through ``grafana-client``: push the shipped dashboards into a folder, and
write anomaly events as annotations.

Pushing is idempotent: the folder is found by uid (or title) before it is created, each dashboard
is saved by uid with ``overwrite`` (Grafana keeps every saved version in its history), and a
dashboard whose stored model already equals the shipped one is left alone, so pushing twice adds
no version.

Annotations are organization annotations (no dashboard id), tagged ``aiops``, ``aiops-anomaly``,
``entity:<entity>``, ``entity_group:<group>``, ``detector:<detector>`` and ``aiops-event:<id>``;
any dashboard can show them with a Grafana annotation query by tag (the entity dashboard asks for
``aiops-anomaly`` + ``entity:$entity``). An event that opens is a point at its start; when it
closes the same annotation, found again by its ``aiops-event`` tag (so a restarted agent still
closes what an earlier one opened), becomes a region from start to end. Its text
(:func:`event_text`) names the peak, the top contributing metrics and the root-cause ranking
(which entities went first, and how long before); on close it is rewritten with the event's
final numbers.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

from aiops_plugin.config import GrafanaConfig
from aiops_plugin.dashboards import DashboardFile
from aiops_plugin.store import AnomalyEvent
from aiops_plugin.windows import entity_display_name

log = logging.getLogger(__name__)

ANOMALY_TAG = "aiops-anomaly"
#: Keys Grafana sets itself on a saved dashboard; ignored when comparing with the shipped model.
_SERVER_KEYS = ("id", "version")


class GrafanaError(Exception):
    """A Grafana call failed; the message names the call and what Grafana answered."""


def connect(url: str, token: str | None, timeout: float = 10.0) -> GrafanaApi:
    """A client for ``url`` with a service-account ``token`` (``Authorization: Bearer``).

    Without a token, credentials in the URL (``https://user:password@grafana``) are used as basic
    auth; ``?verify=false`` in the URL turns TLS verification off.
    """
    return GrafanaApi.from_url(url, credential=token, timeout=timeout)


def _call(action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    # grafana-client raises GrafanaException for HTTP errors; connection errors come from its
    # HTTP library (niquests), whose exceptions are OSErrors
    except (GrafanaException, OSError) as exc:
        raise GrafanaError(f"{action}: {exc}") from exc


def folder_uid(title: str) -> str:
    """A stable folder uid from its title (``AIOps`` -> ``aiops``), so a push finds its folder."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "aiops"


def ensure_folder(api: GrafanaApi, title: str) -> str:
    """The uid of the folder with the title's uid (or, failing that, the title), created if
    neither exists."""
    uid = folder_uid(title)
    folders = _call("listing folders (GET /api/folders)", api.folder.get_all_folders)
    for key, value in (("uid", uid), ("title", title)):
        for folder in folders:
            if folder.get(key) == value:
                return str(folder["uid"])
    created = _call(
        f"creating folder {title!r} (POST /api/folders)", api.folder.create_folder, title, uid=uid
    )
    return str(created["uid"])


@dataclass(frozen=True)
class PushResult:
    """What happened to one dashboard: ``created``, ``updated`` or ``unchanged``."""

    uid: str
    title: str
    status: str
    version: int | None
    url: str | None


def _stored(api: GrafanaApi, uid: str) -> dict[str, Any] | None:
    """The dashboard Grafana holds under ``uid`` (``{"dashboard", "meta"}``), or None."""
    try:
        return _call(
            f"reading dashboard {uid!r} (GET /api/dashboards/uid)", api.dashboard.get_dashboard, uid
        )
    except GrafanaError as exc:
        cause = exc.__cause__
        if isinstance(cause, GrafanaClientError) and cause.status_code == 404:
            return None
        raise


def _without_server_keys(model: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in model.items() if key not in _SERVER_KEYS}


def push_dashboard(
    api: GrafanaApi, dashboard: DashboardFile, folder_uid: str, message: str
) -> PushResult:
    """Save one dashboard into the folder by uid (``overwrite``), unless it is stored already."""
    stored = _stored(api, dashboard.uid)
    if stored is not None:
        meta = stored.get("meta", {})
        if meta.get("folderUid") == folder_uid and _without_server_keys(
            stored.get("dashboard", {})
        ) == _without_server_keys(dashboard.model):
            return PushResult(
                dashboard.uid,
                dashboard.title,
                "unchanged",
                stored["dashboard"].get("version"),
                meta.get("url"),
            )
    body = {
        "dashboard": {**dashboard.model, "id": None},
        "folderUid": folder_uid,
        "overwrite": True,
        "message": message,
    }
    saved = _call(
        f"saving dashboard {dashboard.uid!r} from {dashboard.path} (POST /api/dashboards/db)",
        api.dashboard.update_dashboard,
        body,
    )
    return PushResult(
        dashboard.uid,
        dashboard.title,
        "created" if stored is None else "updated",
        saved.get("version"),
        saved.get("url"),
    )


def push_dashboards(
    api: GrafanaApi,
    dashboards: Sequence[DashboardFile],
    folder_title: str,
    message: str = "aiops-plugin dashboards push",
) -> list[PushResult]:
    """Push every dashboard into the folder (created when missing); stops at the first error."""
    folder = ensure_folder(api, folder_title)
    return [push_dashboard(api, dashboard, folder, message) for dashboard in dashboards]


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def event_tags(event: AnomalyEvent) -> list[str]:
    """The tags an anomaly event's annotation carries (dashboards filter on them)."""
    return [
        "aiops",
        ANOMALY_TAG,
        f"entity:{entity_display_name(event.entity_labels)}",
        f"entity_group:{event.group_name}",
        f"detector:{event.detector}",
        f"aiops-event:{event.id}",
    ]


def event_text(event: AnomalyEvent) -> str:
    """What an on-call reads on the annotation: the peak, the metrics that explain the event,
    the entities that went first and, once closed, when it ended; rewritten on close so the
    annotation ends with the event's final numbers."""
    entity = entity_display_name(event.entity_labels)
    text = (
        f"Anomaly on {entity} (group {event.group_name}): {event.detector} score peaked at "
        f"{event.peak_score:.2f} at {event.peak_at.isoformat()}"
    )
    if event.peak_probability is not None:
        text += f", P(anomalous) up to {_percent(event.peak_probability)}"
    text += "."
    if event.top_metrics:
        shares = ", ".join(
            f"{item['metric']} {_percent(item['share'])}" for item in event.top_metrics
        )
        text += f" Top metrics: {shares}."
    if event.root_cause:
        text += f" Root cause: {_root_cause_text(event.root_cause, event.group_name)}."
    if event.end_at is not None:
        steps = f"{event.n_steps} scored step{'' if event.n_steps == 1 else 's'}"
        text += f" Back below the threshold at {event.end_at.isoformat()} after {steps}."
    return text


def _percent(value: float) -> str:
    """A share as Prometheus' humanizePercentage writes it (0.125 -> ``12.5%``), so an
    annotation and an alert about the same event read alike."""
    return f"{value * 100:.4g}%"


def _root_cause_text(ranking: Sequence[dict[str, Any]], event_group: str) -> str:
    """``a went first (3m before), then b (at the start), c (1m 30s after)``: the ranked
    entities, best first, with when each became anomalous relative to the event's start."""
    named = []
    for place, item in enumerate(ranking):
        name = entity_display_name(item["entity_labels"])
        if item.get("group", event_group) != event_group:
            name += f" of group {item['group']}"
        if place == 0:
            name += " went first"
        lead = item.get("lead_seconds")
        named.append(name if lead is None else f"{name} ({_lead_text(float(lead))})")
    first, *rest = named
    return first if not rest else f"{first}, then {', '.join(rest)}"


def _lead_text(seconds: float) -> str:
    """``3m before`` / ``1m 30s after`` / ``at the start``: the largest whole unit and, when it is
    not zero, the next one."""
    whole = round(abs(seconds))
    if whole == 0:
        return "at the start"
    sizes = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    top = next(k for k, (_, size) in enumerate(sizes) if whole >= size)
    unit, size = sizes[top]
    text = f"{whole // size}{unit}"
    if top + 1 < len(sizes):
        next_unit, next_size = sizes[top + 1]
        if (whole % size) // next_size:
            text += f" {(whole % size) // next_size}{next_unit}"
    return f"{text} {'before' if seconds > 0 else 'after'}"


class AnnotationWriter:
    """Writes anomaly events opened or closed in a cycle as Grafana annotations.

    Failures are logged with the event and never raised: Grafana being down must not stop
    scoring. Each call is synchronous and bounded by the client's timeout.
    """

    def __init__(self, api: GrafanaApi) -> None:
        self.api = api

    @classmethod
    def from_config(cls, config: GrafanaConfig) -> AnnotationWriter:
        if not config.url:
            raise ValueError("grafana.url is required to write annotations")
        return cls(connect(config.url, config.token, config.timeout))

    def write(self, events: Sequence[AnomalyEvent]) -> int:
        """Annotate each event (opened: a point; closed: the region); returns how many
        succeeded."""
        written = 0
        for event in events:
            try:
                if event.end_at is None:
                    self._open(event)
                else:
                    self._close(event)
                written += 1
            except (GrafanaException, OSError) as exc:
                log.warning(
                    "grafana annotation for anomaly event %d (%s %s) not written: %s",
                    event.id,
                    event.group_name,
                    event.entity_key,
                    exc,
                )
        return written

    def _open(self, event: AnomalyEvent) -> None:
        self.api.annotations.add_annotation(
            time_from=_millis(event.start_at), tags=event_tags(event), text=event_text(event)
        )

    def _close(self, event: AnomalyEvent) -> None:
        assert event.end_at is not None
        tags = event_tags(event)
        found = self.api.annotations.find_annotations(
            tags=[f"aiops-event:{event.id}"], ann_type="annotation", limit=1
        )
        if found:
            # grafana-client sends every field of a PATCH; tags and text are given so they stay
            self.api.annotations.partial_update_annotation(
                found[0]["id"], time_to=_millis(event.end_at), tags=tags, text=event_text(event)
            )
        else:
            self.api.annotations.add_annotation(
                time_from=_millis(event.start_at),
                time_to=_millis(event.end_at),
                tags=tags,
                text=event_text(event),
            )


class BackgroundAnnotations:
    """:class:`AnnotationWriter` off the cycle's critical path.

    The cycle hands over the events it opened or closed (:meth:`submit`, never blocking); one
    thread writes them in order, so an event's open is written before its close. The queue is
    bounded: while Grafana is slow or down, the oldest pending events beyond ``max_pending`` are
    dropped with a warning instead of the cycle waiting on HTTP calls (annotations are a view;
    the events themselves are in the store).
    """

    def __init__(self, writer: AnnotationWriter, max_pending: int = 10_000) -> None:
        self.writer = writer
        self._pending: deque[AnomalyEvent] = deque(maxlen=max_pending)
        self._changed = threading.Condition()
        self._busy = False
        self._closed = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="grafana-annotations", daemon=True)
        self._thread.start()

    def submit(self, events: Sequence[AnomalyEvent]) -> None:
        if not events:
            return
        with self._changed:
            overflow = max(0, len(self._pending) + len(events) - (self._pending.maxlen or 0))
            if overflow:
                self.dropped += overflow
                log.warning(
                    "grafana annotations: %d pending events dropped (Grafana slow or down)",
                    overflow,
                )
            self._pending.extend(events)
            self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted event was written (or failed); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (up to ``timeout``), then stop the thread."""
        self.flush(timeout)
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._busy = True
            try:
                self.writer.write(batch)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
