"""``aiops-plugin demo``: the stack of ``stack.py`` driven to a delivered alert, told line by line.

SIGTERM and SIGINT (Ctrl-C) end the demo the same way: the handler raises ``DemoStopped`` in the
main thread, which unwinds to ``DemoStack.close()``, so the agent, Prometheus and Alertmanager are
stopped and waited for and no process keeps holding a port. Further SIGTERM / SIGINT are ignored
while that runs, so a second Ctrl-C cannot leave a child behind.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from aiops_plugin.demo.errors import StackError
from aiops_plugin.demo.stack import DemoStack, new_stack

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class DemoStopped(BaseException):
    """SIGTERM or SIGINT arrived; ``signum`` says which.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so no ``except Exception`` on the way
    swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    _ignore_stop_signals()
    raise DemoStopped(signum)


def _say(text: str, stream: TextIO = sys.stdout) -> None:
    """One line of the demo's story, flushed (the output is often a pipe: tee, CI logs)."""
    print(text, file=stream, flush=True)


def _start(stack: DemoStack) -> None:
    _say(f"[demo] backfilling {stack.history_rows} rows of SMD {stack.sample.machine} as history")
    stack.start_servers()
    assert stack.prometheus and stack.alertmanager
    _say(f"[demo] Prometheus   {stack.prometheus.url}")
    _say(f"[demo] Alertmanager {stack.alertmanager.url}")
    _say("[demo] starting the agent (fits on the history first)")
    stack.start_agent()
    _say(f"[demo] agent ready: {stack.agent_url}/metrics")


def _wait_for_alert(stack: DemoStack) -> tuple[dict[str, Any], float]:
    """Replay the test rows live; the first anomaly alert Alertmanager delivers, and the delay
    (seconds) from the first anomalous sample being served to its delivery."""
    assert stack.replay and stack.webhook
    stack.replay.start()
    _say(
        f"[demo] replaying the test part live, 1 row/s; the labelled anomaly arrives in "
        f"~{stack.anomaly_row} s"
    )
    payload, received_at = stack.webhook.wait_for_alert(
        "AiopsAnomaly(Detected|Severe)",
        timeout=stack.anomaly_row + 180,
        instance=stack.sample.machine,
    )
    alert = next(
        a for a in payload["alerts"] if a["labels"]["alertname"].startswith("AiopsAnomaly")
    )
    return alert, received_at - stack.replay.row_started_at(stack.anomaly_row)


def _report_failure(stack: DemoStack, error: Exception) -> None:
    """The cause on one line; then, once, the agent's log tail if the agent had started (the
    cause of a failure after that point is usually in it)."""
    _say(f"[demo] failed: {error}", sys.stderr)
    if stack.agent is not None:
        _say(f"[demo] last lines of {stack.agent_log_path}:", sys.stderr)
        _say(stack.agent_log(), sys.stderr)


def run_demo(workdir: Path, agent_port: int = 9108, keep_running: bool = False) -> int:
    """Run the demo end to end; returns the process exit code.

    0 once the alert was delivered (also when a signal stops ``keep_running`` afterwards), 1 on
    a failure, 128 + the signal number when SIGTERM or SIGINT stopped it before the alert. It
    installs signal handlers, so call it from the main thread; they are restored on return.
    """
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    stack = new_stack(workdir.resolve(), agent_port, lead_rows=90)
    delivered = False
    try:
        try:
            stack.check_agent_port()
            _start(stack)
            alert, delay = _wait_for_alert(stack)
            delivered = True
            _say(f"[demo] alert delivered by Alertmanager {delay:.1f} s after the")
            _say("[demo] first anomalous sample was served:")
            shown = {"labels": alert["labels"], "annotations": alert["annotations"]}
            _say(json.dumps(shown, indent=2))
            if keep_running:
                _say("[demo] everything keeps running; Ctrl-C (or SIGTERM) stops it")
                while True:
                    time.sleep(3600)
            return 0
        except (StackError, OSError) as error:
            _report_failure(stack, error)
            return 1
    except DemoStopped as stopped:
        _say(f"[demo] {stopped}: stopping the agent, Prometheus and Alertmanager")
        return 0 if delivered else 128 + stopped.signum
    finally:
        _ignore_stop_signals()
        stack.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
