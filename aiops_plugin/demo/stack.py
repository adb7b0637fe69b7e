"""The whole path on one machine: real Prometheus + Alertmanager, a real SMD sample, the agent.

Used by ``aiops-plugin demo`` (``runner.py``) and by the end-to-end and dashboard tests, so they
cannot drift apart.

Time is compressed: SMD rows are one minute apart, the demo plays one row per second. The first
``history_rows`` rows (train part, then the start of the test part) are backfilled into Prometheus
as history ending now; the agent fits on them; the remaining test rows are then served live by a
replay exporter that Prometheus scrapes every second. The labelled anomaly (test rows 18109-18149
of machine-1-7) arrives ``lead_rows`` seconds after the replay starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import requests
import yaml

from aiops_plugin.alerting import load_rules_with_for
from aiops_plugin.demo.errors import AgentExitedError, PortInUseError
from aiops_plugin.demo.openmetrics import backfill, backfill_timestamps, write_openmetrics
from aiops_plugin.demo.polling import poll_until
from aiops_plugin.demo.ports import free_port, port_in_use, process_listens_on
from aiops_plugin.demo.processes import AlertmanagerServer, PrometheusServer, ScrapeJob
from aiops_plugin.demo.replay import ReplayExporter
from aiops_plugin.demo.sample import DemoSample, load_demo_sample
from aiops_plugin.demo.webhook import WebhookReceiver

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = REPO_ROOT / "alert_rules" / "aiops-plugin.rules.yml"
#: The shipped Alertmanager routing; the demo only replaces its webhook URLs and timings.
ALERTMANAGER_FILE = REPO_ROOT / "examples" / "alertmanager.yml"
METRIC = "smd_metric_value"
AGENT_JOB = "aiops-plugin"
AGENT_HOST = "127.0.0.1"
REPLAY_JOB = "smd-replay"
#: The demo's detectors: one quick classic detector, so the alert comes within minutes.
DEMO_DETECTORS: dict[str, Any] = {"device": "cpu", "mad": {"window": 60}}
#: The agent configuration a stack writes into its work directory; also the mark of a work
#: directory an earlier stack used.
AGENT_CONFIG_FILE = "aiops-demo.yaml"
#: What a run leaves in its work directory that the next run must not see: the TSDB holds the
#: last replay (it would overlap the new history), Alertmanager's notification log would hold
#: back the same alert for ``repeat_interval``, the agent's store holds the last run's models.
RUN_STATE = ("prometheus-data", "prometheus", "alertmanager", "agent-data")


def demo_config(
    prometheus_url: str,
    agent_port: int,
    data_dir: Path,
    fit_window_seconds: float,
    detectors: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The agent configuration of the demo (also a readable example of a small config).

    ``detectors`` replaces the ``detectors`` section (default ``DEMO_DETECTORS``).
    """
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
        "detectors": DEMO_DETECTORS if detectors is None else detectors,
        "calibration": {"false_alarm_rate": 0.001},
        "schedule": {
            "infer_every": "1s",
            "fit_every": "1h",
            "fit_window": f"{int(fit_window_seconds)}s",
        },
        "store": {"data_dir": str(data_dir)},
        "server": {"host": AGENT_HOST, "port": agent_port},
    }


