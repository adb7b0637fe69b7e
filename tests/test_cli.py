"""The command line as a new user meets it: help, bad configurations, an unreachable Prometheus.

Unreachable means real sockets on 127.0.0.1: a closed port (connection refused) and a listening
socket that takes the TCP connection but never answers HTTP (no answer). Timings are asserted
against the configured timeout, retries and backoff, which the tests keep small.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import aiops_plugin.agent  # noqa: F401 - imported up front: timings leave out torch's import
from aiops_plugin.cli import app
from aiops_plugin.demo import (
    PrometheusServer,
    backfill,
    backfill_timestamps,
    free_port,
    write_openmetrics,
)
from tests.test_config import MINIMAL

METRIC = "smd_metric_value"
QUERY = f"sum by (instance, dim) ({METRIC})"
ROWS = 300
GROUPS = 4
TIMEOUT, RETRIES, BACKOFF = 0.5, 2, 0.05
#: in-process start-up (store, model loading) on top of the reads themselves, seconds
SLACK = 1.5


def write_config(directory: Path, url: str, groups: int = 1) -> Path:
    raw = {
        "prometheus": {
            "url": url,
            "step": "1s",
            "timeout": TIMEOUT,
            "retries": RETRIES,
            "backoff": BACKOFF,
        },
        "entities": [
            {"name": f"group{i}", "labels": ["instance"], "queries": {"smd": QUERY}}
            for i in range(groups)
        ],
        "detectors": {"device": "cpu", "mad": {"window": 30}},
        "schedule": {"fit_window": f"{ROWS - 1}s"},
        "store": {"data_dir": str(directory / "data")},
    }
    path = directory / "aiops.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def read_bound() -> float:
    """Seconds one read may take before giving up: every try times out, plus urllib3's backoff
    (0, then ``backoff * 2**(n-1)`` before try n+1; bounded by the geometric sum)."""
    return TIMEOUT * (RETRIES + 1) + BACKOFF * 2 ** (RETRIES + 1)


@pytest.fixture
def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A socket that completes TCP handshakes (the kernel's backlog) and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose store holds models of ``GROUPS`` groups, fitted by ``aiops-plugin fit`` on
    a real Prometheus with backfilled history (stopped again before the tests use it)."""
    workdir = tmp_path_factory.mktemp("cli-fitted")
    rng = np.random.default_rng(0)
    phase = np.arange(ROWS)[:, None] / 30.0 + np.arange(3)[None, :]
    history = workdir / "history.om"
    write_openmetrics(
        history,
        METRIC,
        {"instance": "host-1", "job": "smd"},
        "dim",
        ["m0", "m1", "m2"],
        np.sin(phase) + 0.1 * rng.standard_normal((ROWS, 3)),
        backfill_timestamps(ROWS, time.time() - 2.0, 1.0),
    )
    backfill(history, workdir / "tsdb")
    with PrometheusServer(tsdb_dir=workdir / "tsdb", workdir=workdir / "prometheus") as server:
        server.start()
        result = CliRunner().invoke(
            app, ["fit", "--config", str(write_config(workdir, server.url, GROUPS))]
        )
    assert result.exit_code == 0, result.output
    return workdir


def invoke_timed(args: list[str]) -> tuple[object, float]:
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    return result, time.monotonic() - started


def assert_one_error_line(stderr: str, url: str, cause: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert f"Prometheus at {url}" in errors[0] and cause in errors[0], errors[0]


@pytest.mark.parametrize("command", [["fit"], ["score", "--once"]], ids=["fit", "score"])
def test_refused_connection_is_one_error_line_and_exit_1(
    command: list[str], closed_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, closed_url)
    done = subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", *command, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert_one_error_line(done.stderr, closed_url, "connection refused")
    assert len(done.stderr.splitlines()) <= 4, done.stderr


def test_silent_prometheus_gives_up_after_the_configured_tries(
    silent_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, silent_url)
    result, seconds = invoke_timed(["score", "--once", "-c", str(config)])
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.stderr, silent_url, f"timed out after {TIMEOUT:g} s")
    assert seconds < read_bound() + SLACK


@pytest.mark.parametrize("unreachable", ["closed_url", "silent_url"])
def test_score_stops_at_the_first_unreachable_read_of_several_groups(
    unreachable: str, fitted_dir: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(unreachable)
    config = write_config(fitted_dir, url, GROUPS)
    result, seconds = invoke_timed(["score", "--once", "-c", str(config)])
    assert "fitting first" not in result.stderr, "the stored models were not used"
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.stderr, url, "")
    assert seconds < read_bound() + SLACK, f"{seconds:.1f} s for {GROUPS} groups"


def test_help_tells_a_user_what_the_tool_is() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "thin: parse, call, print" not in result.output
    assert "Prometheus" in result.output and "anomal" in result.output
    for command in ("check-config", "run", "score", "fit"):
        assert command in result.output


def _unreadable(path: Path) -> list[str]:
    """Make ``path`` unreadable; root reads anything, so it runs without the DAC capabilities."""
    path.write_text(MINIMAL)
    path.chmod(0)
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no way to be refused a read")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("directory", "is a directory"),
        ("empty", "is empty"),
        ("yaml_syntax", ":3:9: not valid YAML: expected"),
        ("not_a_url", "prometheus.url"),
        ("grafana_not_a_url", "grafana.url"),
        ("not_utf8", "not UTF-8"),
        ("permission_denied", "permission denied"),
    ],
)
def test_check_config_names_the_file_in_a_short_error_and_exits_2(
    case: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "aiops.yaml"
    prefix: list[str] = []
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_text("# nothing yet\n")
    elif case == "yaml_syntax":
        path.write_text("prometheus:\n  url: [http://x\nentities: []\n")
    elif case == "not_a_url":
        path.write_text(MINIMAL.replace('"http://127.0.0.1:9090"', "not a url"))
    elif case == "grafana_not_a_url":
        path.write_text(MINIMAL + "grafana: {url: grafana.example.com}\n")
    elif case == "not_utf8":
        path.write_bytes(MINIMAL.replace("node_cpu", "n\xf6de_cpu").encode("latin-1"))
    elif case == "permission_denied":
        prefix = _unreadable(path)
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "aiops_plugin.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "<unicode string>" not in done.stderr
    assert len(done.stderr.splitlines()) <= 3, done.stderr
    assert done.stderr.startswith(f"error: {path}"), done.stderr
    assert expected in done.stderr, done.stderr
