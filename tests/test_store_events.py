"""Anomaly events with hysteresis and details, root causes, feedback labels and the migration that
added them, on SQLite and on the session's real PostgreSQL server."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, Table, create_engine, func, insert, inspect, select

from aiops_plugin.store import AnomalyEvent, EventNotFound, InvalidFeedback, Store
from aiops_plugin.store.models import AnomalyEventRow, AnomalyFeedbackRow, Base
from aiops_plugin.windows import entity_key
from tests.test_store_calibration import alembic_config

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
HOST_A = {"instance": "a:9100", "job": "node"}
HOST_B = {"instance": "b:9100", "job": "node"}
KEY_A, KEY_B = entity_key(HOST_A), entity_key(HOST_B)
LABELS = {KEY_A: HOST_A, KEY_B: HOST_B}
NAN, INF = float("nan"), float("inf")
# events.close_score / events.close_after_steps defaults, schedule.event_min_score
HYSTERESIS = {"threshold": 1.0, "close_score": 0.7, "close_after_steps": 3}
NEW_EVENT_COLUMNS = {
    "peak_probability",
    "below_since",
    "below_steps",
    "n_steps",
    "contributions",
    "detector_scores",
    "log_templates",
    "root_cause",
}


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def track(
    store: Store,
    minutes: float,
    scores: dict[str, float],
    *,
    group: str = "hosts",
    details: dict[str, dict[str, Any]] | None = None,
    **options: Any,
) -> list[AnomalyEvent]:
    return store.track_anomaly_events(
        group=group,
        detector="fused",
        timestamp=at(minutes),
        scores=scores,
        labels=LABELS,
        details=details,
        **options,
    )


def track_series(store: Store, series: list[float], **options: Any) -> list[list[AnomalyEvent]]:
    """Host A's score at minutes 0, 1, 2, ...; what each step returned."""
    return [track(store, minute, {KEY_A: score}, **options) for minute, score in enumerate(series)]


def all_events(store: Store) -> list[AnomalyEvent]:
    return sorted(store.anomaly_events(limit=1000), key=lambda event: event.id)


# Flaps around the threshold, dips below close_score twice for less than three steps, then stays
# quiet from minute 6: one event from 0, ended at 6, closed (sure) at minute 8.
FLAPPING = [1.2, 0.9, 0.5, 1.1, 0.6, 0.8, 0.5, 0.4, 0.3, 0.2]


def test_flapping_around_the_threshold_stays_one_event(store: Store) -> None:
    returned = track_series(store, FLAPPING, **HYSTERESIS)
    [opened] = returned[0]
    assert (opened.start_at, opened.end_at, opened.peak_score) == (at(0), None, 1.2)
    assert all(step == [] for step in returned[1:8])
    [closed] = returned[8]
    assert closed.id == opened.id
    assert closed.end_at == at(6)  # when it went quiet, not when that became sure (8)
    assert closed.duration_seconds == 360.0
    assert closed.n_steps == 6  # minutes 0 to 5; the quiet run that closed it is not counted
    assert (closed.peak_score, closed.peak_at) == (1.2, at(0))
    assert returned[9] == []
    assert [event.id for event in all_events(store)] == [opened.id]


def test_without_hysteresis_the_same_scores_flap_into_events(store: Store) -> None:
    track_series(store, FLAPPING)  # the defaults: close at the first step below the threshold
    events = all_events(store)
    assert [(event.start_at, event.end_at) for event in events] == [
        (at(0), at(1)),
        (at(3), at(4)),
    ]
    assert [event.n_steps for event in events] == [1, 1]


def test_the_close_needs_close_after_steps_quiet_steps_in_a_row(store: Store) -> None:
    returned = track_series(store, [2.0, 0.1, 0.1, 0.75, 0.1, 0.1], **HYSTERESIS)
    assert all(step == [] for step in returned[1:])  # 0.75 >= close_score ended the first run
    [event] = store.open_anomaly_events()
    assert event.end_at is None and event.duration_seconds is None
    with store.engine.connect() as connection:
        row = connection.execute(select(AnomalyEventRow)).one()
    assert (row.below_since, row.below_steps) == (at(4), 2)
    [closed] = track(store, 6, {KEY_A: 0.1}, **HYSTERESIS)
    assert (closed.end_at, closed.n_steps) == (at(4), 4)


def test_scores_between_close_score_and_threshold_keep_an_event_but_do_not_open_one(
    store: Store,
) -> None:
    track(store, 0, {KEY_A: 1.5, KEY_B: 0.9}, **HYSTERESIS)
    track(store, 1, {KEY_A: 0.9, KEY_B: 0.99}, **HYSTERESIS)
    [event] = store.open_anomaly_events()
    assert event.entity_key == KEY_A and event.n_steps == 2


