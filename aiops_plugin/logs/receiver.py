"""OTLP/HTTP log receiver: ``POST /v1/logs`` on the agent's own HTTP server.

Speaks the OTLP/HTTP protocol as the OpenTelemetry SDKs and the Collector's ``otlphttp`` exporter
send it: binary protobuf or the OTLP JSON mapping, optionally gzip (or deflate) compressed,
decoded with the official ``opentelemetry-proto`` messages. The answer is an
``ExportLogsServiceResponse`` in the request's encoding; records refused one by one (no entity,
empty or oversized body) are reported in ``partial_success`` and counted, not failed as a whole.
A request refused as a whole gets a 4xx/5xx with a ``google.rpc.Status`` body, as the spec asks;
429 and 503 carry ``Retry-After``, which OTLP clients honour when they retry.

Whole-request refusals are decided before any decoding work where possible: the token, the
content type and the declared length are checked before the body is read, the body is read with
a limit, and decompression stops as soon as the limit is passed, so a gzip bomb costs at most
``max_body_bytes`` of memory.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request, Response
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from aiops_plugin.config import LogEntityMapping, LogsConfig
from aiops_plugin.exporter import LOG_REJECTION_REASONS, Exporter
from aiops_plugin.logs.intake import (
    IntakeRecord,
    IntakeRefused,
    LogIntake,
    QueueFull,
    StoreUnavailable,
)
from aiops_plugin.store import Store
from aiops_plugin.store.models import LogRecordRow
from aiops_plugin.windows import entity_key

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
LOGS_PATH = "/v1/logs"
#: Worker threads for /v1/logs, apart from the default pool: requests waiting for a slow store
#: must not starve /metrics and /healthz, which run in the default pool.
LOG_WORKER_THREADS = 32
#: ``severity_text`` column width (``log_records.severity_text``); longer texts are cut.
SEVERITY_TEXT_CHARS = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: zlib window bits: gzip framing, and zlib framing (what OTLP exporters send as "deflate").
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: Compressed bytes fed to zlib at a time (see ``decompress``): a member's end costs at most
#: this much copying, however small the members.
DECOMPRESS_CHUNK = 4096
#: gzip members per body: SDKs and the Collector send one; thousands of empty ones are an attack
#: on the CPU, not logs.
MAX_GZIP_MEMBERS = 1024
#: Log entities of a group when the receiver is not told its ``max_entities`` (the default).
DEFAULT_MAX_LOG_ENTITIES = 1000
_REASON_TEXT = {
    "no_entity": "no entity attribute",
    "label_too_long": "entity label value over logs.intake.max_label_value_chars",
    "too_many_entities": "new entity beyond its group's max_entities",
    "empty_body": "empty body",
    "record_too_large": "body over logs.intake.max_record_bytes",
}


class RequestRefused(Exception):
    """A request refused as a whole: the HTTP status, the counted reason, a message that says
    what failed, and how many rejections to count (records where known, else the request)."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        count: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.count = count
        self.headers = headers or {}


@dataclass
class MappedRecords:
    """The records of one request: those to store, and rejections by reason."""

    accepted: list[IntakeRecord] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """Human-readable ``partial_success.error_message``."""
        total = len(self.accepted) + sum(self.rejected.values())
        parts = ", ".join(
            f"{count} {_REASON_TEXT.get(reason, reason)} ({reason})"
            for reason, count in sorted(self.rejected.items())
        )
        return f"{sum(self.rejected.values())} of {total} log records rejected: {parts}"


class EntityMapper:
    """Finds a record's entity from ``logs.entities``: the first mapping whose attribute is
    present (and not empty) on the resource or on the record, as its ``scope`` says."""

    def __init__(self, mappings: list[LogEntityMapping], max_label_value_chars: int = 256) -> None:
        self.mappings = mappings  # value_format checked by the configuration
        self.max_label_value_chars = max_label_value_chars

    def resource_entities(self, attributes: list[KeyValue]) -> list[tuple[str, str] | str | None]:
        """Per mapping, the entity a resource-scoped mapping finds on this resource (None for
        record-scoped ones or when absent); computed once per resource."""
        values = _attribute_texts(attributes)
        return [
            self._entity(mapping, values.get(mapping.attribute))
            if mapping.scope == "resource"
            else None
            for mapping in self.mappings
        ]

    def entity_of(
        self, resource: list[tuple[str, str] | str | None], record_attributes: list[KeyValue]
    ) -> tuple[str, str] | str | None:
        """``(entity_group, entity_key)`` of a record, None when no mapping applies, or the
        rejection reason of the mapping that applies (``label_too_long``)."""
        record_values: dict[str, str] | None = None
        for mapping, from_resource in zip(self.mappings, resource, strict=True):
            if mapping.scope == "resource":
                if from_resource is not None:
                    return from_resource
                continue
            if record_values is None:
                record_values = _attribute_texts(record_attributes)
            found = self._entity(mapping, record_values.get(mapping.attribute))
            if found is not None:
                return found
        return None

    def _entity(self, mapping: LogEntityMapping, value: str | None) -> tuple[str, str] | str | None:
        if not value:
            return None
        label_value = mapping.value_format.format(value=value)
        if len(label_value) > self.max_label_value_chars:
            return "label_too_long"  # a label value this long is abuse, not a host name
        return mapping.group, entity_key({mapping.label: label_value})


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; safe across request threads."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


