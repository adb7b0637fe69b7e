"""The read-only anomaly events API: ``GET /api/v1/anomalies`` (filtered, paginated, newest
first) and ``GET /api/v1/anomalies/{id}``, the events the agent records in the store, as JSON.

Registered on the agent's HTTP app by :func:`aiops_plugin.api.create_app`.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from aiops_plugin.store.repo import EVENT_STATES, AnomalyEvent, Store, StoreError
from aiops_plugin.windows import entity_display_name

ANOMALIES_PATH = "/api/v1/anomalies"
ANOMALIES_DEFAULT_LIMIT = 100
ANOMALIES_MAX_LIMIT = 1000
ANOMALIES_PARAMETERS = ("entity", "group", "since", "until", "state", "limit", "cursor")
_UNSIGNED = re.compile(r"[0-9]+")
_UNIX_SECONDS = re.compile(r"-?[0-9]+(\.[0-9]*)?")
_MAX_ECHO = 100  # characters of a refused value quoted back in an error


class BadParameter(Exception):
    """A request parameter the anomaly API refuses: answered 400 naming it and its value."""

    def __init__(self, parameter: str, value: str, reason: str) -> None:
        shown = value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "..."
        super().__init__(f"{parameter}: {reason}, got {shown!r}")
        self.parameter = parameter
        self.value = shown


def register_anomaly_api(app: FastAPI, store: Store) -> None:
    """``GET /api/v1/anomalies`` (filtered, paginated, newest first) and
    ``GET /api/v1/anomalies/{id}``: the anomaly events in the store, read-only, as JSON.

    Parameters are validated here rather than by FastAPI, so that a refusal is a 400 naming the
    parameter and the value, without changing the 422 of the other endpoints. A store that
    fails answers 503; the next request tries it again.
    """

    @app.get(ANOMALIES_PATH)
    def list_anomalies(request: Request) -> JSONResponse:
        params = request.query_params
        try:
            unknown = sorted(set(params) - set(ANOMALIES_PARAMETERS))
            if unknown:
                raise BadParameter(
                    unknown[0],
                    params[unknown[0]],
                    f"unknown parameter (known: {', '.join(ANOMALIES_PARAMETERS)})",
                )
            state = params.get("state")
            if state is not None and state not in EVENT_STATES:
                raise BadParameter("state", state, f"must be one of {', '.join(EVENT_STATES)}")
            since = _parse_time("since", params.get("since"))
            until = _parse_time("until", params.get("until"))
            if since is not None and until is not None and since > until:
                raise BadParameter(
                    "since", params["since"], f"must not be after until ({params['until']!r})"
                )
            limit = _parse_limit(params.get("limit"))
            after = _decode_cursor(params.get("cursor"))
        except BadParameter as exc:
            return _bad_request(exc)
        try:
            # One more than asked for: whether it comes says whether there is a next page.
            events = store.list_anomaly_events(
                group=params.get("group"),
                entity=params.get("entity"),
                since=since,
                until=until,
                state=state,
                limit=limit + 1,
                after=after,
            )
        except StoreError as exc:
            return _unavailable(exc)
        page = events[:limit]
        next_cursor = _encode_cursor(page[-1]) if len(events) > limit else None
        now = datetime.now(UTC)
        return JSONResponse(
            {"anomalies": [_event_json(event, now) for event in page], "next_cursor": next_cursor}
        )

    @app.get(ANOMALIES_PATH + "/{event_id}")
    def get_anomaly(event_id: str) -> JSONResponse:
        if not _UNSIGNED.fullmatch(event_id):
            return _bad_request(BadParameter("id", event_id, "must be a positive integer"))
        try:
            event = store.get_anomaly_event(int(event_id))
        except StoreError as exc:
            return _unavailable(exc)
        if event is None:
            return JSONResponse({"error": f"no anomaly event {int(event_id)}"}, status_code=404)
        return JSONResponse(_event_json(event, datetime.now(UTC)))


def _bad_request(exc: BadParameter) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc), "parameter": exc.parameter, "value": exc.value}, status_code=400
    )


def _unavailable(exc: StoreError) -> JSONResponse:
    return JSONResponse({"error": f"the store is unavailable: {exc}"}, status_code=503)


def _parse_time(parameter: str, value: str | None) -> datetime | None:
    """RFC 3339 with an offset (``2024-05-01T12:00:00Z``) or unix seconds (``1714564800``)."""
    if value is None:
        return None
    try:
        if _UNIX_SECONDS.fullmatch(value):
            parsed = datetime.fromtimestamp(float(value), UTC)
        else:
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                raise BadParameter(
                    parameter, value, "needs a UTC offset such as Z or +02:00 (RFC 3339)"
                )
            parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise BadParameter(
            parameter, value, "is neither an RFC 3339 timestamp nor unix seconds"
        ) from None
    return parsed


def _parse_limit(value: str | None) -> int:
    reason = f"must be an integer from 1 to {ANOMALIES_MAX_LIMIT}"
    if value is None:
        return ANOMALIES_DEFAULT_LIMIT
    if not _UNSIGNED.fullmatch(value) or not 1 <= int(value) <= ANOMALIES_MAX_LIMIT:
        raise BadParameter("limit", value, reason)
    return int(value)


def _encode_cursor(event: AnomalyEvent) -> str:
    """Opaque to clients: the (start, id) of the last event of a page, URL-safe base64."""
    raw = f"{event.start_at.isoformat()}|{event.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str | None) -> tuple[datetime, int] | None:
    if value is None:
        return None
    reason = "malformed cursor (pass the next_cursor of a previous page unchanged)"
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
        start_text, _, id_text = raw.decode().partition("|")
        start = datetime.fromisoformat(start_text)
        if start.tzinfo is None or not _UNSIGNED.fullmatch(id_text) or int(id_text) < 1:
            raise ValueError(value)
        return start.astimezone(UTC), int(id_text)
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError):
        raise BadParameter("cursor", value, reason) from None


def _rfc3339(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _event_json(event: AnomalyEvent, now: datetime) -> dict[str, Any]:
    """One event as the API shows it; ``duration_seconds`` runs to ``now`` while it is open."""
    duration = ((event.end_at or now) - event.start_at).total_seconds()
    return {
        "id": event.id,
        "entity_group": event.group_name,
        "entity": entity_display_name(event.entity_labels),
        "labels": event.entity_labels,
        "detector": event.detector,
        "state": "open" if event.end_at is None else "closed",
        "start": _rfc3339(event.start_at),
        "end": _rfc3339(event.end_at),
        "peak_at": _rfc3339(event.peak_at),
        # JSON has no Infinity: a non-finite peak is shown as null
        "peak_score": event.peak_score if math.isfinite(event.peak_score) else None,
        "duration_seconds": max(duration, 0.0),
    }