def test_a_missing_or_nan_score_neither_extends_nor_ends_a_quiet_run(store: Store) -> None:
    track_series(store, [2.0, 0.1], **HYSTERESIS)
    assert track(store, 2, {KEY_A: NAN}, **HYSTERESIS) == []
    assert track(store, 3, {KEY_B: 0.0}, **HYSTERESIS) == []  # A not scored
    assert track(store, 4, {KEY_A: 0.2}, **HYSTERESIS) == []
    [closed] = track(store, 5, {KEY_A: 0.3}, **HYSTERESIS)
    assert (closed.end_at, closed.n_steps) == (at(1), 1)


def test_bad_hysteresis_settings_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="close_after_steps must be at least 1"):
        track(store, 0, {KEY_A: 2.0}, close_after_steps=0)
    with pytest.raises(ValueError, match=r"close_score \(1.5\) must not exceed threshold"):
        track(store, 0, {KEY_A: 2.0}, threshold=1.0, close_score=1.5)
    assert all_events(store) == []


STEP_DETAILS = [
    (
        2.0,
        {
            "probability": 0.9,
            "contributions": {"cpu": 0.75, "mem": 0.25},
            "detector_scores": {"mad": 2.5, "pca": 1.1},
            "log_templates": [{"template": "disk full <*>", "count": 3, "score": 1.5}],
        },
    ),
    (
        4.0,  # the peak
        {
            "probability": 0.99,
            "contributions": {"cpu": 0.25, "disk": 0.75},
            "detector_scores": {"mad": 3.0, "pca": 4.2},
            "log_templates": [
                {"template": "disk full <*>", "count": 2, "score": 1.0},
                {"template": "oom killed", "count": 1, "score": 3.0},
            ],
        },
    ),
    (
        1.0,  # below the peak, above close_score: still counts
        {
            "probability": 0.5,
            "contributions": {"cpu": 1.0},
            "detector_scores": {"mad": 1.0},
            "log_templates": [{"template": "oom killed", "count": 4, "score": 0.5}],
        },
    ),
    (
        0.2,  # quiet: adds nothing
        {
            "probability": 1.0,
            "contributions": {"net": 1.0},
            "detector_scores": {"mad": 9.0},
            "log_templates": [{"template": "link down", "count": 9, "score": 9.0}],
        },
    ),
]


def test_details_accumulate_into_the_event(store_url: str) -> None:
    with Store.open(store_url, event_top_metrics=2, event_top_log_templates=5) as store:
        for minute, (score, details) in enumerate(STEP_DETAILS):
            track(store, minute, {KEY_A: score}, details={KEY_A: details}, **HYSTERESIS)
        [event] = store.open_anomaly_events()
    # cpu 0.75*2 + 0.25*4 + 1*1 = 3.5, disk 0.75*4 = 3, mem 0.25*2 = 0.5: shares of 7
    assert [item["metric"] for item in event.top_metrics] == ["cpu", "disk"]
    assert [item["share"] for item in event.top_metrics] == pytest.approx([0.5, 3 / 7])
    assert event.log_templates == [
        {"template": "oom killed", "count": 5, "score": 3.0},
        {"template": "disk full <*>", "count": 5, "score": 1.5},
    ]
    assert event.peak_probability == 0.99
    assert (event.peak_score, event.peak_at) == (4.0, at(1))
    assert event.detector_scores == {"mad": 3.0, "pca": 4.2}
    assert event.n_steps == 3


def test_every_metric_kept_sums_to_one_and_templates_are_cut(store_url: str) -> None:
    with Store.open(store_url, event_top_metrics=50, event_top_log_templates=1) as store:
        for minute, (score, details) in enumerate(STEP_DETAILS[:3]):
            track(store, minute, {KEY_A: score}, details={KEY_A: details})
        [event] = store.open_anomaly_events()
    assert math.fsum(item["share"] for item in event.top_metrics) == pytest.approx(1.0)
    assert [item["metric"] for item in event.top_metrics] == ["cpu", "disk", "mem"]
    assert event.log_templates == [{"template": "oom killed", "count": 5, "score": 3.0}]


