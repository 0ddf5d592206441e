"""Who owns a new flow: SOCKET/FLOW events → pid, pid → exe path, and the OS lookup fallback.

- ``ConnectEvents`` (sans-I/O) keeps the connect events not yet claimed by a packet. On Linux a CONNECT
  event's local port is 0 (the hook runs before the implicit bind: ``scripts/repro/connect_local_port.py``),
  so an event is matched to its flow's first packet by (protocol, remote address, remote port), oldest
  first — and when several processes' events wait for one remote, the owner is confirmed from its own
  socket list (``pid_owns_socket``): their events and packets arrive in no fixed order. FLOW-layer
  ESTABLISHED events carry the full 5-tuple and match exactly (unconnected UDP ``sendto()`` raises no
  CONNECT at all). A CONNECT that comes after its flow was decided without it (by the exact event, or by
  the OS lookup once the hold timeout passed) is that flow's and is dropped (``expect_late``): kept, it
  would be the next flow's to the same remote whatever app that flow is.
- ``NamespaceFilter``: SOCKET events are host-wide (``scripts/repro/socket_events_host_wide.py``), so
  events of processes in other network namespaces are dropped before they reach the table.
- ``ExeResolver``: pid → exe path through psutil, cached by (pid, create time) so a reused pid never
  inherits a dead process's rules; and a process's ancestors' exe paths, for children that follow their
  parent's rule.
- ``os_lookup_pid``: the fallback when no event came: on Linux the one socket through ``sock_diag``
  (``platform.linux.sock_diag``: µs, and only a socket that exists costs a /proc scan), elsewhere (and
  when netlink cannot answer) the socket tables of this network namespace through psutil (a walk of
  every socket, 4–48 ms). ``OS_LOOKUPS_PER_POLL`` is how many the router makes per timer run.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

IPPROTO_TCP = 6
IPPROTO_UDP = 17

EVENT_MAX_AGE = 2.0
"""Seconds an unclaimed connect event is kept (a connect whose packet we never saw: loopback, refused)."""

STALE_EVENT_AGE = 0.1
"""Seconds after which a waiting CONNECT is confirmed against the OS before a flow takes it, even when it
is the only one. A connect's first packet follows it within milliseconds; an older event is one whose
packet never came to us — a UDP socket connected only to learn its source address, as glibc's
getaddrinfo does for each address it sorts — and another app's flow to that server must not take it."""

MAX_EVENTS = 4096
"""Unclaimed events kept at most; the oldest go first (a flood must not grow memory)."""

OS_LOOKUPS_PER_POLL = 8 if sys.platform.startswith("linux") else 2
"""OS lookups the router makes per timer run; held flows beyond wait for the next run (soon after, not a
tick later), so a run stalls the packet loop for tens of ms at worst. On Linux a lookup is a ``sock_diag``
request (µs when no socket exists; 1–5 ms more when one does, for the /proc scan); elsewhere a psutil
table walk (4–48 ms), so fewer."""


@dataclass(slots=True)
class _Pending:
    pid: int
    at: float


