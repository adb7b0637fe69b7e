"""Logs end to end in the agent: real SDK -> /v1/logs -> store -> Drain3 -> MiniLM -> features ->
aiops_log_anomaly_score on /metrics; and the BGL evaluation on real loghub lines."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.agent import Agent, PhaseTimer
from aiops_plugin.api import HttpServer
from aiops_plugin.config import Config
from aiops_plugin.demo import free_port
from aiops_plugin.evaluation.logs_benchmark import run_log_benchmark
from aiops_plugin.windows import entity_key
from tests.serving import serving

DATA_ROOT = Path(__file__).parents[2] / "shared" / "data"
NORMAL = [
    "GET /api/cart/{} 200 in {} ms",
    "user {} logged in from web",
    "cache hit for product {}",
]


def make_config(tmp_path: Path, port: int) -> Config:
    return Config.model_validate(
        {
            "prometheus": {"step": "1s"},
            "entities": [{"name": "svc", "labels": ["service"], "queries": {"up": "up"}}],
            "schedule": {"fit_window": "1h"},
            "store": {"data_dir": str(tmp_path / "data")},
            "server": {"host": "127.0.0.1", "port": port},
            "logs": {
                "enabled": True,
                "entities": [{"group": "svc", "label": "service", "attribute": "service.name"}],
                "embedder": {"device": "cpu"},
            },
        }
    )


def send(
    url: str,
    service: str,
    lines: list[tuple[str, SeverityNumber]],
    at: float,
    spacing: float = 1.0,
) -> None:
    """Lines ``spacing`` seconds apart from ``at`` (record time), through the real SDK."""
    provider = LoggerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPLogExporter(endpoint=f"{url}/v1/logs", compression=Compression.Gzip)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=50))
    logger = provider.get_logger("test")
    for i, (body, severity) in enumerate(lines):
        logger.emit(
            timestamp=int((at + i * spacing) * 1e9),
            body=body,
            severity_number=severity,
            severity_text=severity.name,
        )
    assert provider.force_flush(10_000)
    provider.shutdown()


def normal_lines(n: int, offset: int = 0) -> list[tuple[str, SeverityNumber]]:
    return [
        (NORMAL[i % len(NORMAL)].format(i + offset, (7 * i) % 90), SeverityNumber.INFO)
        for i in range(n)
    ]


def metric_samples(url: str, name: str) -> list:
    text = requests.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if name in (family.name, f"{family.name}_total"):
            return family.samples
    return []


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Agent, str]]:
    port = free_port()
    agent = Agent(make_config(tmp_path, port))
    agent.start_up()
    agent.open_log_intake()
    with serving(agent, port) as url:
        yield agent, url


def test_logs_from_the_sdk_become_a_log_anomaly_score(running: tuple[Agent, str]) -> None:
    agent, url = running
    assert agent.logs is not None
    history_end = time.time() - 30
    send(url, "checkout", normal_lines(600), at=history_end - 700)
    send(url, "search", normal_lines(300, offset=1000), at=history_end - 400)
    model = agent.logs.fit("svc", history_end - 3600, history_end)
    assert model is not None and len(model.entity_keys) == 2

    now = time.time()
    send(url, "checkout", normal_lines(3, offset=5000), at=now - 3)
    send(
        url,
        "search",
        [("kernel panic: unable to mount root fs on unknown-block(0,0)", SeverityNumber.FATAL)],
        at=now - 2,
    )
    detail = agent._infer_logs(now, PhaseTimer())
    assert detail == {"svc": 2}
    scores = {s.labels["service"]: s.value for s in metric_samples(url, "aiops_log_anomaly_score")}
    assert set(scores) == {"checkout", "search"}
    assert scores["search"] > 1.0 > scores["checkout"]
    # the log p-values the fused score takes in: the panic is rarer than the alarm rate
    keys = [entity_key({"service": "checkout"}), entity_key({"service": "search"})]
    p = agent.logs.p_values("svc", keys + [entity_key({"service": "no-logs"})])
    rate = agent.config.calibration.false_alarm_rate
    assert p is not None and p[1] < rate < p[0]
    assert np.isnan(p[2])  # an entity without logs has no log evidence, not a fake one
    sample = metric_samples(url, "aiops_log_anomaly_score")[0]
    assert {"entity", "entity_group"} <= set(sample.labels)


def test_each_template_is_embedded_once(running: tuple[Agent, str]) -> None:
    agent, url = running
    assert agent.logs is not None
    send(url, "checkout", normal_lines(300), at=time.time() - 10)
    agent.logs.process_pending()
    embedded = metric_samples(url, "aiops_log_templates_embedded_total")[0].value
    mined = metric_samples(url, "aiops_log_lines_mined_total")[0].value
    assert mined == 300 and 0 < embedded <= len(NORMAL) + 2
    send(url, "checkout", normal_lines(300, offset=300), at=time.time() - 5)
    agent.logs.process_pending()
    assert metric_samples(url, "aiops_log_lines_mined_total")[0].value == 600
    assert metric_samples(url, "aiops_log_templates_embedded_total")[0].value == embedded


def test_restarted_agent_keeps_template_ids_and_log_model(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(tmp_path, port)
    agent = Agent(config)
    agent.start_up()
    agent.open_log_intake()
    server = HttpServer(agent, "127.0.0.1", port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        send(url, "checkout", normal_lines(200), at=time.time() - 100)
        assert agent.logs is not None
        model = agent.logs.fit("svc", time.time() - 3600, time.time())
        assert model is not None
        texts = agent.logs.miner.template_texts()
    finally:
        server.stop()
        assert agent.log_intake is not None
        agent.log_intake.close()
        agent.store.close()
    restarted = Agent(config)
    restarted.start_up()
    assert restarted.logs is not None
    assert "svc" in restarted.logs.models
    assert restarted.logs.miner.template_texts() == texts
    restarted.store.close()


def test_bgl_evaluation_runs_through_the_receiver() -> None:
    if not (DATA_ROOT / "loghub" / "BGL").is_dir():
        pytest.fail(f"{DATA_ROOT}/loghub/BGL not found: needs ../shared/data beside the repo")
    result = run_log_benchmark(DATA_ROOT, command="test")
    assert result.lines == 2000 and result.test_alerts > 0
    assert result.embedded == result.templates
    assert result.cache_hit_rate == pytest.approx(1 - result.templates / 2000)
    for _, values in result.rows:
        assert 0.0 <= values["auc_pr"] <= 1.0 and 0.0 <= values["auc_roc"] <= 1.0


def test_mining_runs_off_the_cycle_and_a_lagging_backlog_withholds_the_log_score(
    running: tuple[Agent, str],
) -> None:
    """With the mining job on, a cycle does not mine: records that wait longer than a step
    make the log score absent (not a low number from an incomplete window), the fused score
    takes no log evidence, and the backlog gauges say why; the mining job clears it."""
    agent, url = running
    assert agent.logs is not None
    history_end = time.time() - 30
    send(url, "checkout", normal_lines(600), at=history_end - 700)
    assert agent.logs.fit("svc", history_end - 3600, history_end) is not None
    now = time.time()
    assert agent._infer_logs(now, PhaseTimer()) == {"svc": 1}
    assert metric_samples(url, "aiops_log_anomaly_score")

    agent._background_mining = True  # as start_scheduler sets it
    send(url, "search", normal_lines(50, offset=9000), at=now - 1)
    # the records were accepted over a step ago (step 1s here) and none is mined yet
    time.sleep(1.5)
    detail = agent._infer_logs(time.time(), PhaseTimer())
    assert detail["svc"].startswith("stale: records wait to be mined")
    assert metric_samples(url, "aiops_log_anomaly_score") == []
    assert agent.logs.p_values("svc", [entity_key({"service": "checkout"})]) is None
    assert metric_samples(url, "aiops_log_mining_backlog_records")[0].value == 50
    assert metric_samples(url, "aiops_log_mining_lag_seconds")[0].value > 1.0

    agent._log_mining_job()
    assert metric_samples(url, "aiops_log_mining_backlog_records")[0].value == 0
    assert metric_samples(url, "aiops_log_mining_lag_seconds")[0].value == 0
    assert agent._infer_logs(time.time(), PhaseTimer()) == {"svc": 2}
    assert len(metric_samples(url, "aiops_log_anomaly_score")) == 2