def test_nan_and_inf_in_details_are_dropped(store: Store) -> None:
    details = {
        "probability": NAN,
        "contributions": {"cpu": NAN, "mem": INF, "disk": np.float32(0.5)},
        "detector_scores": {"mad": NAN, "pca": np.float64(2.0)},
        "log_templates": [
            {"template": "a", "count": 1, "score": INF},
            {"template": "b", "count": np.int64(2), "score": 1.25},
        ],
    }
    [event] = track(store, 0, {KEY_A: 2.0}, details={KEY_A: details})
    assert event.peak_probability is None
    assert event.top_metrics == [{"metric": "disk", "share": 1.0}]
    assert event.detector_scores == {"pca": 2.0}
    assert event.log_templates == [{"template": "b", "count": 2, "score": 1.25}]


def test_the_warning_scores_are_those_before_the_step_that_opened_the_event(
    store: Store,
) -> None:
    """What the early warning said before the event opened is kept; the steps of the event
    say what came during it, not before, and change nothing."""
    before = {"5m": [0.2, np.float32(1.5), NAN], "15m": [NAN], "30m": []}
    track(store, 0, {KEY_A: 2.0}, details={KEY_A: {"warning_scores": before}})
    track(store, 1, {KEY_A: 3.0}, details={KEY_A: {"warning_scores": {"5m": [9.0]}}})
    [event] = store.open_anomaly_events()
    assert event.warning_scores == {"5m": [0.2, 1.5]}
    assert store.get_anomaly_event(event.id).warning_scores == {"5m": [0.2, 1.5]}


def test_an_infinite_score_opens_an_event_without_contributions(store: Store) -> None:
    details = {"contributions": {"cpu": 1.0}, "detector_scores": {"mad": 5.0}}
    [event] = track(store, 0, {KEY_A: INF}, details={KEY_A: details})
    assert event.peak_score == INF
    assert event.top_metrics == []
    assert event.detector_scores == {"mad": 5.0}


@pytest.mark.parametrize(
    ("details", "message"),
    [
        ({"contribution": {"cpu": 1.0}}, r"unknown fields \['contribution'\]"),
        ({"probability": "high"}, r"\['probability'\] is 'high', not a number"),
        ({"contributions": {"cpu": None}}, r"\['contributions'\]\['cpu'\] is None"),
        ({"log_templates": [{"template": "x", "score": 1.0}]}, "lacks count"),
        ({"warning_scores": {"5m": 1.0}}, r"\['warning_scores'\]\['5m'\] must be a list"),
        ({"warning_scores": {"5m": [0.1, "x"]}}, r"\['warning_scores'\]\['5m'\]\[1\] is 'x'"),
    ],
)
def test_malformed_details_are_refused_and_nothing_written(
    store: Store, details: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        track(store, 0, {KEY_A: 2.0}, details={KEY_A: details})
    assert all_events(store) == []


def test_details_of_unscored_entities_are_ignored(store: Store) -> None:
    [event] = track(
        store,
        0,
        {KEY_A: 2.0, KEY_B: NAN},
        details={KEY_B: {"contributions": {"cpu": 1.0}}, "nobody": {"probability": 0.5}},
    )
    assert event.entity_key == KEY_A and event.top_metrics == []


def test_root_cause_is_set_and_replaced_as_a_whole(store: Store) -> None:
    [event] = track(store, 0, {KEY_A: 2.0})
    assert store.get_anomaly_event(event.id).root_cause == []
    ranking = [
        {"entity": "db", "group": "svc", "rank": 1, "lead_seconds": 120.0},
        {"entity": "api", "group": "svc", "rank": 2, "lead_seconds": 30.0},
    ]
    store.set_event_root_cause(event.id, ranking)
    assert store.get_anomaly_event(event.id).root_cause == ranking
    assert store.open_anomaly_events()[0].root_cause == ranking
    store.set_event_root_cause(event.id, ranking[1:])
    assert store.get_anomaly_event(event.id).root_cause == ranking[1:]
    with pytest.raises(ValueError, match=r"root cause of anomaly event \d+\[0\]\['lead_seconds'\]"):
        store.set_event_root_cause(event.id, [{"entity": "db", "lead_seconds": NAN}])
    assert store.get_anomaly_event(event.id).root_cause == ranking[1:]
    for missing in (event.id + 1000, 0, 2**70):
        with pytest.raises(EventNotFound, match=f"no anomaly event {missing}"):
            store.set_event_root_cause(missing, ranking)


def feedback_rows(store: Store) -> int:
    with store.engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(AnomalyFeedbackRow))


