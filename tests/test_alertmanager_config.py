"""The shipped Alertmanager configuration (examples/alertmanager.yml): valid for amtool, routes
every product alert where its comments say, and inhibits what they say, on a real Alertmanager.

amtool and Alertmanager are required (Debian's prometheus-alertmanager): these tests fail rather
than skip without them, like the promtool tests of alert_rules/.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiops_plugin.demo import AlertmanagerServer, WebhookReceiver, poll_until

REPO_ROOT = Path(__file__).parents[1]
CONFIG = REPO_ROOT / "examples" / "alertmanager.yml"
RULES = REPO_ROOT / "alert_rules" / "aiops-plugin.rules.yml"
AMTOOL_TIMEOUT_S = 60
ANOMALY_ALERTS = ("AiopsAnomalyDetected", "AiopsAnomalySevere")
TIMING_FIELDS = ("group_wait", "group_interval", "repeat_interval")


@pytest.fixture(scope="module")
def amtool() -> str:
    path = shutil.which("amtool")
    if path is None:
        pytest.fail(
            "amtool not found on PATH: install Alertmanager's tools "
            "(apt-get install prometheus-alertmanager) to check examples/alertmanager.yml"
        )
    return path


def _run_amtool(amtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [amtool, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=AMTOOL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result


def _receivers_for(amtool: str, labels: dict[str, str]) -> list[str]:
    """Receivers the shipped routing tree sends an alert with ``labels`` to, in tree order."""
    pairs = [f"{name}={value}" for name, value in labels.items()]
    output = _run_amtool(
        amtool, "config", "routes", "test", f"--config.file={CONFIG}", *pairs
    ).stdout
    return [name for line in output.splitlines() for name in line.split(",") if name.strip()]


def _shipped() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_shipped_config_passes_amtool_check_config(amtool: str) -> None:
    output = _run_amtool(amtool, "check-config", str(CONFIG.relative_to(REPO_ROOT))).stdout
    assert "SUCCESS" in output


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (
            {"alertname": "AiopsAnomalyDetected", "severity": "warning", "entity_group": "smd"},
            "aiops-anomaly",
        ),
        (
            {"alertname": "AiopsAnomalyDetected", "severity": "warning", "entity_group": "node"},
            "aiops-infra",
        ),
        (
            {"alertname": "AiopsAnomalySevere", "severity": "critical", "entity_group": "node"},
            "aiops-pager",
        ),
        (
            {"alertname": "AiopsAnomalySevere", "severity": "critical", "entity_group": "pods"},
            "aiops-pager",
        ),
        (
            {"alertname": "AiopsEarlyWarning", "severity": "warning", "entity_group": "pods"},
            "aiops-anomaly",
        ),
        (
            {"alertname": "AiopsEarlyWarning", "severity": "warning", "entity_group": "node"},
            "aiops-infra",
        ),
        (
            {"alertname": "AiopsSourceDown", "severity": "warning", "source": "prometheus"},
            "aiops-agent-health",
        ),
        ({"alertname": "AiopsAgentDown", "severity": "critical"}, "aiops-pager"),
        ({"alertname": "NodeFilesystemAlmostFull", "severity": "warning"}, "default"),
    ],
    ids=lambda value: "-".join(value.values()) if isinstance(value, dict) else value,
)
def test_alert_routes_to_receiver_by_severity_and_entity_labels(
    amtool: str, labels: dict[str, str], receiver: str
) -> None:
    assert _receivers_for(amtool, labels) == [receiver]


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_every_shipped_alert_reaches_an_aiops_receiver(amtool: str, rule: dict[str, Any]) -> None:
    labels = {"alertname": rule["alert"], **rule.get("labels", {})}
    (receiver,) = _receivers_for(amtool, labels)
    assert receiver.startswith("aiops-"), f"{rule['alert']} falls through to {receiver!r}"
    expected = "aiops-pager" if labels["severity"] == "critical" else None
    assert expected is None or receiver == expected


def test_anomaly_alerts_are_grouped_per_entity() -> None:
    (anomaly_route,) = [
        route
        for route in _shipped()["route"]["routes"]
        if "AiopsAnomaly" in " ".join(route.get("matchers", []))
    ]
    assert anomaly_route["group_by"] == ["alertname", "entity_group", "entity"]


def test_inhibit_rules_silence_the_anomaly_alerts_an_agent_alert_makes_meaningless() -> None:
    rules = {
        (tuple(rule["source_matchers"]), tuple(rule["target_matchers"]), tuple(rule["equal"]))
        for rule in _shipped()["inhibit_rules"]
    }
    anomalies = ('alertname=~"AiopsAnomaly(Detected|Severe)|AiopsEarlyWarning"',)
    assert rules == {
        (('alertname="AiopsAnomalySevere"',), ('alertname="AiopsAnomalyDetected"',),
         ("entity_group", "entity")),
        (('alertname="AiopsSourceDown"', 'source="prometheus"'), anomalies, ("job",)),
        (('alertname="AiopsScoresStale"',), anomalies, ("job",)),
        (('alertname="AiopsAgentDown"',), anomalies, ("job",)),
    }  # fmt: skip
    alert_names = {rule["alert"] for rule in _alert_rules()}
    assert {"AiopsSourceDown", "AiopsScoresStale", "AiopsAgentDown", *ANOMALY_ALERTS} <= alert_names


def test_test_stack_changes_only_webhook_urls_and_timings(tmp_path: Path) -> None:
    server = AlertmanagerServer(
        webhook_url="http://127.0.0.1:1/hook", workdir=tmp_path, config_file=CONFIG
    )
    used = server.config()
    expected = copy.deepcopy(_shipped())
    for receiver in expected["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = "http://127.0.0.1:1/hook"

    def strip_timings(route: dict[str, Any]) -> None:
        for field in TIMING_FIELDS:
            route.pop(field, None)
        for child in route.get("routes", []):
            strip_timings(child)

    assert used["route"]["group_wait"] == "1s"
    for document in (used, expected):
        strip_timings(document["route"])
    assert used == expected


# --------------------------------------------------------------------------------------------
# A real Alertmanager running the shipped file


@pytest.fixture(scope="module")
def alertmanager(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[AlertmanagerServer, WebhookReceiver]]:
    with WebhookReceiver() as webhook:
        server = AlertmanagerServer(
            webhook_url=webhook.url,
            workdir=tmp_path_factory.mktemp("alertmanager"),
            config_file=CONFIG,
        )
        with server:
            yield server, webhook


def _alert(alertname: str, severity: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": alertname, "severity": severity, **labels}}


def _anomaly(job: str, entity: str) -> dict[str, Any]:
    return _alert(
        "AiopsAnomalyDetected",
        "warning",
        job=job,
        instance=entity,
        entity=entity,
        entity_group="smd",
        detector="fused",
    )


def _inhibited_by(server: AlertmanagerServer, alertname: str, entity: str) -> list[str] | None:
    """Fingerprints of the alerts inhibiting this one; None while it is not inhibited."""
    for alert in server.alerts():
        labels = alert["labels"]
        if labels["alertname"] == alertname and labels.get("entity") == entity:
            return list(alert["status"]["inhibitedBy"]) or None
    return None


def test_source_down_inhibits_the_same_agents_anomaly_alerts_only(
    alertmanager: tuple[AlertmanagerServer, WebhookReceiver],
) -> None:
    server, webhook = alertmanager
    server.post_alerts(
        [
            _alert(
                "AiopsSourceDown",
                "warning",
                job="aiops-plugin",
                instance="10.0.0.7:9108",
                source="prometheus",
            ),
            _anomaly("aiops-plugin", "machine-1-1"),
            _anomaly("aiops-plugin-shard-2", "machine-2-1"),
        ]
    )

    assert poll_until(
        lambda: _inhibited_by(server, "AiopsAnomalyDetected", "machine-1-1"),
        15,
        "inhibited anomaly",
    )
    payload, _ = webhook.wait_for_alert("AiopsAnomalyDetected", timeout=15, entity="machine-2-1")
    assert payload["receiver"] == "aiops-anomaly"
    payload, _ = webhook.wait_for_alert("AiopsSourceDown", timeout=15)
    assert payload["receiver"] == "aiops-agent-health"
    assert _inhibited_by(server, "AiopsAnomalyDetected", "machine-2-1") is None
    delivered = {
        alert["labels"].get("entity") for payload in webhook.payloads for alert in payload["alerts"]
    }
    assert "machine-1-1" not in delivered


def test_severe_anomaly_pages_and_inhibits_the_warning_for_the_same_entity(
    alertmanager: tuple[AlertmanagerServer, WebhookReceiver],
) -> None:
    server, webhook = alertmanager
    # another agent's job: the source-down alert of the test above still fires for its own
    severe = _anomaly("aiops-plugin-shard-3", "machine-3-1")
    severe["labels"].update(alertname="AiopsAnomalySevere", severity="critical")
    server.post_alerts([severe, _anomaly("aiops-plugin-shard-3", "machine-3-1")])

    payload, _ = webhook.wait_for_alert("AiopsAnomalySevere", timeout=15, entity="machine-3-1")
    assert payload["receiver"] == "aiops-pager"
    assert poll_until(
        lambda: _inhibited_by(server, "AiopsAnomalyDetected", "machine-3-1"),
        15,
        "inhibited warning",
    )
