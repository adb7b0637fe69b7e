"""Real Prometheus and Alertmanager on 127.0.0.1, for the end-to-end tests and the local demo.

The plugin's contract is with real servers (PromQL reads, scraped ``/metrics``, alerts routed by
Alertmanager), so tests and the demo run the real binaries in temporary directories on free ports
instead of mocking their HTTP APIs. Nothing here imports pytest.

Public API:

- ``free_port() -> int``: a TCP port on 127.0.0.1 that was free a moment ago.
- ``find_binary(*names) -> str``: path of a binary, or ``BinaryNotFoundError`` with the apt line.
- ``poll_until(check, timeout, what, interval=0.2)``: the one deadline-poll loop used here.
- ``load_demo_sample() -> DemoSample``: the shipped SMD machine-1-2 slice (see
  ``demo_data/README.md``): 3000 train rows, 600 labelled test rows, 38 features ``m00..m37``.
- ``backfill_timestamps(n_rows, end, step=1.0) -> np.ndarray``: time-compressed timestamps, row
  ``i`` at ``end - (n_rows - 1 - i) * step`` seconds.
- ``write_openmetrics(path, metric, labels, feature_label, feature_names, values, timestamps)``:
  OpenMetrics text for ``promtool tsdb create-blocks-from openmetrics``.
- ``backfill(openmetrics_path, tsdb_dir)``: runs promtool; call it before Prometheus starts.
- ``ScrapeJob``: one ``scrape_configs`` entry (job name, ``host:port`` targets, interval,
  ``honor_labels``).
- ``PrometheusServer``: ``start() / stop() / restart() / close()``, context manager, ``url``,
  ``wait_ready``, ``reload``, ``query``, ``query_range``, ``wait_for``.
- ``AlertmanagerServer``: one route to a webhook, or a shipped configuration file (e.g.
  ``examples/alertmanager.yml``) with its webhook URLs and timings replaced;
  ``start() / stop() / close()``, ``url``, ``post_alerts``, ``alerts``.
- ``WebhookReceiver``: in-process HTTP server collecting Alertmanager webhook payloads;
  ``wait_for_alert(alertname, timeout, status="firing", **labels) -> (payload, received_at)``.
- ``ReplayExporter``: in-process exporter serving one row of an array per ``seconds_per_row``;
  ``current_row``, ``row_started_at(row)``, ``wait_for_row(row, timeout)``.

Errors are ``LocalStackError`` subclasses: ``BinaryNotFoundError`` (with the apt-get line),
``ServerStartError`` and ``BackfillError`` (with the tail of the process' output) and
``WaitTimeoutError``. All wall-clock times are Unix seconds (``time.time()``), so times measured
here compare directly with Prometheus sample timestamps.

Facts these helpers are built around (checked against Prometheus 2.42):

- promtool reads OpenMetrics timestamps as seconds (milliseconds silently become dates far in the
  future) and silently drops a sample older than the previous one of its series, so
  ``write_openmetrics`` refuses both.
- Prometheus deletes blocks older than its newest sample minus retention: ``retention="10y"``.
- Prometheus loads blocks at startup, and then rejects every sample (of every series, ``up``
  included) older than its newest block's end. So: backfill, then start Prometheus, and end the
  history at or before now; history ending in the future stalls all ingestion until then.
- A new scrape target is first scraped ~6 s after Prometheus starts: poll with ``wait_for``.

History that live scrapes continue, as the end-to-end test and the demo use it::

    sample = load_demo_sample()
    labels = {"instance": sample.machine, "job": "smd"}  # the labels the scrape will produce
    stamps = backfill_timestamps(len(sample.train), end=time.time() - 1)
    write_openmetrics(om, "smd_metric_value", labels, "dim", sample.feature_names,
                      sample.train, stamps)
    backfill(om, tsdb)
    replay = ReplayExporter(sample.test, sample.feature_names, {"instance": sample.machine})
    with PrometheusServer(tsdb, [ScrapeJob("smd", [replay.target], honor_labels=True)]) as prom:
        prom.wait_for('up{job="smd"} == 1')
        replay.start()  # row 0 is in the next scrape; no test row is skipped

The series then hold every history row 1 s apart, a seam of ~6-8 s (target discovery), then one
live sample per second; a 1 s ``query_range`` over the whole span has a point at every step.
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import numpy as np
import requests
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

DEMO_SAMPLE_FILE = "smd-machine-1-2-sample.csv.gz"
APT_HINT = "apt-get install prometheus prometheus-alertmanager"
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_T = TypeVar("_T")


class LocalStackError(RuntimeError):
    """Base class for failures of the local Prometheus / Alertmanager stack."""


class BinaryNotFoundError(LocalStackError):
    """A server binary is not on PATH."""


class ServerStartError(LocalStackError):
    """A server process exited or never became ready; the message holds its log tail."""


class BackfillError(LocalStackError):
    """promtool refused the OpenMetrics input; the message holds promtool's output."""


