"""Everything pydivert: divert handles read and written through raw buffers, and SOCKET-layer events.

On Linux (eBPFDivert) packets are received into and sent from one preallocated buffer through
libebpfdivert's ctypes functions with a reused address struct — no ``pydivert.Packet`` per packet
(docs/ARCHITECTURE.md, pydivert costs: ~7 µs per packet this way against ~15 µs through ``Packet``). On
Windows ``router_handles`` gives ``platform.windows.handles`` instead: WinDivertRecvEx/SendEx batches read
by threads that feed the router's loop (docs/WINDOWS.md); pydivert there only opens the handles
(``open_with_pydivert``).

Backend misbehaviour is handled here, each workaround in one named place with the script in
``scripts/repro/`` that shows it:

- ``_explain_socket_layer_failure``  — ``ip netns exec`` hides cgroup v2 (``socket_layer_netns_exec.py``)
- ``NetworkHandle.send`` EMSGSIZE     — oversize (GRO) packets on loopback (``oversize_send.py``)
- ``NetworkHandle.refresh``          — interfaces created after open are not covered (``new_interface.py``)
- ``SocketEventHandle.flows``        — UDP ``sendto()`` has no SOCKET CONNECT (``udp_sendto_no_connect.py``)
- ``PRIORITY_*``                     — two handles with one priority misbehave (ARCHITECTURE.md); each its own
- injection uses the capture handle  — a SEND_ONLY handle was reported to drop INBOUND injections
  (``send_only_inbound.py``; not reproduced on kernel 6.18, kept because it costs nothing)

Elsewhere: CONNECT events carry local port 0 and are host-wide (``process/lookup.py``: ``ConnectEvents``,
``NamespaceFilter``); later IP fragments escape ``udp`` filters (``core/packet_router.py``:
``ROUTER_FILTER``; ``fragments_escape.py``).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import pydivert
from pydivert import Flag, Layer

if TYPE_CHECKING:
    from awg_split_tunnel.platform.windows.handles import WindowsEventHandle, WindowsNetworkHandle
    from awg_split_tunnel.platform.windows.owners import SocketOwners

log = logging.getLogger("awg_split_tunnel.router")

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    from pydivert.windivert_dll.structs import WinDivertAddress

    _lib: Any = None
else:
    from pydivert.bpf import WinDivertAddress
    from pydivert.bpf import libebpfdivert as _lib

DivertAddress = WinDivertAddress
"""The WINDIVERT_ADDRESS layout, shared by both backends (80 bytes)."""

MAX_PACKET = 65575
"""Largest packet a handle can return (WinDivert's and libebpfdivert's buffer size)."""

# Every handle its own priority: two handles with the same non-zero priority misbehaved (ARCHITECTURE.md).
# Higher numbers see packets first ("packets are diverted to higher priority handles before lower priority
# handles", WinDivert's documentation, docs/WINDOWS.md); the SOCKET and FLOW handles only observe.
PRIORITY_SOCKET = 1040
PRIORITY_FLOW = 1039
PRIORITY_NETWORK = 1041
PRIORITY_NETWORK_ALT = 1042
"""Used while a NETWORK handle is reopened, so the old and the new handle never share a priority."""
PRIORITY_HOLD = 1043
"""``hold_every_packet``'s handle."""

_EAGAIN = -errno.EAGAIN


class SocketEventKind(enum.IntEnum):
    """WINDIVERT_EVENT_* values of SOCKET- and FLOW-layer events."""

    ESTABLISHED = 1
    DELETED = 2
    BIND = 3
    CONNECT = 4
    LISTEN = 5
    ACCEPT = 6
    CLOSE = 7


@dataclass(frozen=True, slots=True)
class SocketEvent:
    """One SOCKET-layer event. Addresses are packed (4 bytes for IPv4, 16 for IPv6)."""

    kind: SocketEventKind
    pid: int
    proto: int
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int


_V4_MAPPED = bytes(10) + b"\xff\xff"


def address_from_words(words: Any) -> bytes:
    """A packed address from WinDivert's ``UINT32[4]`` (least significant word first, host order).

    IPv4 arrives IPv4-mapped (``::ffff:a.b.c.d``) and is returned as 4 bytes.
    """
    raw = bytes(words)[::-1] if sys.byteorder == "little" else b"".join(bytes(w) for w in reversed(words))
    return raw[12:] if raw.startswith(_V4_MAPPED) else raw


