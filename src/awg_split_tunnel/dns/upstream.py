"""The resolvers a route's lookups are sent to: a tunnel's own ``dns:`` servers, else the system
resolver's upstream servers (still through the tunnel)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path

DNS_PORT = 53

RESOLV_CONF_FILES = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))
"""Where the system resolver's upstream servers are written: systemd-resolved's list of the real
servers first (``/etc/resolv.conf`` then names only its stub at 127.0.0.53)."""


def nameservers(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf text, loopback ones left out (a local stub is not an
    upstream), a scope (``fe80::1%eth0``) dropped, malformed lines skipped."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1].partition("%")[0])
        except ValueError:
            continue
        if not address.is_loopback and str(address) not in found:
            found.append(str(address))
    return found


def system_upstream_servers(files: Iterable[Path] = RESOLV_CONF_FILES) -> list[str]:
    """The system resolver's upstream servers: the first of ``files`` that names any."""
    for path in files:
        try:
            servers = nameservers(path.read_text(errors="replace"))
        except OSError:
            continue
        if servers:
            return servers
    return []


def route_servers(tunnel_servers: Sequence[str], system: Sequence[str]) -> list[str]:
    """The servers a route asks: the tunnel's own, else the system's."""
    return list(tunnel_servers) if tunnel_servers else list(system)
