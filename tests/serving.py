"""An agent served over real HTTP for a test: start, yield its URL, stop and close everything."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aiops_plugin.agent import Agent
from aiops_plugin.api import HttpServer


@contextlib.contextmanager
def serving(agent: Agent, port: int) -> Iterator[str]:
    """The agent's HTTP server on 127.0.0.1:``port``; on exit the server stops, then the log
    intake (if open) and the store close, in the order the agent's own shutdown uses."""
    server = HttpServer(agent, "127.0.0.1", port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        if agent.log_intake is not None:
            agent.log_intake.close()
        agent.store.close()
