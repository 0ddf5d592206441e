"""Console control events for `awg-split-tunnel run` in a Windows console (docs/WINDOWS.md, Service).

Windows has no SIGTERM. Closing the console window, logging off and shutting down send
``CTRL_CLOSE_EVENT``, ``CTRL_LOGOFF_EVENT`` and ``CTRL_SHUTDOWN_EVENT`` to the handler registered with
``SetConsoleCtrlHandler``, on a thread of their own; the process is ended when the handler returns (or
after about 5 s for a close). So the handler asks the daemon to stop and waits, up to `CLOSE_GRACE`, for
the stop to finish: the divert handles closed, the kill switch removed. Ctrl-C and Ctrl-Break ask for a
stop and return at once.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from typing import Any

CTRL_C_EVENT = 0
CTRL_BREAK_EVENT = 1
CTRL_CLOSE_EVENT = 2
CTRL_LOGOFF_EVENT = 5
CTRL_SHUTDOWN_EVENT = 6
ENDING_EVENTS = frozenset({CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT})
"""After these the process is ended when the handler returns."""

CLOSE_GRACE = 4.5
"""Seconds the handler waits for the stop; Windows ends the process about 5 s after a close event."""

SetHandler = Callable[[Callable[[int], bool], bool], None]
"""SetConsoleCtrlHandler(handler, add)."""


class ConsoleStop:
    """Turns console control events into a daemon stop (module docstring)."""

    def __init__(
        self,
        request_stop: Callable[[], None],
        stopped: threading.Event,
        set_handler: SetHandler | None = None,
        *,
        grace: float = CLOSE_GRACE,
    ) -> None:
        self._request_stop = request_stop
        self._stopped = stopped
        self._set_handler = set_handler or _kernel32_set_handler()
        self._grace = grace

    def handle(self, event: int) -> bool:
        """The handler: True (handled) for every event it knows."""
        if event not in ENDING_EVENTS and event not in (CTRL_C_EVENT, CTRL_BREAK_EVENT):
            return False
        self._request_stop()
        if event in ENDING_EVENTS:
            self._stopped.wait(self._grace)
        return True

    def __enter__(self) -> ConsoleStop:
        self._set_handler(self.handle, True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._set_handler(self.handle, False)


def _kernel32_set_handler() -> SetHandler:
    if sys.platform != "win32":
        raise OSError("console control events are Windows only")
    kernel32: Any = ctypes.WinDLL("kernel32", use_last_error=True)
    routine = ctypes.WINFUNCTYPE(ctypes.c_int, ctypes.c_uint32)
    installed: dict[Callable[[int], bool], Any] = {}

    def set_handler(handler: Callable[[int], bool], add: bool) -> None:
        if add:
            # The ctypes callback must stay alive while Windows may call it.
            installed[handler] = routine(lambda event: 1 if handler(event) else 0)
            kernel32.SetConsoleCtrlHandler(installed[handler], 1)
        elif handler in installed:
            kernel32.SetConsoleCtrlHandler(installed.pop(handler), 0)

    return set_handler