class WaitTimeoutError(LocalStackError, TimeoutError):
    """A condition polled with a deadline did not become true in time."""


def find_binary(*names: str) -> str:
    """Absolute path of the first of ``names`` on PATH (Debian names Alertmanager differently)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise BinaryNotFoundError(f"none of {', '.join(names)} found on PATH; install with: {APT_HINT}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (a server binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll_until(
    check: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.2
) -> _T:
    """Call ``check`` until it returns something other than None, or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _duration(seconds: float) -> str:
    """A Prometheus duration string (``"1s"``, ``"500ms"``) for a number of seconds."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"duration must be positive, got {seconds} s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


# --------------------------------------------------------------------------------------------
# The demo sample and backfill


@dataclass(frozen=True)
class DemoSample:
    """The shipped SMD machine-1-2 slice, values min-max scaled to [0, 1] by the publishers.

    Attributes:
        train: float32 ``(3000, 38)``, the last 3000 train rows (unlabelled, mostly normal).
        test: float32 ``(600, 38)``, test rows 5500..6099.
        test_labels: int ``(600,)``, 1 = anomalous minute (test rows 5875..5950).
        train_rows: int ``(3000,)``, original row index of each train row.
        test_rows: int ``(600,)``, original row index of each test row.
        feature_names: ``["m00", ..., "m37"]``, the column order of ``train`` and ``test``.
        machine: the SMD machine the rows come from.
    """

    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    train_rows: np.ndarray
    test_rows: np.ndarray
    feature_names: list[str]
    machine: str = "machine-1-2"


def load_demo_sample() -> DemoSample:
    """Read ``demo_data/smd-machine-1-2-sample.csv.gz`` from the installed package."""
    resource = resources.files("aiops_plugin") / "demo_data" / DEMO_SAMPLE_FILE
    with gzip.open(io.BytesIO(resource.read_bytes()), "rt") as handle:
        header = handle.readline().strip().split(",")
        body = np.loadtxt(handle, delimiter=",", dtype=str, ndmin=2)
    if header[:3] != ["part", "row", "label"]:
        raise ValueError(f"{DEMO_SAMPLE_FILE}: unexpected header {header[:3]}")
    parts, rows, labels = body[:, 0], body[:, 1].astype(int), body[:, 2].astype(int)
    values = body[:, 3:].astype(np.float32)
    is_train, is_test = parts == "train", parts == "test"
    return DemoSample(
        train=values[is_train],
        test=values[is_test],
        test_labels=labels[is_test],
        train_rows=rows[is_train],
        test_rows=rows[is_test],
        feature_names=header[3:],
    )


def backfill_timestamps(n_rows: int, end: float, step: float = 1.0) -> np.ndarray:
    """Time-compressed timestamps ``(n_rows,)``, seconds: row ``i`` at ``end - (n-1-i)*step``.

    SMD rows are one minute apart; replaying them one per ``step`` seconds lets a test cover
    hours of history in minutes while keeping the rows' order and spacing uniform.
    """
    return end - step * np.arange(n_rows - 1, -1, -1, dtype=np.float64)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_openmetrics(
    path: str | Path,
    metric: str,
    labels: Mapping[str, str],
    feature_label: str,
    feature_names: Sequence[str],
    values: np.ndarray,
    timestamps: np.ndarray,
) -> None:
    """Write one gauge family as OpenMetrics text for ``promtool tsdb create-blocks-from``.

    One series per feature: ``metric{labels, feature_label="<feature>"} value timestamp``.
    Series are written one after another, each in time order: promtool appends samples in file
    order and silently drops one older than its series' previous sample. NaN values are skipped
    (a missing sample, not a NaN sample).

    Args:
        path: output file.
        metric: metric name, e.g. ``smd_metric_value``.
        labels: labels shared by all series. To continue these series by live scraping, give
            exactly the labels the scrape will produce (including ``job``).
        feature_label: label that names the feature, e.g. ``dim``.
        feature_names: one name per column of ``values``.
        values: ``(time, features)``.
        timestamps: ``(time,)`` Unix seconds, strictly increasing.
    """
    values = np.asarray(values, dtype=np.float64)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if not _METRIC_NAME.match(metric):
        raise ValueError(f"invalid metric name {metric!r}")
    for name in [*labels, feature_label]:
        if not _LABEL_NAME.match(name):
            raise ValueError(f"invalid label name {name!r}")
    if feature_label in labels:
        raise ValueError(f"feature label {feature_label!r} is also in labels")
    if values.ndim != 2 or values.shape != (timestamps.shape[0], len(feature_names)):
        raise ValueError(
            f"values {values.shape} must be (len(timestamps)={timestamps.shape[0]}, "
            f"len(feature_names)={len(feature_names)})"
        )
    if timestamps.size > 1 and not np.all(np.diff(timestamps) > 0):
        raise ValueError("timestamps must be strictly increasing (promtool drops the others)")
    if timestamps.size and timestamps.max() > 1e11:
        raise ValueError("timestamps look like milliseconds; promtool expects Unix seconds")

    shared = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels.items())
    stamps = [f"{t:.3f}" for t in timestamps]
    with Path(path).open("w", encoding="utf-8") as out:
        out.write(f"# TYPE {metric} gauge\n")
        for column, feature in enumerate(feature_names):
            feature_pair = f'{feature_label}="{_escape_label_value(feature)}"'
            series = f"{metric}{{{','.join(filter(None, [shared, feature_pair]))}}}"
            out.writelines(
                f"{series} {value!r} {stamp}\n"
                for value, stamp in zip(values[:, column].tolist(), stamps, strict=True)
                if not math.isnan(value)
            )
        out.write("# EOF\n")


def backfill(openmetrics_path: str | Path, tsdb_dir: str | Path) -> None:
    """Turn an OpenMetrics file into TSDB blocks in ``tsdb_dir`` (before Prometheus starts).

    Prometheus only loads blocks at startup and, once running, rejects samples older than its
    newest block's end, so history must be written here first and must not end in the future.
    """
    promtool = find_binary("promtool")
    Path(tsdb_dir).mkdir(parents=True, exist_ok=True)
    command = [promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet"]
    done = subprocess.run(
        [*command, str(openmetrics_path), str(tsdb_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        output = (done.stderr + done.stdout).strip()[-4000:]
        raise BackfillError(
            f"promtool backfill of {openmetrics_path} into {tsdb_dir} failed "
            f"(exit {done.returncode}):\n{output}"
        )


# --------------------------------------------------------------------------------------------
# Server processes


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
            raise LocalStackError(f"prometheus reload failed: {response.text.strip()}")

    def _api(self, path: str, params: Mapping[str, Any]) -> Any:
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or body.get("status") != "success":
            error = body.get("error", response.text.strip())
            raise LocalStackError(f"prometheus /api/v1/{path} {dict(params)} failed: {error}")
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
            raise LocalStackError(f"{path}: not an Alertmanager configuration (no 'route')")
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
            raise LocalStackError(f"alertmanager rejected alerts: {response.text.strip()}")

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


# --------------------------------------------------------------------------------------------
# In-process HTTP servers


class WebhookReceiver:
    """Collects Alertmanager webhook payloads in-process, to assert on what an on-call would get.

    Each payload is stored with ``received_at`` (Unix seconds) so a test can measure the delay
    from an anomalous sample to the notification.
    """

    def __init__(self) -> None:
        self._received: list[tuple[dict[str, Any], float]] = []
        self._changed = threading.Condition()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    payload = json.loads(self.rfile.read(length))
                except ValueError:
                    self.send_error(400, "body is not JSON")
                    return
                receiver._record(payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Silence per-request logging to stderr."""

        return Handler

    def _record(self, payload: dict[str, Any]) -> None:
        with self._changed:
            self._received.append((payload, time.time()))
            self._changed.notify_all()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/alerts"

    @property
    def payloads(self) -> list[dict[str, Any]]:
        """Every payload received so far, oldest first."""
        with self._changed:
            return [payload for payload, _ in self._received]

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="webhook-receiver", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _find(self, alertname: str, status: str, labels: Mapping[str, str]) -> int:
        for index in range(len(self._received)):
            for alert in self._received[index][0].get("alerts", []):
                alert_labels = alert.get("labels", {})
                if (
                    alert.get("status") == status
                    and re.fullmatch(alertname, alert_labels.get("alertname", "")) is not None
                    and all(alert_labels.get(k) == v for k, v in labels.items())
                ):
                    return index
        return -1

    def wait_for_alert(
        self, alertname: str, timeout: float = 30.0, status: str = "firing", **labels: str
    ) -> tuple[dict[str, Any], float]:
        """First payload holding an alert with this name (a regular expression matched against
        the whole name), status and labels, and its arrival time.

        Returns ``(payload, received_at)``, ``received_at`` in Unix seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while (index := self._find(alertname, status, labels)) < 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [a.get("labels") for p, _ in self._received for a in p.get("alerts", [])]
                    raise WaitTimeoutError(
                        f"no {status} alert {alertname} {labels} within {timeout:.1f}s; "
                        f"received: {json.dumps(seen)[:1000]}"
                    )
                self._changed.wait(remaining)
            return self._received[index]


class _RowCollector(Collector):
    """Serves the current row of the replay as one gauge family, all features from one row."""

    def __init__(self, replay: ReplayExporter) -> None:
        self._replay = replay

    def collect(self) -> Iterator[GaugeMetricFamily]:
        replay = self._replay
        family = GaugeMetricFamily(
            replay.metric,
            "Replayed dataset value, one row per replay step.",
            labels=[*replay.labels, replay.feature_label],
        )
        row = replay.current_row
        if row >= 0:
            shared = list(replay.labels.values())
            for feature, value in zip(replay.feature_names, replay.values[row], strict=True):
                if not math.isnan(value):
                    family.add_metric([*shared, feature], float(value))
        yield family


class ReplayExporter:
    """Serves a dataset live, one row every ``seconds_per_row``, for Prometheus to scrape.

    Exposes ``metric{<labels>, <feature_label>="<feature>"}`` (default
    ``smd_metric_value{instance=..., dim="m00".."m37"}``) from its own registry, without
    timestamps, so Prometheus stamps each sample with its scrape time. The HTTP server runs from
    construction but serves no series until ``start()``: start it once Prometheus scrapes it, so
    that no row is missed. After the last row it keeps serving that row. Scrape it with
    ``ScrapeJob(..., honor_labels=True)`` so its ``instance`` label is kept. With scrapes and rows
    both 1 s apart, scrape jitter can occasionally repeat or skip one row.

    Args:
        values: ``(rows, features)``.
        feature_names: one per column.
        labels: labels shared by all series, e.g. ``{"instance": "machine-1-2"}``.
        seconds_per_row: wall-clock seconds each row is served.
    """

    def __init__(
        self,
        values: np.ndarray,
        feature_names: Sequence[str],
        labels: Mapping[str, str],
        metric: str = "smd_metric_value",
        feature_label: str = "dim",
        seconds_per_row: float = 1.0,
    ) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.ndim != 2 or self.values.shape[1] != len(feature_names):
            raise ValueError(f"values {self.values.shape} do not match {len(feature_names)} names")
        self.feature_names = list(feature_names)
        self.labels = dict(labels)
        self.metric = metric
        self.feature_label = feature_label
        self.seconds_per_row = seconds_per_row
        self._lock = threading.Lock()
        self._row = -1
        self._started_at: list[float] = []
        self._stop = threading.Event()
        self._advancer: threading.Thread | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_RowCollector(self))
        self._server, self._server_thread = start_http_server(
            0, addr="127.0.0.1", registry=self.registry
        )

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @property
    def target(self) -> str:
        """``host:port`` for a ``ScrapeJob``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.target}/metrics"

    @property
    def current_row(self) -> int:
        """Index of the row being served; -1 before ``start()``."""
        with self._lock:
            return self._row

    def row_started_at(self, row: int) -> float:
        """Unix time at which ``row`` began to be served; KeyError if not reached yet."""
        with self._lock:
            if not 0 <= row < len(self._started_at):
                raise KeyError(f"row {row} has not been served yet")
            return self._started_at[row]

    def wait_for_row(self, row: int, timeout: float) -> float:
        """Block until ``row`` is served; returns ``row_started_at(row)``."""
        if not 0 <= row < len(self.values):
            raise ValueError(f"row {row} outside 0..{len(self.values) - 1}")
        return poll_until(
            lambda: self.row_started_at(row) if self.current_row >= row else None,
            timeout,
            f"replay row {row}",
            interval=0.05,
        )

    def _advance(self) -> None:
        origin = time.time()
        for row in range(len(self.values)):
            if row > 0 and self._stop.wait(origin + row * self.seconds_per_row - time.time()):
                return
            with self._lock:
                self._row = row
                self._started_at.append(time.time())

    def start(self) -> Self:
        """Begin serving row 0 now, then advance on schedule (no drift: times are from start)."""
        if self._advancer is None:
            self._advancer = threading.Thread(target=self._advance, name="replay", daemon=True)
            self._advancer.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._advancer is not None:
            self._advancer.join()
        self._server.shutdown()
        self._server.server_close()
        self._server_thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
