"""HTTP: ``/metrics`` (the exporter's registry), ``/healthz``, ``/readyz``, the anomaly events
API (``/api/v1/anomalies``, feedback included) and, when logs are enabled, the OTLP log
receiver's ``/v1/logs``.

Served by uvicorn in a background thread so the scheduler and the signal handling stay in the
main thread.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from aiops_plugin.anomaly_api import register_anomaly_api
from aiops_plugin.logs.receiver import register_log_receiver

if TYPE_CHECKING:
    from aiops_plugin.agent import Agent


def create_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="aiops-plugin", docs_url=None, redoc_url=None)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(agent.exporter.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready, reason = agent.readiness()
        return JSONResponse({"ready": ready, "reason": reason}, status_code=200 if ready else 503)

    def count_feedback(label: str) -> None:
        agent.exporter.feedback.labels(label=label).inc()

    register_anomaly_api(
        app, agent.store, feedback_token=agent.config.feedback.token, on_feedback=count_feedback
    )
    if agent.config.logs.enabled:
        if agent.log_intake is None:
            raise RuntimeError("logs are enabled: call Agent.open_log_intake() before create_app")
        register_log_receiver(
            app,
            agent.log_intake,
            agent.config.logs,
            agent.exporter,
            {group.name: group.max_entities for group in agent.config.entities},
        )
    return app


class HttpServer:
    """uvicorn in a thread (which leaves signal handling to the main thread), stoppable."""

    @classmethod
    def for_agent(cls, agent: Agent) -> HttpServer:
        """The agent's server on its configured address (``Agent.run(http=...)``)."""
        server = agent.config.server
        return cls(agent, server.host, server.port, server.tls_cert_file, server.tls_key_file)

    def __init__(
        self,
        agent: Agent,
        host: str,
        port: int,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
    ) -> None:
        """HTTPS when ``tls_cert_file`` and ``tls_key_file`` are given (``server.tls_*``)."""
        config = uvicorn.Config(
            create_app(agent),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            ssl_certfile=tls_cert_file,
            ssl_keyfile=tls_key_file,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"HTTP server did not start on {self.server.config.host}:"
                    f"{self.server.config.port} (port in use?)"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
