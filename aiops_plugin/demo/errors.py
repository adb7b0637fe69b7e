"""Failures of the local stack; every one is a ``StackError``, so a caller catches one class."""

from __future__ import annotations


class StackError(RuntimeError):
    """Base class for failures of the local Prometheus / Alertmanager / agent stack."""


class BinaryNotFoundError(StackError):
    """A server binary is not on PATH; the message holds the apt-get line."""


class ServerStartError(StackError):
    """A server process exited or never became ready; the message holds its log tail."""


class BackfillError(StackError):
    """promtool refused the OpenMetrics input; the message holds promtool's output."""


class WaitTimeoutError(StackError, TimeoutError):
    """A condition polled with a deadline did not become true in time."""


class PortInUseError(StackError):
    """A port the stack must bind is already taken, e.g. by an agent of an earlier demo."""


class AgentExitedError(StackError):
    """The agent process exited before it became ready; its log holds the reason."""