OPEN_ERRORS = {
    2: "the WinDivert driver file (WinDivert64.sys) was not found beside WinDivert.dll: reinstall",
    5: "opening WinDivert needs Administrator rights: run it elevated (or as the service)",
    577: "Windows refused the WinDivert driver's signature (Secure Boot / driver signature enforcement)",
    654: "another program has a different WinDivert version loaded: stop it (or reboot) and try again",
    1275: "the WinDivert driver was blocked (security software, memory integrity/VBS, or an unsupported VM)",
    1753: "the Base Filtering Engine service (BFE) is not running: start it ('sc start BFE')",
}
"""WinDivertOpen's documented error codes (docs/WINDOWS.md) → what the user can do about each."""


def explain_open_error(exc: OSError) -> OSError:
    """A WinDivertOpen failure as one line a user can act on; other errors unchanged."""
    code = getattr(exc, "winerror", None)
    hint = OPEN_ERRORS.get(code) if isinstance(code, int) else None
    if hint is None:
        return exc
    return OSError(exc.errno, f"cannot open WinDivert (error {code}): {hint}")


def _open(divert: Any) -> None:
    """``divert.open()``, with WinDivert's error codes explained (``explain_open_error``)."""
    try:
        divert.open()
    except OSError as exc:
        explained = explain_open_error(exc)
        if explained is exc:
            raise
        raise explained from exc


def _explain_socket_layer_failure(exc: Exception) -> OSError:
    """Workaround: ``ip netns exec`` remounts /sys and hides cgroup v2, which the SOCKET layer hooks.

    Reproduction: ``scripts/repro/socket_layer_netns_exec.py``. Start the daemon with
    ``nsenter --net=/run/netns/NAME`` instead (no remount), or mount cgroup2 in the new /sys.
    """
    return OSError(
        errno.EOPNOTSUPP,
        f"cannot open the SOCKET layer ({exc}); if this process was started with 'ip netns exec', "
        "start it with 'nsenter --net=/run/netns/NAME' instead (ip netns exec hides cgroup v2)",
    )


class _DivertHandle:
    """What both handle kinds share: the pydivert object, its raw backend handle (Linux), closing, and
    a pollable descriptor."""

    _divert: Any = None
    _handle: int | None = None

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        divert, self._divert, self._handle = self._divert, None, None
        if divert is not None:
            divert.close()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int | None:
        """A descriptor that polls readable while packets wait (Linux), or None."""
        if self._handle is None or _lib is None:
            return None
        return int(_lib.ebpfdivert_get_event_fd(self._handle))


class NetworkHandle(_DivertHandle):
    """A NETWORK-layer divert handle used through raw buffers: ``recv_into`` → rewrite → ``send``.

    Packets are sent back on the same handle they came from: a SEND_ONLY handle was reported to fail
    silently on INBOUND injection (``scripts/repro/send_only_inbound.py`` checks it; here it worked).
    """

    def __init__(self, filter: str, priority: int = PRIORITY_NETWORK) -> None:
        self.filter = filter
        self.priority = priority
        self._divert: Any = None
        self._handle: int | None = None
        self._interfaces: frozenset[str] = frozenset()
        self._recv_len = ctypes.c_uint32(0)
        self._send_len = ctypes.c_uint32(0)
        self.send_errors = 0
        self.oversize = 0

    def open(self) -> None:
        self._interfaces = _interface_names()
        divert = pydivert.Divert(self.filter, layer=Layer.NETWORK, priority=self.priority)
        _open(divert)
        self._divert = divert
        self._handle = getattr(divert._impl, "_handle", None) if _lib is not None else None

    def recv_into(self, buf: bytearray, c_buf: Any, addr: Any, timeout_ms: int = 0) -> int:
        """Receive one packet into ``buf`` (``c_buf`` is its ctypes view) and ``addr``; 0 when none waits."""
        if self._handle is not None:
            ret = _lib.ebpfdivert_recv(
                self._handle, c_buf, len(buf), ctypes.byref(self._recv_len), ctypes.byref(addr), timeout_ms
            )
            if ret < 0:
                if ret == _EAGAIN:
                    return 0
                raise OSError(-ret, "divert receive failed")
            return int(self._recv_len.value)
        return 0  # closed (a stop racing the packet loop): nothing more will arrive

    def send(self, c_buf: Any, length: int, addr: Any) -> bool:
        """Inject ``length`` bytes from ``c_buf`` as ``addr`` says; False (counted) when the backend refuses.

        Workaround: on loopback (MTU 65536, GRO) reinjecting a coalesced 7,292-byte packet failed with
        EMSGSIZE (ARCHITECTURE.md; ``scripts/repro/oversize_send.py`` shows what loopback does here: most
        super-packets pass undiverted as ``too_big``). The router never diverts loopback; should a send
        still fail, the packet is lost and the sender retransmits, so it is counted, never raised.
        """
        if self._handle is not None:
            ret = _lib.ebpfdivert_send(
                self._handle, c_buf, length, ctypes.byref(self._send_len), ctypes.byref(addr)
            )
            if ret < 0:
                if ret == -errno.EMSGSIZE:
                    self.oversize += 1
                else:
                    self.send_errors += 1
                return False
            return True
        self.send_errors += 1  # closed
        return False

    # -- buffers and addresses, so callers never touch ctypes --------------------------------------------

    @staticmethod
    def new_buffer() -> tuple[bytearray, Any, Any]:
        """A receive buffer, its ctypes view and an address struct, allocated once per loop."""
        return new_packet_buffer()

    @staticmethod
    def copy_address(addr: Any) -> Any:
        copy = DivertAddress()
        ctypes.pointer(copy)[0] = addr
        return copy

    @staticmethod
    def set_inbound(addr: Any, inbound: bool = True) -> None:
        addr.Outbound = 0 if inbound else 1

    @staticmethod
    def c_buffer(data: bytearray) -> Any:
        return (ctypes.c_char * len(data)).from_buffer(data)

    def refresh(self) -> bool:
        """Reopen the handle if network interfaces appeared since it was opened; True if it did.

        Workaround: interfaces created after a handle is opened are not covered by it
        (``scripts/repro/new_interface.py``). The new handle opens (at the other priority) before the old
        one closes, so no packet slips past in between.
        """
        if _lib is None or _interface_names() <= self._interfaces:
            self._interfaces &= _interface_names()
            return False
        old_divert = self._divert
        self.priority = PRIORITY_NETWORK_ALT if self.priority == PRIORITY_NETWORK else PRIORITY_NETWORK
        self.open()
        if old_divert is not None:
            old_divert.close()
        return True

    def stats(self) -> dict[str, int]:
        counters: dict[str, int] = dict(self._divert.stats()) if self._divert is not None else {}
        counters["send_errors"] = self.send_errors
        counters["oversize"] = self.oversize
        return counters


