"""Waiting for something the lab will do: the one poll loop the end-to-end tests share."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_for(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    detail: Callable[[], str] = lambda: "",
    interval: float = 0.1,
) -> float:
    """Poll ``condition()`` until true; the seconds it took. Fails the test after ``timeout``, with
    ``detail()`` (e.g. the daemon's log) in the message."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(interval)
    pytest.fail(f"not within {timeout:.0f}s: {what}\n{detail()[-4000:]}")
