"""The OTLP/HTTP log receiver and its durable intake, against the running agent HTTP server.

Logs are sent by the real OpenTelemetry SDK (``OTLPLogExporter``, gzip) and as hand-built OTLP
protobuf / JSON requests; every check reads the store's ``log_records`` table or ``/metrics``.
The log lines are synthetic. A "slow store" is a real SQLite write lock held by the test.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import requests
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from aiops_plugin.agent import Agent
from aiops_plugin.api import HttpServer
from aiops_plugin.config import Config
from aiops_plugin.demo import free_port, poll_until
from aiops_plugin.logs.intake import IntakeRecord
from aiops_plugin.logs.receiver import DECOMPRESS_CHUNK, MAX_GZIP_MEMBERS, decompress
from aiops_plugin.store import Store
from aiops_plugin.store.models import LogRecordRow
from aiops_plugin.windows import entity_key
from tests.postgres_fixture import PostgresServer, start_server, stop_server

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
TOKEN = "s3cret-t0ken"
MAX_BODY = 256 * 1024
MAX_RECORD = 1024
WEB_1 = entity_key({"instance": "web-1:9100"})


def make_config(tmp_path: Path, **intake: Any) -> Config:
    return Config.model_validate(
        {
            "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
            "store": {"data_dir": str(tmp_path / "data")},
            "server": {"host": "127.0.0.1", "port": free_port()},
            "logs": {
                "enabled": True,
                "entities": [
                    {
                        "group": "hosts",
                        "label": "instance",
                        "attribute": "host.name",
                        "value_format": "{value}:9100",
                    },
                    {
                        "group": "hosts",
                        "label": "instance",
                        "attribute": "aiops.instance",
                        "scope": "record",
                    },
                ],
                "intake": {"max_body_bytes": MAX_BODY, "max_record_bytes": MAX_RECORD, **intake},
            },
        }
    )


@dataclass
class Receiver:
    agent: Agent
    url: str
    token: str | None

    @property
    def store(self) -> Store:
        return self.agent.store

    def post(
        self,
        body: bytes | Iterator[bytes],
        content_type: str = PROTOBUF,
        encoding: str | None = None,
        token: str | None = "default",
    ) -> requests.Response:
        headers = {"Content-Type": content_type}
        if encoding:
            headers["Content-Encoding"] = encoding
        token = self.token if token == "default" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(f"{self.url}/v1/logs", data=body, headers=headers, timeout=30)

    def rows(self) -> list[LogRecordRow]:
        with self.store.engine.connect() as connection:
            return list(connection.execute(select(LogRecordRow).order_by(LogRecordRow.id)))

    def bodies(self) -> list[str]:
        return [row.body for row in self.rows()]

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        raise AssertionError(f"no sample {name}{labels} on /metrics")


@contextmanager
def running_receiver(config: Config, store: Store | None = None) -> Iterator[Receiver]:
    """The real agent's HTTP server with its log intake, stopped as ``Agent.run`` stops it."""
    agent = Agent(config, store=store)
    agent.open_log_intake()
    server = HttpServer(agent, config.server.host, config.server.port)
    server.start()
    try:
        yield Receiver(agent, f"http://127.0.0.1:{config.server.port}", config.logs.intake.token)
    finally:
        server.stop()
        assert agent.log_intake is not None
        agent.log_intake.close()
        agent.store.close()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """One server with a token, shared by the tests that only add rows and compare counts."""
    config = make_config(tmp_path_factory.mktemp("receiver"), token=TOKEN)
    with running_receiver(config) as running:
        yield running


def record(
    body: str | bytes | dict | None,
    severity: int = 9,
    attributes: dict[str, str] | None = None,
    time_ns: int = 0,
) -> LogRecord:
    result = LogRecord(severity_number=severity, severity_text="INFO", time_unix_nano=time_ns)
    if isinstance(body, str):
        result.body.string_value = body
    elif isinstance(body, bytes):
        result.body.bytes_value = body
    elif isinstance(body, dict):
        result.body.kvlist_value.values.extend(
            KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in body.items()
        )
    for key, value in (attributes or {}).items():
        result.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    return result


