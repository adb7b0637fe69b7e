"""The agent's incident loop against a real Prometheus holding real SMD history: what it leaves
out of the fit (alerts that fired, maintenance, confirmed incidents), what feedback teaches the
next fit, the early warning per horizon, and events with their root cause.

History (one SMD row per second, machine-1-7 of the shipped sample): ``quiet`` is the real
rows; ``early`` and ``late`` are the same rows with a level shift of every metric planted
``EARLY_SHIFT`` and ``LATE_SHIFT`` seconds before the end. Prometheus also holds an ``ALERTS``
series of AiopsAnomalyDetected firing on ``quiet`` for ``ALERT_ROWS`` seconds, as the rule
evaluator would have written it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from aiops_plugin.agent import Agent
from aiops_plugin.demo import (
    PrometheusServer,
    backfill,
    backfill_timestamps,
    load_demo_sample,
    write_openmetrics,
)
from aiops_plugin.demo.ports import free_port
from aiops_plugin.windows import entity_key
from tests.serving import serving
from tests.test_agent import METRIC, ROWS, exported, make_config

EARLY_SHIFT = 150
LATE_SHIFT = 110
#: the fit happens before either shift; inference replays the last FIT_BEFORE seconds
FIT_BEFORE = 200
ALERT_START, ALERT_ROWS = 800, 60


class Incidents:
    def __init__(self, prometheus: PrometheusServer, end: float) -> None:
        self.prometheus = prometheus
        self.end = end

    @property
    def fit_at(self) -> float:
        return self.end - FIT_BEFORE


@pytest.fixture(scope="module")
def incidents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Incidents]:
    workdir = tmp_path_factory.mktemp("incidents")
    sample = load_demo_sample()
    rows = sample.train[-ROWS:].astype(np.float64)
    end = time.time() - 2.0
    timestamps = backfill_timestamps(ROWS, end, 1.0)
    shift = 6.0 * np.maximum(rows.std(axis=0), 0.02)
    step_at = np.arange(ROWS)[:, None]
    series = {
        "quiet": rows,
        "early": rows + np.where(step_at >= ROWS - EARLY_SHIFT, shift, 0.0),
        "late": rows + np.where(step_at >= ROWS - LATE_SHIFT, shift, 0.0),
    }
    tsdb = workdir / "tsdb"
    for i, (instance, values) in enumerate(series.items()):
        path = workdir / f"history-{i}.om"
        labels = {"instance": instance, "job": "smd"}
        write_openmetrics(path, METRIC, labels, "dim", sample.feature_names, values, timestamps)
        backfill(path, tsdb)
    firing = np.full((ROWS, 1), np.nan)
    firing[ALERT_START : ALERT_START + ALERT_ROWS] = 1.0
    alert_labels = {
        "alertname": "AiopsAnomalyDetected",
        "alertstate": "firing",
        "entity_group": "smd",
        "entity": "quiet",
        "instance": "quiet",
        "detector": "fused",
    }
    path = workdir / "alerts.om"
    write_openmetrics(path, "ALERTS", alert_labels, "severity", ["warning"], firing, timestamps)
    backfill(path, tsdb)
    with PrometheusServer(tsdb_dir=tsdb, workdir=workdir / "prometheus") as prometheus:
        prometheus.start()
        yield Incidents(prometheus, end)


def config_for(incidents: Incidents, tmp_path: Path, **overrides):
    overrides.setdefault("fit_exclusions", {"margin": "5s"})
    overrides.setdefault("calibration", {"horizons": ["10s", "30s"]})
    overrides.setdefault("events", {"close_after_steps": 2, "root_cause_window": "60s"})
    overrides.setdefault("schedule", {"fit_window": f"{ROWS - FIT_BEFORE - 1}s"})
    return make_config(incidents.prometheus.url, tmp_path, **overrides)


def test_alert_firing_periods_are_left_out_of_the_fit(incidents: Incidents, tmp_path: Path):
    agent = Agent(config_for(incidents, tmp_path))
    agent.start_up()
    group = agent.config.entities[0]
    start = incidents.fit_at - agent.config.schedule.fit_window
    periods = agent._excluded_periods(group, start, incidents.fit_at)
    assert {(p.reason, tuple(p.labels.items())) for p in periods} == {
        ("alert", (("instance", "quiet"),))
    }
    summary = agent.fit(now=incidents.fit_at)
    excluded = summary["smd"]["excluded_steps"]["alert"]
    # the firing run and the margins; Prometheus' look-back may stretch the end of a
    # backfilled series (no staleness marker) by up to 5 minutes
    assert ALERT_ROWS + 10 <= excluded <= ALERT_ROWS + 10 + 301
    agent.store.close()


def test_maintenance_windows_are_left_out_of_the_fit(incidents: Incidents, tmp_path: Path):
    start = datetime.fromtimestamp(incidents.fit_at - 1000, UTC).isoformat()
    end = datetime.fromtimestamp(incidents.fit_at - 900, UTC).isoformat()
    config = config_for(
        incidents,
        tmp_path,
        fit_exclusions={
            "alerts": False,
            "margin": "0s",
            "maintenance_windows": [{"start": start, "end": end, "labels": {"instance": "late"}}],
        },
    )
    agent = Agent(config)
    agent.start_up()
    summary = agent.fit(now=incidents.fit_at)
    assert summary["smd"]["excluded_steps"] == {"maintenance": pytest.approx(101, abs=1)}
    agent.store.close()


def _event(
    agent: Agent,
    instance: str,
    at: float,
    scores: dict[str, float],
    peak: float,
    warning_scores: dict[str, list[float]] | None = None,
) -> int:
    """An anomaly event of ``instance`` at ``at`` with these detector scores at its peak (and
    these early-warning scores before it opened)."""
    labels = {instance: {"instance": instance}}
    key = entity_key({"instance": instance})
    opened = agent.store.track_anomaly_events(
        group="smd",
        detector="fused",
        timestamp=datetime.fromtimestamp(at, UTC),
        scores={key: peak},
        labels={key: labels[instance]},
        details={
            key: {
                "detector_scores": scores,
                "probability": 0.95,
                "warning_scores": warning_scores or {},
            }
        },
    )
    agent.store.track_anomaly_events(
        group="smd",
        detector="fused",
        timestamp=datetime.fromtimestamp(at + 30, UTC),
        scores={key: 0.0},
        labels={key: labels[instance]},
    )
    return opened[0].id


def test_feedback_reweights_the_fused_score_and_removes_the_incident_from_the_data(
    incidents: Incidents, tmp_path: Path
) -> None:
    agent = Agent(config_for(incidents, tmp_path, fit_exclusions={"alerts": False, "margin": "5s"}))
    agent.start_up()
    agent.fit(now=incidents.fit_at)
    assert agent.calibrations["smd"].weights == {}
    # mad was beyond its threshold at the confirmed incident's peak, pca at the false alarm's
    incident = _event(agent, "quiet", incidents.fit_at - 600, {"mad": 4.0, "pca": 0.3}, 2.0)
    false_alarm = _event(agent, "late", incidents.fit_at - 400, {"mad": 0.2, "pca": 3.0}, 1.5)
    agent.store.save_feedback(incident, "alice", "true_positive", "disk filled up")
    agent.store.save_feedback(false_alarm, "alice", "false_positive", "a deploy")
    summary = agent.fit(now=incidents.fit_at)
    weights = agent.calibrations["smd"].weights
    assert weights["mad"] > 1.0 > weights["pca"]
    # the incident (30 s + 5 s margins) is out of the data; the false alarm stays in
    assert summary["smd"]["excluded_steps"] == {"confirmed_incident": pytest.approx(41, abs=1)}
    assert summary["smd"]["calibration"]["labelled_events"] == 2
    agent.store.close()


def test_enough_labels_calibrate_the_probability_on_them(incidents: Incidents, tmp_path: Path):
    agent = Agent(
        config_for(
            incidents,
            tmp_path,
            fit_exclusions={"alerts": False, "confirmed_incidents": False, "margin": "5s"},
            feedback={"min_labelled_events": 4},
        )
    )
    agent.start_up()
    agent.fit(now=incidents.fit_at)
    for i, (peak, label) in enumerate(
        [
            (5.0, "true_positive"),
            (4.0, "true_positive"),
            (1.2, "false_positive"),
            (1.1, "false_positive"),
        ]
    ):
        # the early warning was up before the incidents, quiet before the false alarms
        before = [peak - 1.0] * 10 if label == "true_positive" else [0.2] * 10
        warned = {"10s": before, "30s": before * 3}
        event = _event(
            agent, "quiet", incidents.fit_at - 900 + 100 * i, {"mad": peak}, peak, warned
        )
        agent.store.save_feedback(event, "bob", label, None)
    agent.fit(now=incidents.fit_at)
    early_warning = agent.early_warnings["smd"]
    assert all(model is not None for model in early_warning.labelled_)
    model = early_warning.labelled_[0]
    assert model is not None
    rate = agent.config.calibration.false_alarm_rate
    up, quiet = model.probability(np.array([rate**3.0, rate**0.2]))
    assert up > 0.5 > quiet
    probability = agent.probabilities["smd"]
    assert probability.labelled is not None
    strong, weak = probability.probability(np.array([rate**5.0, rate**1.1]))
    assert strong > 0.5 > weak
    versions = {
        name: agent.store.latest_model_version(name, "smd", agent.config.model_hash(name, "smd")).id
        for name in agent.detector_names
    }
    stored = agent.store.latest_calibration_version(
        "smd", "fused", agent.config.calibration_hash("smd", versions)
    )
    assert "isotonic" in stored.method and "labelled_probability" in stored.state
    assert "-labelled-" in stored.method and stored.state["early_warning"]["labelled"][0]
    agent.store.close()


def test_replay_exports_early_warnings_and_events_with_their_root_cause(
    incidents: Incidents, tmp_path: Path
) -> None:
    """Inference replayed over the two planted shifts: early warnings per horizon every cycle;
    ``late``'s event ranks ``early`` (40 s before) first, over the API and in /metrics."""
    config = config_for(
        incidents,
        tmp_path,
        fit_exclusions={"alerts": False, "margin": "5s"},
        schedule={"fit_window": f"{ROWS - FIT_BEFORE - 1}s"},
        events={"close_after_steps": 2, "root_cause_window": "60s"},
    )
    agent = Agent(config)
    agent.start_up()
    agent.fit(now=incidents.fit_at)
    for now in np.arange(incidents.fit_at + 1, incidents.end + 0.5, 2.0):
        (result,) = agent.infer(now=float(now))
        assert result.early_warning is not None and result.early_warning.shape == (3, 2)
    horizons = {s.labels["horizon"] for s in exported(agent)["aiops_early_warning_probability"]}
    assert horizons == {"10s", "30s"}
    warning = {
        (s.labels["instance"], s.labels["horizon"]): s.value
        for s in exported(agent)["aiops_early_warning_probability"]
    }
    assert all(0.0 <= value <= 1.0 for value in warning.values())
    scores = {
        (s.labels["instance"], s.labels["horizon"]): s.value
        for s in exported(agent)["aiops_early_warning_score"]
    }
    assert set(scores) == set(warning) and all(value >= 0.0 for value in scores.values())

    events = {event.entity_labels["instance"]: event for event in agent.store.open_anomaly_events()}
    assert {"early", "late"} <= set(events)
    late = events["late"]
    assert late.root_cause[0]["entity_labels"] == {"instance": "early"}
    assert late.root_cause[0]["lead_seconds"] > 0
    assert late.top_metrics and late.detector_scores
    # what the early warning said in the cycles before the event opened (2 s apart: at most 5
    # for the 10 s horizon, 15 for the 30 s one), for feedback to teach the next fit
    assert set(late.warning_scores) == {"10s", "30s"}
    assert 0 < len(late.warning_scores["10s"]) <= 5 < len(late.warning_scores["30s"]) <= 15
    ranks = {s.labels["instance"]: s.value for s in exported(agent)["aiops_root_cause_rank"]}
    assert ranks["early"] == 1.0

    port = free_port()
    with serving(agent, port):
        url = f"http://127.0.0.1:{port}/api/v1/anomalies/{late.id}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
    assert body["root_cause"][0]["entity_labels"] == {"instance": "early"}
    agent.store.close()