class ConnectEvents:
    """Connect events waiting for the first packet of their flow (no I/O; time passed in)."""

    __slots__ = ("_by_remote", "_by_tuple", "_count", "_late", "_late_count", "dropped", "max_age")

    def __init__(self, max_age: float = EVENT_MAX_AGE) -> None:
        self.max_age = max_age
        self._by_remote: dict[tuple[int, bytes, int], deque[_Pending]] = {}
        self._by_tuple: dict[tuple[int, int, bytes, int], _Pending] = {}
        self._count = 0
        self._late: dict[tuple[int, bytes, int], deque[_Pending]] = {}
        """CONNECTs still to come of flows decided without them (``expect_late``)."""
        self._late_count = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._count + len(self._by_tuple)

    def add_connect(self, proto: int, remote_addr: bytes, remote_port: int, pid: int, now: float) -> None:
        """A SOCKET CONNECT: ``pid`` is about to send to (remote_addr, remote_port)."""
        if self._late_count and self._take_late(proto, remote_addr, remote_port, pid, now):
            return  # the CONNECT of a flow decided already: not one for the next flow to this remote
        if self._count >= MAX_EVENTS:
            self.expire(now)
            if self._count >= MAX_EVENTS:
                self.dropped += 1
                return
        self._by_remote.setdefault((proto, remote_addr, remote_port), deque()).append(_Pending(pid, now))
        self._count += 1

    def add_flow(
        self, proto: int, local_port: int, remote_addr: bytes, remote_port: int, pid: int, now: float
    ) -> None:
        """A FLOW ESTABLISHED (or a CONNECT with a real local port): an exact match."""
        if len(self._by_tuple) >= MAX_EVENTS:
            self.expire(now)
            if len(self._by_tuple) >= MAX_EVENTS:
                self.dropped += 1
                return
        self._by_tuple[(proto, local_port, remote_addr, remote_port)] = _Pending(pid, now)

    def claim(
        self,
        proto: int,
        local_port: int,
        remote_addr: bytes,
        remote_port: int,
        now: float,
        confirm: Callable[[int], bool | None] | None = None,
        ambiguous: bool = False,
    ) -> int | None:
        """The pid of the flow whose first packet this is, consuming the event; None if none is known.

        Matched by remote only, the oldest event wins — unless events of more than one process wait for
        this remote (or the caller says the match is ``ambiguous``: several flows wait for it), or the
        oldest is older than ``STALE_EVENT_AGE``: then ``confirm(pid)`` (does ``pid`` own this flow's
        socket? None: cannot tell) picks the owner among them, in arrival order. Two apps connecting to
        one server at once otherwise swap owners, since their CONNECT events and first packets reach us
        in no fixed order. If every candidate is known not to own it, nothing is claimed (the caller
        falls back to the OS lookup).
        """
        exact = self._by_tuple.pop((proto, local_port, remote_addr, remote_port), None)
        if exact is not None and now - exact.at <= self.max_age:
            if not self._drop_one_connect(proto, remote_addr, remote_port, exact.pid):
                self.expect_late(proto, remote_addr, remote_port, exact.pid, now)
            return exact.pid
        key = (proto, remote_addr, remote_port)
        queue = self._by_remote.get(key)
        if not queue:
            return None
        while queue and now - queue[0].at > self.max_age:
            queue.popleft()
            self._count -= 1
        if not queue:
            del self._by_remote[key]
            return None
        if confirm is not None:
            candidates = list(dict.fromkeys(pending.pid for pending in queue))
            if len(candidates) > 1 or ambiguous or now - queue[0].at > STALE_EVENT_AGE:
                unknown = False
                for pid in candidates:
                    owns = confirm(pid)
                    if owns:
                        self._drop_one_connect(proto, remote_addr, remote_port, pid)
                        return pid
                    unknown = unknown or owns is None
                if not unknown:
                    return None
        pending = queue.popleft()
        self._count -= 1
        if not queue:
            del self._by_remote[key]
        return pending.pid

    def waiting(self, proto: int, local_port: int, remote_addr: bytes, remote_port: int) -> bool:
        """Whether an event this flow could claim waits."""
        return (proto, local_port, remote_addr, remote_port) in self._by_tuple or bool(
            self._by_remote.get((proto, remote_addr, remote_port))
        )

    def expect_late(self, proto: int, remote_addr: bytes, remote_port: int, pid: int, now: float) -> None:
        """A flow of ``pid`` to this remote was decided without its CONNECT (by an exact FLOW event, or by
        the OS lookup when the event was late): that CONNECT, if it comes within ``max_age``, is this
        flow's. Kept, it would be claimed by the next flow to the same remote — another app's, whose own
        event is not in yet — and route it by the first app's rule."""
        if self._late_count >= MAX_EVENTS:
            self._expire_late(now)
            if self._late_count >= MAX_EVENTS:
                return
        self._late.setdefault((proto, remote_addr, remote_port), deque()).append(_Pending(pid, now))
        self._late_count += 1

    def _take_late(self, proto: int, remote_addr: bytes, remote_port: int, pid: int, now: float) -> bool:
        if _take_one(self._late, (proto, remote_addr, remote_port), pid, now - self.max_age):
            self._late_count -= 1
            return True
        return False

    def _expire_late(self, now: float) -> None:
        self._late_count -= _expire_queues(self._late, now - self.max_age)

    def _drop_one_connect(self, proto: int, remote_addr: bytes, remote_port: int, pid: int) -> bool:
        """Consume a waiting CONNECT of ``pid`` to this remote: the same connect may have been seen on both
        layers, and it would be claimed by the next flow to the same remote. Whether there was one."""
        if _take_one(self._by_remote, (proto, remote_addr, remote_port), pid, float("-inf")):
            self._count -= 1
            return True
        return False

    def expire(self, now: float) -> None:
        """Forget events older than ``max_age``."""
        limit = now - self.max_age
        self._count -= _expire_queues(self._by_remote, limit)
        for exact in [k for k, p in self._by_tuple.items() if p.at < limit]:
            del self._by_tuple[exact]
        self._expire_late(now)


def _take_one(queues: dict[Any, deque[_Pending]], key: Any, pid: int, limit: float) -> bool:
    """Remove the first entry of ``pid`` not older than ``limit`` from the queue at ``key``."""
    queue = queues.get(key)
    if not queue:
        return False
    found = next((p for p in queue if p.pid == pid and p.at >= limit), None)
    if found is not None:
        queue.remove(found)
    if not queue:
        del queues[key]
    return found is not None


