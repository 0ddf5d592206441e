"""Ending apps' TCP connections from outside the app: ``ss -K`` (iproute2), i.e. sock_diag SOCK_DESTROY.

The kernel data path routes a packet tunnel's flows by their conntrack mark; when the tunnel goes down,
a connection the app is only waiting on would sit silent until the app sends again. Destroying the
socket tells the app at once (its calls fail with ECONNABORTED), as the divert path's RST does.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Iterable

log = logging.getLogger("awg_split_tunnel.router")

BATCH = 64
"""Sockets named per ``ss`` call (its filter is one argument)."""


def _endpoint(address: bytes, port: int) -> str:
    ip = ipaddress.ip_address(address)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def destroy_tcp(connections: Iterable[tuple[bytes, int, bytes, int]]) -> int:
    """Destroy the TCP sockets of (local address, local port, remote address, remote port); how many
    ``ss`` was asked to end (0 when ``ss`` is missing or refuses: the apps then learn at their next send)."""
    ss = shutil.which("ss")
    wanted = [f"( src {_endpoint(a, p)} and dst {_endpoint(b, q)} )" for a, p, b, q in connections]
    if ss is None or not wanted:
        return 0
    for start in range(0, len(wanted), BATCH):
        expression = " or ".join(wanted[start : start + BATCH])
        done = subprocess.run([ss, "-K", "-t", expression], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.warning("[Router] ending TCP connections failed: %s", done.stderr.strip()[:200])
            return 0
    return len(wanted)
