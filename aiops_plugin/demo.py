"""The whole path on one machine: real Prometheus + Alertmanager, a real SMD sample, the agent.

Used by ``aiops-plugin demo`` and by the end-to-end test, so the two cannot drift apart.

Time is compressed: SMD rows are one minute apart, the demo plays one row per second. The first
``history_rows`` rows (train part, then the start of the test part) are backfilled into Prometheus
as history ending now; the agent fits on them; the remaining test rows are then served live by a
replay exporter that Prometheus scrapes every second. The labelled anomaly (test rows 5875-5950
of machine-1-2) arrives ``lead_rows`` seconds after the replay starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import yaml

from aiops_plugin.alerting import load_rules_with_for
from aiops_plugin.localstack import (
    AlertmanagerServer,
    DemoSample,
    PrometheusServer,
    ReplayExporter,
    ScrapeJob,
    WebhookReceiver,
    backfill,
    backfill_timestamps,
    free_port,
    load_demo_sample,
    poll_until,
    write_openmetrics,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = REPO_ROOT / "alert_rules" / "aiops-plugin.rules.yml"
#: The shipped Alertmanager routing; the demo only replaces its webhook URLs and timings.
ALERTMANAGER_FILE = REPO_ROOT / "examples" / "alertmanager.yml"
METRIC = "smd_metric_value"
AGENT_JOB = "aiops-plugin"
REPLAY_JOB = "smd-replay"


def demo_config(
    prometheus_url: str, agent_port: int, data_dir: Path, fit_window_seconds: float
) -> dict:
    """The agent configuration of the demo (also a readable example of a small config)."""
    return {
        "prometheus": {"url": prometheus_url, "step": "1s", "timeout": "5s", "backoff": "0.2s"},
        "entities": [
            {
                "name": "smd",
                "labels": ["instance"],
                # one query, one series per SMD metric: features are named by their `dim` label
                "queries": {"smd": f"sum by (instance, dim) ({METRIC})"},
            }
        ],
        "detectors": {"device": "cpu", "mad": {"window": 60}},
        "calibration": {"false_alarm_rate": 0.001},
        "schedule": {
            "infer_every": "1s",
            "fit_every": "1h",
            "fit_window": f"{int(fit_window_seconds)}s",
        },
        "store": {"data_dir": str(data_dir)},
        "server": {"host": "127.0.0.1", "port": agent_port},
    }


@dataclass
class DemoStack:
    """Every process and in-process server of the demo; ``close()`` stops them all."""

    workdir: Path
    sample: DemoSample
    history_rows: int
    lead_rows: int
    agent_port: int
    rules_for: str = "0s"
    prometheus: PrometheusServer | None = None
    alertmanager: AlertmanagerServer | None = None
    webhook: WebhookReceiver | None = None
    replay: ReplayExporter | None = None
    agent: subprocess.Popen | None = None
    config_path: Path | None = None
    history_end: float = 0.0
    _log_handles: list = field(default_factory=list)

    @property
    def rows(self) -> np.ndarray:
        """All sample rows in time order: train, then test."""
        return np.concatenate([self.sample.train, self.sample.test])

    @property
    def replay_start(self) -> int:
        """Index (into ``rows``) of the first live row."""
        return self.history_rows

    @property
    def anomaly_row(self) -> int:
        """Index into the replayed rows of the first labelled anomalous row."""
        first_test_anomaly = int(np.argmax(self.sample.test_labels))
        return len(self.sample.train) + first_test_anomaly - self.replay_start

    def start_servers(self) -> None:
        """History into the TSDB, then Prometheus, Alertmanager and the webhook receiver."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        rows = self.rows[: self.history_rows]
        self.history_end = time.time() - 1.0
        openmetrics = self.workdir / "history.om"
        write_openmetrics(
            openmetrics,
            METRIC,
            {"instance": self.sample.machine, "job": REPLAY_JOB},
            "dim",
            self.sample.feature_names,
            rows,
            backfill_timestamps(len(rows), self.history_end, 1.0),
        )
        tsdb = self.workdir / "prometheus-data"
        backfill(openmetrics, tsdb)
        self.webhook = WebhookReceiver().start()
        self.alertmanager = AlertmanagerServer(
            webhook_url=self.webhook.url,
            workdir=self.workdir / "alertmanager",
            config_file=ALERTMANAGER_FILE,
        )
        self.alertmanager.start()
        rules = self.workdir / "aiops-plugin.rules.yml"
        rules.write_text(load_rules_with_for(RULES_FILE, self.rules_for))
        self.replay = ReplayExporter(
            self.rows[self.replay_start :],
            self.sample.feature_names,
            {"instance": self.sample.machine},
            metric=METRIC,
        )
        self.prometheus = PrometheusServer(
            tsdb_dir=tsdb,
            workdir=self.workdir / "prometheus",
            scrape_jobs=[
                ScrapeJob(REPLAY_JOB, [self.replay.target], honor_labels=True),
                ScrapeJob(AGENT_JOB, [f"127.0.0.1:{self.agent_port}"], honor_labels=True),
            ],
            rule_files=[rules],
            alertmanager_url=self.alertmanager.url,
        )
        self.prometheus.start()

    def write_agent_config(self) -> Path:
        assert self.prometheus is not None
        self.config_path = self.workdir / "aiops-demo.yaml"
        config = demo_config(
            self.prometheus.url,
            self.agent_port,
            self.workdir / "agent-data",
            fit_window_seconds=self.history_rows,
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def start_agent(self, timeout: float = 120.0) -> None:
        """``aiops-plugin run`` as a separate process, as a user runs it; wait until ready."""
        config = self.write_agent_config()
        log_file = (self.workdir / "agent.log").open("ab")
        self._log_handles.append(log_file)
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "aiops_plugin.cli", "run", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.wait_agent_ready(timeout)

    def wait_agent_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool | None:
            if self.agent is not None and self.agent.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {self.agent.returncode}:\n{self.agent_log()}"
                )
            try:
                response = requests.get(f"{self.agent_url}/readyz", timeout=2)
            except requests.RequestException:
                return None
            return True if response.status_code == 200 else None

        poll_until(ready, timeout, f"agent ready on {self.agent_url}")

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    def agent_log(self, lines: int = 60) -> str:
        path = self.workdir / "agent.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def stop_agent(self, timeout: float = 30.0) -> int | None:
        if self.agent is None or self.agent.poll() is not None:
            return None if self.agent is None else self.agent.returncode
        self.agent.send_signal(signal.SIGTERM)
        try:
            return self.agent.wait(timeout)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            return self.agent.wait()

    def close(self) -> None:
        self.stop_agent()
        for server in (self.replay, self.prometheus, self.alertmanager, self.webhook):
            if server is not None:
                for stop in ("close", "stop"):
                    if hasattr(server, stop):
                        getattr(server, stop)()
                        break
        for handle in self._log_handles:
            handle.close()


