"""Generated hostile input for every decoder that reads what others send: OTLP protobuf and
JSON (functions, then the running receiver), the YAML configuration loader and Prometheus'
range answers. A thousand inputs each (Hypothesis, derandomized so CI is repeatable): every one
is decoded, or refused with a clear error or a counted rejection; nothing else escapes, the
receiver never answers 5xx and keeps serving, and the store holds exactly what was accepted.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from sqlalchemy import func, select

from aiops_plugin.config import Config, ConfigError, load_config
from aiops_plugin.logs.receiver import (
    JSON,
    PROTOBUF,
    EntityMapper,
    RequestRefused,
    decompress,
    map_records,
    parse_request,
)
from aiops_plugin.sources.prometheus import PrometheusReader, SourceUnavailable, answer_series
from aiops_plugin.store.models import LogRecordRow
from tests.test_log_receiver import Receiver, make_config, running_receiver

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOKEN = "fuzz-token"

# --------------------------------------------------------------------------- OTLP strategies

texts = st.text(max_size=40) | st.sampled_from(["host.name", "aiops.instance", "", "web-1"])


def any_values(depth: int = 2) -> st.SearchStrategy[AnyValue]:
    leaves = st.one_of(
        st.builds(lambda v: AnyValue(string_value=v), st.text(max_size=80)),
        st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=80)),
        st.builds(lambda v: AnyValue(int_value=v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: AnyValue(double_value=v), st.floats()),
        st.builds(lambda v: AnyValue(bool_value=v), st.booleans()),
        st.just(AnyValue()),
    )
    if depth == 0:
        return leaves

    def kvlist(pairs: list[tuple[str, AnyValue]]) -> AnyValue:
        value = AnyValue()
        value.kvlist_value.values.extend(KeyValue(key=k, value=v) for k, v in pairs)
        return value

    def array(items: list[AnyValue]) -> AnyValue:
        value = AnyValue()
        value.array_value.values.extend(items)
        return value

    inner = any_values(depth - 1)
    return (
        leaves
        | st.builds(kvlist, st.lists(st.tuples(texts, inner), max_size=3))
        | st.builds(array, st.lists(inner, max_size=3))
    )


attributes = st.lists(st.tuples(texts, any_values(1)), max_size=4).map(
    lambda pairs: [KeyValue(key=k, value=v) for k, v in pairs]
)


@st.composite
def log_records(draw: st.DrawFn) -> LogRecord:
    record = LogRecord(
        time_unix_nano=draw(st.integers(0, 2**64 - 1)),
        observed_time_unix_nano=draw(st.integers(0, 2**64 - 1)),
        severity_number=draw(st.integers(-(2**31), 2**31 - 1)),
        severity_text=draw(st.text(max_size=100)),
    )
    record.body.CopyFrom(draw(any_values()))
    record.attributes.extend(draw(attributes))
    return record


@st.composite
def otlp_requests(draw: st.DrawFn) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        resource_logs = request.resource_logs.add()
        resource_logs.resource.attributes.extend(draw(attributes))
        for _ in range(draw(st.integers(0, 2))):
            resource_logs.scope_logs.add().log_records.extend(
                draw(st.lists(log_records(), max_size=4))
            )
    return request


@st.composite
def mutated(draw: st.DrawFn, original: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding cut, with bytes flipped, inserted or removed: a broken sender."""
    data = bytearray(draw(original))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, len(data))) if data else 0
        if kind == "flip" and position < len(data):
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


protobuf_bodies = (
    mutated(otlp_requests().map(lambda r: r.SerializeToString()))
    | st.binary(max_size=2048)
    | otlp_requests().map(lambda r: r.SerializeToString())
)


def json_documents() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    anything = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=12,
    )
    otlp_keys = st.sampled_from(
        [
            "resourceLogs",
            "scopeLogs",
            "logRecords",
            "resource",
            "attributes",
            "body",
            "stringValue",
            "kvlistValue",
            "values",
            "key",
            "value",
            "timeUnixNano",
            "severityNumber",
            "traceId",
            "spanId",
        ]
    )
    shaped = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(otlp_keys, inner, max_size=4),
        max_leaves=20,
    )
    return shaped | anything


json_bodies = (
    json_documents().map(lambda d: json.dumps(d).encode())
    | mutated(json_documents().map(lambda d: json.dumps(d).encode()))
    | st.binary(max_size=512)
)

MAPPER = EntityMapper(make_config(Path("/tmp")).logs.entities)


def decode_or_refuse(payload: bytes, media_type: str) -> None:
    """Decoded and mapped, or refused with 400: nothing else may come out."""
    from datetime import UTC, datetime

    try:
        request = parse_request(payload, media_type)
    except RequestRefused as refused:
        assert refused.status == 400 and refused.reason == "malformed", refused
        assert str(refused)
        return
    mapped = map_records(request, MAPPER, None, 64 * 1024, datetime.now(UTC))
    assert len(mapped.accepted) + sum(mapped.rejected.values()) == sum(
        len(scope.log_records)
        for resource in request.resource_logs
        for scope in resource.scope_logs
    )
    for record in mapped.accepted:
        assert record.body.strip() and "\x00" not in record.body


@FUZZ
@given(protobuf_bodies)
def test_protobuf_bodies_decode_or_get_a_clear_400(payload: bytes) -> None:
    decode_or_refuse(payload, PROTOBUF)


@FUZZ
@given(json_bodies)
def test_json_bodies_decode_or_get_a_clear_400(payload: bytes) -> None:
    decode_or_refuse(payload, JSON)