def _expire_queues(queues: dict[Any, deque[_Pending]], limit: float) -> int:
    """Drop the entries older than ``limit`` (each queue is in arrival order); how many went."""
    gone = 0
    for key in [k for k, q in queues.items() if q and q[0].at < limit]:
        queue = queues[key]
        while queue and queue[0].at < limit:
            queue.popleft()
            gone += 1
        if not queue:
            del queues[key]
    return gone


def netns_inode(pid: int | str = "self") -> int | None:
    """The inode of ``pid``'s network namespace, or None if the process is gone or hidden."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


NAMESPACE_CACHE_TTL = 1.0
"""Seconds a pid's namespace answer is reused. A pid comes back only after the kernel has handed out every
other pid (``pid_max`` can be 32768), so within a second it is the same process; kept longer, a pid once
ours and now a container's (its events then accepted, one of them claimed by our flow to the same
remote), or once gone and now an app of ours (its events ignored), would be answered wrongly."""


class NamespaceFilter:
    """Keeps only events of processes in this process's network namespace.

    A pid's answer is reused for ``NAMESPACE_CACHE_TTL`` seconds (a burst of one process's events costs
    one ``stat``), then checked again: a daemon runs for weeks, and pids are reused.
    """

    __slots__ = ("_cache", "_clock", "_own", "_stat")

    def __init__(
        self,
        own_inode: int | None = None,
        stat: Callable[[int], int | None] = netns_inode,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._own = own_inode if own_inode is not None else netns_inode()
        self._stat = stat
        self._clock = clock
        self._cache: dict[int, tuple[bool, float]] = {}

    def same_namespace(self, pid: int) -> bool:
        if pid <= 0:
            return False  # kernel context (softirq accepts): no process to route
        now = self._clock()
        known = self._cache.get(pid)
        if known is not None and now - known[1] <= NAMESPACE_CACHE_TTL:
            return known[0]
        inode = self._stat(pid)
        same = inode is not None and inode == self._own
        if len(self._cache) > 4096:
            self._cache = {p: k for p, k in self._cache.items() if now - k[1] <= NAMESPACE_CACHE_TTL}
        self._cache[pid] = (same, now)
        return same


MAX_ANCESTRY = 32
"""Parents followed at most when a process has no rule of its own (``ExeResolver.ancestors``)."""


class ExeResolver:
    """pid → exe path, cached by (pid, create time): PID reuse never maps a new process to an old path.

    ``ancestors`` gives the exe paths of a process's parent, grandparent, ... so that a child without a
    rule of its own follows its parent's (a browser's helpers, a launcher's game, a shell's commands). A
    parent is taken only if it started no later than the child: a parent that exited may have had its
    pid reused by a younger process, which is then not the parent (Windows never updates a child's
    parent pid; Linux gives the orphan to init or a subreaper, where the walk ends).
    """

    __slots__ = ("_ancestry", "_cache", "misses")

    def __init__(self) -> None:
        self._cache: dict[tuple[int, float], str] = {}
        self._ancestry: dict[tuple[int, float], tuple[str, ...]] = {}
        self.misses = 0

    def exe(self, pid: int) -> str | None:
        """The exe path of ``pid``, or None if the process is gone or cannot be inspected."""
        try:
            return self._exe(pid, process_identity(pid)[1])
        except (psutil.Error, OSError):
            return None

    def ancestors(self, pid: int) -> tuple[str, ...]:
        """The exe paths of ``pid``'s living ancestors, nearest first, up to (not including) init."""
        try:
            parent, started = process_identity(pid)
        except (psutil.Error, OSError):
            return ()
        key = (pid, started)
        known = self._ancestry.get(key)
        if known is not None:
            return known
        chain: list[str] = []
        child_started = started
        for _ in range(MAX_ANCESTRY):
            if parent <= 1 or parent in _ROOT_PIDS:
                break
            try:
                grandparent, parent_started = process_identity(parent)
                if parent_started > child_started:
                    break  # a younger process that took a dead parent's pid
                exe = self._exe(parent, parent_started)
            except (psutil.Error, OSError):
                break
            chain.append(exe)
            rest = self._ancestry.get((parent, parent_started))
            if rest is not None:
                chain.extend(rest)
                break
            parent, child_started = grandparent, parent_started
        if len(self._ancestry) > 16384:
            self._ancestry.clear()
        result = self._ancestry[key] = tuple(chain)
        return result

    def _exe(self, pid: int, started: float) -> str:
        key = (pid, started)
        path = self._cache.get(key)
        if path is None:
            self.misses += 1
            proc = psutil.Process(pid)
            path = proc.exe() or proc.name()
            if len(self._cache) > 16384:
                self._cache.clear()
            self._cache[key] = path
        return path