class EntityBudget:
    """Log entities per group, bounded like metric entities: a group's first ``max_entities``
    distinct entities (those already in the store count first) are accepted; records of a
    new entity beyond that are rejected and counted (``too_many_entities``), so anyone with
    the intake token cannot create unbounded series. Safe across the request threads."""

    def __init__(self, store: Store, limits: dict[str, int]) -> None:
        self._store = store
        self._limits = limits
        self._known: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def admit(self, group: str, key: str) -> bool:
        with self._lock:
            known = self._known.get(group)
            if known is None:
                known = self._known[group] = self._stored_keys(group)
            if key in known:
                return True
            if len(known) < self._limits.get(group, 0):
                known.add(key)
                return True
            return False

    def _stored_keys(self, group: str) -> set[str]:
        query = (
            select(LogRecordRow.entity_key)
            .where(LogRecordRow.entity_group == group)
            .distinct()
            .limit(self._limits.get(group, 0))
        )
        try:
            with self._store.engine.connect() as connection:
                return set(connection.scalars(query))
        except SQLAlchemyError as exc:
            raise RequestRefused(
                503,
                "store_unavailable",
                f"reading the known log entities failed: {self._store._reason(exc)}",
                headers={"Retry-After": "5"},
            ) from exc


class LogReceiver:
    """Decodes, maps and hands one request's records to the intake; counts every refusal."""

    def __init__(
        self,
        intake: LogIntake,
        config: LogsConfig,
        exporter: Exporter,
        max_entities: dict[str, int] | None = None,
    ) -> None:
        self.intake = intake
        self.config = config.intake
        self.mapper = EntityMapper(config.entities, config.intake.max_label_value_chars)
        rate = self.config.max_requests_per_second
        self.rate_limit = TokenBucket(rate, burst=max(1.0, rate)) if rate > 0 else None
        self.budget = EntityBudget(
            intake.store,
            max_entities
            if max_entities is not None
            else {mapping.group: DEFAULT_MAX_LOG_ENTITIES for mapping in config.entities},
        )
        self.exporter = exporter
        self.limiter: anyio.CapacityLimiter | None = None  # made in the event loop, on first use
        for reason in LOG_REJECTION_REASONS:
            exporter.logs_rejected.labels(reason=reason)

    def check_rate(self) -> None:
        """429 with Retry-After beyond ``logs.intake.max_requests_per_second``."""
        wait = self.rate_limit.take() if self.rate_limit is not None else 0.0
        if wait > 0:
            raise RequestRefused(
                429,
                "rate_limited",
                f"over logs.intake.max_requests_per_second={self.config.max_requests_per_second:g}",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def check_token(self, authorization: str | None) -> None:
        """401 unless the bearer token matches ``logs.intake.token`` (constant-time)."""
        expected = self.config.token
        if expected is None:
            return
        scheme, _, provided = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            provided.strip().encode(), expected.encode()
        ):
            raise RequestRefused(
                401,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer <logs.intake.token>)",
                headers={"WWW-Authenticate": 'Bearer realm="aiops-plugin"'},
            )

    def export(self, body: bytes, media_type: str, content_encoding: str | None) -> Message:
        """The whole request, blocking until its records are committed: decode, map, store."""
        received_at = datetime.now(UTC)
        payload = decompress(body, content_encoding, self.config.max_body_bytes)
        request = parse_request(payload, media_type)
        mapped = map_records(
            request, self.mapper, self.budget, self.config.max_record_bytes, received_at
        )
        try:
            self.intake.submit(mapped.accepted)
        except QueueFull as exc:
            raise _retry_later(429, "queue_full", exc, len(mapped.accepted)) from exc
        except StoreUnavailable as exc:
            raise _retry_later(503, "store_unavailable", exc, len(mapped.accepted)) from exc
        response = ExportLogsServiceResponse()
        for reason, count in mapped.rejected.items():
            self.exporter.logs_rejected.labels(reason=reason).inc(count)
        if mapped.rejected:
            response.partial_success.rejected_log_records = sum(mapped.rejected.values())
            response.partial_success.error_message = mapped.summary()
        return response

    def count(self, refused: RequestRefused) -> None:
        self.exporter.logs_rejected.labels(reason=refused.reason).inc(refused.count)