def test_metric_lines_keep_their_span_of_history_and_come_back_from_the_store(
    incidents: Incidents, tmp_path: Path
) -> None:
    """With ``early_warning.ramp`` the agent keeps the longest line's span of every metric
    (30 cycles for the 30 s horizon at 1 s steps, more than mad's scoring context asks for),
    so the lines are there from the first cycle on; the fitted lines are stored with the
    calibration and an agent started afresh loads them."""
    config = config_for(
        incidents,
        tmp_path,
        early_warning={"ramp": True},
        fit_exclusions={"alerts": False, "margin": "5s"},
    )
    agent = Agent(config)
    agent.start_up()
    agent.fit(now=incidents.fit_at)
    warning = agent.early_warnings["smd"]
    assert warning.method == "ew-ramp-trend-tail-cauchy-bum-v1"
    assert warning.history_steps == 30
    (result,) = agent.infer(now=incidents.fit_at + 1)
    assert agent.buffers["smd"].values.shape[1] >= 30
    # no fused-score history yet (the trend needs three cycles): the lines alone speak
    assert result.early_warning is not None and np.isfinite(result.early_warning).all()
    scores = [s.value for s in exported(agent)["aiops_early_warning_score"]]
    assert len(scores) == 3 * 2 and all(np.isfinite(scores))
    agent.store.close()

    again = Agent(config)
    again.start_up()
    loaded = again.early_warnings["smd"]
    assert loaded.method == warning.method and loaded.ramp_features_ == warning.ramp_features_
    (result,) = again.infer(now=incidents.fit_at + 2)
    assert result.early_warning is not None and np.isfinite(result.early_warning).all()
    again.store.close()
