"""Real Prometheus and Alertmanager processes on 127.0.0.1, each in its own work directory.

The plugin's contract is with real servers (PromQL reads, scraped ``/metrics``, alerts routed by
Alertmanager), so tests and the demo run the real binaries on free ports instead of mocking their
HTTP APIs.

- ``find_binary(*names) -> str``: path of a binary, or ``BinaryNotFoundError`` with the apt line.
- ``ScrapeJob``: one ``scrape_configs`` entry (job name, ``host:port`` targets, interval,
  ``honor_labels``).
- ``PrometheusServer``: ``start() / stop() / restart() / close()``, context manager, ``url``,
  ``wait_ready``, ``reload``, ``query``, ``query_range``, ``wait_for``.
- ``AlertmanagerServer``: one route to a webhook, or a shipped configuration file (e.g.
  ``examples/alertmanager.yml``) with its webhook URLs and timings replaced;
  ``start() / stop() / close()``, ``url``, ``post_alerts``, ``alerts``.

Facts these are built around (checked against Prometheus 2.42):

- Prometheus deletes blocks older than its newest sample minus retention: ``retention="10y"``.
- Prometheus loads blocks at startup, and then rejects every sample (of every series, ``up``
  included) older than its newest block's end: backfill (``aiops_plugin.demo.openmetrics``)
  before it starts.
- A new scrape target is first scraped ~6 s after Prometheus starts: poll with ``wait_for``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import requests
import yaml

from aiops_plugin.demo.errors import (
    BinaryNotFoundError,
    ServerStartError,
    StackError,
    WaitTimeoutError,
)
from aiops_plugin.demo.polling import poll_until
from aiops_plugin.demo.ports import free_port

APT_HINT = "apt-get install prometheus prometheus-alertmanager"


def find_binary(*names: str) -> str:
    """Absolute path of the first of ``names`` on PATH (Debian names Alertmanager differently)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise BinaryNotFoundError(f"none of {', '.join(names)} found on PATH; install with: {APT_HINT}")