def _retry_later(status: int, reason: str, exc: IntakeRefused, records: int) -> RequestRefused:
    return RequestRefused(
        status, reason, str(exc), count=records, headers={"Retry-After": str(exc.retry_after)}
    )


def decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body without its ``Content-Encoding``, never more than ``limit`` bytes of it.

    Raises ``RequestRefused``: 413 past the limit, 400 for a corrupt or truncated stream, 415 for
    an encoding other than gzip, deflate or identity.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise RequestRefused(
            415,
            "unsupported_media_type",
            f"Content-Encoding {content_encoding!r} is not supported (gzip, deflate, identity)",
        )
    output = bytearray()
    view = memoryview(body)
    position, members = 0, 0
    try:
        while True:  # a gzip body may hold several members, one after the other
            members += 1
            if members > MAX_GZIP_MEMBERS:
                raise RequestRefused(
                    400, "malformed", f"{encoding} body has over {MAX_GZIP_MEMBERS} members"
                )
            decompressor = zlib.decompressobj(_WBITS[encoding])
            # input in bounded chunks: what is left after a member's end (``unused_data``, a
            # copy) is then at most one chunk, so many small members cost linear time
            while not decompressor.eof and position < len(view):
                chunk = view[position : position + DECOMPRESS_CHUNK]
                position += len(chunk)
                output += decompressor.decompress(chunk, limit + 1 - len(output))
                if len(output) > limit:
                    raise _too_large(f"decompressed body is over {limit} bytes")
            if not decompressor.eof:
                raise RequestRefused(400, "malformed", f"truncated {encoding} body")
            position -= len(decompressor.unused_data)
            if encoding != "gzip" or position >= len(view):
                return bytes(output)
    except zlib.error as exc:
        raise RequestRefused(400, "malformed", f"corrupt {encoding} body: {exc}") from exc


def parse_request(payload: bytes, media_type: str) -> ExportLogsServiceRequest:
    """Decode an ``ExportLogsServiceRequest`` from binary protobuf or OTLP JSON; 400 if not one.

    OTLP JSON differs from protobuf's canonical JSON in one way that matters here: trace and
    span ids are hex, not base64. Invalid UTF-8 in a protobuf string field fails the parse (the
    protobuf runtime refuses it), so such a request is a 400; a ``bytes_value`` body is fine.
    """
    request = ExportLogsServiceRequest()
    if media_type == PROTOBUF:
        try:
            request.ParseFromString(payload)
        except DecodeError as exc:
            raise RequestRefused(
                400, "malformed", f"body is not an OTLP ExportLogsServiceRequest protobuf: {exc}"
            ) from exc
        return request
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise RequestRefused(400, "malformed", f"body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise RequestRefused(400, "malformed", "body is not a JSON object")
    _hex_ids_to_base64(document)
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError) as exc:
        raise RequestRefused(
            400, "malformed", f"body is not an OTLP ExportLogsServiceRequest: {exc}"
        ) from exc
    return request


