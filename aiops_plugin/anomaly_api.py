"""The anomaly events API: ``GET /api/v1/anomalies`` (filtered, paginated, newest first) and
``GET /api/v1/anomalies/{id}``, the events the agent records in the store, as JSON; and
``POST /api/v1/anomalies/{id}/feedback``, an engineer's label on an event (bearer token), which
the next fit learns from.

Registered on the agent's HTTP app by :func:`aiops_plugin.api.create_app`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from aiops_plugin.config import ENV_FEEDBACK_TOKEN
from aiops_plugin.store.repo import (
    EVENT_STATES,
    AnomalyEvent,
    EventNotFound,
    FeedbackLabel,
    InvalidFeedback,
    Store,
    StoreError,
)
from aiops_plugin.windows import entity_display_name

ANOMALIES_PATH = "/api/v1/anomalies"
ANOMALIES_DEFAULT_LIMIT = 100
ANOMALIES_MAX_LIMIT = 1000
ANOMALIES_PARAMETERS = ("entity", "group", "since", "until", "state", "limit", "cursor")
FEEDBACK_FIELDS = ("label", "comment", "user")
FEEDBACK_REQUIRED = ("label", "user")
_UNSIGNED = re.compile(r"[0-9]+")
_UNIX_SECONDS = re.compile(r"-?[0-9]+(\.[0-9]*)?")
_MAX_ECHO = 100  # characters of a refused value quoted back in an error


class BadParameter(Exception):
    """A request parameter or body field the anomaly API refuses: answered 400 naming it and
    its value (None when it is missing)."""

    def __init__(self, parameter: str, value: str | None, reason: str) -> None:
        if value is None:
            shown = None
            super().__init__(f"{parameter}: {reason}")
        else:
            shown = value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "..."
            super().__init__(f"{parameter}: {reason}, got {shown!r}")
        self.parameter = parameter
        self.value = shown


def register_anomaly_api(
    app: FastAPI,
    store: Store,
    feedback_token: str | None = None,
    on_feedback: Callable[[str], None] | None = None,
) -> None:
    """``GET /api/v1/anomalies`` (filtered, paginated, newest first),
    ``GET /api/v1/anomalies/{id}`` and ``POST /api/v1/anomalies/{id}/feedback``.

    Parameters are validated here rather than by FastAPI, so that a refusal is a 400 naming the
    parameter and the value, without changing the 422 of the other endpoints. A store that
    fails answers 503; the next request tries it again.

    Feedback needs ``Authorization: Bearer <feedback_token>``; without a token configured it
    answers 503 rather than accept labels from anyone. ``on_feedback(label)`` is called after
    each write that created a label or changed one (``aiops_feedback_total{label}``), not for
    the same label posted again.
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
            return _not_found(int(event_id))
        return JSONResponse(
            {
                **_event_json(event, datetime.now(UTC)),
                "feedback": [
                    {
                        **item,
                        "created_at": _rfc3339(item["created_at"]),
                        "updated_at": _rfc3339(item["updated_at"]),
                    }
                    for item in event.feedback
                ],
            }
        )

    @app.post(ANOMALIES_PATH + "/{event_id}/feedback")
    async def post_feedback(event_id: str, request: Request) -> JSONResponse:
        if not feedback_token:
            return JSONResponse(
                {
                    "error": "feedback is disabled: set feedback.token in the configuration "
                    f"(or {ENV_FEEDBACK_TOKEN}) and post with Authorization: Bearer <token>"
                },
                status_code=503,
            )
        if not bearer_token_matches(request.headers.get("authorization"), feedback_token):
            return JSONResponse(
                {"error": "missing or wrong bearer token (Authorization: Bearer <feedback.token>)"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="aiops-plugin"'},
            )
        try:
            if not _UNSIGNED.fullmatch(event_id):
                raise BadParameter("id", event_id, "must be a positive integer")
            fields = _feedback_fields(await request.body())
        except BadParameter as exc:
            return _bad_request(exc)
        try:
            stored, created = await run_in_threadpool(
                store.save_feedback,
                int(event_id),
                fields["user"],
                fields["label"],
                fields.get("comment"),
            )
        except InvalidFeedback as exc:
            return _bad_request(BadParameter(exc.field, _as_text(exc.value), exc.reason))
        except EventNotFound:
            return _not_found(int(event_id))
        except StoreError as exc:
            return _unavailable(exc)
        if on_feedback is not None and (created or stored.replaced_label is not None):
            on_feedback(stored.label)
        return JSONResponse(_feedback_label_json(stored), status_code=201 if created else 200)


def bearer_token_matches(authorization: str | None, expected: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <expected>``, compared in constant
    time so that the answer's timing does not leak the token."""
    scheme, _, provided = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        provided.strip().encode(), expected.encode()
    )


def _feedback_fields(body: bytes) -> dict[str, Any]:
    """The JSON object of a feedback post, its field names checked (their values are checked
    by the store)."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        fields = None
    if not isinstance(fields, dict):
        raise BadParameter(
            "body",
            body.decode(errors="replace"),
            'must be a JSON object such as {"label": "true_positive", "user": "alice"}',
        )
    unknown = sorted(set(fields) - set(FEEDBACK_FIELDS))
    if unknown:
        raise BadParameter(
            unknown[0],
            _as_text(fields[unknown[0]]),
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(known: {', '.join(FEEDBACK_FIELDS)})",
        )
    for name in FEEDBACK_REQUIRED:
        if name not in fields:
            raise BadParameter(name, None, "is required")
    return fields


def _as_text(value: object) -> str:
    """A refused body value as it is echoed back: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _feedback_label_json(label: FeedbackLabel) -> dict[str, Any]:
    return {
        "id": label.id,
        "event_id": label.event_id,
        "user": label.user,
        "label": label.label,
        "comment": label.comment,
        "created_at": _rfc3339(label.created_at),
        "updated_at": _rfc3339(label.updated_at),
    }


def _not_found(event_id: int) -> JSONResponse:
    return JSONResponse({"error": f"no anomaly event {event_id}"}, status_code=404)


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


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no Infinity or NaN: such a value is shown as null."""
    return value if value is not None and math.isfinite(value) else None


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
        "peak_score": _finite_or_none(event.peak_score),
        "peak_probability": _finite_or_none(event.peak_probability),
        "duration_seconds": max(duration, 0.0),
        "n_steps": event.n_steps,
        "top_metrics": event.top_metrics,
        "detector_scores": event.detector_scores,
        "log_templates": event.log_templates,
        "root_cause": event.root_cause,
        "warning_scores": event.warning_scores,
    }