def _duration(seconds: float) -> str:
    """A Prometheus duration string (``"1s"``, ``"500ms"``) for a number of seconds."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"duration must be positive, got {seconds} s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


class _ServerProcess:
    """A server binary in its own work directory, its output appended to ``<name>.log`` there."""

    name = "server"

    def __init__(self, workdir: str | Path | None, port: int | None) -> None:
        self._owns_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"aiops-{self.name}-")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if port is None else port
        self.log_path = self.workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _write_config(self) -> None:
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of the process log, for error messages."""
        if not self.log_path.exists():
            return "(no log written)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 30.0) -> Self:
        """Start the process and block until it reports ready; raise with its log otherwise."""
        if self.running:
            return self
        self._write_config()
        command = self._command()
        with self.log_path.open("ab") as log:
            log.write(f"--- starting: {' '.join(command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self.wait_ready(timeout)
        except WaitTimeoutError as error:
            self.stop()
            raise ServerStartError(
                f"{self.name} on {self.url} not ready after {timeout:.0f}s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            ) from error
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/-/ready`` until it answers 200; fail early if the process has exited."""

        def ready() -> bool | None:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise ServerStartError(
                    f"{self.name} exited (code {code}) before becoming ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                response = requests.get(f"{self.url}/-/ready", timeout=2)
            except requests.RequestException:
                return None
            return True if response.status_code == 200 else None

        poll_until(ready, timeout, f"{self.name} {self.url}/-/ready", interval=0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait (so the TSDB is closed cleanly); SIGKILL if it does not exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop and start again on the same port with the same data directory."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop, and remove the work directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class ScrapeJob:
    """One Prometheus ``scrape_configs`` entry.

    ``honor_labels`` keeps an exporter's own ``instance`` label (as ``ReplayExporter`` sets it)
    instead of renaming it to ``exported_instance``.
    """

    job_name: str
    targets: Sequence[str]
    scrape_interval: float | None = None
    metrics_path: str = "/metrics"
    honor_labels: bool = False

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "job_name": self.job_name,
            "metrics_path": self.metrics_path,
            "honor_labels": self.honor_labels,
            "static_configs": [{"targets": list(self.targets)}],
        }
        if self.scrape_interval is not None:
            interval = _duration(self.scrape_interval)
            config["scrape_interval"] = interval
            config["scrape_timeout"] = interval
        return config


class PrometheusServer(_ServerProcess):
    """A real Prometheus on 127.0.0.1 with its TSDB in a temp dir (or the given ``tsdb_dir``).

    ``restart()`` keeps port and TSDB, to test an agent across "Prometheus goes down and comes
    back". Intervals are seconds. Retention defaults to 10 years so backfilled history is kept.
    """

    name = "prometheus"

    def __init__(
        self,
        tsdb_dir: str | Path | None = None,
        scrape_jobs: Sequence[ScrapeJob] = (),
        rule_files: Sequence[str | Path] = (),
        alertmanager_url: str | None = None,
        scrape_interval: float = 1.0,
        evaluation_interval: float = 1.0,
        retention: str = "10y",
        port: int | None = None,
        workdir: str | Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._binary = find_binary("prometheus")
        super().__init__(workdir, port)
        self.tsdb_dir = Path(tsdb_dir) if tsdb_dir is not None else self.workdir / "tsdb"
        self.config_path = self.workdir / "prometheus.yml"
        self.scrape_jobs = list(scrape_jobs)
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.alertmanager_url = alertmanager_url
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.retention = retention
        self.extra_args = list(extra_args)

    def config(self) -> dict[str, Any]:
        """The ``prometheus.yml`` content, from the current attributes."""
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": _duration(self.scrape_interval),
                "scrape_timeout": _duration(self.scrape_interval),
                "evaluation_interval": _duration(self.evaluation_interval),
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [job.to_config() for job in self.scrape_jobs],
        }
        if self.alertmanager_url:
            parts = urlsplit(self.alertmanager_url)
            config["alerting"] = {
                "alertmanagers": [
                    {
                        "scheme": parts.scheme or "http",
                        "path_prefix": parts.path or "/",
                        "static_configs": [{"targets": [parts.netloc]}],
                    }
                ]
            }
        return config

    def _write_config(self) -> None:
        self.tsdb_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))

    def _command(self) -> list[str]:
        return [
            self._binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.tsdb_dir}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            *self.extra_args,
        ]

    def reload(self) -> None:
        """Rewrite the config from the attributes and apply it (``POST /-/reload``)."""
        self._write_config()
        response = requests.post(f"{self.url}/-/reload", timeout=10)
        if response.status_code != 200:
            raise StackError(f"prometheus reload failed: {response.text.strip()}")

    def _api(self, path: str, params: Mapping[str, Any]) -> Any:
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or body.get("status") != "success":
            error = body.get("error", response.text.strip())
            raise StackError(f"prometheus /api/v1/{path} {dict(params)} failed: {error}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the API's ``data.result`` (a list for vector and matrix results)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self._api("query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query over ``[start, end]`` Unix seconds every ``step`` seconds."""
        params = {"query": expr, "start": start, "end": end, "step": step}
        return self._api("query_range", params)["result"]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll an instant query until ``predicate(result)`` holds (default: non-empty result).

        In an instant vector result, ``value[0]`` is the evaluation time, not the sample's
        timestamp: query a range selector (``metric[1m]``) to see when samples were scraped.
        """
        last: list[dict[str, Any]] = []

        def check() -> list[dict[str, Any]] | None:
            nonlocal last
            last = self.query(expr)
            return last if predicate(last) else None

        try:
            return poll_until(check, timeout, f"query {expr!r}", interval=0.25)
        except WaitTimeoutError as error:
            raise WaitTimeoutError(f"{error}; last result: {json.dumps(last)[:1000]}") from None


class AlertmanagerServer(_ServerProcess):
    """A single real Alertmanager delivering to one webhook URL.

    Without ``config_file``, one route sends every alert to the webhook, grouped by ``group_by``.
    With ``config_file`` (e.g. ``examples/alertmanager.yml``), that file's routing tree, grouping,
    inhibit rules and receivers are used as written, with two substitutions a test needs: every
    receiver's webhook URL becomes ``webhook_url`` (the payload's ``receiver`` still names the
    receiver), and ``group_wait`` / ``group_interval`` / ``repeat_interval`` replace the file's on
    the root route and on every route that sets its own (``group_by`` is then ignored).

    Group wait and interval default to 1 s so a notification follows an alert within seconds.
    """

    name = "alertmanager"

    def __init__(
        self,
        webhook_url: str,
        group_by: Sequence[str] = ("alertname",),
        group_wait: float = 1.0,
        group_interval: float = 1.0,
        repeat_interval: float = 3600.0,
        port: int | None = None,
        workdir: str | Path | None = None,
        config_file: str | Path | None = None,
    ) -> None:
        self._binary = find_binary("prometheus-alertmanager", "alertmanager")
        super().__init__(workdir, port)
        self.config_path = self.workdir / "alertmanager.yml"
        self.storage_dir = self.workdir / "data"
        self.webhook_url = webhook_url
        self.group_by = list(group_by)
        self.group_wait = group_wait
        self.group_interval = group_interval
        self.repeat_interval = repeat_interval
        self.config_file = None if config_file is None else Path(config_file)

    def _timings(self) -> dict[str, str]:
        return {
            "group_wait": _duration(self.group_wait),
            "group_interval": _duration(self.group_interval),
            "repeat_interval": _duration(self.repeat_interval),
        }

    def _config_from_file(self, path: Path) -> dict[str, Any]:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or not isinstance(config.get("route"), dict):
            raise StackError(f"{path}: not an Alertmanager configuration (no 'route')")
        for receiver in config.get("receivers", []):
            for webhook in receiver.get("webhook_configs", []):
                webhook["url"] = self.webhook_url
        timings = self._timings()
        config["route"].update(timings)
        routes = list(config["route"].get("routes", []))
        while routes:
            route = routes.pop()
            route.update({key: value for key, value in timings.items() if key in route})
            routes.extend(route.get("routes", []))
        return config

    def config(self) -> dict[str, Any]:
        """The ``alertmanager.yml`` content."""
        if self.config_file is not None:
            return self._config_from_file(self.config_file)
        return {
            "route": {
                "receiver": "webhook",
                "group_by": self.group_by,
                "group_wait": _duration(self.group_wait),
                "group_interval": _duration(self.group_interval),
                "repeat_interval": _duration(self.repeat_interval),
            },
            "receivers": [
                {
                    "name": "webhook",
                    "webhook_configs": [{"url": self.webhook_url, "send_resolved": True}],
                }
            ],
        }

    def _write_config(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))

    def _command(self) -> list[str]:
        return [
            self._binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.storage_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
        ]

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """Send alerts as Prometheus would (``POST /api/v2/alerts``)."""
        response = requests.post(f"{self.url}/api/v2/alerts", json=list(alerts), timeout=10)
        if response.status_code != 200:
            raise StackError(f"alertmanager rejected alerts: {response.text.strip()}")

    def alerts(self, **shown: bool) -> list[dict[str, Any]]:
        """Alerts Alertmanager holds (``GET /api/v2/alerts``), e.g. ``alerts(inhibited=False)``.

        Each has ``labels`` and ``status``: ``state`` (``active`` / ``suppressed``),
        ``inhibitedBy`` and ``silencedBy`` (fingerprints). ``shown`` are the API's flags, each
        true by default: ``active``, ``silenced``, ``inhibited``, ``unprocessed`` (false leaves
        those alerts out).
        """
        params = {name: str(value).lower() for name, value in shown.items()}
        response = requests.get(f"{self.url}/api/v2/alerts", params=params, timeout=10)
        response.raise_for_status()
        return list(response.json())
