"""The anomaly events API (``/api/v1/anomalies``) over the real HTTP server and the real store
(SQLite and PostgreSQL): filters, ordering, keyset pagination, one event with its details and
feedback, posting feedback (201 / 200 / 400 / 401 / 404 / 503), and the older endpoints left as
they were."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import text

from aiops_plugin.agent import Agent
from aiops_plugin.config import Config
from aiops_plugin.demo import free_port
from aiops_plugin.windows import entity_key
from tests.serving import serving

T0 = datetime(2024, 5, 1, tzinfo=UTC)
NAN = float("nan")
API = "/api/v1/anomalies"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def z(minutes: float) -> str:
    """RFC 3339 UTC text of ``at(minutes)``, as the API writes it."""
    return at(minutes).isoformat().replace("+00:00", "Z")


SVC = {name: {"service": name} for name in ("api", "db", "web")}
NODE = {"n1": {"instance": "n1:9100", "job": "node"}}

# Per step (minutes after T0): the fused scores of each group; threshold 1.0.
STEPS: list[tuple[int, dict[str, float], dict[str, float]]] = [
    (0, {"api": 2.0, "db": 0.1, "web": 0.5}, {}),
    (1, {"api": 3.0, "db": 1.5}, {"n1": 4.0}),  # api's peak raised; db and n1 open
    (2, {"api": 0.2, "db": NAN}, {"n1": 3.0}),  # api closes; NaN leaves db open
    (3, {"api": 1.2, "db": 0.5, "web": 5.0}, {}),  # api reopens, db closes, web opens
    (4, {}, {"n1": 0.0}),  # n1 closes
    (5, {}, {"n1": 2.0}),  # n1 reopens
]


@dataclass(frozen=True)
class Expected:
    """An event the steps above produce: entity display name, group, start, end (minutes)."""

    entity: str
    group: str
    start: int
    end: int | None


A1 = Expected("api", "svc", 0, 2)
D1 = Expected("db", "svc", 1, 3)
N1 = Expected("n1:9100/node", "node", 1, 4)
A2 = Expected("api", "svc", 3, None)
W1 = Expected("web", "svc", 3, None)
N2 = Expected("n1:9100/node", "node", 5, None)
# Newest first; equal starts by id, newest first (svc is tracked before node at each step, and
# api before web within a step).
ALL = [N2, W1, A2, N1, D1, A1]


TOKEN = "s3cret-feedback-token"


def make_config(store_url: str, port: int, feedback_token: str | None = None) -> Config:
    return Config.model_validate(
        {
            "prometheus": {"step": "1s"},
            "entities": [
                {"name": "svc", "labels": ["service"], "queries": {"up": "up"}},
                {"name": "node", "labels": ["instance", "job"], "queries": {"up": "up"}},
            ],
            "store": {"url": store_url},
            "server": {"host": "127.0.0.1", "port": port},
            "feedback": {"token": feedback_token},
        }
    )


def track(agent: Agent, minutes: float, group: str, scores: dict[str, float]) -> None:
    labels = SVC if group == "svc" else NODE
    agent.store.track_anomaly_events(
        group=group,
        detector="fused",
        timestamp=at(minutes),
        scores={entity_key(labels[name]): score for name, score in scores.items()},
        labels={entity_key(labels[name]): labels[name] for name in scores},
    )


def serve_steps(store_url: str, feedback_token: str | None) -> Iterator[tuple[Agent, str]]:
    """An agent whose store holds the events of STEPS, and its HTTP server (no Prometheus: no
    cycle runs)."""
    port = free_port()
    agent = Agent(make_config(store_url, port, feedback_token))
    for minutes, svc, node in STEPS:
        if svc:
            track(agent, minutes, "svc", svc)
        if node:
            track(agent, minutes, "node", node)
    with serving(agent, port) as url:
        yield agent, url


@pytest.fixture
def served(store_url: str) -> Iterator[tuple[Agent, str]]:
    """The events of STEPS served; no feedback token configured."""
    yield from serve_steps(store_url, None)


@pytest.fixture
def served_with_token(store_url: str) -> Iterator[tuple[Agent, str]]:
    """The events of STEPS served, feedback accepted with ``TOKEN``."""
    yield from serve_steps(store_url, TOKEN)


def get(url: str, path: str, **params: str | int) -> requests.Response:
    return requests.get(f"{url}{path}", params=params, timeout=10)


def listed(url: str, **params: str | int) -> list[Expected]:
    response = get(url, API, **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"anomalies", "next_cursor"}
    return [_as_expected(event) for event in body["anomalies"]]


def _as_expected(event: dict) -> Expected:
    def minutes(value: str | None) -> int | None:
        if value is None:
            return None
        delta = datetime.fromisoformat(value) - T0
        assert delta.total_seconds() % 60 == 0, value
        return int(delta.total_seconds() // 60)

    start = minutes(event["start"])
    assert start is not None
    return Expected(event["entity"], event["entity_group"], start, minutes(event["end"]))


def test_lists_every_event_newest_first(served: tuple[Agent, str]) -> None:
    agent, url = served
    response = get(url, API)
    body = response.json()
    assert response.headers["content-type"] == "application/json"
    assert [_as_expected(event) for event in body["anomalies"]] == ALL
    assert body["next_cursor"] is None
    events = body["anomalies"]
    keys = [(datetime.fromisoformat(e["start"]), e["id"]) for e in events]
    assert keys == sorted(keys, reverse=True)
    assert len({e["id"] for e in events}) == len(ALL)
    # The same events as the store holds, none more.
    assert {e["id"] for e in events} == {e.id for e in agent.store.anomaly_events(limit=1000)}


def test_event_fields(served: tuple[Agent, str]) -> None:
    _, url = served
    events = {(_as_expected(e)): e for e in get(url, API).json()["anomalies"]}
    closed = events[A1]
    assert closed == {
        "id": closed["id"],
        "entity_group": "svc",
        "entity": "api",
        "labels": {"service": "api"},
        "detector": "fused",
        "state": "closed",
        "start": z(0),
        "end": z(2),
        "peak_at": z(1),  # raised from 2.0 at 0 to 3.0 at 1
        "peak_score": 3.0,
        "peak_probability": None,
        "duration_seconds": 120.0,
        "n_steps": 2,
        "top_metrics": [],
        "detector_scores": {},
        "log_templates": [],
        "root_cause": [],
        "warning_scores": {},
    }
    node = events[N2]
    assert node["labels"] == {"instance": "n1:9100", "job": "node"}
    assert node["entity"] == "n1:9100/node"
    assert node["state"] == "open" and node["end"] is None
    assert node["peak_at"] == z(5) and node["peak_score"] == 2.0
    # Open: the duration runs to now.
    to_now = (datetime.now(UTC) - at(5)).total_seconds()
    assert to_now - 60 < node["duration_seconds"] <= to_now + 1
    assert events[D1]["peak_score"] == 1.5 and events[D1]["end"] == z(3)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"group": "node"}, [N2, N1]),
        ({"group": "svc"}, [W1, A2, D1, A1]),
        ({"group": "nope"}, []),
        ({"entity": "api"}, [A2, A1]),
        ({"entity": "n1:9100/node"}, [N2, N1]),
        ({"entity": "n1:9100"}, []),  # the display name, not one label value
        ({"entity": "api", "group": "node"}, []),
        ({"entity": "web", "group": "svc"}, [W1]),
        ({"state": "open"}, [N2, W1, A2]),
        ({"state": "closed"}, [N1, D1, A1]),
        ({"state": "closed", "group": "svc"}, [D1, A1]),
        # overlap with [since, until]: ends are inclusive, open events last until now
        ({"since": z(4)}, [N2, W1, A2, N1]),
        ({"since": z(4.5)}, [N2, W1, A2]),
        ({"until": z(0)}, [A1]),
        ({"until": z(0.5)}, [A1]),
        ({"since": z(2), "until": z(2)}, [N1, D1, A1]),
        ({"since": z(3), "until": z(3)}, [W1, A2, N1, D1]),
        ({"since": z(2.5), "until": z(4.5)}, [W1, A2, N1, D1]),
        ({"since": z(6), "state": "closed"}, []),
        ({"since": z(10), "until": z(20)}, [N2, W1, A2]),
        ({"since": "2024-05-01T02:04:00+02:00"}, [N2, W1, A2, N1]),  # = z(4), with an offset
        ({"since": int(at(4).timestamp())}, [N2, W1, A2, N1]),  # unix seconds
        ({"until": f"{at(0).timestamp() + 30.5}"}, [A1]),  # fractional unix seconds
        ({"limit": 2}, [N2, W1]),
        ({"limit": 1000}, ALL),
    ],
)
def test_filters(served: tuple[Agent, str], params: dict, expected: list[Expected]) -> None:
    _, url = served
    assert listed(url, **params) == expected


def pages(url: str, **params: str | int) -> list[list[dict]]:
    out: list[list[dict]] = []
    cursor = params.pop("cursor", None)
    while True:
        response = get(url, API, **params, **({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        body = response.json()
        out.append(body["anomalies"])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        assert len(out) <= 20, "pagination does not end"


@pytest.mark.parametrize("limit", [1, 2, 4, 5, 6, 7])
def test_pagination_covers_every_event_once(served: tuple[Agent, str], limit: int) -> None:
    _, url = served
    got = pages(url, limit=limit)
    assert [len(page) for page in got[:-1]] == [limit] * (len(got) - 1)
    # a full last page does not leave an empty page behind it
    assert len(got) == max(1, -(-len(ALL) // limit))
    assert [_as_expected(event) for page in got for event in page] == ALL


def test_pagination_with_filters(served: tuple[Agent, str]) -> None:
    _, url = served
    got = pages(url, limit=1, state="closed", group="svc")
    assert [_as_expected(event) for page in got for event in page] == [D1, A1]
    got = pages(url, limit=2, since=z(2), until=z(3))  # A1 ended at 2: the end is inclusive
    assert [_as_expected(event) for page in got for event in page] == [W1, A2, N1, D1, A1]


def test_pagination_is_stable_while_events_are_written(served: tuple[Agent, str]) -> None:
    agent, url = served
    first = get(url, API, limit=2).json()
    assert [_as_expected(e) for e in first["anomalies"]] == [N2, W1]
    track(agent, 6, "svc", {"db": 9.0})  # a newer event after the first page
    rest = pages(url, limit=2, cursor=first["next_cursor"])
    assert [_as_expected(e) for page in rest for e in page] == [A2, N1, D1, A1]
    assert listed(url, limit=1) == [Expected("db", "svc", 6, None)]


def test_one_event(served: tuple[Agent, str]) -> None:
    _, url = served
    for event in get(url, API, state="closed").json()["anomalies"]:
        response = get(url, f"{API}/{event['id']}")
        assert response.status_code == 200
        assert response.json() == {**event, "feedback": []}
    open_event = get(url, API, limit=1).json()["anomalies"][0]
    one = get(url, f"{API}/{open_event['id']}").json()
    assert one["duration_seconds"] >= open_event["duration_seconds"]
    assert {**one, "duration_seconds": 0} == {
        **open_event,
        "duration_seconds": 0,
        "feedback": [],
    }


@pytest.mark.parametrize("event_id", ["999999", "0", str(2**31), str(2**70)])
def test_an_absent_event_is_404(served: tuple[Agent, str], event_id: str) -> None:
    _, url = served
    response = get(url, f"{API}/{event_id}")
    assert response.status_code == 404
    assert response.json() == {"error": f"no anomaly event {int(event_id)}"}


def _cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("params", "parameter", "value"),
    [
        ({"state": "opened"}, "state", "opened"),
        ({"state": ""}, "state", ""),
        ({"since": "yesterday"}, "since", "yesterday"),
        ({"since": "2024-05-01T00:00:00"}, "since", "2024-05-01T00:00:00"),  # no offset
        ({"until": "2024-13-01T00:00:00Z"}, "until", "2024-13-01T00:00:00Z"),
        ({"until": "1e999"}, "until", "1e999"),
        ({"since": "99999999999999999999"}, "since", "99999999999999999999"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since", "0001-01-01T00:00:00+01:00"),
        ({"since": z(5), "until": z(1)}, "since", z(5)),
        ({"limit": "0"}, "limit", "0"),
        ({"limit": "1001"}, "limit", "1001"),
        ({"limit": "-1"}, "limit", "-1"),
        ({"limit": "ten"}, "limit", "ten"),
        ({"limit": ""}, "limit", ""),
        ({"cursor": "!!!"}, "cursor", "!!!"),
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor", "bm90IGEgY3Vyc29y"),  # "not a cursor"
        ({"cursor": _cursor("2024-05-01T00:00:00|3")}, "cursor", None),  # naive
        ({"cursor": _cursor("2024-05-01T00:00:00+00:00|x")}, "cursor", None),
        ({"cursor": _cursor("2024-05-01T00:00:00+00:00|0")}, "cursor", None),
        ({"cursor": base64.urlsafe_b64encode(b"\xff\xfe|1").decode()}, "cursor", None),
        ({"cursor": ""}, "cursor", ""),
        ({"groups": "svc"}, "groups", "svc"),  # a misspelt parameter is not ignored
    ],
)
def test_bad_parameters_are_400(
    served: tuple[Agent, str], params: dict, parameter: str, value: str | None
) -> None:
    _, url = served
    response = get(url, API, **params)
    assert response.status_code == 400, response.text
    body = response.json()
    value = params[parameter] if value is None else value
    assert body["parameter"] == parameter
    assert body["value"] == value
    assert body["error"].startswith(f"{parameter}: ")
    assert repr(value) in body["error"]


def test_bad_parameter_messages(served: tuple[Agent, str]) -> None:
    _, url = served
    assert get(url, API, state="x").json()["error"] == (
        "state: must be one of open, closed, got 'x'"
    )
    assert get(url, API, limit="5000").json()["error"] == (
        "limit: must be an integer from 1 to 1000, got '5000'"
    )
    assert "until" in get(url, API, since=z(2), until=z(1)).json()["error"]
    long = "x" * 500
    body = get(url, API, since=long).json()
    assert len(body["error"]) < 300 and body["value"].endswith("...")


@pytest.mark.parametrize("event_id", ["abc", "-1", "1.5"])
def test_a_bad_event_id_is_400(served: tuple[Agent, str], event_id: str) -> None:
    _, url = served
    response = get(url, f"{API}/{event_id}")
    assert response.status_code == 400
    assert response.json() == {
        "error": f"id: must be a positive integer, got {event_id!r}",
        "parameter": "id",
        "value": event_id,
    }


def test_a_failing_store_is_503_and_the_server_recovers(served: tuple[Agent, str]) -> None:
    agent, url = served
    with agent.store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE anomaly_events RENAME TO anomaly_events_away"))
    try:
        for path in (API, f"{API}/1"):
            response = get(url, path)
            assert response.status_code == 503
            error = response.json()["error"]
            assert error.startswith("the store is unavailable: reading anomaly event")
            assert agent.store.display_url in error
        assert get(url, "/healthz").status_code == 200
    finally:
        with agent.store.engine.begin() as connection:
            connection.execute(text("ALTER TABLE anomaly_events_away RENAME TO anomaly_events"))
    assert listed(url) == ALL


def test_existing_endpoints_still_behave(served: tuple[Agent, str]) -> None:
    _, url = served
    health = get(url, "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = get(url, "/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "reason": "no model fitted yet"}
    metrics = get(url, "/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "aiops_" in metrics.text
    missing = get(url, "/api/v1/nothing")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    # events are read, never written, over HTTP (only feedback is posted)
    assert requests.post(f"{url}{API}", timeout=10).status_code == 405
    assert requests.post(f"{url}{API}/1", timeout=10).status_code == 405
    assert requests.delete(f"{url}{API}/1", timeout=10).status_code == 405
    assert requests.get(f"{url}{API}/1/feedback", timeout=10).status_code == 405


def test_store_methods(served: tuple[Agent, str]) -> None:
    """The repository methods behind the API, directly: the same filters, and errors."""
    agent, _ = served
    store = agent.store
    events = store.list_anomaly_events()
    assert [(e.group_name, e.start_at) for e in events] == [(x.group, at(x.start)) for x in ALL]
    assert events[0].entity_labels == NODE["n1"]
    page = store.list_anomaly_events(limit=2, after=(events[1].start_at, events[1].id))
    assert [e.id for e in page] == [e.id for e in events[2:4]]
    assert store.list_anomaly_events(entity="db", state="closed")[0].end_at == at(3)
    assert store.get_anomaly_event(events[0].id) == events[0]
    assert store.get_anomaly_event(10**6) is None
    assert store.get_anomaly_event(-1) is None
    assert store.get_anomaly_event(2**64) is None
    with pytest.raises(ValueError, match="state"):
        store.list_anomaly_events(state="ongoing")
    with pytest.raises(ValueError, match="limit"):
        store.list_anomaly_events(limit=0)
    with pytest.raises(ValueError, match="naive"):
        store.list_anomaly_events(since=datetime(2024, 5, 1))  # noqa: DTZ001


def test_one_event_shows_its_details_and_root_cause(served: tuple[Agent, str]) -> None:
    agent, url = served
    key = entity_key(SVC["db"])
    [event] = agent.store.track_anomaly_events(
        group="svc",
        detector="fused",
        timestamp=at(7),
        scores={key: 4.0},
        labels={key: SVC["db"]},
        details={
            key: {
                "probability": 0.97,
                "contributions": {"latency": 0.6, "errors": 0.3, "cpu": 0.1},
                "detector_scores": {"mad": 4.5, "pca": 2.0},
                "log_templates": [{"template": "timeout after <*> ms", "count": 7, "score": 2.5}],
                "warning_scores": {"5m": [0.4, 1.2], "15m": [0.3, float("nan"), 0.9]},
            }
        },
    )
    ranking = [{"entity": "api", "entity_group": "svc", "rank": 1, "lead_seconds": 60.0}]
    agent.store.set_event_root_cause(event.id, ranking)
    body = get(url, f"{API}/{event.id}").json()
    assert body["peak_probability"] == 0.97 and body["n_steps"] == 1
    assert [item["metric"] for item in body["top_metrics"]] == ["latency", "errors", "cpu"]
    assert [item["share"] for item in body["top_metrics"]] == pytest.approx([0.6, 0.3, 0.1])
    assert body["detector_scores"] == {"mad": 4.5, "pca": 2.0}
    assert body["log_templates"] == [{"template": "timeout after <*> ms", "count": 7, "score": 2.5}]
    assert body["root_cause"] == ranking
    # what the early warning said before the event opened (a NaN step said nothing)
    assert body["warning_scores"] == {"5m": [0.4, 1.2], "15m": [0.3, 0.9]}
    listed_event = get(url, API, limit=1).json()["anomalies"][0]
    assert listed_event["root_cause"] == ranking and "feedback" not in listed_event


def post_feedback(
    url: str, event_id: int | str, body: object, token: str | None = TOKEN, **headers: str
) -> requests.Response:
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {token}")
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return requests.post(f"{url}{API}/{event_id}/feedback", data=data, headers=headers, timeout=10)


def feedback_count(url: str, label: str) -> float:
    metrics = get(url, "/metrics").text
    [value] = re.findall(rf'^aiops_feedback_total\{{label="{label}"\}} (\S+)$', metrics, re.M)
    return float(value)


def closed_event_id(url: str) -> int:
    return get(url, API, state="closed", limit=1).json()["anomalies"][0]["id"]


def test_feedback_is_created_then_updated(served_with_token: tuple[Agent, str]) -> None:
    agent, url = served_with_token
    event_id = closed_event_id(url)
    body = {"label": "true_positive", "user": "alice", "comment": "disk filled up"}
    created = post_feedback(url, event_id, body)
    assert created.status_code == 201, created.text
    stored = created.json()
    assert {key: stored[key] for key in ("event_id", "user", "label", "comment")} == {
        "event_id": event_id,
        "user": "alice",
        "label": "true_positive",
        "comment": "disk filled up",
    }
    assert stored["created_at"] == stored["updated_at"] and stored["created_at"].endswith("Z")
    assert feedback_count(url, "true_positive") == 1

    again = post_feedback(url, event_id, body)
    assert again.status_code == 200
    assert again.json()["id"] == stored["id"] and again.json()["updated_at"] > stored["updated_at"]
    assert feedback_count(url, "true_positive") == 1  # the same label again is not counted

    changed = post_feedback(url, event_id, {"label": "false_positive", "user": "alice"})
    assert changed.status_code == 200 and changed.json()["label"] == "false_positive"
    assert changed.json()["comment"] is None
    assert feedback_count(url, "false_positive") == 1

    assert (
        post_feedback(url, event_id, {"label": "true_positive", "user": "bob"}).status_code == 201
    )
    assert feedback_count(url, "true_positive") == 2
    event = get(url, f"{API}/{event_id}").json()
    assert [(item["user"], item["label"]) for item in event["feedback"]] == [
        ("alice", "false_positive"),
        ("bob", "true_positive"),
    ]
    assert event["feedback"][0]["updated_at"] == changed.json()["updated_at"]
    assert [e.id for e, _ in agent.store.labelled_events(event["entity_group"])] == [event_id]


@pytest.mark.parametrize(
    ("body", "parameter"),
    [
        ("{not json", "body"),
        ('["true_positive"]', "body"),
        ("", "body"),
        (b"\xff\xfe", "body"),
        ("[" * 100_000, "body"),
        ({"label": "true_positive", "user": "a", "labels": "x"}, "labels"),
        ({"label": "true_positive", "user": "a", "by": "x", "at": 1}, "at"),
        ({"user": "alice"}, "label"),
        ({"label": "true_positive"}, "user"),
        ({"label": "maybe", "user": "alice"}, "label"),
        ({"label": 1, "user": "alice"}, "label"),
        ({"label": "true_positive", "user": ""}, "user"),
        ({"label": "true_positive", "user": "u" * 201}, "user"),
        ({"label": "true_positive", "user": ["alice"]}, "user"),
        ({"label": "true_positive", "user": "alice", "comment": "c" * 2001}, "comment"),
        ({"label": "true_positive", "user": "alice", "comment": {"text": "x"}}, "comment"),
    ],
)
def test_bad_feedback_is_400_naming_the_field(
    served_with_token: tuple[Agent, str], body: object, parameter: str
) -> None:
    agent, url = served_with_token
    response = post_feedback(url, closed_event_id(url), body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["parameter"] == parameter
    assert answer["error"].startswith(f"{parameter}: ")
    assert len(answer["error"]) < 400
    assert agent.store.labelled_events("svc") == []


def test_feedback_error_messages(served_with_token: tuple[Agent, str]) -> None:
    _, url = served_with_token
    event_id = closed_event_id(url)
    unknown = post_feedback(url, event_id, {"label": "true_positive", "user": "a", "b": 1, "c": 2})
    assert unknown.json()["error"] == (
        "b: unknown fields b, c (known: label, comment, user), got '1'"
    )
    missing = post_feedback(url, event_id, {"label": "true_positive"})
    assert missing.json() == {"error": "user: is required", "parameter": "user", "value": None}
    label = post_feedback(url, event_id, {"label": "maybe", "user": "a"})
    assert (
        label.json()["error"] == "label: must be one of true_positive, false_positive, got 'maybe'"
    )
    bad_id = post_feedback(url, "abc", {"label": "true_positive", "user": "a"})
    assert bad_id.status_code == 400 and bad_id.json()["parameter"] == "id"


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer"],
)
def test_feedback_without_the_token_is_401(
    served_with_token: tuple[Agent, str], authorization: str | None
) -> None:
    agent, url = served_with_token
    headers = {} if authorization is None else {"Authorization": authorization}
    response = post_feedback(
        url, closed_event_id(url), {"label": "true_positive", "user": "a"}, None, **headers
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in response.text
    assert agent.store.labelled_events("svc") == []
    assert feedback_count(url, "true_positive") == 0


def test_the_bearer_scheme_is_case_insensitive(served_with_token: tuple[Agent, str]) -> None:
    _, url = served_with_token
    body = {"label": "false_positive", "user": "a"}
    response = post_feedback(url, closed_event_id(url), body, None, Authorization=f"bearer {TOKEN}")
    assert response.status_code == 201


@pytest.mark.parametrize("event_id", ["999999", "0", str(2**70)])
def test_feedback_on_an_absent_event_is_404(
    served_with_token: tuple[Agent, str], event_id: str
) -> None:
    _, url = served_with_token
    response = post_feedback(url, event_id, {"label": "true_positive", "user": "alice"})
    assert response.status_code == 404
    assert response.json() == {"error": f"no anomaly event {int(event_id)}"}


def test_feedback_without_a_configured_token_is_503(served: tuple[Agent, str]) -> None:
    _, url = served
    response = post_feedback(url, closed_event_id(url), {"label": "true_positive", "user": "a"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert "feedback.token" in error and "AIOPS_FEEDBACK_TOKEN" in error


def test_feedback_with_a_failing_store_is_503(served_with_token: tuple[Agent, str]) -> None:
    agent, url = served_with_token
    event_id = closed_event_id(url)
    with agent.store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE anomaly_feedback RENAME TO anomaly_feedback_away"))
    try:
        response = post_feedback(url, event_id, {"label": "true_positive", "user": "a"})
        assert response.status_code == 503
        error = response.json()["error"]
        assert error.startswith(
            f"the store is unavailable: saving feedback on anomaly event {event_id}"
        )
        assert agent.store.display_url in error
    finally:
        with agent.store.engine.begin() as connection:
            connection.execute(text("ALTER TABLE anomaly_feedback_away RENAME TO anomaly_feedback"))
    assert post_feedback(url, event_id, {"label": "true_positive", "user": "a"}).status_code == 201