def test_feedback_is_idempotent_per_event_and_user(store: Store) -> None:
    [event] = track(store, 0, {KEY_A: 2.0})
    first, created = store.save_feedback(event.id, "alice", "true_positive", "disk filled up")
    assert created is True and first.replaced_label is None
    assert (first.event_id, first.user, first.label, first.comment) == (
        event.id,
        "alice",
        "true_positive",
        "disk filled up",
    )
    assert first.created_at == first.updated_at and first.created_at.tzinfo == UTC

    again, created = store.save_feedback(event.id, " alice ", "true_positive", "disk filled up")
    assert created is False and again.replaced_label is None
    assert (again.id, again.created_at, again.label) == (first.id, first.created_at, first.label)
    assert again.updated_at > first.updated_at

    changed, created = store.save_feedback(event.id, "alice", "false_positive", None)
    assert created is False and changed.replaced_label == "true_positive"
    assert (changed.id, changed.label, changed.comment) == (first.id, "false_positive", None)

    bob, created = store.save_feedback(event.id, "bob", "true_positive", "")
    assert created is True and bob.comment is None
    assert feedback_rows(store) == 2
    feedback = store.get_anomaly_event(event.id).feedback
    assert [(item["user"], item["label"], item["comment"]) for item in feedback] == [
        ("alice", "false_positive", None),
        ("bob", "true_positive", None),
    ]
    assert feedback[0]["updated_at"] == changed.updated_at
    # lists do not carry feedback
    assert store.list_anomaly_events()[0].feedback == []


@pytest.mark.parametrize(
    ("user", "label", "comment", "field"),
    [
        ("alice", "maybe", None, "label"),
        ("alice", None, None, "label"),
        ("", "true_positive", None, "user"),
        ("   ", "true_positive", None, "user"),
        ("x" * 201, "true_positive", None, "user"),
        (7, "true_positive", None, "user"),
        ("alice", "true_positive", "y" * 2001, "comment"),
        ("alice", "true_positive", 3, "comment"),
    ],
)
def test_bad_feedback_fields_are_refused_by_name(
    store: Store, user: object, label: object, comment: object, field: str
) -> None:
    [event] = track(store, 0, {KEY_A: 2.0})
    with pytest.raises(InvalidFeedback, match=f"^{field}: ") as raised:
        store.save_feedback(event.id, user, label, comment)  # type: ignore[arg-type]
    assert raised.value.field == field and isinstance(raised.value, ValueError)
    assert feedback_rows(store) == 0


def test_feedback_on_an_unknown_event_is_event_not_found(store: Store) -> None:
    for missing in (12345, 0, -1, 2**70):
        with pytest.raises(KeyError) as raised:
            store.save_feedback(missing, "alice", "true_positive", None)
        assert isinstance(raised.value, EventNotFound)
        assert str(raised.value) == f"no anomaly event {missing}"
    assert feedback_rows(store) == 0


def test_feedback_longest_fields_are_accepted(store: Store) -> None:
    [event] = track(store, 0, {KEY_A: 2.0})
    saved, _ = store.save_feedback(event.id, "u" * 200, "true_positive", "c" * 2000)
    assert (len(saved.user), len(saved.comment or "")) == (200, 2000)


def test_labelled_events_of_a_group_with_the_latest_label(store: Store) -> None:
    [first] = track(store, 0, {KEY_A: 2.0})
    track(store, 2, {KEY_A: 0.0})
    [unlabelled] = track(store, 4, {KEY_B: 3.0})
    [second] = track(store, 10, {KEY_A: 5.0})  # still open
    [other_group] = track(store, 0, {KEY_A: 2.0}, group="pods")
    store.save_feedback(first.id, "alice", "true_positive", None)
    store.save_feedback(first.id, "bob", "false_positive", "a deploy")
    store.save_feedback(second.id, "carol", "false_positive", None)
    store.save_feedback(other_group.id, "alice", "true_positive", None)

    labelled = store.labelled_events("hosts")
    assert [(event.id, label) for event, label in labelled] == [
        (first.id, "false_positive"),  # bob's is the newer
        (second.id, "false_positive"),
    ]
    assert labelled[0][0].end_at == at(2) and labelled[0][0].entity_labels == HOST_A
    assert unlabelled.id not in {event.id for event, _ in labelled}

    store.save_feedback(first.id, "alice", "true_positive", "postmortem: real")
    assert store.labelled_events("hosts")[0][1] == "true_positive"
    assert [e.id for e, _ in store.labelled_events("hosts", since=at(5))] == [second.id]
    assert [e.id for e, _ in store.labelled_events("hosts", until=at(5))] == [first.id]
    assert [e.id for e, _ in store.labelled_events("hosts", since=at(2), until=at(2))] == [first.id]
    assert [e.id for e, _ in store.labelled_events("pods")] == [other_group.id]
    assert store.labelled_events("nope") == []