def otlp_request(*resources: tuple[dict[str, str], list[LogRecord]]) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    for attributes, records in resources:
        resource_logs = request.resource_logs.add()
        for key, value in attributes.items():
            resource_logs.resource.attributes.append(
                KeyValue(key=key, value=AnyValue(string_value=value))
            )
        resource_logs.scope_logs.add().log_records.extend(records)
    return request


def lines(marker: str, n: int) -> list[LogRecord]:
    return [record(f"{marker} request {i} served in {i * 3} ms") for i in range(n)]


def web_request(marker: str, n: int) -> bytes:
    return otlp_request(({"host.name": "web-1"}, lines(marker, n))).SerializeToString()


def send_with_sdk(url: str, bodies: list[tuple[Any, SeverityNumber]], token: str | None) -> None:
    """The real SDK path: LoggerProvider -> BatchLogRecordProcessor -> OTLPLogExporter (gzip)."""
    resource = Resource.create({"service.name": "checkout", "host.name": "web-1"})
    provider = LoggerProvider(resource=resource)
    exporter = OTLPLogExporter(
        endpoint=f"{url}/v1/logs",
        headers={"Authorization": f"Bearer {token}"} if token else None,
        compression=Compression.Gzip,
        timeout=10,
    )
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    logger = provider.get_logger("checkout.http")
    for body, severity in bodies:
        logger.emit(body=body, severity_number=severity, severity_text=severity.name)
    assert provider.force_flush(10_000)
    provider.shutdown()


def status_message(response: requests.Response) -> str:
    """The ``google.rpc.Status`` message of an error answer, in either encoding."""
    if response.headers["content-type"].startswith(JSON):
        return response.json()["message"]
    return status_pb2.Status.FromString(response.content).message


# ------------------------------------------------------------------------------- accepted logs


def test_sdk_logs_arrive_in_the_store_with_entity_severity_and_body(receiver: Receiver) -> None:
    marker = uuid.uuid4().hex
    before = receiver.metric("aiops_logs_received_total")
    sent_at = datetime.now(UTC)
    send_with_sdk(
        receiver.url,
        [
            (f"{marker} GET /cart 200 in 12 ms", SeverityNumber.INFO),
            (f"{marker} payment gateway slow: 2300 ms", SeverityNumber.WARN),
            ({"event": f"{marker} order failed", "code": 502}, SeverityNumber.ERROR),
        ],
        TOKEN,
    )
    rows = [row for row in receiver.rows() if marker in row.body]
    assert [(row.severity_number, row.severity_text) for row in rows] == [
        (9, "INFO"),
        (13, "WARN"),
        (17, "ERROR"),
    ]
    assert rows[0].body == f"{marker} GET /cart 200 in 12 ms"
    assert json.loads(rows[2].body) == {"event": f"{marker} order failed", "code": 502}
    assert {(row.entity_group, row.entity_key) for row in rows} == {("hosts", WEB_1)}
    for row in rows:
        assert sent_at - timedelta(seconds=5) < row.observed_at <= row.received_at
    assert receiver.metric("aiops_logs_received_total") == before + 3
    assert receiver.metric("aiops_source_up", source="logs") == 1


