"""An in-process receiver of Alertmanager webhooks, to assert on what an on-call would get.

``WebhookReceiver``: ``wait_for_alert(alertname, timeout, status="firing", **labels) ->
(payload, received_at)``, times in Unix seconds (``time.time()``), so they compare directly with
Prometheus sample timestamps.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Mapping
from typing import Any, Self

from aiops_plugin.demo.errors import WaitTimeoutError


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
