"""The one deadline-poll loop of the local stack: tests and the demo wait on it, never on sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from aiops_plugin.demo.errors import WaitTimeoutError

_T = TypeVar("_T")


def poll_until(
    check: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.2
) -> _T:
    """Call ``check`` until it returns something other than None, or raise after ``timeout`` s.

    Raises:
        WaitTimeoutError: naming ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)
