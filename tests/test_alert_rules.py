"""The shipped alert rules: valid for Prometheus, covered by promtool unit tests, and complete.

promtool is required: without it these tests fail (they do not skip), because an untested rule
file is exactly what they exist to prevent.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from aiops_plugin.alerting import RuleFileError, load_rules_with_for
from aiops_plugin.anomaly_api import ANOMALIES_PARAMETERS, ANOMALIES_PATH
from aiops_plugin.config import CalibrationConfig
from aiops_plugin.exporter import horizon_label

REPO_ROOT = Path(__file__).parents[1]
RULES = REPO_ROOT / "alert_rules" / "aiops-plugin.rules.yml"
RULE_TESTS = REPO_ROOT / "alert_rules" / "tests" / "aiops-plugin.rules.test.yml"
PROMTOOL_TIMEOUT_S = 120
SEVERITIES = {"warning", "critical"}
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook")


def _alert_rules(path: Path) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH: install Prometheus' tools "
            "(apt-get install prometheus) to check and unit-test alert_rules/"
        )
    return path


def _run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def _assert_promtool_succeeded(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def test_rule_file_passes_promtool_check(promtool: str) -> None:
    _assert_promtool_succeeded(
        _run_promtool(promtool, "check", "rules", str(RULES.relative_to(REPO_ROOT)))
    )


def test_promtool_unit_tests_pass(promtool: str) -> None:
    _assert_promtool_succeeded(
        _run_promtool(promtool, "test", "rules", str(RULE_TESTS.relative_to(REPO_ROOT)))
    )


@pytest.mark.parametrize("rule", _alert_rules(RULES), ids=lambda rule: rule["alert"])
def test_every_alert_has_severity_and_what_to_do(rule: dict[str, Any]) -> None:
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    missing = [name for name in REQUIRED_ANNOTATIONS if not annotations.get(name, "").strip()]
    assert not missing, f"{rule['alert']} lacks annotations {missing}"


def _anomaly_rules() -> list[dict[str, Any]]:
    return [rule for rule in _alert_rules(RULES) if rule["alert"].startswith("AiopsAnomaly")]


def test_anomaly_alerts_read_the_probability_and_carry_detector_fused() -> None:
    """The probability has no ``detector`` label; the routes and inhibitions that expect
    ``detector="fused"`` get it from the rule."""
    rules = {rule["alert"]: rule for rule in _anomaly_rules()}
    assert set(rules) == {"AiopsAnomalyDetected", "AiopsAnomalySevere"}
    for rule in rules.values():
        assert rule["expr"].startswith("aiops_anomaly_probability >"), rule["alert"]
        assert rule["labels"]["detector"] == "fused"


def _entity_rules() -> list[dict[str, Any]]:
    """The alerts about one entity: the anomaly alerts and the early warning."""
    return [*_anomaly_rules(), _rule("AiopsEarlyWarning")]


def _rule(name: str) -> dict[str, Any]:
    (rule,) = [rule for rule in _alert_rules(RULES) if rule["alert"] == name]
    return rule


_EARLY_WARNING = re.compile(
    r'^aiops_early_warning_score\{horizon="(?P<horizon>\w+)"\} >= (?P<threshold>[0-9.]+)\n'
    r"unless on\(entity_group, entity\) aiops_anomaly_probability > (?P<anomalous>[0-9.]+)$"
)


def test_early_warning_watches_a_default_horizon_and_not_what_is_already_anomalous() -> None:
    """A warning is for what has not happened yet: it stops where AiopsAnomalyDetected's
    threshold is crossed, and its horizon is one the agent exports by default."""
    match = _EARLY_WARNING.match(_rule("AiopsEarlyWarning")["expr"].strip())
    assert match, _rule("AiopsEarlyWarning")["expr"]
    defaults = {horizon_label(seconds) for seconds in CalibrationConfig().horizons}
    assert match["horizon"] in defaults
    assert float(match["threshold"]) == 1.0  # the score's own threshold, as the anomaly score's
    detected = _rule("AiopsAnomalyDetected")["expr"]
    assert detected == f"aiops_anomaly_probability > {match['anomalous']}"


def test_entity_alerts_link_to_the_entity_dashboard() -> None:
    for rule in _entity_rules():
        dashboard = rule["annotations"].get("dashboard", "")
        assert dashboard.startswith("/d/aiops-entity/aiops-entity?var-entity="), rule["alert"]


def test_entity_alerts_name_the_top_metrics_and_link_the_entity_events() -> None:
    """``top_metrics`` queries the entity's contributions when the annotation is rendered (the
    promtool tests check the text); ``events`` asks the agent's anomaly API only what it knows,
    and the anomaly alerts ask for the open event."""
    for rule in _entity_rules():
        annotations = rule["annotations"]
        assert "aiops_metric_contribution{entity_group=%q, entity=%q}" in annotations["top_metrics"]
        assert "| query }}" in annotations["top_metrics"]
        link = urlsplit(annotations["events"])
        assert link.path == ANOMALIES_PATH, rule["alert"]
        params = parse_qs(link.query)
        assert set(params) <= set(ANOMALIES_PARAMETERS), rule["alert"]
        assert params["group"] == ["{{ $labels.entity_group | urlquery }}"]
        assert params["entity"] == ["{{ $labels.entity | urlquery }}"]
        expected_state = ["open"] if rule["alert"].startswith("AiopsAnomaly") else None
        assert params.get("state") == expected_state, rule["alert"]


def test_every_alert_has_a_promtool_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    untested = {rule["alert"] for rule in _alert_rules(RULES)} - tested
    assert not untested, f"alerts never seen firing in {RULE_TESTS.name}: {sorted(untested)}"


def test_load_rules_with_for_shortens_every_for_and_passes_promtool_check(
    promtool: str, tmp_path: Path
) -> None:
    shortened = tmp_path / "aiops-plugin.rules.yml"
    shortened.write_text(load_rules_with_for(RULES, "5s"), encoding="utf-8")

    rules = _alert_rules(shortened)
    assert len(rules) == len(_alert_rules(RULES))
    assert all(rule["for"] == "5s" for rule in rules)
    _assert_promtool_succeeded(_run_promtool(promtool, "check", "rules", str(shortened)))


def test_load_rules_with_for_changes_nothing_but_for() -> None:
    original = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    rewritten = yaml.safe_load(load_rules_with_for(RULES, "1s"))

    expected = copy.deepcopy(original)
    for group in expected["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    assert rewritten == expected


@pytest.mark.parametrize("duration", ["", "5", "1.5s", "5 s", "30s1m", "fast"])
def test_load_rules_with_for_rejects_a_malformed_duration(duration: str) -> None:
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        load_rules_with_for(RULES, duration)


def test_load_rules_with_for_rejects_a_file_that_is_not_a_rule_file(tmp_path: Path) -> None:
    not_rules = tmp_path / "dashboard.yml"
    not_rules.write_text("panels: []\n", encoding="utf-8")
    with pytest.raises(RuleFileError, match="dashboard.yml"):
        load_rules_with_for(not_rules, "5s")