def test_json_requests_follow_the_otlp_json_mapping(receiver: Receiver) -> None:
    marker = uuid.uuid4().hex
    built = json.loads(
        json_format.MessageToJson(otlp_request(({"host.name": "web-1"}, lines(marker, 2))))
    )
    # OTLP JSON: hex trace ids, integer enums, timeUnixNano as a string or a number.
    records = built["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
    records[0].update(
        traceId="5b8efff798038103d269b633813fc60c", spanId="eee19b7ec3c1b174", severityNumber=17
    )
    records[0]["timeUnixNano"] = "1700000000123456789"
    records[1]["timeUnixNano"] = 1700000001000000000
    records[1]["someFutureField"] = {"ignored": True}
    response = receiver.post(json.dumps(built).encode(), JSON)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(JSON)
    assert response.json() == {}
    rows = [row for row in receiver.rows() if marker in row.body]
    assert [row.severity_number for row in rows] == [17, 9]
    assert rows[0].observed_at == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert rows[1].observed_at == datetime(2023, 11, 14, 22, 13, 21, tzinfo=UTC)


def test_partial_success_names_and_counts_rejected_records(receiver: Receiver) -> None:
    marker = uuid.uuid4().hex
    reasons = ("no_entity", "empty_body", "record_too_large")
    before = {
        reason: receiver.metric("aiops_logs_rejected_total", reason=reason) for reason in reasons
    }
    request = otlp_request(
        ({"host.name": "web-1"}, [record(f"{marker} ok 1"), record("   "), record(None)]),
        (
            {"service.name": "batch-job"},  # no host.name: only record attributes can map it
            [
                record(f"{marker} ok 2", attributes={"aiops.instance": "db-1:9100"}),
                record(f"{marker} orphan 1"),
                record(f"{marker} orphan 2", attributes={"aiops.instance": ""}),
            ],
        ),
        ({"host.name": "web-2"}, [record(f"{marker} " + "x" * MAX_RECORD)]),
    )
    count = len(receiver.rows())
    response = receiver.post(request.SerializeToString())
    assert response.status_code == 200
    answer = ExportLogsServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_log_records == 5
    message = answer.partial_success.error_message
    assert "5 of 7" in message
    assert "2 empty body" in message and "2 no entity attribute" in message
    assert "record_too_large" in message
    rows = receiver.rows()[count:]
    assert [(row.body, row.entity_key) for row in rows] == [
        (f"{marker} ok 1", WEB_1),
        (f"{marker} ok 2", entity_key({"instance": "db-1:9100"})),
    ]
    after = {
        reason: receiver.metric("aiops_logs_rejected_total", reason=reason) for reason in reasons
    }
    assert {reason: after[reason] - before[reason] for reason in reasons} == {
        "no_entity": 2,
        "empty_body": 2,
        "record_too_large": 1,
    }


def test_non_utf8_bytes_body_is_stored_with_replacement_characters(receiver: Receiver) -> None:
    marker = uuid.uuid4().hex.encode()
    request = otlp_request(({"host.name": "web-1"}, [record(marker + b" caf\xe9 \xff\x00 latte")]))
    response = receiver.post(request.SerializeToString())
    assert response.status_code == 200
    assert not ExportLogsServiceResponse.FromString(response.content).HasField("partial_success")
    assert receiver.bodies()[-1] == f"{marker.decode()} caf\ufffd \ufffd\ufffd latte"


# ------------------------------------------------------------------------------- bad requests


def _invalid_utf8_string_body() -> bytes:
    encoded = otlp_request(({"host.name": "web-1"}, [record("PLACEHOLDER")])).SerializeToString()
    return encoded.replace(b"PLACEHOLDER", b"bad \xff\xfe utf8")  # same length


def _chunked(total: int) -> Iterator[bytes]:
    for _ in range(total // 4096):
        yield b"\x00" * 4096


@dataclass(frozen=True)
class BadCase:
    body: Callable[[], bytes | Iterator[bytes]]
    status: int
    reason: str
    message: str
    content_type: str = PROTOBUF
    encoding: str | None = None
    token: str | None = "default"


BAD_CASES = {
    "malformed_protobuf": BadCase(lambda: b"\x0a\xff\xff\xff\x0f", 400, "malformed", "protobuf"),
    "malformed_json": BadCase(
        lambda: b'{"resourceLogs": [', 400, "malformed", "not valid JSON", JSON
    ),
    "json_of_the_wrong_shape": BadCase(
        lambda: b'{"resourceLogs": 5}', 400, "malformed", "resourceLogs", JSON
    ),
    "json_trace_id_not_hex": BadCase(
        lambda: b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"traceId":"zz"}]}]}]}',
        400,
        "malformed",
        "traceId 'zz' is not hex",
        JSON,
    ),
    "invalid_utf8_in_a_string_body": BadCase(_invalid_utf8_string_body, 400, "malformed", "UTF-8"),
    "wrong_content_type": BadCase(
        lambda: b"GET /cart 200", 415, "unsupported_media_type", "text/plain", "text/plain"
    ),
    "unsupported_content_encoding": BadCase(
        lambda: web_request("br", 1), 415, "unsupported_media_type", "'br'", encoding="br"
    ),
    "corrupt_gzip": BadCase(
        lambda: b"this is not gzip at all", 400, "malformed", "corrupt gzip", encoding="gzip"
    ),
    "truncated_gzip": BadCase(
        lambda: gzip.compress(web_request("cut", 50))[:-30],
        400,
        "malformed",
        "truncated gzip",
        encoding="gzip",
    ),
    "body_over_the_limit": BadCase(
        lambda: web_request("big", 20) + b"\x00" * MAX_BODY, 413, "too_large", "over 262144"
    ),
    "chunked_body_over_the_limit": BadCase(
        lambda: _chunked(2 * MAX_BODY), 413, "too_large", "body is over 262144"
    ),
    "gzip_bomb": BadCase(
        lambda: gzip.compress(b"\x00" * (64 * 1024 * 1024), compresslevel=9),
        413,
        "too_large",
        "decompressed body is over",
        encoding="gzip",
    ),
    "too_many_gzip_members": BadCase(
        lambda: gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1),
        400,
        "malformed",
        f"over {MAX_GZIP_MEMBERS} members",
        encoding="gzip",
    ),
    "missing_token": BadCase(
        lambda: web_request("anon", 1), 401, "unauthorized", "bearer", token=None
    ),
    "wrong_token": BadCase(
        lambda: web_request("guess", 1), 401, "unauthorized", "bearer", token="s3cret-t0kem"
    ),
}


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_request_gets_a_clear_4xx_and_the_receiver_keeps_serving(
    receiver: Receiver, case: BadCase
) -> None:
    accepted = receiver.bodies()
    counted = receiver.metric("aiops_logs_rejected_total", reason=case.reason)
    response = receiver.post(case.body(), case.content_type, case.encoding, case.token)
    assert response.status_code == case.status, response.content
    assert case.message in status_message(response)
    if case.status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert receiver.metric("aiops_logs_rejected_total", reason=case.reason) == counted + 1
    assert receiver.bodies() == accepted

    marker = uuid.uuid4().hex
    good = receiver.post(web_request(marker, 3))
    assert good.status_code == 200
    assert receiver.bodies() == accepted + [line.body.string_value for line in lines(marker, 3)]


