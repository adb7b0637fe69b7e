"""The shipped alert rules against what the agent really exports.

Two checks that a hand-written promtool series cannot make on its own:

1. A real Prometheus scrapes a real agent that cannot fit (its Prometheus source is down) and
   evaluates the shipped rules (``for:`` shortened): the health alerts fire from the series the
   exporter emits, including ``AiopsModelNotFitted``, which waits for a 0 the exporter must
   really publish for every configured (group, detector).
2. Every ``aiops_*`` input series of the promtool unit tests has a label set the exporter
   really emits (same label names beyond the entity's own; detectors, sources and phases that
   exist, horizons it exports), checked against the ``/metrics`` of a fitted agent and of one
   that cannot fit; among them the anomaly alerts' ``aiops_anomaly_probability``, the early
   warning's ``aiops_early_warning_score`` and ``aiops_early_warning_probability`` (its
   description quotes it) and the ``aiops_metric_contribution`` their
   ``top_metrics`` annotation queries.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.agent import Agent
from aiops_plugin.alerting import load_rules_with_for
from aiops_plugin.api import HttpServer
from aiops_plugin.config import DETECTOR_NAMES, Config
from aiops_plugin.demo.polling import poll_until
from aiops_plugin.demo.ports import free_port
from aiops_plugin.demo.processes import PrometheusServer, ScrapeJob
from tests.test_agent import History, history, make_config  # noqa: F401 - fixture
from tests.test_dashboards import SCENE_DETECTORS

REPO_ROOT = Path(__file__).parents[1]
RULES = REPO_ROOT / "alert_rules" / "aiops-plugin.rules.yml"
RULE_TESTS = REPO_ROOT / "alert_rules" / "tests" / "aiops-plugin.rules.test.yml"
#: Labels Prometheus attaches to every scraped series of the agent's target.
TARGET_LABELS = {"job", "instance"}


def _unreachable_config(tmp_path: Path) -> Config:
    """Two groups and two detectors against a Prometheus that is not there."""
    query = {"cpu": "sum by (instance) (rate(node_cpu_seconds_total[5m]))"}
    return Config.model_validate(
        {
            "prometheus": {
                "url": f"http://127.0.0.1:{free_port()}",
                "timeout": "1s",
                "retries": 0,
                "backoff": "0.1s",
            },
            "entities": [
                {"name": "hosts", "labels": ["instance"], "queries": query},
                {"name": "pods", "labels": ["namespace", "pod"], "queries": query},
            ],
            "detectors": {"device": "cpu", "pca": {"enabled": True}},
            "schedule": {"fit_retry_backoff": "1h"},
            "store": {"data_dir": str(tmp_path / "data")},
            "server": {"host": "127.0.0.1", "port": free_port()},
        }
    )


@pytest.fixture
def unfitted_agent(tmp_path: Path) -> Iterator[Agent]:
    agent = Agent(_unreachable_config(tmp_path))
    agent.start_up()
    agent._fit_job()
    agent._infer_job()
    yield agent
    agent.store.close()


def _families(agent: Agent) -> dict[str, list]:
    text = generate_latest(agent.exporter.registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_health_alerts_fire_on_what_an_agent_that_cannot_fit_exports(
    unfitted_agent: Agent, tmp_path: Path
) -> None:
    server = HttpServer.for_agent(unfitted_agent)
    server.start()
    rules = tmp_path / "rules.yml"
    rules.write_text(load_rules_with_for(RULES, "1s"), encoding="utf-8")
    target = f"127.0.0.1:{unfitted_agent.config.server.port}"
    try:
        with PrometheusServer(
            workdir=tmp_path / "prometheus",
            scrape_jobs=[ScrapeJob("aiops-plugin", [target], honor_labels=True)],
            rule_files=[rules],
        ) as prometheus:
            prometheus.start()

            def firing() -> dict[str, list[dict]] | None:
                alerts: dict[str, list[dict]] = {}
                for series in prometheus.query('ALERTS{alertstate="firing"}'):
                    alerts.setdefault(series["metric"]["alertname"], []).append(series["metric"])
                wanted = {"AiopsModelNotFitted", "AiopsSourceDown", "AiopsScoresNeverProduced"}
                not_fitted = alerts.get("AiopsModelNotFitted", [])
                return alerts if wanted <= set(alerts) and len(not_fitted) == 4 else None

            alerts = poll_until(firing, 60, "the health alerts of an agent that cannot fit")
    finally:
        server.stop()
    not_fitted = {(a["entity_group"], a["detector"]) for a in alerts["AiopsModelNotFitted"]}
    assert not_fitted == {(g, d) for g in ("hosts", "pods") for d in ("mad", "pca")}
    assert {a["source"] for a in alerts["AiopsSourceDown"]} == {"prometheus"}
    assert all(a["instance"] == target for a in alerts["AiopsScoresNeverProduced"])
    assert "AiopsModelFitStale" not in alerts


_SERIES = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\}$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _promtool_input_series() -> list[tuple[str, dict[str, str]]]:
    document = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    found = []
    for test in document["tests"]:
        for item in test.get("input_series", []):
            match = _SERIES.match(item["series"].strip())
            assert match, f"cannot parse input series {item['series']!r}"
            found.append((match["name"], dict(_LABEL.findall(match["labels"]))))
    return found


def test_promtool_input_series_have_the_label_sets_the_exporter_emits(
    unfitted_agent: Agent,
    history: History,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    fitted = Agent(
        make_config(
            history.prometheus.url,
            tmp_path,
            detectors={
                "device": "cpu",
                "mad": {"window": 30},
                "pca": {"enabled": True},
                # a deep detector, tiny, for the series only deep fits have (training windows)
                "multiscale": SCENE_DETECTORS["multiscale"],
            },
        )
    )
    try:
        fitted.start_up()
        fitted.fit(now=history.end)
        # the early warning's trend needs a few cycles of fused scores before it says anything
        for back in (4.0, 2.0, 0.0):
            fitted.infer(now=history.end - back)
        emitted: dict[str, list] = {}
        for agent in (fitted, unfitted_agent):
            for name, samples in _families(agent).items():
                emitted.setdefault(name, []).extend(samples)
        entity_label_names = {"instance", "namespace", "pod"}
        known_values = {
            "detector": set(DETECTOR_NAMES) | {"fused", "logs"},
            "source": {s.labels["source"] for s in emitted["aiops_source_up"]},
            "horizon": {
                s.labels["horizon"]
                for samples in emitted.values()
                for s in samples
                if "horizon" in s.labels
            },
        }
        checked: list[str] = []
        for name, labels in _promtool_input_series():
            if not name.startswith("aiops_"):
                continue
            assert name in emitted, f"{name}: the exporter emits no such metric"
            shapes = {frozenset(sample.labels) - entity_label_names for sample in emitted[name]}
            shape = frozenset(labels) - TARGET_LABELS - entity_label_names
            assert shape in shapes, (
                f"{name}{labels}: label names {sorted(shape)} are not what the exporter emits "
                f"({[sorted(s) for s in shapes]})"
            )
            for label, allowed in known_values.items():
                if label in labels:
                    assert labels[label] in allowed, f"{name}: no {label} {labels[label]!r}"
            checked.append(name)
        assert len(checked) >= 10
        assert {
            "aiops_anomaly_probability",
            "aiops_anomaly_score",
            "aiops_early_warning_probability",
            "aiops_early_warning_score",
            "aiops_metric_contribution",
        } <= set(checked)
    finally:
        fitted.store.close()
