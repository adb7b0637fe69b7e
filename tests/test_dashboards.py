"""The shipped Grafana dashboards (``dashboards/*.json``), checked three ways:

1. structure: stable uids, the ``aiops`` tag, a ``datasource`` variable and no hard-coded
   datasource uid, links between the four, a grid without overlaps, the alert rules' link;
2. Grafana's own schema: each dashboard typed as ``Json<AiopsDashboard>`` (built from the npm
   package ``@grafana/schema``, see ``tests/dashboard_schema/dashboard.ts``) and compiled with
   ``tsc --noEmit --strict``: unknown keys and wrong types fail;
3. semantics: every PromQL expression of every panel, variable and annotation, with its template
   variables substituted by real values, runs against a real Prometheus that scrapes a real agent
   (SMD history + live replay, logs over OTLP, the shipped rules) at the moment an anomaly alert
   fires: it must parse and return series, except the panels listed below as waiting for a
   metric the agent does not export yet.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.dashboards import DashboardError, load_dashboards
from aiops_plugin.demo import RULES_FILE, DemoStack, new_stack, poll_until
from tests.grafana_standin import GrafanaStandIn

SCHEMA_DIR = Path(__file__).parent / "dashboard_schema"
UIDS = {"aiops-overview", "aiops-entity", "aiops-detectors", "aiops-agent"}
DASHBOARDS = {d.uid: d.model for d in load_dashboards()}

#: Panels built on the metric contract for metrics the agent does not export yet (none today).
#: The test asserts each metric is absent from the agent's /metrics (so this list cannot hide a
#: real failure) and still runs the queries, which must parse; a panel's queries on other metrics
#: must return series. Key: (dashboard uid, panel title).
WAITING_FOR_CALIBRATION: dict[tuple[str, str], tuple[str, ...]] = {}
#: Every detector family of the scene's agent, the deep ones tiny (one epoch of a few hundred
#: windows, a seconds-long fit on 2 CPU cores) so that their uncertainty, multi-scale weights
#: and forecasts of two SMD features are exported and every panel on them returns series.
SCENE_DETECTORS: dict[str, Any] = {
    "device": "cpu",
    "mad": {"window": 60},
    "iforest": {"enabled": True},
    "multiscale": {
        "enabled": True,
        "window": 32,
        "epochs": 1,
        "max_train_windows": 300,
        "d_model": 16,
    },
    "forecaster": {
        "enabled": True,
        "window": 32,
        "epochs": 1,
        "max_train_windows": 300,
        "hidden": 16,
        "export_metrics": ['smd{dim="m00"}', 'smd{dim="m05"}'],
    },
    "diffusion": {
        "enabled": True,
        "window": 32,
        "epochs": 1,
        "max_train_windows": 300,
        "d_model": 16,
        "scales": 2,
    },
    "fusion": {
        "enabled": True,
        "window": 16,
        "epochs": 1,
        "max_train_windows": 300,
        "channels": 8,
        "lstm_hidden": 8,
        "heads": 2,
        "rff_features": 32,
        "mc_samples": 4,
    },
}
#: The values the semantic test picks where a variable offers them (the demo's one entity).
PREFERRED = {"entity_group": "smd", "entity": "machine-1-7"}
#: Grafana's built-in variables, as a 1 h dashboard would set them.
BUILT_INS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$"
)


# --------------------------------------------------------------------------------------------
# walking a dashboard


def panels_of(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in model.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.panel}:{self.ref}"


def queries_of(uid: str, model: dict[str, Any]) -> list[Query]:
    """PromQL of every panel target and Prometheus annotation (annotations run as range
    queries)."""
    found = [
        Query(uid, panel["title"], target["refId"], target["expr"], bool(target.get("instant")))
        for panel in panels_of(model)
        for target in panel.get("targets", [])
    ]
    for annotation in model["annotations"]["list"]:
        if annotation["datasource"].get("type") == "prometheus":
            found.append(
                Query(
                    uid,
                    f"annotation {annotation['name']}",
                    "Anno",
                    annotation["target"]["expr"],
                    False,
                )
            )
    return found


ALL_QUERIES = [query for uid, model in DASHBOARDS.items() for query in queries_of(uid, model)]


def mentions(expr: str, metric: str) -> bool:
    return re.search(rf"(?<![\w:]){re.escape(metric)}(?![\w:])", expr) is not None


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace ``$var``, ``${var}``, ``${var:format}`` and ``[[var]]`` as Grafana does for a
    single value; unknown names (``$1`` of label_replace) stay."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, match.group(0))

    return _VARIABLE.sub(replace, text)


# --------------------------------------------------------------------------------------------
# 1. structure


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_dashboard_has_stable_uid_tags_datasource_variable_and_links(uid: str) -> None:
    model = DASHBOARDS[uid]
    assert model["id"] is None
    assert model["schemaVersion"] >= 39
    assert "aiops" in model["tags"]
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert any(
        link["type"] == "dashboards" and link["tags"] == ["aiops"] and link["includeVars"]
        for link in model["links"]
    ), "no link to the other aiops dashboards"


def test_the_four_dashboards_ship_with_unique_uids() -> None:
    assert set(DASHBOARDS) == UIDS


def _datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _datasource_refs(value)


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_no_datasource_uid_is_hard_coded(uid: str) -> None:
    for ref in _datasource_refs(DASHBOARDS[uid]):
        if ref.get("type") == "grafana":
            assert ref["uid"] == "-- Grafana --"  # Grafana's built-in annotation source
        else:
            assert ref == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_panel_ids_are_unique_and_panels_do_not_overlap(uid: str) -> None:
    panels = panels_of(DASHBOARDS[uid])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_alert_rules_link_to_the_entity_dashboard_with_its_entity_variable() -> None:
    rules = yaml.safe_load(RULES_FILE.read_text())
    links = [
        rule["annotations"]["dashboard"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "dashboard" in rule.get("annotations", {})
    ]
    assert links
    entity = DASHBOARDS["aiops-entity"]
    variables = {v["name"] for v in entity["templating"]["list"]}
    for link in links:
        path, _, query = link.partition("?")
        assert path == "/d/aiops-entity/aiops-entity"
        assert {param.split("=")[0].removeprefix("var-") for param in query.split("&")} <= variables


def test_data_links_point_at_shipped_dashboards() -> None:
    text = "".join(json.dumps(model) for model in DASHBOARDS.values())
    targets = set(re.findall(r"/d/([\w-]+)/", text))
    assert targets and targets <= UIDS


def test_every_panel_has_a_description() -> None:
    missing = [
        (uid, panel["title"])
        for uid, model in DASHBOARDS.items()
        for panel in panels_of(model)
        if panel["type"] != "row" and not panel.get("description")
    ]
    assert not missing


def test_waiting_lists_name_existing_panels_and_their_queries() -> None:
    for (uid, title), metrics in WAITING_FOR_CALIBRATION.items():
        exprs = [q.expr for q in ALL_QUERIES if q.dashboard == uid and q.panel == title]
        assert exprs, f"{uid}: no panel titled {title!r}"
        for metric in metrics:
            assert any(mentions(expr, metric) for expr in exprs), f"{title!r} never uses {metric}"


def test_loading_refuses_duplicate_uids_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DashboardError, match="not found"):
        load_dashboards(tmp_path / "missing")
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps({"uid": "same", "title": name}))
    with pytest.raises(DashboardError, match="also the uid"):
        load_dashboards(tmp_path)


# --------------------------------------------------------------------------------------------
# 2. Grafana's schema (tsc over @grafana/schema)


@pytest.fixture(scope="module")
def tsc(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], str]:
    """Type-check ``{name: dashboard model}``; returns tsc's output ("" when all pass).

    The pinned packages (tests/dashboard_schema/package-lock.json) are installed with ``npm ci``
    when missing (``.ci/run`` does it up front).
    """
    compiler = SCHEMA_DIR / "node_modules" / ".bin" / "tsc"
    if not compiler.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm not found: apt-get install nodejs npm (as .ci/run does)")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=SCHEMA_DIR, check=True, timeout=600
        )
    wrapper = (SCHEMA_DIR / "dashboard.js").as_posix()

    def check(models: dict[str, Any]) -> str:
        workdir = tmp_path_factory.mktemp("tsc")
        files = []
        for name, model in models.items():
            path = workdir / f"{name}.ts"
            path.write_text(
                f"import type {{ AiopsDashboard, Json }} from '{wrapper}';\n\n"
                f"export const dashboard: Json<AiopsDashboard> = {json.dumps(model, indent=2)};\n"
            )
            files.append(str(path))
        result = subprocess.run(
            [
                str(compiler),
                "--noEmit",
                "--strict",
                "--pretty",
                "false",
                "--module",
                "esnext",
                "--moduleResolution",
                "bundler",
                "--target",
                "es2022",
                *files,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = (result.stdout + result.stderr).strip()
        assert (result.returncode == 0) == (output == ""), output
        return output

    return check


def test_dashboards_type_check_against_grafana_schema(tsc: Callable[[dict[str, Any]], str]) -> None:
    assert tsc(DASHBOARDS) == ""


def test_schema_check_rejects_unknown_keys_and_wrong_types(
    tsc: Callable[[dict[str, Any]], str],
) -> None:
    def broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        model = copy.deepcopy(DASHBOARDS["aiops-overview"])
        change(model)
        return model

    def first(model: dict[str, Any], type_: str) -> dict[str, Any]:
        return next(p for p in model["panels"] if p["type"] == type_)

    cases = {
        "dashboard_key": broken(lambda m: m.update(schemaVersoin=39)),
        "wrong_type": broken(lambda m: m.update(schemaVersion="39")),
        "panel_key": broken(lambda m: first(m, "stat").update(gridPoss={"x": 0})),
        "option_value": broken(lambda m: first(m, "stat")["options"].update(colorMode="rainbow")),
        "missing_option": broken(lambda m: first(m, "table")["options"].pop("showHeader")),
        "target_key": broken(lambda m: first(m, "bargauge")["targets"][0].update(exprr="up")),
        "field_config": broken(
            lambda m: first(m, "state-timeline")["fieldConfig"]["defaults"].update(unitt="s")
        ),
        "panel_type": broken(lambda m: first(m, "stat").update(type="piechart")),
        "variable_key": broken(lambda m: m["templating"]["list"][0].update(qurey="prometheus")),
        "link_type": broken(lambda m: m["links"][0].update(type="dashboard")),
    }
    output = tsc(cases)
    failed = {Path(line.split("(")[0]).stem for line in output.splitlines() if "error TS" in line}
    assert failed == set(cases), output


# --------------------------------------------------------------------------------------------
# 3. every query against a real Prometheus scraping a real agent


@dataclass
class LoggingDemoStack(DemoStack):
    """The demo stack with logs over OTLP and annotations to a Grafana stand-in (its detectors
    are ``SCENE_DETECTORS``, given to ``new_stack``)."""

    grafana_url: str = ""

    def write_agent_config(self) -> Path:
        path = super().write_agent_config()
        config = yaml.safe_load(path.read_text())
        config["calibration"] = {**config.get("calibration", {}), "horizons": ["5s", "10s"]}
        config["logs"] = {
            "enabled": True,
            "entities": [{"group": "smd", "label": "instance", "attribute": "host.name"}],
            "embedder": {"device": "cpu"},
            # a third template overflows, so aiops_log_templates_overflow_total has a series
            "templates": {"max_templates_per_entity": 2},
        }
        config["grafana"] = {"url": self.grafana_url, "token": "test-token", "annotations": True}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


NORMAL_LOGS = ("GET /api/cart/{} 200 in {} ms", "user {} logged in from web", "cache hit for {}")


def send_logs(url: str, resource: dict[str, str], count: int, start: float, spacing: float) -> None:
    """``count`` INFO lines through the OpenTelemetry SDK's OTLP/HTTP exporter, record times
    ``start + i * spacing``."""
    provider = LoggerProvider(resource=Resource.create(resource))
    exporter = OTLPLogExporter(endpoint=f"{url}/v1/logs", compression=Compression.Gzip)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=50))
    logger = provider.get_logger("test_dashboards")
    for i in range(count):
        logger.emit(
            timestamp=int((start + i * spacing) * 1e9),
            body=NORMAL_LOGS[i % len(NORMAL_LOGS)].format(i, (7 * i) % 90),
            severity_number=SeverityNumber.INFO,
            severity_text="INFO",
        )
    assert provider.force_flush(10_000)
    provider.shutdown()


@dataclass
class Scene:
    """The stack at the moment an anomaly alert fires; ``at`` is that moment (Unix seconds)."""

    stack: LoggingDemoStack
    grafana: GrafanaStandIn
    at: float
    exported: set[str]
    variables: dict[str, dict[str, str]]

    def api(self, path: str, **params: Any) -> Any:
        assert self.stack.prometheus is not None
        response = requests.get(
            f"{self.stack.prometheus.url}/api/v1/{path}", params=params, timeout=30
        )
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]


def resolve_variables(scene: Scene, uid: str) -> dict[str, str]:
    """Each variable's value, in dashboard order (later ones depend on earlier ones), as Grafana
    would pick it: the preferred value if offered, else All, else the first option."""
    values = dict(BUILT_INS)
    for variable in DASHBOARDS[uid]["templating"]["list"]:
        name, kind = variable["name"], variable["type"]
        if kind == "datasource":
            continue
        assert kind == "query", f"{uid}: variable type {kind!r} not handled by this test"
        match = _LABEL_VALUES.match(substitute(variable["query"], values))
        assert match, f"{uid}: ${name}: not a label_values() query: {variable['query']}"
        label, selector = match["label"], match["selector"]
        if selector:
            series = scene.api(
                "series", **{"match[]": selector, "start": scene.at - 3600, "end": scene.at}
            )
            options = sorted({s[label] for s in series if label in s})
        else:
            options = sorted(
                scene.api(f"label/{label}/values", start=scene.at - 3600, end=scene.at)
            )
        assert options, f"{uid}: ${name} has no values"
        if PREFERRED.get(name) in options:
            values[name] = PREFERRED[name]
        else:
            values[name] = variable["allValue"] if variable.get("includeAll") else options[0]
    return values


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    base = new_stack(tmp_path_factory.mktemp("dashboards"), lead_rows=5, detectors=SCENE_DETECTORS)
    grafana = GrafanaStandIn(token="test-token").start()
    stack = LoggingDemoStack(
        **{f.name: getattr(base, f.name) for f in fields(DemoStack)}, grafana_url=grafana.url
    )
    try:
        stack.start_servers()
        assert stack.prometheus is not None and stack.replay is not None
        stack.start_agent(timeout=180)
        # log history inside the fit window; the agent fits its log model on the first cycle
        # after a start, so it is restarted once the history is stored
        send_logs(stack.agent_url, {"host.name": stack.sample.machine}, 300, time.time() - 900, 3)
        stack.stop_agent()
        stack.start_agent(timeout=180)
        send_logs(stack.agent_url, {"host.name": stack.sample.machine}, 20, time.time(), 0.1)
        send_logs(stack.agent_url, {"service.name": "no-host"}, 1, time.time(), 0.1)  # rejected
        prometheus = stack.prometheus
        for expr in (
            'aiops_log_anomaly_score{entity="machine-1-7"}',
            'rate(aiops_logs_rejected_total{reason="no_entity"}[1m])',
            "rate(aiops_log_templates_overflow_total[1m])",
        ):
            prometheus.wait_for(expr, timeout=60)
        stack.replay.start()
        prometheus.wait_for(
            'ALERTS{alertname="AiopsAnomalyDetected", alertstate="firing", entity="machine-1-7"}',
            timeout=120,
        )
        at = time.time()
        text = requests.get(f"{stack.agent_url}/metrics", timeout=5).text
        exported = {
            sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        scene = Scene(stack, grafana, at, exported, {})
        scene.variables = {uid: resolve_variables(scene, uid) for uid in DASHBOARDS}
        yield scene
    finally:
        print(stack.agent_log(30))
        stack.close()
        grafana.stop()


@pytest.mark.e2e
def test_waiting_panels_wait_for_metrics_the_agent_does_not_export(scene: Scene) -> None:
    for (uid, title), metrics in WAITING_FOR_CALIBRATION.items():
        exported = [metric for metric in metrics if metric in scene.exported]
        assert not exported, (
            f"the agent exports {exported} now: remove {uid} {title!r} from WAITING_FOR_CALIBRATION"
        )


@pytest.mark.e2e
@pytest.mark.parametrize("uid", sorted(UIDS))
def test_variables_resolve_to_values(scene: Scene, uid: str) -> None:
    values = scene.variables[uid]
    for name, preferred in PREFERRED.items():
        if name in values:
            assert values[name] == preferred


@pytest.mark.e2e
@pytest.mark.parametrize("query", ALL_QUERIES, ids=[q.id for q in ALL_QUERIES])
def test_query_parses_and_returns_series(scene: Scene, query: Query) -> None:
    values = scene.variables[query.dashboard]
    expr = substitute(query.expr, values)
    names = [next(group for group in groups if group) for groups in _VARIABLE.findall(expr)]
    leftover = [name for name in names if not name.isdigit()]
    assert not leftover, f"unresolved variables {leftover} in {expr}"
    if query.instant:
        result = scene.api("query", query=expr, time=scene.at)["result"]
    else:
        result = scene.api("query_range", query=expr, start=scene.at - 600, end=scene.at, step=5)[
            "result"
        ]
    waiting = [
        metric
        for metric in WAITING_FOR_CALIBRATION.get((query.dashboard, query.panel), ())
        if mentions(query.expr, metric)
    ]
    if waiting:
        pytest.skip(f"{query.id}: parses; waiting for {', '.join(waiting)}")
    assert result, f"no series for {expr}"


@pytest.mark.e2e
def test_agent_writes_the_anomaly_event_as_a_grafana_annotation(scene: Scene) -> None:
    def annotated() -> list[dict[str, Any]] | None:
        found = [a for a in scene.grafana.annotations.values() if "entity:machine-1-7" in a["tags"]]
        return found or None

    # The scene keeps running while the test polls: the fused score can dip under the threshold
    # and rise again, closing the first event and opening another, so more than one annotation
    # may exist by now. Each one must be well formed; the first one is the alert's event.
    found = poll_until(annotated, 30, "the anomaly event's Grafana annotation")
    for annotation in found:
        assert {"aiops", "aiops-anomaly", "entity_group:smd", "detector:fused"} <= set(
            annotation["tags"]
        )
    first = min(found, key=lambda a: a["time"])
    assert abs(first["time"] / 1000 - scene.at) < 120
    assert not scene.grafana.rejected and not scene.grafana.unexpected
    assert "Top metrics:" in first["text"], first["text"]


@pytest.mark.e2e
def test_firing_anomaly_alert_names_exported_top_metrics_and_links_the_entity_events(
    scene: Scene,
) -> None:
    """The annotations as the real Prometheus renders them from what the real agent exports:
    ``top_metrics`` names metrics the agent reported contributions for, and ``events`` is a
    request the agent's anomaly API answers with the entity's open events only."""
    (alert,) = [
        alert
        for alert in scene.api("alerts")["alerts"]
        if alert["labels"]["alertname"] == "AiopsAnomalyDetected"
        and alert["labels"]["entity"] == PREFERRED["entity"]
        and alert["state"] == "firing"
    ]
    contributions = scene.api(
        "series",
        **{
            "match[]": f'aiops_metric_contribution{{entity="{PREFERRED["entity"]}"}}',
            "start": scene.at - 600,
            "end": time.time(),
        },
    )
    exported = {series["metric"] for series in contributions}
    named = re.findall(r"(?:^|, )(.+?) \([0-9.e+-]+%\)", alert["annotations"]["top_metrics"])
    assert named and set(named) <= exported, (alert["annotations"]["top_metrics"], exported)

    link = alert["annotations"]["events"]
    assert link.endswith("&state=open")
    response = requests.get(f"{scene.stack.agent_url}{link}", timeout=10)
    assert response.status_code == 200, response.text
    for event in response.json()["anomalies"]:
        assert (event["entity_group"], event["entity"]) == (
            PREFERRED["entity_group"],
            PREFERRED["entity"],
        )
        assert event["state"] == "open"
    every_state = requests.get(
        f"{scene.stack.agent_url}{link.removesuffix('&state=open')}", timeout=10
    )
    assert every_state.status_code == 200 and every_state.json()["anomalies"], every_state.text
