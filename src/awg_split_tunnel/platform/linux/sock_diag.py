"""The owner of one socket on Linux: a netlink INET_DIAG exact lookup, then the socket's inode in /proc.

``psutil.net_connections`` reads every socket table and every process's descriptors to answer for one
flow (4–48 ms). The kernel answers for one 4-tuple directly: a ``SOCK_DIAG_BY_FAMILY`` request without
``NLM_F_DUMP`` (an exact lookup, ``inet_diag_find_one_icsk`` / ``udp_dump_one``) returns that socket's
inode and uid, or ENOENT when there is none — a few µs, so a flood of SYNs from no socket (raw packets)
costs nothing to refuse. Only a socket that exists is then looked for among the descriptors in
``/proc/PID/fd``, processes of the socket's uid first.

pyroute2's ``DiagSocket`` (0.9) offers dumps only, costs ~120 µs a request through its marshalling, and
cannot be called inside a running asyncio loop (``scripts/repro/pyroute2_sync_in_asyncio.py``) — where
the router runs — so the request is packed here (``linux/inet_diag.h``, ``linux/sock_diag.h``).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLMSG_ERROR = 2
NLMSG_HDRLEN = 16
INET_DIAG_NOCOOKIE = 0xFFFFFFFFFFFFFFFF
ALL_STATES = 0xFFFFFFFF

_NLMSG = struct.Struct("=IHHII")
_REQ_HEAD = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_PORTS = struct.Struct("!HH")
_REQ_TAIL = struct.Struct("=IQ")  # interface, cookie
_UID_INODE = struct.Struct("=II")
# inet_diag_msg: family, state, timer, retrans (4), ports (4), addresses (32), interface (4), cookie (8),
# expires, rqueue, wqueue (12), then uid and inode.
_UID_OFFSET = NLMSG_HDRLEN + 4 + 4 + 32 + 4 + 8 + 12
_ERRNO = struct.Struct("=i")


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """One socket as the kernel describes it: its inode (``socket:[inode]`` in /proc) and owner uid."""

    inode: int
    uid: int


def _diag_socket() -> socket.socket:
    if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
        raise OSError("sock_diag needs Linux")
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)


class SockDiag:
    """Exact socket lookups over one netlink socket (not thread-safe: one owner)."""

    def __init__(self) -> None:
        self._sock = _diag_socket()
        self._sock.settimeout(0.5)  # the kernel answers at once; never hang the packet loop on it
        self._seq = 0
        self.udp = self._finds_udp()
        """Whether UDP sockets can be looked up (the ``udp_diag`` module answers): without it every UDP
        lookup says ENOENT, which must not be taken for "no socket"."""

    def close(self) -> None:
        self._sock.close()

    def find(
        self, proto: int, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
    ) -> DiagSocket | None:
        """The socket of this flow (a connected one, or for UDP one bound to the local port), or None.

        Raises OSError when the kernel cannot answer (no ``udp_diag``, netlink refused).
        """
        family = socket.AF_INET if len(local_addr) == 4 else socket.AF_INET6
        if proto == socket.IPPROTO_UDP:
            # udp_dump_one looks the socket up as for a datagram coming in: source = the remote side.
            src, sport, dst, dport = remote_addr, remote_port, local_addr, local_port
        else:
            src, sport, dst, dport = local_addr, local_port, remote_addr, remote_port
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = (
            _REQ_HEAD.pack(family, proto, 0, ALL_STATES)
            + _PORTS.pack(sport, dport)
            + src.ljust(16, b"\0")
            + dst.ljust(16, b"\0")
            + _REQ_TAIL.pack(0, INET_DIAG_NOCOOKIE)
        )
        self._sock.send(
            _NLMSG.pack(NLMSG_HDRLEN + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self._seq, 0) + body
        )
        while True:
            data = self._sock.recv(8192)
            _, kind, _, seq, _ = _NLMSG.unpack_from(data)
            if seq == self._seq:
                break  # an answer to an earlier request that timed out on our side is skipped
        if kind == NLMSG_ERROR:
            code = -_ERRNO.unpack_from(data, NLMSG_HDRLEN)[0]
            if code == errno.ENOENT:
                return None
            raise OSError(code, os.strerror(code))
        uid, inode = _UID_INODE.unpack_from(data, _UID_OFFSET)
        return DiagSocket(inode, uid)

    def _finds_udp(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("127.0.0.1", 9))
            port = probe.getsockname()[1]
            loopback = socket.inet_aton("127.0.0.1")
            try:
                found = self.find(socket.IPPROTO_UDP, loopback, port, loopback, 9)
            except OSError:
                return False
            return found is not None and found.inode == os.fstat(probe.fileno()).st_ino


def pid_of_socket(found: DiagSocket, proc: str = "/proc") -> int | None:
    """The process holding the socket ``found`` (its inode among a process's descriptors): processes of
    the socket's uid first, then the rest. None if none holds it (closed meanwhile) or they are hidden."""
    if not found.inode:
        return None  # a connection in TIME_WAIT (or half open): no process holds it any more
    target = f"socket:[{found.inode}]"
    others: list[str] = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"{proc}/{name}").st_uid != found.uid:
                others.append(name)
                continue
        except OSError:
            continue
        if _holds(proc, name, target):
            return int(name)
    for name in others:
        if _holds(proc, name, target):
            return int(name)
    return None


def _holds(proc: str, pid: str, target: str) -> bool:
    directory = f"{proc}/{pid}/fd"
    try:
        fds = os.listdir(directory)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{directory}/{fd}") == target:
                return True
        except OSError:
            continue
    return False
