"""Conntrack entries of the kernel data path, through pyroute2's ctnetlink socket.

A UDP flow's verdict lives in its conntrack entry (the ct mark), which outlives the app's socket by the
UDP timeout (30 s unanswered, 120 s after replies). The kernel hands a closed socket's port to the next
socket that asks, maybe another app's: the entry is deleted when the socket closes (a FLOW DELETED event),
so the next app's first datagram is queued and decided afresh instead of inheriting the verdict.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Any

log = logging.getLogger("awg_split_tunnel.router")


class ConntrackTable:
    """Deletes conntrack entries by their original tuple; one netlink socket per family, opened lazily.

    pyroute2 needs the socket's family to match the tuple's (an IPv6 tuple on the default AF_INET socket
    is refused with EINVAL).
    """

    def __init__(self) -> None:
        self._sockets: dict[int, Any] = {}

    def forget(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> bool:
        """Delete the entry of (proto, src:sport → dst:dport); False if there was none."""
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
        entry = NFCTAttrTuple(
            family=family,
            saddr=str(ipaddress.ip_address(src)),
            daddr=str(ipaddress.ip_address(dst)),
            proto=proto,
            sport=sport,
            dport=dport,
        )
        try:
            self._socket(family).entry("del", tuple_orig=entry)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                log.debug("[Router] conntrack delete failed: %s", exc)
            return False
        return True

    def _socket(self, family: int) -> Any:
        sock = self._sockets.get(family)
        if sock is None:
            from pyroute2 import Conntrack

            sock = self._sockets[family] = Conntrack(nfgen_family=family)
        return sock

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