class SocketEventHandle(_DivertHandle):
    """A SOCKET- (or FLOW-) layer handle that only observes (SNIFF | RECV_ONLY): who connects where.

    ``SocketEventHandle()`` gives CONNECT events of TCP and connected UDP; ``SocketEventHandle.flows()``
    gives FLOW ESTABLISHED events of UDP, the only trace of ``sendto()`` on an unconnected socket.
    """

    def __init__(
        self,
        filter: str = "!loopback and (tcp or udp)",
        priority: int = PRIORITY_SOCKET,
        layer: Layer = Layer.SOCKET,
    ) -> None:
        self.filter = filter
        self.priority = priority
        self.layer = layer
        self._divert: Any = None
        self._handle: int | None = None
        self._buf = bytearray(64)
        self._c_buf = (ctypes.c_char * len(self._buf)).from_buffer(self._buf)
        self._addr = DivertAddress()
        self._recv_len = ctypes.c_uint32(0)

    def open(self) -> None:
        divert = pydivert.Divert(
            self.filter, layer=self.layer, priority=self.priority, flags=Flag.SNIFF | Flag.RECV_ONLY
        )
        try:
            _open(divert)
        except NotImplementedError as exc:
            raise _explain_socket_layer_failure(exc) from exc
        self._divert = divert
        self._handle = getattr(divert._impl, "_handle", None) if _lib is not None else None

    @classmethod
    def flows(cls) -> SocketEventHandle:
        return cls("!loopback and udp", PRIORITY_FLOW, Layer.FLOW)

    def recv(self, timeout_ms: int = 0) -> SocketEvent | None:
        """The next event, or None if none arrives within ``timeout_ms``."""
        addr = self._addr
        if self._handle is None:
            return None  # closed
        ret = _lib.ebpfdivert_recv(
            self._handle,
            self._c_buf,
            len(self._buf),
            ctypes.byref(self._recv_len),
            ctypes.byref(addr),
            timeout_ms,
        )
        if ret < 0:
            if ret == _EAGAIN:
                return None
            raise OSError(-ret, "divert receive failed")
        return socket_event(addr, self.layer)


