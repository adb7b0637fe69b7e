"""The agent keeps working when parts of it fail, and its self-metrics mean what they say.

Against the real Prometheus with SMD history of ``tests/test_agent.py`` (four entities, one of
which vanished 10 minutes before the end). Faults are real where they can be (Prometheus stopped
and started again, tables of the SQLite store dropped); one detector failure is injected by
replacing a fitted model's ``score`` with one that raises, since no real detector fails on
demand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from aiops_plugin.agent import Agent, CycleFailed
from aiops_plugin.demo.polling import poll_until
from aiops_plugin.detectors.baselines import RollingMadDetector
from aiops_plugin.logs.pipeline import LogPipeline
from tests.test_agent import QUERY, History, history, make_config  # noqa: F401 - fixture
from tests.test_dashboards import SCENE_DETECTORS


def _samples(agent: Agent, name: str) -> list:
    """Samples of the family ``name`` (a counter's family drops ``_total``, so match both)."""
    text_ = generate_latest(agent.exporter.registry).decode()
    return [
        sample
        for family in text_string_to_metric_families(text_)
        if name in (family.name, f"{family.name}_total")
        for sample in family.samples
    ]


def _value(agent: Agent, name: str, **labels: str) -> float | None:
    for sample in _samples(agent, name):
        if sample.name in (name, f"{name}_total") and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            return sample.value
    return None


@pytest.fixture
def two_groups(history: History, tmp_path: Path) -> Iterator[Agent]:  # noqa: F811
    """An agent with two groups ("a", "b") of the same SMD history, fitted at its end."""
    groups = [
        {"name": name, "labels": ["instance"], "queries": {"smd": QUERY}} for name in ("a", "b")
    ]
    agent = Agent(make_config(history.prometheus.url, tmp_path, entities=groups))
    agent.start_up()
    agent.fit(now=history.end)
    yield agent
    agent.store.close()


def test_one_groups_detector_failure_does_not_stop_the_other_group(
    two_groups: Agent,
    history: History,  # noqa: F811 - the fixture imported above
) -> None:
    agent = two_groups

    def broken(_windows):  # noqa: ANN001, ANN202
        raise RuntimeError("detector exploded")

    agent.models[("mad", "b")].score_latest = broken  # what a cycle calls
    results = {result.group: result for result in agent.infer(now=history.end)}
    assert results["a"].error is None and results["a"].entities
    assert results["b"].error == "RuntimeError: detector exploded"
    groups = {s.labels["entity_group"] for s in _samples(agent, "aiops_anomaly_score")}
    assert groups == {"a"}


def test_a_store_that_refuses_writes_does_not_stop_scoring(
    two_groups: Agent,
    history: History,  # noqa: F811 - the fixture imported above
) -> None:
    agent = two_groups
    with agent.store.engine.begin() as connection:
        connection.execute(text("DROP TABLE anomaly_events"))
        connection.execute(text("DROP TABLE job_runs"))
    results = agent.infer(now=history.end)
    assert all(result.error is None and result.entities for result in results)
    groups = {s.labels["entity_group"] for s in _samples(agent, "aiops_anomaly_score")}
    assert groups == {"a", "b"}
    assert _value(agent, "aiops_source_up", source="store") == 0


def test_editing_one_group_refits_only_that_group(
    two_groups: Agent,
    history: History,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Group "b" gets another query: on restart "a" loads its models and calibration from the
    store, and the fit job refits "b" alone."""
    groups = [
        {"name": "a", "labels": ["instance"], "queries": {"smd": QUERY}},
        {"name": "b", "labels": ["instance"], "queries": {"smd": QUERY, "again": QUERY}},
    ]
    config = make_config(history.prometheus.url, tmp_path, entities=groups)
    before = {
        (d, g): two_groups.store.latest_model_version(d, g, config.model_hash(d, g))
        for d in config.detectors.enabled_names()
        for g in ("a", "b")
    }
    assert all(before[(d, "a")] is not None for d in ("mad", "pca"))
    assert before[("mad", "b")] is None  # b's definition changed: a new hash
    two_groups.store.close()
    agent = Agent(config)
    try:
        agent.start_up()
        assert agent.missing_models() == [("mad", "b"), ("pca", "b")]
        assert "a" in agent.calibrations and "b" not in agent.calibrations
        agent._fit_job()  # what the scheduler runs: only the groups that lack a model
        assert agent.missing_models() == []
        for d in ("mad", "pca"):
            kept = agent.store.latest_model_version(d, "a", config.model_hash(d, "a"))
            assert kept is not None and kept.id == before[(d, "a")].id  # a was not refitted
            assert agent.store.latest_model_version(d, "b", config.model_hash(d, "b"))
        results = {result.group: result for result in agent.infer(now=history.end)}
        assert results["a"].entities and results["b"].entities
    finally:
        agent.store.close()


def test_fit_is_retried_with_backoff_until_prometheus_is_back(
    history: History,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Started while Prometheus is down, the agent must not wait for ``fit_every`` (1 day)."""
    schedule = {
        "fit_window": f"{2400 - 1}s",
        "infer_every": "1s",
        "fit_every": "1d",
        "fit_retry_backoff": "0.5s",
        "fit_retry_max_backoff": "2s",
    }
    config = make_config(history.prometheus.url, tmp_path, schedule=schedule)
    history.prometheus.stop()
    agent = Agent(config)
    try:
        agent.start_up()
        agent.start_scheduler()
        poll_until(lambda: agent.last_fit_error, 30, "a failed first fit")
        ready, reason = agent.readiness()
        assert not ready and "prometheus unavailable" in reason and "next try in" in reason
        history.prometheus.start()
        poll_until(lambda: agent.models or None, 60, "a model once Prometheus is back")
        poll_until(lambda: agent.readiness()[0] or None, 30, "the agent ready")
        assert agent.last_fit_error is None
        fitted = _value(agent, "aiops_model_last_fit_timestamp_seconds", entity_group="smd")
        assert fitted is not None and fitted > time.time() - 120
    finally:
        agent.stop_event.set()
        if agent.scheduler is not None:
            agent.scheduler.shutdown(wait=True)
        agent.store.close()
        history.prometheus.start()  # a no-op when it is running


def test_skips_count_entities_and_a_vanished_entity_once(
    history: History,  # noqa: F811
    tmp_path: Path,
) -> None:
    agent = Agent(make_config(history.prometheus.url, tmp_path))
    agent.start_up()
    with pytest.raises(CycleFailed, match="no fitted model yet"):
        agent.infer(now=history.end)
    read = agent.buffers["smd"]
    # one count per entity that was not scored, not one per group
    no_model = _value(agent, "aiops_entities_skipped_total", entity_group="smd", reason="no_model")
    assert no_model == len(read.entities) == 3
    agent.fit(now=history.end)
    for _ in range(3):
        agent.infer(now=history.end)
    vanished = _value(
        agent, "aiops_entities_skipped_total", entity_group="smd", reason="no_recent_data"
    )
    assert vanished == 1, "the vanished entity must be reported once, not every cycle"
    agent.store.close()


def test_cycle_phases_are_observed_once_per_cycle_and_fits_separately(
    two_groups: Agent,
    history: History,  # noqa: F811 - the fixture imported above
) -> None:
    agent = two_groups
    for _ in range(2):
        agent.infer(now=history.end)
    counts = {
        s.labels["phase"]: s.value
        for s in _samples(agent, "aiops_cycle_duration_seconds")
        if s.name == "aiops_cycle_duration_seconds_count"
    }
    assert counts == {phase: 2 for phase in ("fetch", "features", "infer", "calibrate", "export")}
    fits = {
        (s.labels["entity_group"], s.labels["detector"]): s.value
        for s in _samples(agent, "aiops_fit_duration_seconds")
        if s.name == "aiops_fit_duration_seconds_count"
    }
    assert fits == {(g, d): 1 for g in ("a", "b") for d in ("mad", "pca")}
    last_fit = {
        (s.labels["entity_group"], s.labels["detector"]): s.value
        for s in _samples(agent, "aiops_model_last_fit_timestamp_seconds")
    }
    assert set(last_fit) == set(fits) and min(last_fit.values()) > 0


def test_the_log_miner_has_one_caller_at_a_time(tmp_path: Path) -> None:
    """The fit and the infer job run on different scheduler threads and both mine logs."""
    config = make_config(
        "http://127.0.0.1:9",
        tmp_path,
        logs={
            "enabled": True,
            "entities": [{"group": "smd", "label": "instance", "attribute": "host.name"}],
            "embedder": {"device": "cpu"},
        },
    )
    agent = Agent(config)
    pipeline = agent.logs
    assert isinstance(pipeline, LogPipeline)
    inside, most = 0, 0
    guard = threading.Lock()
    mine = pipeline.miner.mine_pending

    def observed_mine(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.3)  # a batch in progress, long enough for the other job to arrive
        try:
            return mine(*args, **kwargs)
        finally:
            with guard:
                inside -= 1

    pipeline.miner.mine_pending = observed_mine
    threads = [threading.Thread(target=pipeline.process_pending) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert most == 1
    agent.store.close()


def test_a_gpu_that_is_not_there_at_start_means_the_cpu_not_a_crash_loop(
    history: History,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A node whose GPU is gone (driver, device index): the agent starts on the CPU, says so in
    its log and in ``aiops_device_fallback``, and scores."""
    config = make_config(history.prometheus.url, tmp_path, detectors={"device": "cuda:15"})
    agent = Agent(config)
    try:
        assert agent.device.type == "cpu"
        assert _value(agent, "aiops_device_fallback", reason="unavailable") == 1
        agent.start_up()
        agent.fit(now=history.end)
        assert agent.infer(now=history.end)[0].error is None
    finally:
        agent.store.close()


def test_a_gpu_failing_mid_cycle_moves_every_model_to_the_cpu(
    history: History,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU cannot fail here (there is none), so the failure is forced: the agent believes it
    runs on CUDA and the deep model's scoring raises the error PyTorch raises for an illegal
    memory access, once. That cycle reports the group's error; the models move to the CPU and
    the next cycle scores there."""
    config = make_config(
        history.prometheus.url,
        tmp_path,
        detectors={
            "device": "cpu",
            "mad": {"window": 30},
            "multiscale": SCENE_DETECTORS["multiscale"],
        },
    )
    agent = Agent(config)
    try:
        agent.start_up()
        agent.fit(now=history.end)
        model = agent.models[("multiscale", "smd")]
        real = model.score_latest
        calls = {"n": 0}

        def failing_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a stand-in
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError(
                    "CUDA error: an illegal memory access was encountered\n"
                    "CUDA kernel errors might be asynchronously reported at some other API call"
                )
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "score_latest", failing_once)
        agent.device = torch.device("cuda")  # what the agent would believe on a GPU node
        with pytest.raises(CycleFailed, match="illegal memory access"):
            agent.infer(now=history.end)  # the only group failed: the cycle did
        assert agent.device.type == "cpu"
        assert model.detector.device.type == "cpu"
        assert next(model.detector.model_.parameters()).device.type == "cpu"
        assert _value(agent, "aiops_device_fallback", reason="device_error") == 1
        assert agent.infer(now=history.end)[0].error is None
    finally:
        agent.store.close()


def test_a_fleet_over_max_entities_is_capped_with_a_log_and_a_metric(
    history: History,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Four machines, ``max_entities: 2``: two are fitted and scored, the others are left out
    with a warning and counted in ``aiops_entities_over_limit``; /metrics does not grow."""
    config = make_config(history.prometheus.url, tmp_path)
    config.entities[0].max_entities = 2
    agent = Agent(config)
    try:
        agent.start_up()
        agent.fit(now=history.end)
        agent.infer(now=history.end)
        scored = {
            s.labels["instance"]
            for s in _samples(agent, "aiops_anomaly_score")
            if s.labels["detector"] == "fused"
        }
        assert len(scored) == 2
        over = _value(agent, "aiops_entities_over_limit", entity_group="smd")
        assert over is not None and over >= 1
        assert "over max_entities=2 were not read" in caplog.text
    finally:
        agent.store.close()


def test_one_detectors_failed_fit_leaves_the_others_fitted_and_is_retried(
    history: History,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mad's fit raises (first in the detector order): pca is still fitted and installed,
    mad's fit timestamp stays 0 (AiopsModelNotFitted can fire), and the retry is scheduled."""
    config = make_config(
        history.prometheus.url,
        tmp_path,
        detectors={"device": "cpu", "mad": {"window": 30}, "pca": {"enabled": True}},
    )
    agent = Agent(config)

    def exploding(self, windows):  # noqa: ANN001, ANN202 - the detector's signature
        raise RuntimeError("mad exploded")

    monkeypatch.setattr(RollingMadDetector, "fit", exploding)
    try:
        agent.start_up()
        summary = agent.fit(now=history.end)
        assert summary["smd"]["mad"] == {"error": "mad exploded"}
        assert "version" in summary["smd"]["pca"]
        assert ("pca", "smd") in agent.models and ("mad", "smd") not in agent.models
        assert agent.missing_models() == [("mad", "smd")]
        fitted = {
            s.labels["detector"]: s.value
            for s in _samples(agent, "aiops_model_last_fit_timestamp_seconds")
        }
        assert fitted["mad"] == 0 and fitted["pca"] > 0
        agent._schedule_fit_retry("mad exploded")
        assert agent.last_fit_error is not None and "next try in" in agent.last_fit_error
        monkeypatch.undo()
        agent.fit(now=history.end, groups={"smd"})
        assert agent.missing_models() == []
    finally:
        agent.store.close()
