"""Dashboard provisioning and anomaly annotations through grafana-client.

No Grafana server can be installed here, so these run against ``tests/grafana_standin.py``: an
in-process HTTP server that checks every request against Grafana's documented HTTP API (paths,
methods, body fields and their types, the bearer token) and keeps what a Grafana would store.
Everything else is real: the CLI, grafana-client and its HTTP stack, the store.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from aiops_plugin.cli import app
from aiops_plugin.config import ConfigError, load_config
from aiops_plugin.dashboards import DASHBOARDS_DIR, load_dashboards
from aiops_plugin.demo import free_port
from aiops_plugin.grafana import AnnotationWriter, BackgroundAnnotations, connect
from aiops_plugin.store import AnomalyEvent, Store
from aiops_plugin.windows import entity_key
from tests.grafana_standin import GrafanaStandIn

TOKEN = "glsa_test_token"
ENTITY = {"instance": "machine-1-2"}
KEY = entity_key(ENTITY)


@pytest.fixture
def grafana() -> Iterator[GrafanaStandIn]:
    with GrafanaStandIn(token=TOKEN) as standin:
        yield standin


def push(*args: str, token: str | None = TOKEN) -> Result:
    env = {"AIOPS_GRAFANA_TOKEN": token} if token else {"AIOPS_GRAFANA_TOKEN": ""}
    return CliRunner().invoke(app, ["dashboards", "push", *args], env=env)


def assert_api_used_as_documented(grafana: GrafanaStandIn) -> None:
    assert not grafana.rejected, grafana.rejected
    assert not grafana.unexpected, grafana.unexpected


def test_push_creates_the_folder_and_every_dashboard(grafana: GrafanaStandIn) -> None:
    result = push("--grafana-url", grafana.url)
    assert result.exit_code == 0, result.output
    assert [(f["uid"], f["title"]) for f in grafana.folders.values()] == [("aiops", "AIOps")]
    shipped = load_dashboards()
    assert set(grafana.dashboard_versions) == {d.uid for d in shipped}
    for dashboard in shipped:
        (saved,) = grafana.dashboard_versions[dashboard.uid]
        assert saved["folderUid"] == "aiops"
        assert saved["message"] == "aiops-plugin dashboards push"
        stored = {k: v for k, v in saved["dashboard"].items() if k not in ("id", "version")}
        assert stored == {k: v for k, v in dashboard.model.items() if k != "id"}
        assert f"created   {dashboard.uid}" in result.output
    saves = [r.body for r in grafana.requests if r.path == "/api/dashboards/db"]
    assert all(body["overwrite"] is True and body["dashboard"]["id"] is None for body in saves)
    assert_api_used_as_documented(grafana)


def test_pushing_again_adds_no_version_and_a_change_adds_one(
    grafana: GrafanaStandIn, tmp_path: Path
) -> None:
    assert push("--grafana-url", grafana.url).exit_code == 0
    again = push("--grafana-url", grafana.url)
    assert again.exit_code == 0, again.output
    assert again.output.count("unchanged") == 4
    assert all(len(versions) == 1 for versions in grafana.dashboard_versions.values())

    changed = tmp_path / "dashboards"
    shutil.copytree(DASHBOARDS_DIR, changed)
    overview = json.loads((changed / "aiops-overview.json").read_text())
    overview["title"] = "AIOps / Overview (edited)"
    (changed / "aiops-overview.json").write_text(json.dumps(overview))
    result = push("--grafana-url", grafana.url, "--dashboards-dir", str(changed))
    assert result.exit_code == 0, result.output
    assert "updated   aiops-overview   version 2" in result.output
    history = grafana.dashboard_versions["aiops-overview"]
    assert [v["dashboard"]["title"] for v in history] == [
        "AIOps / Overview",
        "AIOps / Overview (edited)",
    ]
    assert len(grafana.folders) == 1
    assert sum(r.method == "POST" and r.path == "/api/folders" for r in grafana.requests) == 1
    assert_api_used_as_documented(grafana)


def test_push_reuses_an_existing_folder_with_the_same_title(grafana: GrafanaStandIn) -> None:
    connect(grafana.url, TOKEN).folder.create_folder("AIOps", uid="made-by-hand")
    assert push("--grafana-url", grafana.url).exit_code == 0
    assert list(grafana.folders) == ["made-by-hand"]
    assert {v[-1]["folderUid"] for v in grafana.dashboard_versions.values()} == {"made-by-hand"}


def test_push_takes_the_token_from_a_file_and_url_and_folder_from_the_config(
    grafana: GrafanaStandIn, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "entities": [{"name": "node", "labels": ["instance"], "queries": {"up": "up"}}],
                "grafana": {"url": grafana.url, "folder": "Platform AIOps"},
            }
        )
    )
    result = push("--config", str(config), "--token-file", str(token_file), token=None)
    assert result.exit_code == 0, result.output
    assert [(f["uid"], f["title"]) for f in grafana.folders.values()] == [
        ("platform-aiops", "Platform AIOps")
    ]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in grafana.requests)


def test_push_with_a_wrong_token_fails_naming_the_call(grafana: GrafanaStandIn) -> None:
    result = push("--grafana-url", grafana.url, token="wrong")
    assert result.exit_code == 1
    assert "listing folders (GET /api/folders)" in result.output
    assert "Unauthorized" in result.output
    assert not grafana.dashboard_versions


def test_push_without_credentials_or_url_is_a_usage_error(grafana: GrafanaStandIn) -> None:
    assert push("--grafana-url", grafana.url, token=None).exit_code == 2
    assert push(token=None).exit_code == 2
    assert not grafana.requests


def test_export_writes_every_dashboard_for_file_provisioning(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dashboards", "export", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for dashboard in load_dashboards():
        written = tmp_path / "out" / f"{dashboard.uid}.json"
        assert json.loads(written.read_text()) == dashboard.model


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store.open(f"sqlite:///{tmp_path / 'aiops.db'}")
    yield store
    store.close()


def track(
    store: Store, at: datetime, score: float, details: dict[str, Any] | None = None
) -> list[AnomalyEvent]:
    """One scored step of the entity (with what it says about the anomaly, if given)."""
    return store.track_anomaly_events(
        group="node",
        detector="fused",
        timestamp=at,
        scores={KEY: score},
        labels={KEY: ENTITY},
        details={KEY: details} if details else None,
    )


def test_an_anomaly_event_is_a_point_annotation_then_a_region(
    grafana: GrafanaStandIn, store: Store
) -> None:
    writer = AnnotationWriter(connect(grafana.url, TOKEN))
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    end = datetime(2026, 3, 1, 12, 7, tzinfo=UTC)
    (opened,) = track(store, start, 2.5)
    assert writer.write([opened]) == 1
    (annotation,) = grafana.annotations.values()
    assert annotation["time"] == int(start.timestamp() * 1000)
    assert "timeEnd" not in annotation
    assert set(annotation["tags"]) == {
        "aiops",
        "aiops-anomaly",
        "entity:machine-1-2",
        "entity_group:node",
        "detector:fused",
        f"aiops-event:{opened.id}",
    }

    (closed,) = track(store, end, 0.2)
    assert writer.write([closed]) == 1
    (region,) = grafana.annotations.values()
    assert region["id"] == annotation["id"]
    assert region["time"] == int(start.timestamp() * 1000)
    assert region["timeEnd"] == int(end.timestamp() * 1000)
    assert region["tags"] == annotation["tags"]
    assert "peaked at 2.50" in region["text"] and "Back below the threshold" in region["text"]
    assert [(r.method, r.path) for r in grafana.requests] == [
        ("POST", "/api/annotations"),
        ("GET", "/api/annotations"),
        ("PATCH", f"/api/annotations/{annotation['id']}"),
    ]
    assert grafana.requests[1].query["tags"] == [f"aiops-event:{opened.id}"]
    assert_api_used_as_documented(grafana)


def ranked(name: str, lead_seconds: float | None, group: str = "node") -> dict[str, Any]:
    """One entry of an event's root-cause ranking, as the agent stores it."""
    labels = {"instance": name}
    return {
        "group": group,
        "entity_key": entity_key(labels),
        "entity_labels": labels,
        "onset_at": "2026-03-01T11:57:00Z",
        "lead_seconds": lead_seconds,
        "peak_score": 4.0,
        "rank_score": 1.0,
    }


