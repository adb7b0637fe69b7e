"""The Helm chart (helm/aiops-plugin), offline: no cluster and no helm binary.

- Rendering and linting: ``helm-python-sdk`` (Helm 4's own Go code as a library), with several
  value sets; lint is strict (warnings fail) against Kubernetes 1.30.
- Every rendered manifest of a built-in kind is validated against the Kubernetes 1.30 schemas in
  strict mode (``kubernetes-validate --strict -k 1.30.0``: its Python API on every manifest of
  every value set, its command line on the default render). ServiceMonitor
  and PrometheusRule, which are CRDs those schemas lack, are validated against the
  prometheus-operator CRD models of ``cloudcoil-models-prometheus-operator`` (pydantic models
  generated from the CRDs' OpenAPI schemas: required fields, types, enums and patterns), and a
  round trip through the model catches any field the CRD does not know.
- The chart reads alert_rules/ and dashboards/ through symlinks (files/rules, files/dashboards):
  the PrometheusRule must hold exactly the rule file's groups and the dashboard ConfigMaps exactly
  the dashboards' JSON, and the packaged chart (helm package follows the links) renders the same.
- The agent configuration the ConfigMap renders passes the agent's own validation
  (``aiops_plugin.config.load_config``), for every value set.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
from pydantic import BaseModel

from aiops_plugin.config import (
    ENV_FEEDBACK_TOKEN,
    ENV_GRAFANA_TOKEN,
    ENV_LOGS_TOKEN,
    ENV_PROMETHEUS_TOKEN,
    ENV_STORE_URL,
    Config,
    load_config,
)

REPO_ROOT = Path(__file__).parents[1]
CHART = REPO_ROOT / "helm" / "aiops-plugin"
RULES_DIR = REPO_ROOT / "alert_rules"
DASHBOARDS_DIR = REPO_ROOT / "dashboards"
KUBE_VERSION = "1.30.0"
RELEASE = "aiops"
NAMESPACE = "monitoring"
FULLNAME = "aiops-aiops-plugin"
POSTGRES_URL = "postgresql://aiops:s3cret@postgresql.db.svc:5432/aiops"
CRD_MODELS: dict[str, type[BaseModel]] = {
    "ServiceMonitor": ServiceMonitor,
    "PrometheusRule": PrometheusRule,
}
#: Sections of the agent configuration that the chart sets itself instead of taking from values.
CHART_OWNED_SECTIONS = {"server", "store", "sharding"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu": {"gpu": {"enabled": True, "count": 2, "runtimeClassName": "nvidia"}},
    "external-postgresql": {
        "store": {"type": "postgresql", "postgresql": {"url": POSTGRES_URL}},
        "secrets": {"prometheusToken": "prom-token", "logsToken": "logs-token"},
        "config": {
            "logs": {
                "enabled": True,
                "entities": [{"group": "node", "label": "instance", "attribute": "host.name"}],
            }
        },
    },
    "existing-secret": {
        "store": {"type": "postgresql"},
        "secrets": {"existingSecret": "aiops-credentials"},
        "prometheusRule": {"for": {"AiopsAnomalyDetected": "5m"}},
        "serviceMonitor": {"additionalLabels": {"release": "kube-prometheus-stack"}},
    },
    "sharded": {
        "shards": 3,
        "store": {"type": "postgresql", "postgresql": {"url": POSTGRES_URL}},
    },
    "optional-off": {
        "serviceMonitor": {"enabled": False},
        "prometheusRule": {"enabled": False},
        "dashboards": {"enabled": False},
        "persistence": {"enabled": False},
        "serviceAccount": {"create": False},
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    helm_python.disable_logging()  # Helm logs each followed symlink at INFO
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm_python.Chart, values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, as ``helm template aiops . -n monitoring`` prints it."""
    return chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [
        document
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]


@pytest.fixture(scope="module")
def rendered_sets(chart: helm_python.Chart) -> dict[str, list[dict[str, Any]]]:
    return {name: manifests(render(chart, values)) for name, values in VALUE_SETS.items()}


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


def kinds(documents: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in documents)


