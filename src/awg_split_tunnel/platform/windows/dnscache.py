"""Windows: the DNS Client service (Dnscache), the one process that sends the lookups of every app that
asks the system resolver (docs/DNS.md). Found by its service, not by its exe: it runs in a
``svchost.exe`` like many other services."""

from __future__ import annotations

import sys

DNSCACHE_SERVICE = "Dnscache"


def dnscache_pid() -> int | None:
    """The pid of the process running Dnscache; None when it is not running or cannot be asked."""
    if sys.platform != "win32":
        return None
    import psutil

    try:
        pid: int | None = psutil.win_service_get(DNSCACHE_SERVICE).pid()
    except (psutil.Error, OSError):
        return None
    return pid
