"""The fused score takes in the log score where an entity has logs, and only there.

Real parts: the SMD history in a real Prometheus (the agent tests' fixture), logs sent by the
OpenTelemetry SDK exporter to the agent's own OTLP receiver, the real MiniLM embedder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry._logs import SeverityNumber

from aiops_plugin.agent import FUSED, Agent
from aiops_plugin.calibration import score_from_p
from aiops_plugin.demo import free_port
from tests.serving import serving
from tests.test_agent import QUERY, History, exported, history, make_config  # noqa: F401 - fixture
from tests.test_log_pipeline import normal_lines, send

NOISY = "machine-1-7-shifted"
#: The log side of the agent: the "smd" group's entities are the OTLP services of that name.
LOGS = {
    "enabled": True,
    "entities": [{"group": "smd", "label": "instance", "attribute": "service.name"}],
    "embedder": {"device": "cpu"},
}


@pytest.fixture
def agent_with_logs(history: History, tmp_path: Path) -> Iterator[tuple[Agent, str]]:  # noqa: F811
    port = free_port()
    config = make_config(
        history.prometheus.url,
        tmp_path,
        server={"host": "127.0.0.1", "port": port},
        logs=LOGS,
    )
    agent = Agent(config)
    agent.start_up()
    agent.open_log_intake()
    with serving(agent, port) as url:
        yield agent, url


def test_a_log_burst_raises_only_its_entitys_fused_score(
    agent_with_logs: tuple[Agent, str],
    history: History,  # noqa: F811
) -> None:
    agent, url = agent_with_logs
    end = history.end  # the cycles below are scored at the end of the recorded history
    # normal logs over the fit window for two entities; "holey" sends none
    for instance in ("machine-1-7", NOISY):
        send(url, instance, normal_lines(600), at=end - 2000, spacing=3.0)
    agent.fit(now=end)
    send(url, "machine-1-7", normal_lines(3, offset=5000), at=end - 3)
    panic = "kernel panic: unable to mount root fs on unknown-block(0,0)"
    send(url, NOISY, [(panic, SeverityNumber.FATAL)], at=end - 2)
    # the log side is scored first in a cycle, so this cycle's fused score takes it in
    (result,) = agent.infer(now=end)
    keys = {labels["instance"]: i for i, labels in enumerate(result.entities)}
    log_p = agent.logs.p_values("smd", [json_key(labels) for labels in result.entities])
    assert log_p is not None
    assert log_p[keys[NOISY]] < agent.config.calibration.false_alarm_rate
    assert np.isnan(log_p[keys["holey"]])  # no logs: no log evidence, not a fake one
    fused = result.scores[FUSED]
    metrics_only = metric_fused_scores(agent, result)
    assert fused[keys[NOISY]] > max(1.0, metrics_only[keys[NOISY]])
    assert fused[keys["holey"]] == pytest.approx(metrics_only[keys["holey"]], rel=1e-6)
    # the anomaly event of the noisy entity keeps the log template that made it
    (event,) = [
        e for e in agent.store.open_anomaly_events("smd") if e.entity_labels["instance"] == NOISY
    ]
    top = event.log_templates[0]
    assert "kernel panic" in top["template"] and top["count"] == 1 and top["score"] > 0


def json_key(labels: dict[str, str]) -> str:
    from aiops_plugin.windows import entity_key

    return entity_key(labels)


def metric_fused_scores(agent: Agent, result) -> np.ndarray:  # noqa: ANN001
    """The fused score the same cycle would have had from the metric detectors alone."""
    buffer = agent.buffers["smd"]
    keys = [json_key(labels) for labels in result.entities]
    index = [buffer.keys.index(key) for key in keys]
    windows = buffer.select_entities(index)
    raw = {
        name: model.score(windows.tail(model.detector.context_steps + 1)).score[:, -1:]
        for (name, group), model in agent.models.items()
        if group == "smd"
    }
    p = agent.calibrations["smd"].p_values(raw, keys)[FUSED][:, 0]
    return score_from_p(p, agent.config.calibration.false_alarm_rate)


TINY_FUSION = {
    "enabled": True,
    "window": 16,
    "channels": 8,
    "lstm_hidden": 8,
    "heads": 2,
    "rff_features": 32,
    "mc_samples": 4,
    "epochs": 1,
    "max_train_windows": 300,
}


def test_the_fusion_detector_reads_the_logs_of_entities_that_have_them(
    history: History,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The log model is fitted before the detectors, the fusion detector trains on the joined
    metric + log grid, and each cycle says which entities it scored with their logs."""
    port = free_port()
    config = make_config(
        history.prometheus.url,
        tmp_path,
        server={"host": "127.0.0.1", "port": port},
        detectors={"device": "cpu", "mad": {"window": 30}, "fusion": TINY_FUSION},
        logs=LOGS,
    )
    agent = Agent(config)
    agent.start_up()
    agent.open_log_intake()
    end = history.end
    with serving(agent, port) as url:
        for instance in ("machine-1-7", NOISY):
            send(url, instance, normal_lines(600), at=end - 2000, spacing=3.0)
        summary = agent.fit(now=end)
        assert summary["smd"]["logs"]["entities"] == 2
        detector = agent.models[("fusion", "smd")].detector
        assert detector.log_features_, "the fusion model trained with log inputs"
        assert any(name.startswith("log_embedding_") for name in detector.log_features_)
        send(url, NOISY, [("kernel panic: unable to mount root fs", SeverityNumber.FATAL)], at=end)
        (result,) = agent.infer(now=end)
    assert result.scores["fusion"].shape == (3,) and np.isfinite(result.scores["fusion"]).all()
    samples = exported(agent)["aiops_detector_entities"]
    counts = {s.labels["inputs"]: s.value for s in samples if s.labels["detector"] == "fusion"}
    assert counts == {"metrics+logs": 2.0, "metrics": 1.0}  # "holey" sent no logs
    agent.store.close()
