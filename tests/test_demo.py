"""``aiops-plugin demo`` as a user runs it: a separate process, the real servers, signals, ports.

The demo takes minutes to deliver its alert; these tests stop it at the points where its
start-up and shutdown went wrong for users (a signal while it runs, its agent port already taken,
an agent that dies while starting, a second run in the same work directory) and check what is
left running and what was printed. Child processes are found in ``/proc`` (Linux).
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aiops_plugin.demo import free_port, new_stack, port_in_use

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
#: A line of an earlier run's agent log, which this run's log must not carry on.
EARLIER_RUN_LINE = "a line written by an earlier demo run"


def _proc_state(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of a process from ``/proc/<pid>/stat``; None once it is gone."""
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return after_name[0], int(after_name[1])


def alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def children_of(pid: int) -> dict[int, str]:
    """Live child processes of ``pid``: ``{pid: command line}``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        state = _proc_state(int(entry.name))
        if state is not None and state[1] == pid and alive(int(entry.name)):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            found[int(entry.name)] = cmdline.strip()
    return found


class DemoProcess:
    """``python -m aiops_plugin.cli demo`` in a child process; stdout read as it is printed."""

    def __init__(self, workdir: Path, port: int, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aiops_plugin.cli", "demo"]
                + ["--port", str(port), "--workdir", str(workdir)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="demo-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for_line(self, text: str, timeout: float) -> None:
        """Block until a printed line contains ``text``; fail with the output otherwise."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._ended or any(text in line for line in self._lines), timeout
            )
            if not any(text in line for line in self._lines):
                pytest.fail(
                    f"the demo did not print {text!r} within {timeout:.0f}s;\n"
                    f"stdout:\n{''.join(self._lines)}\nstderr:\n{self.stderr}"
                )

    def wait(self, timeout: float) -> int:
        """The exit code; fails, with the output, if the demo is still running after
        ``timeout`` s."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the demo still runs after {timeout:.0f}s;\n"
                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
            )

    def kill_everything(self, children: dict[int, str] | None = None) -> None:
        """SIGKILL the demo and its children (``children`` as recorded earlier, since a child
        outlives a demo that does not stop it), so a failed test leaves nothing running."""
        pids = {**(children or {}), **children_of(self.process.pid)}
        for pid in [*pids, self.process.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)


class OldAgent(http.server.ThreadingHTTPServer):
    """A stand-in for an agent left running by an earlier demo: every GET answers 200, as a
    ready agent's ``/readyz`` does."""

    def __init__(self, port: int) -> None:
        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b'{"ready": true, "reason": "ready"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Silence per-request logging."""

        super().__init__(("127.0.0.1", port), Ready)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, name="old-agent", daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def listen_without_answering(port: int) -> socket.socket:
    """A socket holding ``port`` that accepts connections (the kernel does) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@dataclass
class StoppedDemo:
    """A demo that printed "agent ready" and was then sent SIGTERM."""

    demo: DemoProcess
    workdir: Path
    port: int
    children: dict[int, str]
    exit_code: int
    seconds_to_exit: float


@pytest.fixture(scope="module")
def stopped_by_sigterm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoppedDemo]:
    base = tmp_path_factory.mktemp("demo-sigterm")
    workdir, port = base / "work", free_port()
    workdir.mkdir()
    (workdir / "agent.log").write_text(EARLIER_RUN_LINE + "\n")
    demo = DemoProcess(workdir, port, base / "stderr.txt")
    children: dict[int, str] = {}
    try:
        demo.wait_for_line("agent ready", timeout=240)
        children = children_of(demo.process.pid)
        sent = time.monotonic()
        demo.process.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=60)
        yield StoppedDemo(demo, workdir, port, children, code, time.monotonic() - sent)
    finally:
        demo.kill_everything(children)


def test_sigterm_stops_prometheus_alertmanager_and_the_agent(
    stopped_by_sigterm: StoppedDemo,
) -> None:
    stopped = stopped_by_sigterm
    commands = " | ".join(stopped.children.values())
    assert "prometheus " in commands and "alertmanager" in commands, commands
    assert "aiops_plugin.cli run" in commands, commands
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.demo.stderr
    assert stopped.seconds_to_exit < 30
    assert not [cmd for pid, cmd in stopped.children.items() if alive(pid)]
    assert not port_in_use(stopped.port)
    assert "Traceback" not in stopped.demo.stderr


def test_agent_log_holds_only_this_run(stopped_by_sigterm: StoppedDemo) -> None:
    log = (stopped_by_sigterm.workdir / "agent.log").read_text()
    assert EARLIER_RUN_LINE not in log
    assert "agent stopped cleanly" in log


def test_port_in_use_is_the_first_and_only_error(tmp_path: Path) -> None:
    old_agent = OldAgent(0)
    port = old_agent.server_address[1]
    demo = DemoProcess(tmp_path / "work", port, tmp_path / "stderr.txt")
    try:
        assert demo.wait(timeout=60) == 1
    finally:
        demo.kill_everything()
        old_agent.stop()
    assert demo.stderr == (
        f"[demo] failed: port {port} on 127.0.0.1 is in use "
        "(another demo or agent still running?)\n"
    )
    assert demo.stdout == ""  # nothing was started
    assert not (tmp_path / "work" / "prometheus").exists()


def test_a_server_taking_the_port_during_start_up_is_not_taken_for_our_agent(
    tmp_path: Path,
) -> None:
    port = free_port()
    demo = DemoProcess(tmp_path / "work", port, tmp_path / "stderr.txt")
    old_agent = None
    try:
        demo.wait_for_line("starting the agent", timeout=120)
        old_agent = OldAgent(port)  # before our agent, still importing, binds the port
        assert demo.wait(timeout=120) == 1
    finally:
        demo.kill_everything()
        if old_agent is not None:
            old_agent.stop()
    assert "agent ready" not in demo.stdout
    first = demo.stderr.splitlines()[0]
    assert first.startswith("[demo] failed: the agent exited with code 1 before it was ready")
    assert f"127.0.0.1:{port}" in first  # the agent's own last words: it could not bind


def test_an_agent_failure_is_reported_once_with_the_agent_log(tmp_path: Path) -> None:
    port = free_port()
    demo = DemoProcess(tmp_path / "work", port, tmp_path / "stderr.txt")
    holder = None
    try:
        demo.wait_for_line("starting the agent", timeout=120)
        holder = listen_without_answering(port)
        assert demo.wait(timeout=120) == 1
    finally:
        demo.kill_everything()
        if holder is not None:
            holder.close()
    output = demo.stdout + demo.stderr
    assert output.count("[demo] failed:") == 1, output
    assert output.count("Traceback (most recent call last)") == 1, output  # the agent's, once
    assert demo.stderr.startswith("[demo] failed: the agent exited"), output


def test_the_agent_never_imports_the_demo() -> None:
    """The demo is test and demo machinery: an agent in production carries none of it."""
    code = (
        "import sys, aiops_plugin.agent, aiops_plugin.api, aiops_plugin.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('aiops_plugin.demo')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_second_run_in_the_same_workdir_gets_its_alert_delivered(tmp_path: Path) -> None:
    """Alertmanager keeps a notification log: a run that reused the last run's would not send
    the same alert again for ``repeat_interval``."""
    alert = {
        "alertname": "AiopsAnomalyDetected",
        "severity": "warning",
        "entity_group": "smd",
        "entity": "machine-1-7",
        "instance": "machine-1-7",
    }
    for _ in range(2):
        stack = new_stack(tmp_path / "work")
        try:
            stack.start_servers()
            stack.write_agent_config()
            assert stack.alertmanager is not None and stack.webhook is not None
            stack.alertmanager.post_alerts([{"labels": alert}])
            stack.webhook.wait_for_alert("AiopsAnomalyDetected", timeout=20)
        finally:
            stack.close()