def test_a_multi_member_gzip_body_is_the_concatenation_of_its_members(receiver: Receiver) -> None:
    """RFC 1952 allows several members; a request cut into three compressed parts (each larger
    than the decoder's input chunk, so members end mid-chunk) arrives whole."""
    marker = uuid.uuid4().hex
    payload = web_request(marker, 2000)
    cuts = [0, len(payload) // 3, 2 * len(payload) // 3, len(payload)]
    body = b"".join(gzip.compress(payload[a:b], compresslevel=0) for a, b in pairwise(cuts))
    assert len(body) > 3 * DECOMPRESS_CHUNK
    response = receiver.post(body, encoding="gzip")
    assert response.status_code == 200, response.content
    assert [b for b in receiver.bodies() if b.startswith(marker)] == [
        line.body.string_value for line in lines(marker, 2000)
    ]


def test_decompressing_many_small_members_reads_each_input_byte_once() -> None:
    """The work is linear in the body: zlib is fed bounded chunks, so the bytes after a member's
    end (which zlib copies out) are at most one chunk, however many members follow."""
    members = [gzip.compress(f"member {i};".encode()) for i in range(MAX_GZIP_MEMBERS)]
    fed: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, wbits: int) -> None:
            self._inner = real(wbits)

        def decompress(self, data: memoryview, max_length: int = 0) -> bytes:
            fed.append(len(data))
            return self._inner.decompress(data, max_length)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    with mock.patch("aiops_plugin.logs.receiver.zlib.decompressobj", Counting):
        out = decompress(b"".join(members), "gzip", 1 << 20)
    assert out == b"".join(f"member {i};".encode() for i in range(MAX_GZIP_MEMBERS))
    assert max(fed) <= DECOMPRESS_CHUNK
    # each byte is fed once, plus at most the chunk each member's end hands back (fed again
    # from a slice of the body as the next member's start): quadratic would be ~len^2 / 2
    body = b"".join(members)
    assert sum(fed) <= len(body) + len(members) * DECOMPRESS_CHUNK < len(body) ** 2 / 20


# ------------------------------------------------------------------ durability and backpressure