@dataclass
class DemoStack:
    """Every process and in-process server of the demo; ``close()`` stops them all.

    ``detectors`` replaces the agent's ``detectors`` section (default ``DEMO_DETECTORS``).
    """

    workdir: Path
    sample: DemoSample
    history_rows: int
    lead_rows: int
    agent_port: int
    rules_for: str = "0s"
    detectors: dict[str, Any] | None = None
    prometheus: PrometheusServer | None = None
    alertmanager: AlertmanagerServer | None = None
    webhook: WebhookReceiver | None = None
    replay: ReplayExporter | None = None
    agent: subprocess.Popen[bytes] | None = None
    config_path: Path | None = None
    history_end: float = 0.0
    _log_handles: list[IO[bytes]] = field(default_factory=list)

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

    def check_agent_port(self) -> None:
        """Raise ``PortInUseError`` if something already holds the agent's port.

        Checked before anything starts: an agent left over from an earlier demo would otherwise
        answer in place of ours while ours fails to bind.
        """
        if port_in_use(self.agent_port, AGENT_HOST):
            raise PortInUseError(
                f"port {self.agent_port} on {AGENT_HOST} is in use "
                "(another demo or agent still running?)"
            )

    def start_servers(self) -> None:
        """History into the TSDB, then Prometheus, Alertmanager and the webhook receiver.

        In a work directory an earlier stack used (it holds ``AGENT_CONFIG_FILE``), that run's
        ``RUN_STATE`` is removed first; nothing is removed from any other directory.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        if (self.workdir / AGENT_CONFIG_FILE).exists():
            for stale in RUN_STATE:
                shutil.rmtree(self.workdir / stale, ignore_errors=True)
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
                ScrapeJob(AGENT_JOB, [f"{AGENT_HOST}:{self.agent_port}"], honor_labels=True),
            ],
            rule_files=[rules],
            alertmanager_url=self.alertmanager.url,
        )
        self.prometheus.start()

    def write_agent_config(self) -> Path:
        assert self.prometheus is not None
        self.config_path = self.workdir / AGENT_CONFIG_FILE
        config = demo_config(
            self.prometheus.url,
            self.agent_port,
            self.workdir / "agent-data",
            fit_window_seconds=self.history_rows,
            detectors=self.detectors,
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    @property
    def agent_log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start_agent(self, timeout: float = 120.0) -> None:
        """``aiops-plugin run`` as a separate process, as a user runs it; wait until ready.

        The agent's output goes to ``agent.log``, emptied at the stack's first start and appended
        to by restarts.
        """
        config = self.write_agent_config()
        log_file = self.agent_log_path.open("ab" if self._log_handles else "wb")
        self._log_handles.append(log_file)
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "aiops_plugin.cli", "run", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # the demo's own config only: a user's AIOPS_STORE_URL or tokens must not point
            # the demo agent at their real store or Prometheus credentials
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("AIOPS_")},
                "PYTHONUNBUFFERED": "1",
            },
        )
        self.wait_agent_ready(timeout)

    def wait_agent_ready(self, timeout: float = 120.0) -> None:
        """Poll the ``/readyz`` of the agent process started here until it answers 200.

        The port must be held by that very process (where ``/proc`` tells): a server of someone
        else answering on the port is not taken for ours. If the process exits, this raises
        ``AgentExitedError`` at once.
        """
        agent = self.agent
        if agent is None:
            raise AgentExitedError("the agent was not started")

        def ready() -> bool | None:
            if agent.poll() is not None:
                raise AgentExitedError(
                    f"the agent exited with code {agent.returncode} before it was ready: "
                    f"{self.agent_exit_reason()}"
                )
            if process_listens_on(agent.pid, self.agent_port) is False:
                return None
            try:
                response = requests.get(f"{self.agent_url}/readyz", timeout=2)
            except requests.RequestException:
                return None
            return True if response.status_code == 200 else None

        poll_until(ready, timeout, f"agent ready on {self.agent_url}")

    @property
    def agent_url(self) -> str:
        return f"http://{AGENT_HOST}:{self.agent_port}"

    def agent_log(self, lines: int = 60) -> str:
        """The last ``lines`` lines of ``agent.log`` ("" before the agent started)."""
        if not self.agent_log_path.exists():
            return ""
        return "\n".join(self.agent_log_path.read_text(errors="replace").splitlines()[-lines:])

    def agent_exit_reason(self) -> str:
        """The last line of the agent's log: after a crash, the exception that ended it."""
        lines = [line for line in self.agent_log(20).splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def stop_agent(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the agent and wait (SIGKILL after ``timeout`` s); its exit code."""
        if self.agent is None or self.agent.poll() is not None:
            return None if self.agent is None else self.agent.returncode
        self.agent.send_signal(signal.SIGTERM)
        try:
            return self.agent.wait(timeout)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            return self.agent.wait()

    def close(self) -> None:
        """Stop the agent, then every server, each waited for; safe at any stage of start-up."""
        self.stop_agent()
        if self.replay is not None:
            self.replay.stop()
        for server in (self.prometheus, self.alertmanager):
            if server is not None:
                server.close()
        if self.webhook is not None:
            self.webhook.stop()
        for handle in self._log_handles:
            handle.close()


def new_stack(
    workdir: Path,
    agent_port: int | None = None,
    lead_rows: int = 60,
    detectors: dict[str, Any] | None = None,
) -> DemoStack:
    """A stack whose replay reaches the labelled anomaly ``lead_rows`` seconds after it starts.

    ``detectors`` replaces the agent's ``detectors`` section (default ``DEMO_DETECTORS``).
    """
    sample = load_demo_sample()
    first_anomaly = len(sample.train) + int(np.argmax(sample.test_labels))
    return DemoStack(
        workdir=workdir,
        sample=sample,
        history_rows=first_anomaly - lead_rows,
        lead_rows=lead_rows,
        agent_port=agent_port or free_port(),
        detectors=detectors,
    )
