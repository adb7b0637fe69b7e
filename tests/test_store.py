"""The store's contract, on SQLite and on a real PostgreSQL server started by the test session."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

from aiops_plugin.store import AnomalyEvent, ModelVersion, Store, StoreError
from aiops_plugin.store.models import Base, Entity, ModelVersionRow
from aiops_plugin.store.repo import MIGRATIONS_DIR
from aiops_plugin.windows import entity_key

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
HOST_A = {"instance": "a:9100", "job": "node"}
HOST_B = {"instance": "b:9100", "job": "node"}
KEY_A, KEY_B = entity_key(HOST_A), entity_key(HOST_B)
REPO_ROOT = Path(__file__).resolve().parents[1]
TABLES = {"entities", "model_versions", "job_runs", "anomaly_events"}


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def save_version(store: Store, config_hash: str = "cfg1", **overrides: Any) -> ModelVersion:
    fields: dict[str, Any] = {
        "detector": "multiscale",
        "group": "hosts",
        "config_hash": config_hash,
        "state": b"weights",
        "training_metrics": {"loss": 0.25, "epochs": 3},
        "n_entities": 2,
        "n_features": 5,
    }
    fields.update(overrides)
    return store.save_model_version(**fields)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_migrations_create_the_schema_of_models_py(store: Store) -> None:
    with store.engine.connect() as connection:
        assert TABLES | {"alembic_version"} <= set(inspect(connection).get_table_names())
        context = MigrationContext.configure(connection)
        assert compare_metadata(context, Base.metadata) == []
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        assert context.get_current_revision() == head


def test_upgrade_is_idempotent_and_keeps_data(store_url: str) -> None:
    with Store.open(store_url) as first:
        job_id = first.start_job("fit")
        first.upgrade()
    with Store.open(store_url) as second:
        second.upgrade()
        assert [job["id"] for job in second.recent_jobs()] == [job_id]
        with second.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_agents_starting_together_migrate_once(store_url: str) -> None:
    """Shards of a StatefulSet start at the same time against one database."""
    code = "import sys; from aiops_plugin.store import Store; Store.open(sys.argv[1]).close()"
    agents = [
        subprocess.Popen(
            [sys.executable, "-c", code, store_url],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [agent.communicate(timeout=120)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0] * len(agents), errors
    with Store.open(store_url) as store, store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_upsert_entities_keeps_ids_stable_and_updates_last_seen(store: Store) -> None:
    first = store.upsert_entities("hosts", [HOST_A, HOST_B], at(0))
    host_c = {"job": "node", "instance": "c:9100"}
    second = store.upsert_entities("hosts", [dict(reversed(HOST_B.items())), host_c], at(5))
    assert second[KEY_B] == first[KEY_B]
    assert second[entity_key(host_c)] not in first.values()
    assert store.upsert_entities("pods", [HOST_A], at(5))[KEY_A] != first[KEY_A]

    store.upsert_entities("hosts", [HOST_B], at(1))  # a late call does not age the entity
    with store.engine.connect() as connection:
        rows = {
            row.key: row
            for row in connection.execute(select(Entity).where(Entity.group_name == "hosts"))
        }
    assert rows[KEY_B].first_seen == at(0)
    assert rows[KEY_B].last_seen == at(5)
    assert rows[KEY_A].last_seen == at(0)
    assert rows[KEY_B].labels == HOST_B


def test_latest_model_version_is_the_newest_for_the_config_hash(store: Store) -> None:
    save_version(store, "cfg1")
    newest_cfg1 = save_version(store, "cfg1", training_metrics={"loss": 0.1})
    newest = save_version(store, "cfg2")

    latest = store.latest_model_version("multiscale", "hosts", "cfg1")
    assert latest == newest_cfg1
    assert latest.training_metrics == {"loss": 0.1}
    assert (latest.n_entities, latest.n_features) == (2, 5)
    assert latest.created_at.tzinfo == UTC
    assert store.latest_model_version("multiscale", "hosts") == newest


def test_latest_model_version_ignores_other_config_hash_detector_and_group(store: Store) -> None:
    save_version(store, "cfg1")
    assert store.latest_model_version("multiscale", "hosts", "cfg-changed") is None
    assert store.latest_model_version("diffusion", "hosts") is None
    assert store.latest_model_version("multiscale", "pods") is None


def test_prune_model_versions_keeps_the_newest(store: Store) -> None:
    saved = [save_version(store, f"cfg{i % 2}") for i in range(7)]
    other = save_version(store, detector="diffusion")

    assert store.prune_model_versions("multiscale", "hosts", keep=3) == 4
    assert store.prune_model_versions("multiscale", "hosts", keep=3) == 0
    with store.engine.connect() as connection:
        remaining = set(connection.scalars(select(ModelVersionRow.id)))
    assert remaining == {version.id for version in saved[-3:]} | {other.id}


def test_model_state_bytes_round_trip_exactly(store: Store) -> None:
    state = b"\x00" + random.Random(0).randbytes(2 * 1024 * 1024) + b"\x00"
    save_version(store, state=state)
    assert store.latest_model_version("multiscale", "hosts").state == state


def test_failing_save_leaves_no_row(store: Store) -> None:
    kept = save_version(store)
    with pytest.raises(StoreError, match="saving a 'multiscale' model"):
        save_version(store, training_metrics={"loss": float("nan")})
    assert store.latest_model_version("multiscale", "hosts") == kept
    with store.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(ModelVersionRow)) == 1


def test_job_lifecycle(store: Store) -> None:
    fit = store.start_job("fit", {"window": "7d"})
    [running] = store.recent_jobs()
    assert (running["id"], running["status"], running["finished_at"]) == (fit, "running", None)

    store.finish_job(fit, "succeeded", detail={"n_entities": 12})
    infer = store.start_job("infer")
    store.finish_job(infer, "failed", error="Prometheus unreachable")

    (fit_job,) = store.recent_jobs(kind="fit")
    assert fit_job["status"] == "succeeded"
    assert fit_job["detail"] == {"window": "7d", "n_entities": 12}
    assert fit_job["started_at"] <= fit_job["finished_at"]
    assert fit_job["finished_at"].tzinfo == UTC
    newest = store.recent_jobs(limit=1)
    assert [(job["id"], job["status"], job["error"]) for job in newest] == [
        (infer, "failed", "Prometheus unreachable")
    ]


def test_finish_job_rejects_unknown_status_and_id(store: Store) -> None:
    job = store.start_job("fit")
    with pytest.raises(ValueError, match="not 'running'"):
        store.finish_job(job, "running")
    with pytest.raises(LookupError, match="no job run with id"):
        store.finish_job(job + 1000, "succeeded")


def test_mark_running_jobs_interrupted(store: Store) -> None:
    left_running = [store.start_job("fit"), store.start_job("infer")]
    done = store.start_job("infer")
    store.finish_job(done, "succeeded")

    assert store.mark_running_jobs_interrupted() == 2
    assert store.mark_running_jobs_interrupted() == 0
    statuses = {job["id"]: job for job in store.recent_jobs()}
    assert {statuses[job]["status"] for job in left_running} == {"interrupted"}
    assert all(statuses[job]["finished_at"] is not None for job in left_running)
    assert statuses[done]["status"] == "succeeded"


def test_anomaly_events_open_peak_and_close_across_calls(store: Store) -> None:
    def track(minutes: float, scores: dict[str, float]) -> list[AnomalyEvent]:
        return store.track_anomaly_events(
            group="hosts",
            detector="fused",
            timestamp=at(minutes),
            scores=scores,
            # labels while each entity may open its first event (as the agent gives them every
            # cycle); later, stored entities need none
            labels={KEY_A: HOST_A, KEY_B: HOST_B} if minutes <= 1 else {},
        )

    [opened_a] = track(0, {KEY_A: 1.5, KEY_B: 0.2})
    assert (opened_a.entity_key, opened_a.entity_labels) == (KEY_A, HOST_A)
    assert (opened_a.start_at, opened_a.peak_at, opened_a.peak_score) == (at(0), at(0), 1.5)
    assert opened_a.end_at is None

    [opened_b] = track(1, {KEY_A: 2.5, KEY_B: 1.2})
    assert opened_b.entity_key == KEY_B
    assert track(2, {KEY_A: 1.8}) == []  # still anomalous, lower than the peak; B not scored

    open_now = {event.entity_key: event for event in store.open_anomaly_events("hosts")}
    assert set(open_now) == {KEY_A, KEY_B}
    assert (open_now[KEY_A].peak_score, open_now[KEY_A].peak_at) == (2.5, at(1))
    assert open_now[KEY_A].id == opened_a.id

    closed = track(3, {KEY_A: 0.3, KEY_B: 0.9})
    assert {(event.id, event.end_at) for event in closed} == {
        (opened_a.id, at(3)),
        (opened_b.id, at(3)),
    }
    assert store.open_anomaly_events() == []

    [reopened_a] = track(4, {KEY_A: 1.1, KEY_B: 0.1})
    assert reopened_a.id not in {opened_a.id, opened_b.id}
    assert [event.id for event in store.anomaly_events()] == [
        reopened_a.id,
        opened_b.id,
        opened_a.id,
    ]
    assert [event.id for event in store.anomaly_events(since=at(3.5))] == [reopened_a.id]
    assert [event.id for event in store.anomaly_events(limit=1)] == [reopened_a.id]


def test_anomaly_events_are_separate_per_detector_and_group(store: Store) -> None:
    labels = {KEY_A: HOST_A}
    for group, detector in [("hosts", "fused"), ("hosts", "diffusion"), ("pods", "fused")]:
        store.track_anomaly_events(
            group=group, detector=detector, timestamp=at(0), scores={KEY_A: 3.0}, labels=labels
        )
    closed = store.track_anomaly_events(
        group="hosts", detector="fused", timestamp=at(1), scores={KEY_A: 0.0}, labels=labels
    )
    assert [(event.group_name, event.detector) for event in closed] == [("hosts", "fused")]
    still_open = {(event.group_name, event.detector) for event in store.open_anomaly_events()}
    assert still_open == {("hosts", "diffusion"), ("pods", "fused")}
    assert [event.group_name for event in store.open_anomaly_events("pods")] == ["pods"]


def test_nan_score_leaves_the_open_event_open(store: Store) -> None:
    kwargs = {"group": "hosts", "detector": "fused", "labels": {KEY_A: HOST_A}}
    store.track_anomaly_events(timestamp=at(0), scores={KEY_A: 2.0}, **kwargs)
    assert store.track_anomaly_events(timestamp=at(1), scores={KEY_A: float("nan")}, **kwargs) == []
    assert [event.entity_key for event in store.open_anomaly_events()] == [KEY_A]


def test_unknown_entity_without_labels_is_rejected_and_nothing_written(store: Store) -> None:
    with pytest.raises(ValueError, match="no labels given for unknown entities"):
        store.track_anomaly_events(
            group="hosts",
            detector="fused",
            timestamp=at(0),
            scores={KEY_A: 2.0, KEY_B: 2.0},
            labels={KEY_A: HOST_A},
        )
    assert store.open_anomaly_events() == []
    with store.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Entity)) == 0


def test_timestamps_come_back_as_the_same_instant_in_utc(store: Store) -> None:
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    [event] = store.track_anomaly_events(
        group="hosts",
        detector="fused",
        timestamp=local,
        scores={KEY_A: 2.0},
        labels={KEY_A: HOST_A},
    )
    assert event.start_at == T0
    assert event.start_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.upsert_entities("hosts", [HOST_A], datetime(2024, 5, 1, 12, 0))


def test_ping_answers_true_for_a_live_database(store: Store) -> None:
    assert store.ping() is True


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_unreachable_store_raises_store_error_that_hides_the_password(
    backend: str, tmp_path
) -> None:
    if backend == "postgresql":
        port = closed_port()
        url, where = f"postgresql://aiops:s3cret-pw@127.0.0.1:{port}/aiops", f"127.0.0.1:{port}"
    else:
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        url, where = f"sqlite:///{blocker / 'aiops.db'}", str(blocker)

    with pytest.raises(StoreError) as raised:
        Store.open(url)
    assert where in str(raised.value)
    assert "s3cret-pw" not in str(raised.value)
    if backend == "postgresql":
        assert "***" in str(raised.value)
        unreachable = Store(url)
        assert unreachable.ping() is False
        unreachable.close()


def test_sqlite_creates_its_data_folder_and_uses_wal(tmp_path) -> None:
    path = tmp_path / "var" / "lib" / "aiops" / "aiops.db"
    with Store.open(f"sqlite:///{path}") as store:
        assert path.is_file()
        with store.engine.connect() as connection:
            assert connection.scalar(text("PRAGMA journal_mode")) == "wal"
