"""``aiops-plugin run`` as an operating-system process, for the tests that kill it, restart it
or run several side by side (shards): start (waiting for /healthz), wait until ready, SIGKILL,
stop. Its output goes to a log file that failures quote."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests


class AgentProcess:
    """One agent process on the configuration file ``path`` (served on ``port``)."""

    def __init__(self, path: Path, port: int, log_file: Path) -> None:
        self.path, self.port, self.log_file = path, port, log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_file.read_text()[-chars:] if self.log_file.exists() else ""

    def start(self, timeout: float = 120.0) -> AgentProcess:
        """Start it and wait until /healthz answers."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aiops_plugin.cli", "run", "--config", str(self.path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_tail()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return self
            time.sleep(0.2)
        raise AssertionError(f"the agent on port {self.port} did not start: {self.log_tail()}")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until /readyz answers 200 (a model fitted and a cycle succeeded)."""
        deadline = time.monotonic() + timeout
        while not requests.get(f"{self.url}/readyz", timeout=5).ok:
            assert time.monotonic() < deadline, self.log_tail()
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