def test_an_event_annotation_names_top_metrics_and_root_cause_and_ends_with_final_numbers(
    grafana: GrafanaStandIn, store: Store
) -> None:
    writer = AnnotationWriter(connect(grafana.url, TOKEN))
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    details = {"probability": 0.93, "contributions": {"cpu": 0.7, "mem": 0.3}}
    (opened,) = track(store, start, 2.5, details)
    ranking = [
        ranked("machine-1-1", 180.0),
        ranked("machine-1-2", 0.0),
        ranked("db-1", -90.0, group="db"),
        ranked("machine-1-4", None),
    ]
    store.set_event_root_cause(opened.id, ranking)
    written = store.get_anomaly_event(opened.id)
    assert written is not None
    assert writer.write([written]) == 1
    (annotation,) = grafana.annotations.values()
    assert annotation["text"] == (
        f"Anomaly on machine-1-2 (group node): fused score peaked at 2.50 at {start.isoformat()}, "
        "P(anomalous) up to 93%. Top metrics: cpu 70%, mem 30%. Root cause: machine-1-1 went "
        "first (3m before), then machine-1-2 (at the start), db-1 of group db (1m 30s after), "
        "machine-1-4."
    )

    # a stronger step turns the metrics around: shares are score-weighted over the event
    later = {"probability": 0.999, "contributions": {"cpu": 0.1, "mem": 0.9}}
    assert track(store, datetime(2026, 3, 1, 12, 3, tzinfo=UTC), 5.0, later) == []
    end = datetime(2026, 3, 1, 12, 7, tzinfo=UTC)
    (closed,) = track(store, end, 0.2)
    assert writer.write([closed]) == 1
    (region,) = grafana.annotations.values()
    assert region["id"] == annotation["id"]
    assert region["text"] == (
        "Anomaly on machine-1-2 (group node): fused score peaked at 5.00 at "
        "2026-03-01T12:03:00+00:00, P(anomalous) up to 99.9%. Top metrics: mem 70%, cpu 30%. "
        "Root cause: machine-1-1 went first (3m before), then machine-1-2 (at the start), db-1 "
        f"of group db (1m 30s after), machine-1-4. Back below the threshold at {end.isoformat()} "
        "after 2 scored steps."
    )
    assert_api_used_as_documented(grafana)


