"""The last lines the daemon logged, kept in memory for the dashboard's log view."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

LOG_TAIL_LINES = 500
"""Lines kept; older ones are only in the terminal or ``--log-file``."""


class LogTail(logging.Handler):
    """A logging handler keeping the last `size` records, each with a sequence number so that a reader
    asks only for the lines it has not seen."""

    def __init__(self, size: int = LOG_TAIL_LINES) -> None:
        super().__init__(logging.DEBUG)
        self._lines: deque[dict[str, Any]] = deque(maxlen=size)
        self._next = 1
        self._guard = threading.Lock()  # records arrive from the event loop and from worker threads
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # a bad log call must not break the daemon
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(
                {
                    "seq": self._next,
                    "time": record.created,
                    "level": record.levelname.lower(),
                    "message": message,
                }
            )
            self._next += 1

    def since(self, seq: int = 0, level: int = logging.DEBUG) -> list[dict[str, Any]]:
        """The kept lines after `seq` at `level` or above, oldest first."""
        with self._guard:
            lines = list(self._lines)
        return [
            line
            for line in lines
            if line["seq"] > seq and logging.getLevelName(line["level"].upper()) >= level
        ]