_ROOT_PIDS = frozenset({4} if sys.platform == "win32" else ())
"""Windows' System process (pid 4): the parent of kernel-started processes, never an app."""


def process_identity(pid: int) -> tuple[int, float]:
    """(parent pid, start time) of ``pid``: on Linux read from ``/proc/PID/stat`` directly (fields 4 and
    22, clock ticks since boot) — a new flow's first packet waits for this lookup, and psutil builds a
    whole ``Process`` for it (~4x the time); elsewhere psutil's ppid and create time. OSError or
    psutil.Error if the process is gone."""
    if not sys.platform.startswith("linux"):
        proc = psutil.Process(pid)
        return proc.ppid(), proc.create_time()
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split(maxsplit=20)
    return int(fields[1]), float(fields[19])


def os_lookup_pid(
    proto: int, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
) -> int | None:
    """The pid owning a local socket of this network namespace, None if no process owns it (it closed
    already) or pids are hidden. Linux: one ``sock_diag`` request; otherwise ``psutil_lookup_pid``."""
    if sys.platform.startswith("linux"):
        answer = _linux_lookup(proto, local_addr, local_port, remote_addr, remote_port)
        if answer is not _UNANSWERED:
            return answer
    return psutil_lookup_pid(proto, local_addr, local_port, remote_addr, remote_port)


_UNANSWERED = -1

if sys.platform.startswith("linux"):
    from awg_split_tunnel.platform.linux.sock_diag import SockDiag, pid_of_socket

    _diag: SockDiag | None = None
    _diag_failed = False

    def _linux_lookup(
        proto: int, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
    ) -> int | None:
        """The owner through ``sock_diag``, or ``_UNANSWERED`` when netlink cannot tell."""
        global _diag, _diag_failed
        if _diag_failed:
            return _UNANSWERED
        try:
            if _diag is None:
                _diag = SockDiag()
            if proto != IPPROTO_TCP and not _diag.udp:
                return _UNANSWERED
            found = _diag.find(proto, local_addr, local_port, remote_addr, remote_port)
        except OSError:
            _diag_failed = True  # netlink refused (a sandbox, an old kernel): the portable way from now on
            return _UNANSWERED
        return None if found is None else pid_of_socket(found)


def psutil_lookup_pid(
    proto: int, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
) -> int | None:
    """The pid owning a local socket, from the OS socket tables of this network namespace (slow: a scan).

    Prefers the socket connected to exactly this remote; falls back to one bound to the local port
    (unconnected UDP). None if no process owns it (it closed already) or pids are hidden.
    """
    try:
        connections = psutil.net_connections(kind="tcp" if proto == IPPROTO_TCP else "udp")
    except (psutil.Error, OSError):
        return None
    return socket_owner(connections, local_addr, local_port, remote_addr, remote_port)


def socket_owner(
    connections: Iterable[Any], local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
) -> int | None:
    """The pid owning the socket in ``connections`` (``psutil.net_connections`` rows of the flow's protocol):
    the socket connected to exactly this remote, else one bound to the local port (unconnected UDP)."""
    local_ip = str(ipaddress.ip_address(local_addr))
    remote_ip = str(ipaddress.ip_address(remote_addr))
    bound: int | None = None
    for conn in connections:
        if not conn.laddr or conn.laddr.port != local_port or conn.pid is None:
            continue
        if conn.raddr:
            if conn.raddr.port == remote_port and _same_ip(conn.raddr.ip, remote_ip):
                return int(conn.pid)
        elif _same_ip(conn.laddr.ip, local_ip) or conn.laddr.ip in ("0.0.0.0", "::"):
            bound = int(conn.pid)
    return bound


def pid_owns_socket(
    pid: int, proto: int, local_port: int, remote_addr: bytes, remote_port: int
) -> bool | None:
    """Whether process ``pid`` owns the socket with this local port talking to this remote (an unconnected
    UDP socket on the port counts). One process's sockets only, so cheap (µs to a few ms); None if the
    process cannot be inspected."""
    kind = "tcp" if proto == IPPROTO_TCP else "udp"
    remote_ip = str(ipaddress.ip_address(remote_addr))
    try:
        connections = psutil.Process(pid).net_connections(kind=kind)
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return None
    for conn in connections:
        if not conn.laddr or conn.laddr.port != local_port:
            continue
        if not conn.raddr or (conn.raddr.port == remote_port and _same_ip(conn.raddr.ip, remote_ip)):
            return True
    return False


def _same_ip(a: str, b: str) -> bool:
    if a == b:
        return True
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    return a.removeprefix("::ffff:") == b.removeprefix("::ffff:")