@contextmanager
def sqlite_write_lock(store: Store) -> Iterator[sqlite3.Connection]:
    """Another process-like writer holding SQLite's write lock: the store becomes slow."""
    connection = sqlite3.connect(store.url.database, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def test_backpressure_answers_429_and_503_and_stores_nothing_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, queue_records=100, commit_timeout="1s")
    with running_receiver(config) as receiver:
        assert receiver.post(web_request("before", 10)).status_code == 200
        with sqlite_write_lock(receiver.store):
            held = receiver.post(web_request("held", 80))  # taken by the writer, then stuck
            assert held.status_code == 503
            assert "did not commit within" in status_message(held)
            assert held.headers["retry-after"] == "1"
            full = receiver.post(web_request("full", 80))
            assert full.status_code == 429
            assert "queue" in status_message(full)
            assert int(full.headers["retry-after"]) >= 1
            queued = receiver.post(web_request("queued", 10))  # fits, waits, gives up
            assert queued.status_code == 503
        assert receiver.post(web_request("after", 10)).status_code == 200
        bodies = receiver.bodies()
        assert [body.split()[0] for body in bodies] == ["before"] * 10 + ["after"] * 10
        assert receiver.metric("aiops_logs_rejected_total", reason="queue_full") == 80
        assert receiver.metric("aiops_logs_rejected_total", reason="store_unavailable") == 90
        assert receiver.metric("aiops_logs_received_total") == 20
        assert receiver.agent.log_intake is not None
        assert receiver.agent.log_intake.pending_records == 0


def test_failing_store_answers_503_then_recovers(tmp_path: Path) -> None:
    with running_receiver(make_config(tmp_path)) as receiver:
        assert receiver.post(web_request("before", 5)).status_code == 200
        path = receiver.store.url.database
        with sqlite3.connect(path, isolation_level=None) as connection:
            connection.execute("ALTER TABLE log_records RENAME TO log_records_parked")
        failed = receiver.post(web_request("lost", 5))
        assert failed.status_code == 503
        assert "no such table: log_records" in status_message(failed)
        assert "retry-after" in failed.headers
        with sqlite3.connect(path, isolation_level=None) as connection:
            connection.execute("ALTER TABLE log_records_parked RENAME TO log_records")

        def accepted() -> bool | None:
            return receiver.post(web_request("after", 5)).status_code == 200 or None

        poll_until(accepted, timeout=15, what="the receiver to accept logs again")
        assert receiver.metric("aiops_source_up", source="logs") == 1
        assert {body.split()[0] for body in receiver.bodies()} == {"before", "after"}
        assert receiver.metric("aiops_logs_rejected_total", reason="store_unavailable") >= 5


def test_records_accepted_before_close_are_in_the_store_after_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    acknowledged: list[str] = []
    with running_receiver(config) as receiver:
        markers = [f"m{i}" for i in range(24)]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda m: receiver.post(web_request(m, 25)).status_code, markers))
        acknowledged += [m for m, code in zip(markers, codes, strict=True) if code == 200]
        assert len(acknowledged) == 24

        # Requests still queued when the intake closes are written, then the writer stops.
        intake = receiver.agent.log_intake
        assert intake is not None
        with ThreadPoolExecutor(4) as pool:
            with sqlite_write_lock(receiver.store):
                late = [pool.submit(receiver.post, web_request(f"late{i}", 25)) for i in range(4)]
                poll_until(
                    lambda: intake.pending_records == 100 or None, timeout=10, what="4 requests"
                )
                closing = threading.Thread(target=intake.close)
                closing.start()
                refused = receiver.post(web_request("after-close", 1))
            closing.join(timeout=30)
            assert [future.result().status_code for future in late] == [200] * 4
        assert refused.status_code == 503 and "shutting down" in status_message(refused)
        acknowledged += [f"late{i}" for i in range(4)]

    with Store.open(config.store.resolved_url()) as reopened, reopened.engine.connect() as db:
        stored = db.execute(select(LogRecordRow.body)).scalars().all()
    assert sorted({body.split()[0] for body in stored}) == sorted(acknowledged)
    assert len(stored) == 25 * len(acknowledged)