def map_records(
    request: ExportLogsServiceRequest,
    mapper: EntityMapper,
    budget: EntityBudget | None,
    max_record_bytes: int,
    received_at: datetime,
) -> MappedRecords:
    """Each record to its entity and stored form, or to a rejection reason (``budget``: the
    bound on entities per group, checked last so a refused record takes no place in it)."""
    mapped = MappedRecords()
    for resource_logs in request.resource_logs:
        resource = mapper.resource_entities(list(resource_logs.resource.attributes))
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                entity = mapper.entity_of(resource, list(record.attributes))
                if entity is None:
                    mapped.rejected["no_entity"] += 1
                    continue
                if isinstance(entity, str):
                    mapped.rejected[entity] += 1
                    continue
                body = render_any_value(record.body)
                if not body.strip():
                    mapped.rejected["empty_body"] += 1
                    continue
                if len(body) > max_record_bytes or len(body.encode()) > max_record_bytes:
                    mapped.rejected["record_too_large"] += 1
                    continue
                if budget is not None and not budget.admit(*entity):
                    mapped.rejected["too_many_entities"] += 1
                    continue
                nanos = record.time_unix_nano or record.observed_time_unix_nano
                mapped.accepted.append(
                    IntakeRecord(
                        received_at=received_at,
                        observed_at=_EPOCH + timedelta(microseconds=nanos // 1000)
                        if nanos
                        else received_at,
                        entity_group=entity[0],
                        entity_key=entity[1],
                        severity_number=int(record.severity_number),
                        severity_text=_storable(record.severity_text)[:SEVERITY_TEXT_CHARS],
                        body=_storable(body),
                    )
                )
    return mapped


def render_any_value(value: AnyValue) -> str:
    """A string body as is; bytes decoded as UTF-8 with replacement characters; any other kind
    (number, bool, kvlist, array) as compact JSON, so structured logs stay readable."""
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    if kind == "string_value":
        return value.string_value
    if kind == "bytes_value":
        return value.bytes_value.decode("utf-8", errors="replace")
    return json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"))


def _plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "bytes_value":
        return value.bytes_value.decode("utf-8", errors="replace")
    if kind == "array_value":
        return [_plain(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _plain(item.value) for item in value.kvlist_value.values}
    return None if kind is None else getattr(value, kind)


def _attribute_texts(attributes: list[KeyValue]) -> dict[str, str]:
    return {item.key: _storable(render_any_value(item.value)) for item in attributes}


def _storable(text: str) -> str:
    """NUL is valid UTF-8 but PostgreSQL text cannot hold it: replace it rather than let one
    record fail a whole batch (and every retry of it)."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _hex_ids_to_base64(document: dict) -> None:
    """OTLP JSON carries ``traceId`` / ``spanId`` as hex; protobuf's JSON parser expects base64."""
    for resource_logs in _dicts(document, "resourceLogs", "resource_logs"):
        for scope_logs in _dicts(resource_logs, "scopeLogs", "scope_logs"):
            for record in _dicts(scope_logs, "logRecords", "log_records"):
                for key in ("traceId", "trace_id", "spanId", "span_id"):
                    value = record.get(key)
                    if not isinstance(value, str):
                        continue
                    try:
                        record[key] = base64.b64encode(bytes.fromhex(value)).decode()
                    except ValueError as exc:
                        raise RequestRefused(
                            400, "malformed", f"log record {key} {value!r} is not hex"
                        ) from exc


def _dicts(parent: dict, *keys: str) -> list[dict]:
    """Dict items of the first list found under ``keys`` (anything else is left to the parser)."""
    for key in keys:
        items = parent.get(key)
        if isinstance(items, list):
            return [item for item in items if isinstance(item, dict)]
    return []


def _too_large(message: str) -> RequestRefused:
    return RequestRefused(413, "too_large", f"{message} (logs.intake.max_body_bytes)")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _encode(message: Message, media_type: str) -> bytes:
    if media_type == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


_GRPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    413: code_pb2.INVALID_ARGUMENT,
    415: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def _refusal_response(refused: RequestRefused, media_type: str) -> Response:
    """A ``google.rpc.Status`` in the request's encoding (protobuf when that is unknown)."""
    answer_type = JSON if media_type == JSON else PROTOBUF
    status = status_pb2.Status(
        code=_GRPC_CODES.get(refused.status, code_pb2.UNKNOWN), message=str(refused)
    )
    return Response(
        _encode(status, answer_type),
        status_code=refused.status,
        media_type=answer_type,
        headers=refused.headers,
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The (still compressed) body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"body of {declared} bytes is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(f"body is over {limit} bytes")
    return bytes(body)


def register_log_receiver(
    app: FastAPI,
    intake: LogIntake,
    config: LogsConfig,
    exporter: Exporter,
    max_entities: dict[str, int] | None = None,
) -> LogReceiver:
    """Add ``POST /v1/logs`` to ``app``; decoding and the wait for the commit run in worker
    threads of their own (``LOG_WORKER_THREADS``), never on the event loop. ``max_entities``:
    per entity group, the bound on its log entities (its ``max_entities``)."""
    receiver = LogReceiver(intake, config, exporter, max_entities)

    @app.post(LOGS_PATH, include_in_schema=False)
    async def receive_logs(request: Request) -> Response:
        media_type = _media_type(request.headers.get("content-type"))
        try:
            receiver.check_token(request.headers.get("authorization"))
            receiver.check_rate()
            if media_type not in (PROTOBUF, JSON):
                raise RequestRefused(
                    415,
                    "unsupported_media_type",
                    f"Content-Type {request.headers.get('content-type')!r} is not supported: "
                    f"send {PROTOBUF} or {JSON}",
                )
            body = await _read_body(request, receiver.config.max_body_bytes)
            if receiver.limiter is None:
                receiver.limiter = anyio.CapacityLimiter(LOG_WORKER_THREADS)
            response = await anyio.to_thread.run_sync(
                receiver.export,
                body,
                media_type,
                request.headers.get("content-encoding"),
                limiter=receiver.limiter,
            )
        except RequestRefused as refused:
            receiver.count(refused)
            return _refusal_response(refused, media_type)
        return Response(_encode(response, media_type), status_code=200, media_type=media_type)

    return receiver
