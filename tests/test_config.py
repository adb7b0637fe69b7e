"""Configuration: valid files load, bad ones name the file and the field, secrets from env."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from aiops_plugin.config import (
    Config,
    ConfigError,
    EntityGroupConfig,
    SuppressionRule,
    load_config,
    parse_duration,
)

EXAMPLES = Path(__file__).parents[1] / "examples"

MINIMAL = """
prometheus: {url: "http://127.0.0.1:9090", step: 30s}
entities:
  - name: node
    labels: [instance]
    queries: {cpu: 'rate(node_cpu_seconds_total[5m])'}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aiops.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(example: Path) -> None:
    config = load_config(example)
    assert config.entities


def test_durations_are_seconds(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.prometheus.step == 30.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("2h") == 7200.0
    assert parse_duration(15) == 15.0


def test_unknown_field_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "schedule: {infer_evry: 1m}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert "schedule.infer_evry" in str(error.value)


def test_bad_duration_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("step: 30s", "step: soon"))
    with pytest.raises(ConfigError, match=r"prometheus\.step"):
        load_config(path)


def test_reserved_entity_label_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("labels: [instance]", "labels: [detector]"))
    with pytest.raises(ConfigError, match=r"entities\.0\.labels.*reserved"):
        load_config(path)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "entities: [\n"))


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("step: 30s}", "step: 30s"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:3:9: not valid YAML: expected ',' or '}}'"), message
    assert message.endswith("(while parsing a flow mapping at 2:13)"), message
    assert "<unicode string>" not in message and "\n" not in message


def test_empty_file_says_it_is_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"aiops\.yaml: the file is empty") as error:
        load_config(write(tmp_path, "\n# to be written\n"))
    assert "NoneType" not in str(error.value)


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "prometheus:9090",
        "127.0.0.1:9090",
        "ftp://prometheus",
        "http://",
        "http://h:port",
    ],
)
@pytest.mark.parametrize("field", ["prometheus", "grafana"])
def test_urls_must_be_http_with_a_host(field: str, url: str, tmp_path: Path) -> None:
    text = (
        MINIMAL.replace('"http://127.0.0.1:9090"', f'"{url}"')
        if field == "prometheus"
        else MINIMAL + f'grafana: {{url: "{url}"}}\n'
    )
    with pytest.raises(ConfigError, match=rf"{field}\.url: .*http\(s\) URL with a host"):
        load_config(write(tmp_path, text))


def test_http_and_https_urls_with_a_path_are_accepted(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        '"http://127.0.0.1:9090"', '"https://thanos.example.com:10902/prometheus"'
    )
    config = load_config(write(tmp_path, text + "grafana: {url: http://grafana:3000}\n"))
    assert config.prometheus.url == "https://thanos.example.com:10902/prometheus"
    assert config.grafana.url == "http://grafana:3000"


def test_secrets_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOPS_PROMETHEUS_TOKEN", "s3cret")
    monkeypatch.setenv("AIOPS_STORE_URL", "postgresql://aiops@db/aiops")
    config = load_config(write(tmp_path, MINIMAL))
    assert config.prometheus.bearer_token == "s3cret"
    assert config.store.resolved_url() == "postgresql://aiops@db/aiops"


def test_model_hash_changes_with_detector_settings(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    group = config.entities[0].name
    before = config.model_hash("mad", group)
    config.detectors.mad.window = 30
    assert config.model_hash("mad", group) != before


def test_model_hash_ignores_the_alarm_rate_suppression_and_other_groups(tmp_path: Path) -> None:
    """Changing the false-alarm rate or a suppression rule retrains nothing; editing one group
    refits only that group."""
    config = load_config(write(tmp_path, MINIMAL))
    first = config.entities[0]
    other = first.model_copy(update={"name": "other"})
    config.entities.append(other)
    before = {g.name: config.model_hash("mad", g.name) for g in config.entities}
    calibration_before = config.calibration_hash(first.name, {"mad": 1})
    config.calibration.false_alarm_rate = 0.01
    first.suppress = {next(iter(first.queries)): SuppressionRule(direction="up")}
    assert {g.name: config.model_hash("mad", g.name) for g in config.entities} == before
    assert config.calibration_hash(first.name, {"mad": 1}) == calibration_before
    other.queries = {**other.queries, "extra": "up"}
    assert config.model_hash("mad", first.name) == before[first.name]
    assert config.model_hash("mad", "other") != before["other"]
    config.calibration.tail_fraction = 0.1
    assert config.calibration_hash(first.name, {"mad": 1}) != calibration_before
    assert config.model_hash("mad", first.name) == before[first.name]


def test_turning_the_metric_lines_on_recalibrates_and_their_default_changes_no_hash(
    tmp_path: Path,
) -> None:
    """``early_warning.ramp`` joins the calibration hash only where it is on, so the hash of a
    configuration that does not set it is what it was before the setting existed (a stored
    calibration stays valid across the upgrade); turning it on recalibrates, refits nothing."""
    config = load_config(write(tmp_path, MINIMAL))
    group = config.entities[0].name
    payload = {
        "group": group,
        "model_versions": {"mad": 1},
        "tail_fraction": config.calibration.tail_fraction,
        "recent_p_values": config.calibration.recent_p_values,
        "horizons": config.calibration.horizons,
        "early_warning": {
            name: value
            for name, value in config.early_warning.model_dump(mode="json").items()
            if name != "ramp"
        },
        "slo": {},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert config.calibration_hash(group, {"mad": 1}) == digest
    model = config.model_hash("mad", group)
    config.early_warning.ramp = True
    assert config.calibration_hash(group, {"mad": 1}) != digest
    assert config.model_hash("mad", group) == model


def test_cli_check_config_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("name: node", "name: node\n    lables: [x]"))
    done = subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert str(path) in done.stderr and "entities.0.lables" in done.stderr
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiops_plugin.cli",
            "check-config",
            str(EXAMPLES / "node-exporter.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _field_paths(annotation, f"{prefix}{name}.")
        elif name == "entities":
            paths += _field_paths(EntityGroupConfig, "entities[].")
        else:
            paths.append(prefix + name)
    return paths


def test_readme_documents_every_configuration_field() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    undocumented = [path for path in _field_paths(Config) if f"`{path}`" not in readme]
    assert not undocumented, f"README configuration reference lacks {undocumented}"