def test_retention_deletes_by_age_then_by_row_count(tmp_path: Path) -> None:
    with running_receiver(make_config(tmp_path, retention="1h", max_rows=1000)) as receiver:
        intake = receiver.agent.log_intake
        assert intake is not None
        now = datetime.now(UTC)

        def batch(tag: str, n: int, age: timedelta) -> list[IntakeRecord]:
            at = now - age
            return [IntakeRecord(at, at, "hosts", WEB_1, 9, "INFO", f"{tag} {i}") for i in range(n)]

        intake.submit(batch("old", 300, timedelta(hours=2)))
        intake.submit(batch("recent", 1100, timedelta(minutes=1)))
        intake.submit(batch("new", 100, timedelta(0)))
        assert intake.enforce_retention(now) == 300 + 200
        bodies = receiver.bodies()
        assert len(bodies) == 1000
        assert bodies[0] == "recent 200" and bodies[-1] == "new 99"
        assert intake.enforce_retention(now) == 0


def test_postgresql_store_receives_sdk_logs(tmp_path: Path, postgresql_url: str) -> None:
    config = make_config(tmp_path)
    with running_receiver(config, store=Store.open(postgresql_url)) as receiver:
        send_with_sdk(
            receiver.url,
            [(f"worker {i} finished job in {i} ms", SeverityNumber.INFO) for i in range(200)],
            None,
        )
        # NUL is valid UTF-8 but not storable in PostgreSQL text; a long severity text is cut.
        odd = record("nul \x00 inside", attributes={"aiops.instance": "db-1\x00"})
        odd.severity_text = "S" * 100
        response = receiver.post(otlp_request(({}, [odd])).SerializeToString())
        assert response.status_code == 200
        rows = receiver.rows()
    assert len(rows) == 201
    assert {row.entity_key for row in rows[:200]} == {WEB_1}
    assert rows[-1].body == "nul \ufffd inside"
    assert rows[-1].entity_key == entity_key({"instance": "db-1\ufffd"})
    assert rows[-1].severity_text == "S" * 64


# --------------------------------------------------------------------- bounded log cardinality


def test_log_entities_are_bounded_like_metric_entities(tmp_path: Path) -> None:
    """A group's log entities are capped at its ``max_entities`` (those already stored count
    first, across a restart), a label value over ``max_label_value_chars`` is rejected: both
    counted, nothing of theirs stored, so no sender can make /metrics grow without bound."""
    config = make_config(tmp_path, max_label_value_chars=64)
    config.entities[0].max_entities = 5
    with running_receiver(config) as receiver:
        hosts = [f"web-{i}" for i in range(1000)]
        request = otlp_request(*[({"host.name": host}, lines(host, 1)) for host in hosts])
        answer = receiver.post(request.SerializeToString())
        assert answer.status_code == 200
        assert ExportLogsServiceResponse.FromString(answer.content).partial_success == (
            ExportLogsPartialSuccess(
                rejected_log_records=995,
                error_message="995 of 1000 log records rejected: 995 new entity beyond its "
                "group's max_entities (too_many_entities)",
            )
        )
        long_name = "x" * (200 * 1024)  # under the test receiver's 256 KiB body limit
        answer = receiver.post(
            otlp_request(({"host.name": long_name}, lines("long", 3))).SerializeToString()
        )
        assert answer.status_code == 200
        assert receiver.metric("aiops_logs_rejected_total", reason="too_many_entities") == 995
        assert receiver.metric("aiops_logs_rejected_total", reason="label_too_long") == 3
        stored = {row.entity_key for row in receiver.rows()}
        assert stored == {entity_key({"instance": f"web-{i}:9100"}) for i in range(5)}
        # a known entity keeps sending; a sixth does not get in
        known = otlp_request(
            ({"host.name": "web-3"}, lines("again", 2)), ({"host.name": "web-9"}, lines("new", 2))
        )
        assert receiver.post(known.SerializeToString()).status_code == 200
        assert len(receiver.rows()) == 5 + 2
        assert (
            max(
                len(line)
                for line in requests.get(f"{receiver.url}/metrics", timeout=10).text.splitlines()
            )
            < 4096
        )
    # after a restart the stored entities are the budget's first five again
    with running_receiver(config) as receiver:
        again = otlp_request(
            ({"host.name": "web-999"}, lines("x", 1)), ({"host.name": "web-0"}, lines("y", 1))
        )
        assert receiver.post(again.SerializeToString()).status_code == 200
        assert {row.entity_key for row in receiver.rows()} == stored


