"""Faults between the agent and what it depends on, against the running parts.

Prometheus slow or failing: a proxy in front of the real Prometheus (the ``history`` fixture's)
delays its answers past the agent's timeout, then answers 503, then passes through again. The
agent marks the source down, keeps answering /metrics, withdraws stale scores, and scores again
in the first cycle after the proxy passes again.

The store full: SQLite's own "database or disk is full" (a page-count cap on the agent's
connections, the error a full disk gives): the log intake answers 503 with Retry-After, nothing
accepted before is lost, and writes resume by themselves once there is room.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from sqlalchemy import event

from aiops_plugin.agent import Agent, CycleFailed
from tests.test_agent import History, history, make_config, scores_by_instance  # noqa: F401
from tests.test_log_receiver import lines, otlp_request, record, running_receiver
from tests.test_log_receiver import make_config as log_config


class FaultyProxy:
    """HTTP proxy to ``target``: ``mode`` is "pass", "slow" (answers after ``delay`` s) or
    "error" (503 without asking the target)."""

    def __init__(self, target: str, delay: float = 3.0) -> None:
        self.target, self.delay, self.mode = target.rstrip("/"), delay, "pass"
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if proxy.mode == "error":
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"upstream unavailable")
                    return
                if proxy.mode == "slow":
                    time.sleep(proxy.delay)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {"Content-Type": self.headers.get("Content-Type", "")}
                try:
                    answer = requests.request(
                        self.command,
                        proxy.target + self.path,
                        data=body,
                        headers=headers,
                        timeout=30,
                    )
                    self.send_response(answer.status_code)
                    self.send_header("Content-Type", answer.headers.get("Content-Type", ""))
                    self.end_headers()
                    self.wfile.write(answer.content)
                except (requests.RequestException, BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _forward  # noqa: N815 - http.server's names

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxied(history: History, tmp_path: Path) -> Iterator[tuple[Agent, FaultyProxy]]:  # noqa: F811
    proxy = FaultyProxy(history.prometheus.url)
    config = make_config(proxy.url, tmp_path)
    agent = Agent(config)
    agent.start_up()
    agent.fit(now=history.end)
    # the cycle's read is short: a 1 s timeout, one retry (the reader reads these per request)
    config.prometheus.timeout, config.prometheus.retries = 1.0, 1
    try:
        yield agent, proxy
    finally:
        agent.store.close()
        proxy.close()


def _source_up(agent: Agent) -> float:
    return agent.exporter.source_up.labels(source="prometheus")._value.get()


@pytest.mark.parametrize("fault", ["slow", "error"])
def test_prometheus_slow_or_failing_marks_the_source_down_and_recovers_next_cycle(
    proxied: tuple[Agent, FaultyProxy],
    history: History,  # noqa: F811
    fault: str,
) -> None:
    agent, proxy = proxied
    agent.infer(now=history.end)
    before = scores_by_instance(agent)
    assert before and _source_up(agent) == 1

    proxy.mode = fault
    started = time.monotonic()
    with pytest.raises(CycleFailed, match="Prometheus at"):
        agent.infer(now=history.end)
    # bounded by timeout x tries (+ backoff), not by the proxy's delay or a hang
    assert time.monotonic() - started < 10
    assert _source_up(agent) == 0
    assert scores_by_instance(agent) == {}  # stale scores are withdrawn, not served as fresh
    assert agent.exporter.exposition()  # /metrics still renders

    proxy.mode = "pass"
    agent.infer(now=history.end)  # the first cycle after recovery scores again
    assert _source_up(agent) == 1
    assert set(scores_by_instance(agent)) == set(before)


def test_a_full_store_answers_503_keeps_what_it_had_and_recovers(tmp_path: Path) -> None:
    config = log_config(tmp_path)
    with running_receiver(config) as receiver:
        assert (
            receiver.post(
                otlp_request(({"host.name": "web-1"}, lines("kept", 20))).SerializeToString()
            ).status_code
            == 200
        )
        engine = receiver.store.engine
        cap = {"pages": None}

        @event.listens_for(engine, "connect")
        def _cap_pages(connection, _record) -> None:  # noqa: ANN001 - DBAPI objects
            if cap["pages"] is not None:
                connection.execute(f"PRAGMA max_page_count = {cap['pages']}")

        with engine.connect() as connection:
            pages = connection.exec_driver_sql("PRAGMA page_count").scalar()
        cap["pages"] = pages  # no room beyond what is there: the disk is full
        engine.dispose()
        big = [record(f"full {i} " + "x" * 900) for i in range(200)]  # ~180 KB: new pages
        request = otlp_request(({"host.name": "web-1"}, big)).SerializeToString()
        refused = receiver.post(request)
        assert refused.status_code == 503, refused.content
        assert int(refused.headers["retry-after"]) >= 1
        assert "database or disk is full" in refused.text
        assert requests.get(f"{receiver.url}/metrics", timeout=10).ok

        cap["pages"] = None  # room again (the cap is per connection: new ones have none)
        engine.dispose()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = receiver.post(request)
            if answer.status_code == 200:
                break
            time.sleep(1)
        assert answer.status_code == 200
        bodies = receiver.bodies()
    assert [b for b in bodies if b.startswith("kept")] == [
        line.body.string_value for line in lines("kept", 20)
    ]
    assert len([b for b in bodies if b.startswith("full")]) == 200  # once: the 503 stored none


def test_prometheus_failing_during_the_fit_leaves_no_model_and_the_retry_fits(
    history: History,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Prometheus fails while the fit reads (the proxy answers 503): the fit job installs
    nothing, says why and schedules its retry; the retry after Prometheus is back fits."""
    proxy = FaultyProxy(history.prometheus.url)
    agent = Agent(make_config(proxy.url, tmp_path))
    try:
        agent.start_up()
        proxy.mode = "error"
        agent._fit_job()  # what the scheduler runs
        assert agent.models == {} and agent.missing_models()
        assert agent.last_fit_error is not None
        assert "prometheus unavailable" in agent.last_fit_error
        assert "next try in" in agent.last_fit_error
        assert _source_up(agent) == 0
        proxy.mode = "pass"
        agent.fit(now=history.end)
        assert agent.missing_models() == [] and _source_up(agent) == 1
    finally:
        agent.store.close()
        proxy.close()