@FUZZ
@given(st.binary(max_size=1024) | mutated(st.binary(max_size=512).map(gzip.compress)))
def test_compressed_bodies_decompress_or_get_a_clear_4xx(body: bytes) -> None:
    for encoding in ("gzip", "deflate"):
        try:
            out = decompress(body, encoding, 64 * 1024)
        except RequestRefused as refused:
            assert refused.status in (400, 413) and str(refused)
        else:
            assert len(out) <= 64 * 1024


# ---------------------------------------------------------------------- the running receiver


@pytest.fixture(scope="module")
def fuzzed_receiver() -> Iterator[Receiver]:
    with tempfile.TemporaryDirectory() as folder:
        config = make_config(Path(folder), token=TOKEN)
        with running_receiver(config) as receiver:
            yield receiver


def stored_rows(receiver: Receiver) -> int:
    with receiver.store.engine.connect() as connection:
        return int(connection.scalar(select(func.count(LogRecordRow.id))))


@FUZZ
@given(
    body=protobuf_bodies | json_bodies,
    media_type=st.sampled_from([PROTOBUF, JSON]),
    encoding=st.sampled_from([None, None, "gzip"]),
)
def test_the_running_receiver_never_fails_and_stores_exactly_what_it_accepts(
    fuzzed_receiver: Receiver, body: bytes, media_type: str, encoding: str | None
) -> None:
    before = stored_rows(fuzzed_receiver)
    sent = gzip.compress(body) if encoding else body
    response = fuzzed_receiver.post(sent, media_type, encoding, TOKEN)
    assert response.status_code in (200, 400, 413, 415), response.content[:300]
    after = stored_rows(fuzzed_receiver)
    if response.status_code != 200:
        assert after == before
        return
    if media_type == PROTOBUF:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceResponse,
        )

        answer = ExportLogsServiceResponse.FromString(response.content)
        request = ExportLogsServiceRequest.FromString(body)
        total = sum(
            len(scope.log_records) for res in request.resource_logs for scope in res.scope_logs
        )
        assert after - before == total - answer.partial_success.rejected_log_records


def test_after_the_fuzzing_the_receiver_still_takes_a_good_request(
    fuzzed_receiver: Receiver,
) -> None:
    from tests.test_log_receiver import web_request

    before = stored_rows(fuzzed_receiver)
    assert fuzzed_receiver.post(web_request("after-fuzz", 3), token=TOKEN).status_code == 200
    assert stored_rows(fuzzed_receiver) == before + 3
    assert requests.get(f"{fuzzed_receiver.url}/healthz", timeout=5).ok


# ------------------------------------------------------------------------ the config loader

BASE = {
    "prometheus": {"url": "http://127.0.0.1:9090"},
    "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
}
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["5m", "-5s", ".nan", "1e300", "{value}", "("]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)
config_keys = st.sampled_from(
    [
        "prometheus",
        "entities",
        "schedule",
        "detectors",
        "calibration",
        "store",
        "server",
        "logs",
        "sharding",
        "events",
        "grafana",
        "feedback",
        "suppression",
        "fit_exclusions",
    ]
)


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["raw", "values", "sections"]))
    if kind == "raw":
        return draw(st.text(max_size=300))
    if kind == "values":
        return yaml.safe_dump(draw(yaml_values), allow_unicode=True)
    document = {**BASE, **draw(st.dictionaries(config_keys, yaml_values, max_size=3))}
    return yaml.safe_dump(document, allow_unicode=True)


@FUZZ
@given(config_texts())
def test_the_config_loader_gives_a_config_or_a_named_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            config = load_config(path)
        except ConfigError as error:
            assert str(error).startswith(str(path)), error
        else:
            assert isinstance(config, Config) and config.entities


# ------------------------------------------------------------- Prometheus' range answers

GROUP_CONFIG = Config.model_validate(
    {
        "prometheus": {"url": "http://127.0.0.1:9", "step": "1s"},
        "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
    }
)
START = 1_700_000_000.0
numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e400", "abc", "", "0x10"]),
)
points = st.one_of(
    st.tuples(st.floats(START - 5, START + 15) | st.floats(), numbers_as_text).map(list),
    yaml_values,
)
series_items = st.one_of(
    st.fixed_dictionaries(
        {
            "metric": st.dictionaries(
                st.sampled_from(["instance", "job", "__name__", "cpu"]), yaml_values, max_size=3
            ),
            "values": st.lists(points, max_size=12) | yaml_values,
        }
    ),
    yaml_values,
)


def _json_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_finite(v) for v in value]
    return value


@FUZZ
@given(st.lists(series_items, max_size=6) | yaml_values)
def test_range_answers_of_any_shape_become_windows_or_counted_skips(answer: Any) -> None:
    reader = PrometheusReader(GROUP_CONFIG.prometheus)
    # the decoder is what is fuzzed: the answer as JSON on the wire, parsed as the reader does
    # (Prometheus writes no NaN or infinite JSON numbers: those become strings here)
    body = json.dumps({"status": "success", "data": {"result": _json_finite(answer)}}, default=str)

    def wire(*args: Any, **kwargs: Any) -> Iterator[dict]:
        with reader._answer_errors():
            yield from answer_series(io.BytesIO(body.encode()))

    reader._range_answer = wire
    try:
        result = reader.read_range(GROUP_CONFIG.entities[0], START, START + 9)
    except SourceUnavailable as exc:  # JSON the parser cannot take (a 64-bit overflow)
        assert "other than the Prometheus API's JSON" in str(exc)
        return
    if result.windows is not None:
        values = result.windows.values
        assert values.dtype == np.float32 and values.shape[1] == 10
        finite = values[np.isfinite(values)]
        assert not np.isinf(values).any() and all(math.isfinite(v) for v in finite[:5])
