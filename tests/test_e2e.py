"""End to end on real servers: SMD history in a real Prometheus, the agent as a separate process
(``aiops-plugin run``), the shipped alert rules, a real Alertmanager running the shipped
``examples/alertmanager.yml``, and a webhook receiver.

The rules are loaded from ``alert_rules/`` with their ``for:`` shortened to 0s, and Alertmanager's
group_wait / group_interval / repeat_interval are shortened and its webhook URLs pointed at the
test's receiver (the changes a test needs: it cannot wait minutes); everything else, the routing
tree and inhibit rules included, is the files as shipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.demo import DemoStack, new_stack, poll_until
from aiops_plugin.store import Store

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    stack = new_stack(tmp_path_factory.mktemp("e2e"), lead_rows=40)
    try:
        stack.start_servers()
        stack.start_agent(timeout=180)
        yield stack
    finally:
        print(stack.agent_log(30))
        stack.close()


def agent_metrics(stack: DemoStack) -> dict[str, list]:
    text = requests.get(f"{stack.agent_url}/metrics", timeout=5).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def source_up(stack: DemoStack, source: str) -> float | None:
    for sample in agent_metrics(stack).get("aiops_source_up", []):
        if sample.labels["source"] == source:
            return sample.value
    return None


def test_anomaly_alert_reaches_alertmanager_webhook_naming_the_entity(stack: DemoStack) -> None:
    assert stack.prometheus and stack.replay and stack.webhook
    stack.prometheus.wait_for(
        'up{job="aiops-plugin"} == 1', lambda result: bool(result) or None, timeout=60
    )
    stack.replay.start()
    anomaly = stack.anomaly_row
    # the score may jump straight above the severe level: then the shipped inhibition rule
    # delivers AiopsAnomalySevere (critical, paged) and silences the warning
    payload, received_at = stack.webhook.wait_for_alert(
        "AiopsAnomaly(Detected|Severe)", timeout=anomaly + 240, instance=stack.sample.machine
    )
    visible_at = stack.replay.row_started_at(anomaly)
    alert = next(
        a for a in payload["alerts"] if a["labels"]["alertname"].startswith("AiopsAnomaly")
    )
    expected = {
        "AiopsAnomalyDetected": ("warning", "aiops-anomaly"),
        "AiopsAnomalySevere": ("critical", "aiops-pager"),
    }[alert["labels"]["alertname"]]
    assert (alert["labels"]["severity"], payload["receiver"]) == expected  # the shipped routes
    assert alert["labels"]["entity"] == "machine-1-7"
    assert alert["labels"]["detector"] == "fused"
    assert "machine-1-7" in alert["annotations"]["summary"]
    assert alert["annotations"]["runbook"]
    # no anomaly alert before the labelled anomaly was served
    assert received_at >= visible_at
    series = stack.prometheus.query("aiops_anomaly_probability[10m]")
    scraped = [(float(t), float(v)) for t, v in series[0]["values"]]
    # the alert's threshold, read from the shipped rule
    first_above = min(t for t, v in scraped if v > 0.9 and t >= visible_at - 1.0)
    normal = [v for t, v in scraped if t < visible_at - 1.0]
    assert normal and max(normal) < 0.9  # the normal minutes before it were not anomalous
    print(
        f"\nanomalous sample served -> webhook notification: {received_at - visible_at:.1f} s "
        f"(detection: first anomaly probability > 0.9 scraped after "
        f"{first_above - visible_at:.1f} s; rules + Alertmanager delivery: "
        f"{received_at - first_above:.1f} s)"
    )


def test_agent_rides_out_a_prometheus_restart(stack: DemoStack) -> None:
    assert stack.prometheus
    stack.prometheus.stop()
    poll_until(lambda: True if source_up(stack, "prometheus") == 0.0 else None, 60, "source down")
    assert requests.get(f"{stack.agent_url}/healthz", timeout=5).status_code == 200
    stack.prometheus.start()

    def fresh_scores() -> set[str] | None:
        """The instances scored by a fresh successful cycle. The first cycles after the restart
        may skip the entity (its latest step not scraped yet: no_recent_data) and still
        succeed, so this waits for one that scored it."""
        if source_up(stack, "prometheus") != 1.0:
            return None
        metrics = agent_metrics(stack)
        (sample,) = metrics["aiops_cycle_last_success_timestamp_seconds"]
        scored = {s.labels["instance"] for s in metrics.get("aiops_anomaly_score", [])}
        return scored if time.time() - sample.value < 5 and scored else None

    scored = poll_until(fresh_scores, 60, "agent scoring again after Prometheus came back")
    assert scored == {"machine-1-7"}


def test_sigterm_stops_the_agent_cleanly(stack: DemoStack) -> None:
    assert stack.agent is not None
    assert stack.stop_agent(timeout=30) == 0
    assert "agent stopped cleanly" in stack.agent_log()
    store = Store.open(f"sqlite:///{Path(stack.workdir) / 'agent-data' / 'aiops.db'}")
    try:
        assert not [job for job in store.recent_jobs(limit=1000) if job["status"] == "running"]
        assert store.latest_model_version("mad", "smd") is not None
    finally:
        store.close()