def test_an_event_closed_by_a_restarted_agent_is_written_as_a_region(
    grafana: GrafanaStandIn, store: Store
) -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    track(store, start, 2.5)  # opened while Grafana annotations were off
    (closed,) = track(store, datetime(2026, 3, 1, 12, 3, tzinfo=UTC), 0.1)
    assert AnnotationWriter(connect(grafana.url, TOKEN)).write([closed]) == 1
    (region,) = grafana.annotations.values()
    assert region["timeEnd"] - region["time"] == 180_000
    assert_api_used_as_documented(grafana)


def test_grafana_down_does_not_stop_the_writer(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    (opened,) = track(store, datetime(2026, 3, 1, 12, 0, tzinfo=UTC), 2.5)
    writer = AnnotationWriter(connect(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2))
    assert writer.write([opened]) == 0
    assert "not written" in caplog.text


def test_background_annotations_write_in_order_without_the_cycle_waiting(
    grafana: GrafanaStandIn, store: Store
) -> None:
    """The cycle's submit returns at once; the thread writes the open before the close, so the
    region is the same annotation; flush waits for it."""
    queued = BackgroundAnnotations(AnnotationWriter(connect(grafana.url, TOKEN)))
    (opened,) = track(store, datetime(2026, 3, 1, 12, 0, tzinfo=UTC), 2.5)
    (closed,) = track(store, datetime(2026, 3, 1, 12, 4, tzinfo=UTC), 0.1)
    queued.submit([opened])
    queued.submit([closed])
    assert queued.flush(10)
    (region,) = grafana.annotations.values()
    assert region["timeEnd"] - region["time"] == 240_000
    queued.close()


def test_background_annotations_drop_the_oldest_while_grafana_is_down(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Grafana unreachable (every write waits out its timeout): submitting never blocks, and
    pending events beyond the bound are dropped with a warning rather than piling up."""
    writer = AnnotationWriter(connect(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2))
    queued = BackgroundAnnotations(writer, max_pending=2)
    events = [
        track(store, datetime(2026, 3, 1, 12, minute, tzinfo=UTC), 2.5 if minute % 2 else 0.1)
        for minute in range(1, 12)
    ]
    flat = [event for step in events for event in step]
    started = time.monotonic()
    for event in flat:
        queued.submit([event])
    assert time.monotonic() - started < 1.0
    assert queued.dropped >= len(flat) - 3  # one may be in the writer's hands, two pending
    assert "pending events dropped" in caplog.text
    queued.close(timeout=30)


def test_annotations_need_a_grafana_url_and_the_token_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"entities": [{"name": "node", "labels": ["instance"], "queries": {"up": "up"}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**base, "grafana": {"annotations": True}}))
    with pytest.raises(ConfigError, match="grafana"):
        load_config(path)
    path.write_text(yaml.safe_dump({**base, "grafana": {"url": "http://grafana:3000"}}))
    monkeypatch.setenv("AIOPS_GRAFANA_TOKEN", "from-env")
    assert load_config(path).grafana.token == "from-env"