def new_stack(workdir: Path, agent_port: int | None = None, lead_rows: int = 60) -> DemoStack:
    """A stack whose replay reaches the labelled anomaly ``lead_rows`` seconds after it starts."""
    sample = load_demo_sample()
    first_anomaly = len(sample.train) + int(np.argmax(sample.test_labels))
    return DemoStack(
        workdir=workdir,
        sample=sample,
        history_rows=first_anomaly - lead_rows,
        lead_rows=lead_rows,
        agent_port=agent_port or free_port(),
    )


def run_demo(workdir: Path, agent_port: int = 9108, keep_running: bool = False) -> int:
    """Run the demo end to end; returns the process exit code."""
    stack = new_stack(workdir.resolve(), agent_port, lead_rows=90)
    try:
        print(f"[demo] backfilling {stack.history_rows} rows of SMD machine-1-2 as history")
        stack.start_servers()
        assert stack.prometheus and stack.alertmanager and stack.replay and stack.webhook
        print(f"[demo] Prometheus   {stack.prometheus.url}")
        print(f"[demo] Alertmanager {stack.alertmanager.url}")
        print("[demo] starting the agent (fits on the history first)")
        stack.start_agent()
        print(f"[demo] agent ready: {stack.agent_url}/metrics")
        stack.replay.start()
        print(
            f"[demo] replaying the test part live, 1 row/s; the labelled anomaly arrives in "
            f"~{stack.anomaly_row} s"
        )
        payload, received_at = stack.webhook.wait_for_alert(
            "AiopsAnomaly(Detected|Severe)",
            timeout=stack.anomaly_row + 180,
            instance=stack.sample.machine,
        )
        visible = stack.replay.row_started_at(stack.anomaly_row)
        alert = next(
            a for a in payload["alerts"] if a["labels"]["alertname"].startswith("AiopsAnomaly")
        )
        print(f"[demo] alert delivered by Alertmanager {received_at - visible:.1f} s after the")
        print("[demo] first anomalous sample was served:")
        print(
            json.dumps({"labels": alert["labels"], "annotations": alert["annotations"]}, indent=2)
        )
        if keep_running:
            print("[demo] everything keeps running; Ctrl-C to stop")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # noqa: BLE001 - the demo reports and cleans up
        print(f"[demo] failed: {exc}", file=sys.stderr)
        print(stack.agent_log(), file=sys.stderr)
        return 1
    finally:
        stack.close()