def agent_workload(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """The agent's Deployment, or its StatefulSet when sharded."""
    (workload,) = [d for d in documents if d["kind"] in ("Deployment", "StatefulSet")]
    return workload


def agent_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = agent_workload(documents)["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def rule_groups_of_repository() -> list[dict[str, Any]]:
    """The groups of alert_rules/*.yml and *.yaml, in the order Helm's .Files.Glob reads them."""
    paths = sorted([*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")], key=lambda p: p.name)
    return [
        group
        for path in paths
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    ]


def dashboard_files(directory: Path = DASHBOARDS_DIR) -> dict[str, str]:
    return {
        path.name: path.read_text(encoding="utf-8") for path in sorted(directory.glob("*.json"))
    }


# --------------------------------------------------------------------------------------------
# Lint and schemas


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_passes_strict_lint(value_set: str) -> None:
    helm_python.disable_logging()
    report = helm_python.lint(
        CHART,
        copy.deepcopy(VALUE_SETS[value_set]),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    # severity: 1 info (e.g. "icon is recommended"), 2 warning, 3 error
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], json.dumps(report, indent=2)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_validates_against_kubernetes_1_30_strict(
    rendered_sets: dict[str, list[dict[str, Any]]], value_set: str
) -> None:
    for document in rendered_sets[value_set]:
        name = f"{document['kind']}/{document['metadata']['name']}"
        if document["kind"] in CRD_MODELS:
            model = CRD_MODELS[document["kind"]].model_validate(document)
            round_trip = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
            assert round_trip == document, f"{name}: fields unknown to the CRD were dropped"
            continue
        try:
            kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(
                f"{value_set}: {name} invalid for Kubernetes {KUBE_VERSION}: {path}: {error}"
            )


def test_kubernetes_validate_cli_accepts_the_default_render(
    chart: helm_python.Chart, tmp_path: Path
) -> None:
    """The same check as a user would run it on ``helm template`` output."""
    path = tmp_path / "manifests.yaml"
    path.write_text(
        "\n---\n".join(t for n, t in sorted(render(chart, {}).items()) if n.endswith(".yaml")),
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION]
    result = subprocess.run(
        [*command, "--quiet", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # the CRD kinds are only warned about here; the test above checks them against their models
    warned = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout))
    assert warned == set(CRD_MODELS)


def test_custom_resources_are_checked_against_their_crds() -> None:
    broken = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "for": "5 minutes"}]}]},
    }
    with pytest.raises(ValueError, match=r"(?s)expr.*Field required.*for.*pattern"):
        PrometheusRule.model_validate(broken)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gpu": {"enabled": "yes"}}, "at '/gpu/enabled': got string, want boolean"),
        ({"persistence": {"sise": "20Gi"}}, "at '/persistence': additional properties 'sise'"),
        ({"config": {"server": {"port": 8000}}}, "at '/config': additional properties 'server'"),
        ({"store": {"type": "mysql"}}, "at '/store/type'"),
        ({"prometheusRule": {"for": {"AiopsAnomalyDetected": "5 min"}}}, "does not match pattern"),
        ({"config": {"entities": []}}, "at '/config/entities'"),
        ({"service": {"otlpPort": 70000}}, "at '/service/otlpPort'"),
    ],
    ids=["bool", "typo", "chart-owned-section", "enum", "duration", "no-entities", "port"],
)
def test_schema_rejects_a_wrong_value_naming_it(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as error:
        render(chart, values)
    assert message in str(error.value)


def test_postgresql_without_a_url_fails_saying_what_to_set(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="set store.postgresql.url, or secrets"):
        render(chart, {"store": {"type": "postgresql"}})


def test_for_override_of_an_unknown_alert_fails_naming_it(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="prometheusRule.for.AiopsTypo: no alert"):
        render(chart, {"prometheusRule": {"for": {"AiopsTypo": "5m"}}})


def test_schema_config_sections_are_the_agent_configuration_sections() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    in_schema = set(schema["properties"]["config"]["properties"])
    expected = set(Config.model_fields) - CHART_OWNED_SECTIONS
    assert in_schema == expected, (
        "values.schema.json's `config` lists the agent's configuration sections: update it (and "
        f"values.yaml) to {sorted(expected)}"
    )


def test_every_top_level_value_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    undocumented = [
        line.split(":")[0]
        for index, line in enumerate(lines)
        if re.match(r"^[A-Za-z]\w*:", line) and not lines[index - 1].startswith("#")
    ]
    assert not undocumented, f"values without a comment block above them: {undocumented}"
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert set(yaml.safe_load("\n".join(lines))) == set(schema["properties"]) - {"global"}


# --------------------------------------------------------------------------------------------
# One source of truth: alert_rules/ and dashboards/


def test_chart_reads_rules_and_dashboards_through_links_to_the_repository() -> None:
    assert (CHART / "files" / "rules").resolve() == RULES_DIR.resolve()
    assert (CHART / "files" / "dashboards").resolve() == DASHBOARDS_DIR.resolve()


def test_prometheus_rule_holds_exactly_the_rules_of_alert_rules(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    rule = one(rendered_sets["defaults"], "PrometheusRule")
    assert rule["spec"]["groups"] == rule_groups_of_repository()


def test_for_override_changes_only_that_alerts_for(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    expected = rule_groups_of_repository()
    for group in expected:
        for rule in group["rules"]:
            if rule.get("alert") == "AiopsAnomalyDetected":
                rule["for"] = "5m"
    rule = one(rendered_sets["existing-secret"], "PrometheusRule")
    assert rule["spec"]["groups"] == expected
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_dashboard_configmaps_hold_exactly_the_dashboards(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    configmaps = [
        d
        for d in rendered_sets["defaults"]
        if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]
    ]
    held = {key: text for d in configmaps for key, text in d["data"].items()}
    assert held == dashboard_files()
    for configmap in configmaps:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert len(configmap["data"]) == 1  # one dashboard per ConfigMap (1 MiB each)


def test_dashboard_template_on_a_copy_with_a_dashboard(tmp_path: Path) -> None:
    """The repository may not hold dashboards yet: the template is also exercised on a copy of
    the chart (links resolved) with one dashboard whose name needs cleaning."""
    copy_root = tmp_path / "aiops-plugin"
    shutil.copytree(CHART, copy_root, symlinks=False)
    dashboard = {"title": "AIOps {{ not a template }}", "uid": "aiops-x", "panels": []}
    text = json.dumps(dashboard, indent=2) + "\n"
    (copy_root / "files" / "dashboards" / "AIOps_Test.json").write_text(text, encoding="utf-8")
    helm_python.disable_logging()
    with helm_python.Chart.load(copy_root) as copied:
        documents = manifests(render(copied, {"dashboards": {"namespace": "grafana"}}))
    configmap = next(d for d in documents if "AIOps_Test.json" in d.get("data", {}))
    assert configmap["metadata"]["name"] == f"{FULLNAME}-aiops-test"
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["data"]["AIOps_Test.json"] == text
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)


def test_packaged_chart_carries_the_linked_files_and_renders_the_same(
    chart: helm_python.Chart, tmp_path: Path
) -> None:
    archive = Path(chart.save(tmp_path))
    with helm_python.Chart.load_archive(archive.read_bytes()) as packaged:
        names = {file["name"] for file in packaged.files}
        assert {f"files/rules/{p.name}" for p in RULES_DIR.glob("*.yml")} <= names
        assert not any(name.startswith("files/rules/tests/") for name in names)  # .helmignore
        for values in VALUE_SETS.values():
            assert render(packaged, values) == render(chart, values)


# --------------------------------------------------------------------------------------------
# The agent's configuration


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_agent_config_passes_the_agents_validation(
    rendered_sets: dict[str, list[dict[str, Any]]],
    value_set: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in (
        ENV_PROMETHEUS_TOKEN,
        ENV_LOGS_TOKEN,
        ENV_STORE_URL,
        ENV_GRAFANA_TOKEN,
        ENV_FEEDBACK_TOKEN,
    ):
        monkeypatch.delenv(variable, raising=False)
    documents = rendered_sets[value_set]
    configmap = next(d for d in documents if d["metadata"]["name"] == FULLNAME and "data" in d)
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"], encoding="utf-8")

    config = load_config(path)

    (port,) = agent_container(documents)["ports"]
    assert (config.server.host, config.server.port) == ("0.0.0.0", port["containerPort"])
    assert config.prometheus.bearer_token is None and config.logs.intake.token is None
    if VALUE_SETS[value_set].get("store", {}).get("type") == "postgresql":
        assert config.store.url is None  # AIOPS_STORE_URL, from the Secret
    else:
        assert config.store.resolved_url() == "sqlite:////var/lib/aiops-plugin/aiops.db"


def test_values_reach_the_agent_config(chart: helm_python.Chart, tmp_path: Path) -> None:
    documents = manifests(
        render(chart, {"config": {"schedule": {"infer_every": "30s"}}, "containerPort": 8000})
    )
    configmap = next(d for d in documents if d["metadata"]["name"] == FULLNAME and "data" in d)
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"], encoding="utf-8")
    config = load_config(path)
    assert config.schedule.infer_every == 30.0
    assert config.schedule.fit_every == 86400.0  # the other defaults of values.yaml stay
    assert config.server.port == 8000
    assert agent_container(documents)["ports"][0]["containerPort"] == 8000


# --------------------------------------------------------------------------------------------
# The workload


def test_deployment_runs_one_locked_down_agent(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = one(rendered_sets["defaults"], "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = agent_container(rendered_sets["defaults"])
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False)}
    assert writable == {"/tmp", "/var/lib/aiops-plugin"}
    assert container["args"] == ["run", "--config", "/etc/aiops-plugin/config.yaml"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert env_of(container)["HF_HUB_OFFLINE"]["value"] == "1"
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == FULLNAME
    pvc = one(rendered_sets["defaults"], "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_shards_render_a_statefulset_whose_pods_read_their_ordinal(
    rendered_sets: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """shards: 3 is a StatefulSet of 3 agents on the shared PostgreSQL store, each told the
    shard count by its configuration and its own shard by its pod's host name."""
    documents = rendered_sets["sharded"]
    assert "Deployment" not in kinds(documents) and "PersistentVolumeClaim" not in kinds(documents)
    spec = one(documents, "StatefulSet")["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == FULLNAME

    def agent_config(documents: list[dict[str, Any]]) -> dict[str, Any]:
        (configmap,) = [
            d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == FULLNAME
        ]
        return yaml.safe_load(configmap["data"]["config.yaml"])

    assert agent_config(documents)["sharding"] == {"shards": 3}
    assert "sharding" not in agent_config(rendered_sets["defaults"])
    from aiops_plugin.sharding import resolve_shard

    monkeypatch.setenv("HOSTNAME", f"{FULLNAME}-2")
    assert resolve_shard(3, None) == 2


def test_shards_without_postgresql_fail_saying_so(chart: helm_python.Chart) -> None:
    with pytest.raises(Exception, match="needs store.type=postgresql"):
        render(chart, {"shards": 2})


def test_sharded_logs_reach_every_shard_through_one_service(chart: helm_python.Chart) -> None:
    """With logs, every shard accepts OTLP records (each mines only its own entities'), so the
    one Service in front of the StatefulSet selects all of its pods."""
    documents = manifests(
        render(
            chart,
            {
                "shards": 3,
                "store": {"type": "postgresql", "postgresql": {"url": POSTGRES_URL}},
                "config": {"logs": {"enabled": True}},
            },
        )
    )
    statefulset = one(documents, "StatefulSet")
    (service,) = [d for d in documents if d["kind"] == "Service"]
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert "otlp-http" in {port["name"] for port in service["spec"]["ports"]}
    (configmap,) = [
        d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == FULLNAME
    ]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["sharding"] == {"shards": 3} and config["logs"]["enabled"] is True


def test_gpu_off_runs_on_cpu_with_the_cpu_image(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    container = agent_container(rendered_sets["defaults"])
    pod = one(rendered_sets["defaults"], "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "tolerations" not in pod and "nodeSelector" not in pod
    assert env_of(container)["CUDA_VISIBLE_DEVICES"]["value"] == ""
    assert container["image"] == "aiops-plugin:0.1.0"


def test_gpu_on_requests_gpus_on_the_gpu_node_pool(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    container = agent_container(rendered_sets["gpu"])
    pod = one(rendered_sets["gpu"], "Deployment")["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == "4Gi"  # values' limits are kept
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["runtimeClassName"] == "nvidia"
    assert "CUDA_VISIBLE_DEVICES" not in env_of(container)
    assert container["image"] == "aiops-plugin:0.1.0-cuda"


def test_external_postgresql_drops_the_volume_and_reads_the_url_from_the_secret(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    documents = rendered_sets["external-postgresql"]
    assert "PersistentVolumeClaim" not in kinds(documents)
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    assert "data" not in {v["name"] for v in pod["volumes"]}
    env = env_of(agent_container(documents))
    assert env[ENV_STORE_URL]["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": "store-url"}
    assert env[ENV_LOGS_TOKEN]["valueFrom"]["secretKeyRef"]["key"] == "logs-token"
    assert env[ENV_PROMETHEUS_TOKEN]["valueFrom"]["secretKeyRef"]["key"] == "prometheus-token"
    assert ENV_GRAFANA_TOKEN not in env  # not set: no reference to a missing key
    secret = one(documents, "Secret")
    assert set(secret["data"]) == {"store-url", "logs-token", "prometheus-token"}
    assert base64.b64decode(secret["data"]["store-url"]).decode() == POSTGRES_URL
    configmap_text = json.dumps([d for d in documents if d["kind"] == "ConfigMap"])
    assert "s3cret" not in configmap_text and "logs-token" not in configmap_text


def test_existing_secret_is_referenced_and_no_secret_is_created(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    documents = rendered_sets["existing-secret"]
    assert "Secret" not in kinds(documents)
    env = env_of(agent_container(documents))
    references = {
        name: entry["valueFrom"]["secretKeyRef"]
        for name, entry in env.items()
        if "valueFrom" in entry
    }
    assert references == {
        ENV_PROMETHEUS_TOKEN: {
            "name": "aiops-credentials",
            "key": "prometheus-token",
            "optional": True,
        },
        ENV_LOGS_TOKEN: {"name": "aiops-credentials", "key": "logs-token", "optional": True},
        ENV_GRAFANA_TOKEN: {
            "name": "aiops-credentials",
            "key": "grafana-token",
            "optional": True,
        },
        ENV_FEEDBACK_TOKEN: {
            "name": "aiops-credentials",
            "key": "feedback-token",
            "optional": True,
        },
        ENV_STORE_URL: {"name": "aiops-credentials", "key": "store-url"},
    }


def test_existing_claim_is_mounted_instead_of_a_new_one(chart: helm_python.Chart) -> None:
    documents = manifests(render(chart, {"persistence": {"existingClaim": "aiops-data"}}))
    assert "PersistentVolumeClaim" not in kinds(documents)
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"] == {"claimName": "aiops-data"}


def test_everything_optional_off_leaves_the_agent_its_service_and_config(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    documents = rendered_sets["optional-off"]
    assert kinds(documents) == ["ConfigMap", "Deployment", "Service"]
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data == {"name": "data", "emptyDir": {}}
    assert pod["serviceAccountName"] == "default"


def test_service_exposes_metrics_and_otlp_on_the_agents_port(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    service = one(rendered_sets["defaults"], "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http-metrics": (9108, "http"), "otlp-http": (4318, "http")}
    (container_port,) = agent_container(rendered_sets["defaults"])["ports"]
    assert container_port["name"] == "http"
    assert (
        service["spec"]["selector"]
        == one(rendered_sets["defaults"], "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_service_monitor_scrapes_metrics_keeping_entity_labels(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    monitor = one(rendered_sets["defaults"], "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True
    service = one(rendered_sets["defaults"], "Service")
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    # the job is the Service's name, which the rules' job=~".*aiops-plugin.*" must match
    assert "aiops-plugin" in service["metadata"]["name"]
    labelled = one(rendered_sets["existing-secret"], "ServiceMonitor")
    assert labelled["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_notes_say_where_to_look_next(chart: helm_python.Chart) -> None:
    notes = render(chart, {})[f"{CHART.name}/templates/NOTES.txt"]
    for expected in (
        f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}",
        "/readyz",
        f"endpoint: http://{FULLNAME}.{NAMESPACE}.svc:4318",
        "serviceMonitor.additionalLabels.release",
        "examples/alertmanager.yml",
        "one release per\nshard",
    ):
        assert expected in notes
    off = render(chart, VALUE_SETS["optional-off"])[f"{CHART.name}/templates/NOTES.txt"]
    assert "WARNING: persistence.enabled=false" in off
