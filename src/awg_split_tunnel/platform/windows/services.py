"""Windows services' processes, for ``service:`` rules (docs/WINDOWS.md, "Rules by service").

A service runs in one process at a time, often a ``svchost.exe`` shared with other services, so a rule
by exe cannot single it out. The Service Control Manager says which process runs it:
``QueryServiceStatusEx`` (``SERVICE_STATUS_PROCESS.dwProcessId``), which psutil's
``win_service_get(name).pid()`` asks — None while the service is not running; ``psutil.NoSuchProcess``
for a name no service has. The router (``core/packet_router.py``) reads these pids every few seconds and
matches a new flow's process by its pid.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import psutil

DNSCACHE_SERVICE = "Dnscache"
"""The DNS Client service: it sends the lookups of every app that asks the system resolver
(docs/DNS.md, Windows); ``dns.system`` applies to it as the rule ``service:Dnscache``."""

ServiceGet = Callable[[str], Any]
"""``psutil.win_service_get``: the service of that name, whose ``pid()`` is its process's id or None."""


def service_pids(name: str, service_get: ServiceGet | None = None) -> frozenset[int]:
    """The pid of the process hosting service ``name``; empty when the service is not running, does not
    exist, or cannot be asked (never raises: the router asks from its packet loop)."""
    if service_get is None:
        if sys.platform != "win32":
            return frozenset()
        service_get = psutil.win_service_get
    try:
        pid = service_get(name).pid()
    except (psutil.Error, OSError):
        return frozenset()
    return frozenset((pid,)) if isinstance(pid, int) and pid > 0 else frozenset()