def test_migration_0004_upgrades_a_store_with_rows_and_downgrades(store_url: str) -> None:
    Store(store_url).close()  # creates the SQLite folder
    command.upgrade(alembic_config(store_url), "0003")
    engine = create_engine(store_url)
    try:
        with engine.begin() as connection:
            tables = MetaData()
            entities = Table("entities", tables, autoload_with=connection)
            events = Table("anomaly_events", tables, autoload_with=connection)
            entity_id = connection.execute(
                insert(entities).returning(entities.c.id),
                {
                    "group_name": "hosts",
                    "key": KEY_A,
                    "labels": HOST_A,
                    "first_seen": at(0),
                    "last_seen": at(0),
                },
            ).scalar_one()
            event_id = connection.execute(
                insert(events).returning(events.c.id),
                {
                    "entity_id": entity_id,
                    "group_name": "hosts",
                    "detector": "fused",
                    "start_at": at(0),
                    "end_at": None,
                    "peak_score": 2.5,
                    "peak_at": at(1),
                },
            ).scalar_one()
            old_columns = {column.name for column in events.columns}

        with Store.open(store_url) as store:
            event = store.get_anomaly_event(event_id)
            assert (event.start_at, event.peak_score, event.peak_at) == (at(0), 2.5, at(1))
            assert event.entity_labels == HOST_A
            assert (event.n_steps, event.peak_probability, event.end_at) == (1, None, None)
            assert (event.top_metrics, event.detector_scores, event.log_templates) == ([], {}, [])
            assert (event.root_cause, event.feedback) == ([], [])
            # the event tracked on with hysteresis from its defaults
            assert track(store, 2, {KEY_A: 0.1}, **{**HYSTERESIS, "close_after_steps": 2}) == []
            [closed] = track(store, 3, {KEY_A: 0.1}, **{**HYSTERESIS, "close_after_steps": 2})
            assert (closed.id, closed.end_at, closed.n_steps) == (event_id, at(2), 1)
            store.save_feedback(event_id, "alice", "true_positive", None)

        command.downgrade(alembic_config(store_url), "0003")
        with engine.connect() as connection:
            schema = inspect(connection)
            assert "anomaly_feedback" not in schema.get_table_names()
            columns = {column["name"] for column in schema.get_columns("anomaly_events")}
            assert columns == old_columns and not columns & NEW_EVENT_COLUMNS
            kept = connection.execute(select(events.c.id, events.c.end_at)).all()
            assert [row.id for row in kept] == [event_id]

        with Store.open(store_url) as store, store.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            assert store.get_anomaly_event(event_id).end_at == at(2)
    finally:
        engine.dispose()


def test_event_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="event_top_metrics must be at least 1"):
        Store("sqlite://", event_top_metrics=0)


def test_a_cycle_of_many_quiet_entities_touches_only_the_anomalous_ones(store: Store) -> None:
    """2000 entities scored, one anomalous: one entity row and one event are written; the
    quiet ones cost nothing, and the open event still closes on its own quiet steps."""
    fleet = {entity_key({"pod": f"p{i}"}): {"pod": f"p{i}"} for i in range(2000)}
    scores = dict.fromkeys(fleet, 0.2)
    hot = entity_key({"pod": "p7"})
    opened = store.track_anomaly_events(
        group="pods",
        detector="fused",
        timestamp=at(0),
        scores={**scores, hot: 3.0},
        labels=fleet,
    )
    assert [event.entity_key for event in opened] == [hot]
    with store.engine.connect() as connection:
        entities = Table("entities", MetaData(), autoload_with=connection)
        count = connection.execute(select(func.count()).select_from(entities)).scalar_one()
    assert count == 1
    # the next cycle brings no labels at all: nothing to upsert, and the event closes
    closed = store.track_anomaly_events(
        group="pods", detector="fused", timestamp=at(1), scores=scores, labels={}
    )
    assert [(event.entity_key, event.end_at) for event in closed] == [(hot, at(1))]


def test_migration_0006_gives_existing_events_no_warning_scores(store_url: str) -> None:
    Store(store_url).close()  # creates the SQLite folder
    command.upgrade(alembic_config(store_url), "0005")
    with Store.open(store_url) as store:
        [event] = track(store, 0, {KEY_A: 2.0})
    command.downgrade(alembic_config(store_url), "0005")
    engine = create_engine(store_url)
    try:
        with engine.connect() as connection:
            columns = inspect(connection).get_columns("anomaly_events")
        assert "warning_scores" not in {column["name"] for column in columns}
    finally:
        engine.dispose()
    with Store.open(store_url) as store:  # upgrades to head again
        assert store.get_anomaly_event(event.id).warning_scores == {}