def test_postgresql_stopped_answers_503_loses_nothing_and_recovers_by_itself(
    tmp_path: Path, postgresql_server: PostgresServer, postgresql_url: str
) -> None:
    """The store's database stops (an outage, a failover): intake answers 503 with Retry-After
    (the senders retry), /metrics keeps answering with the logs source down, and once the
    database is back the intake writes again without a restart; every 200 is in the store."""
    config = make_config(tmp_path)
    config.store.url = postgresql_url
    with running_receiver(config) as receiver:
        assert receiver.post(web_request("before", 5)).status_code == 200

        stop_server(postgresql_server)
        try:
            refused = receiver.post(web_request("during", 5))
            assert refused.status_code == 503, refused.content
            assert int(refused.headers["retry-after"]) >= 1
            assert requests.get(f"{receiver.url}/metrics", timeout=10).ok
            assert receiver.metric("aiops_source_up", source="logs") == 0
        finally:
            start_server(postgresql_server)
        poll_until(
            lambda: receiver.post(web_request("after", 5)).status_code == 200 or None,
            timeout=60,
            interval=1.0,
            what="the intake writing again",
        )
        assert receiver.metric("aiops_source_up", source="logs") == 1
        bodies = receiver.bodies()
    expected = [line.body.string_value for line in lines("before", 5)]
    assert [b for b in bodies if b.startswith("before")] == expected
    assert not any(b.startswith("during") for b in bodies)  # a 503 stored nothing
    assert [b for b in bodies if b.startswith("after")] == [
        line.body.string_value for line in lines("after", 5)
    ]


# -------------------------------------------------------- TLS, rate limit, secrets kept secret


def test_the_rate_limit_answers_429_with_retry_after_and_stores_nothing_refused(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, max_requests_per_second=2.0)
    with running_receiver(config) as receiver:
        answers = [receiver.post(web_request(f"r{i}", 1)) for i in range(6)]
        codes = [answer.status_code for answer in answers]
        assert codes[:2] == [200, 200] and 429 in codes[2:]
        limited = next(answer for answer in answers if answer.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1
        assert "max_requests_per_second=2" in status_message(limited)
        stored = receiver.bodies()
        assert len(stored) == codes.count(200)
        assert receiver.metric("aiops_logs_rejected_total", reason="rate_limited") == codes.count(
            429
        )
        time.sleep(1.1)
        assert receiver.post(web_request("later", 1)).status_code == 200


def test_tokens_never_appear_in_answers_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong, missing and right tokens on the log intake, and a wrong one on the feedback API:
    no answer and no log line of the agent repeats the configured token or the one offered."""
    secret, guess = "s3cret-intake-t0ken-42", "guessed-t0ken-17"
    config = make_config(tmp_path, token=secret)
    config.feedback.token = "s3cret-feedback-t0ken-99"
    caplog.set_level("DEBUG")
    texts: list[str] = []
    with running_receiver(config) as receiver:
        for token in (guess, None, secret):
            answer = receiver.post(web_request("t", 1), token=token)
            texts.append(answer.text + str(answer.headers))
        answer = requests.post(
            f"{receiver.url}/api/v1/anomalies/1/feedback",
            json={"label": "false_positive"},
            headers={"Authorization": f"Bearer {guess}"},
            timeout=10,
        )
        assert answer.status_code == 401
        texts.append(answer.text + str(answer.headers))
        texts.append(requests.get(f"{receiver.url}/metrics", timeout=10).text)
        texts.append(requests.get(f"{receiver.url}/readyz", timeout=10).text)
    everything = "\n".join(texts) + caplog.text
    for value in (secret, guess, config.feedback.token):
        assert value not in everything


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_the_optional_tls_listener_serves_https_only(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    config = make_config(tmp_path)
    config.server.tls_cert_file, config.server.tls_key_file = str(cert), str(key)
    agent = Agent(config)
    agent.open_log_intake()
    server = HttpServer.for_agent(agent)
    server.start()
    try:
        url = f"127.0.0.1:{config.server.port}"
        assert requests.get(f"https://{url}/healthz", verify=str(cert), timeout=10).ok
        answer = requests.post(
            f"https://{url}/v1/logs",
            data=web_request("tls", 2),
            headers={"Content-Type": PROTOBUF},
            verify=str(cert),
            timeout=10,
        )
        assert answer.status_code == 200
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{url}/healthz", timeout=5)
    finally:
        server.stop()
        assert agent.log_intake is not None
        agent.log_intake.close()
        agent.store.close()