def socket_event(addr: Any, layer: Layer) -> SocketEvent | None:
    """The SOCKET- or FLOW-layer event a WINDIVERT_ADDRESS describes; None for an unknown event kind."""
    s = addr.Socket if layer == Layer.SOCKET else addr.Flow
    try:
        kind = SocketEventKind(addr.Event)
    except ValueError:
        return None
    return SocketEvent(
        kind,
        int(s.ProcessId),
        int(s.Protocol),
        address_from_words(s.LocalAddr),
        int(s.LocalPort),
        address_from_words(s.RemoteAddr),
        int(s.RemotePort),
    )


def new_packet_buffer() -> tuple[bytearray, Any, Any]:
    """A receive buffer, its ctypes view and an address struct, allocated once per loop."""
    buf = bytearray(MAX_PACKET)
    return buf, (ctypes.c_char * MAX_PACKET).from_buffer(buf), DivertAddress()


def is_outbound(addr: Any) -> bool:
    return bool(addr.Outbound)


def set_outbound(addr: Any, outbound: bool) -> None:
    addr.Outbound = 1 if outbound else 0


def is_loopback(addr: Any) -> bool:
    return bool(addr.Loopback)


def interface_index(addr: Any) -> int:
    return int(addr.Network.IfIdx)


def _interface_names() -> frozenset[str]:
    # if_nameindex() asks the kernel through a socket of this process's network namespace; /sys/class/net
    # would show the namespace whose sysfs is mounted, which under nsenter is the host's.
    return frozenset(name for _, name in socket.if_nameindex())


def router_handles(
    exclude_udp_ports: Iterable[int] = (),
) -> tuple[
    NetworkHandle | WindowsNetworkHandle,
    list[SocketEventHandle] | list[WindowsEventHandle | SocketOwners],
    Callable[[int], bool],
]:
    """The router's unopened handles and its namespace filter: a ``router.process.HandleFactory``
    (bind ``exclude_udp_ports`` with ``functools.partial``, which pickles).

    NETWORK handle with ``ROUTER_FILTER`` (less UDP from ``exclude_udp_ports``: packet tunnels' own
    sockets); SOCKET CONNECT events (TCP, connected UDP) and FLOW ESTABLISHED
    events (UDP ``sendto()``, which raises no CONNECT on Linux: ``scripts/repro/udp_sendto_no_connect.py``);
    events from other network namespaces are filtered out (``scripts/repro/socket_events_host_wide.py``).
    """
    from awg_split_tunnel.core.packet_router import router_filter
    from awg_split_tunnel.process.lookup import NamespaceFilter

    if sys.platform == "win32":  # pragma: no cover - the Windows handles' own tests use a fake WinDivert
        from awg_split_tunnel.platform.windows.handles import windows_router_handles
        from awg_split_tunnel.platform.windows.windivert import NativeWinDivert

        return windows_router_handles(NativeWinDivert(), open_with_pydivert, router_filter(exclude_udp_ports))
    events = [SocketEventHandle(), SocketEventHandle.flows()]
    network = NetworkHandle(router_filter(exclude_udp_ports))
    return network, events, NamespaceFilter().same_namespace


def hold_every_packet() -> NetworkHandle:
    """An open NETWORK handle on everything the router diverts, never read: while its owner lives, every
    such packet waits in it — also what a stopped router process's handle lets pass ~3 s after the stop,
    and after that process is killed (``scripts/repro/guard_handle_holds.py``). The daemon's fail-closed
    state when its router process stops answering on the divert data path (docs/DATAPATHS.md); closing
    the handle lets traffic flow again."""
    from awg_split_tunnel.core.packet_router import ROUTER_FILTER

    handle = NetworkHandle(ROUTER_FILTER, PRIORITY_HOLD)
    handle.open()
    return handle


def open_with_pydivert(filter: str, layer: Layer, priority: int, flags: Flag) -> tuple[Any, int]:
    """Open a WinDivert handle through pydivert (it installs the driver and knows its errors, explained
    by ``explain_open_error``): (the ``pydivert.Divert`` to close it with, the raw HANDLE) for the batch
    calls of ``platform.windows``."""
    divert = pydivert.Divert(filter, layer=layer, priority=priority, flags=flags)
    _open(divert)
    return divert, int(divert._impl._handle)


def event_handles() -> tuple[list[SocketEventHandle], Callable[[int], bool]]:
    """The kernel data path's unopened SOCKET/FLOW event handles and namespace filter (no NETWORK handle:
    the kernel queues first packets itself). Module-level, so it pickles into the router process."""
    from awg_split_tunnel.process.lookup import NamespaceFilter

    events = [SocketEventHandle(), SocketEventHandle.flows()]
    if sys.platform == "win32":  # pragma: no cover - the kernel data path is Linux-only
        return events, lambda pid: pid > 4
    return events, NamespaceFilter().same_namespace
