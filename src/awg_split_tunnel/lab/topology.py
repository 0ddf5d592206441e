"""The lab's topology: a client host and a small "internet" of servers, in network namespaces.

::

    ns client 198.18.0.1  ─ eth0 ══ veth ══ "client" ─┐
    ns web    198.18.0.10 ─ eth0 ══ veth ══ "web"    ─┤ br0 in ns inet (the "internet")
    ns socks  198.18.0.20 ─ eth0 ══ veth ══ "socks"  ─┤
    ns http   198.18.0.30 ─ eth0 ══ veth ══ "http"   ─┤
    ns wg     198.18.0.40 ─ eth0 ══ veth ══ "wg"     ─┘  tunnel net 198.19.0.0/24, forwards to web

Every veth is created directly between two lab namespaces, so nothing of the lab ever appears in the
host's namespace and interface names cannot collide between parallel labs. There is no uplink: traffic
to anything outside 198.18.0.0/15 and 2001:2::/48 has nowhere to go.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import socket as _socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from awg_split_tunnel.lab.netns import (
    LabError,
    LabUnavailable,
    PacketCapture,
    call_in_netns,
    claim_prefix,
    delete_netns,
    ip,
    ns_path,
    nsenter_argv,
    release_prefix,
    remove_control_sockets,
    socket_in_netns,
    terminate_process,
)

CLIENT = "client"
INET = "inet"
WEB = "web"
SOCKS = "socks"
HTTP = "http"
WG = "wg"

LAB_NET = "198.18.0.0/24"
LAB_NET6 = "2001:2::/64"
CLIENT_IP = "198.18.0.1"
WEB_IP = "198.18.0.10"
SOCKS_IP = "198.18.0.20"
HTTP_IP = "198.18.0.30"
WG_IP = "198.18.0.40"
CLIENT_IP6 = "2001:2::1"
WEB_IP6 = "2001:2::10"
SOCKS_IP6 = "2001:2::20"
HTTP_IP6 = "2001:2::30"
WG_IP6 = "2001:2::40"

# The network inside the WireGuard/AmneziaWG tunnels; the lab's peer is .1, a client is .2 and up.
TUNNEL_NET = "198.19.0.0/24"
TUNNEL_NET6 = "2001:2:0:19::/64"
TUNNEL_SERVER_IP = "198.19.0.1"
TUNNEL_CLIENT_IP = "198.19.0.2"
TUNNEL_SERVER_IP6 = "2001:2:0:19::1"
TUNNEL_CLIENT_IP6 = "2001:2:0:19::2"
# A second tunnel network for an AmneziaWG peer running next to the WireGuard one.
AWG_TUNNEL_NET = "198.19.1.0/24"
AWG_TUNNEL_NET6 = "2001:2:0:1a::/64"
AWG_TUNNEL_SERVER_IP = "198.19.1.1"
AWG_TUNNEL_CLIENT_IP = "198.19.1.2"
AWG_TUNNEL_SERVER_IP6 = "2001:2:0:1a::1"
AWG_TUNNEL_CLIENT_IP6 = "2001:2:0:1a::2"

WEB_PORT = 80
UDP_ECHO_PORT = 7
SOCKS_PORT = 1080
SOCKS_AUTH_PORT = 1081
HTTP_PROXY_PORT = 3128
HTTP_PROXY_AUTH_PORT = 3129
WG_PORT = 51820
AWG_PORT = 51821

# Name of every lab host's interface towards the bridge, inside its own namespace.
UPLINK = "eth0"
BRIDGE = "br0"
PREFIX_BASE = "awl"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LabHost:
    """A lab host: its role name and its addresses on the lab network."""

    name: str
    ipv4: str
    ipv6: str


HOSTS: Mapping[str, LabHost] = {
    CLIENT: LabHost(CLIENT, CLIENT_IP, CLIENT_IP6),
    WEB: LabHost(WEB, WEB_IP, WEB_IP6),
    SOCKS: LabHost(SOCKS, SOCKS_IP, SOCKS_IP6),
    HTTP: LabHost(HTTP, HTTP_IP, HTTP_IP6),
    WG: LabHost(WG, WG_IP, WG_IP6),
}

# Safety net: labs still open when the interpreter exits are closed by the atexit hook.
_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


atexit.register(_close_open_labs)


def require_root() -> None:
    """Raise :class:`LabUnavailable` unless this process can build network namespaces."""
    if sys.platform == "win32":
        raise LabUnavailable("the lab needs Linux network namespaces")
    if os.geteuid() != 0:
        raise LabUnavailable("needs root for network namespaces")
    missing = [tool for tool in ("ip", "nsenter") if shutil.which(tool) is None]
    if missing:
        raise LabUnavailable(f"missing tools: {', '.join(missing)}")


class Lab:
    """A lab in network namespaces named ``<prefix>-<host>``; a context manager.

    ``start()`` builds it; ``close()`` kills every process it started and deletes every namespace (and
    with them every veth), even after a failed start. Closing twice is harmless.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or PREFIX_BASE + secrets.token_hex(3)
        if len(self.prefix) > 10 or not self.prefix.isalnum() or not self.prefix.islower():
            raise ValueError(f"lab prefix must be at most 10 lowercase letters/digits: {self.prefix!r}")
        self._tmpdir: Path | None = None
        self._processes: list[subprocess.Popen[Any]] = []
        self._namespaces: list[str] = []
        self._ifname_counter = 0
        self._capture_counter = 0
        # Test apps made so far, by name (see apps.make_app).
        self.apps: dict[str, Path] = {}
        self._started = False
        self._closed = False

    # -- building and tearing down ------------------------------------------------------------------

    def start(self) -> Lab:
        """Create namespaces, bridge, veths, addresses and routes; return self."""
        require_root()
        if self._started:
            return self
        claim_prefix(self.prefix)
        self._started = True
        _open_labs.add(self)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, host: str) -> str:
        name = self.ns_name(host)
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    def _build(self) -> None:
        inet = self._add_netns(INET)
        ip("link", "add", BRIDGE, "type", "bridge", netns=inet)
        ip("link", "set", BRIDGE, "up", netns=inet)
        for host in HOSTS.values():
            name = self._add_netns(host.name)
            # No DAD on the lab's hosts: addresses must be usable the moment the lab is up.
            self.run(host.name, ["sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0"], check=True)
            self.run(host.name, ["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"], check=True)
            ip("link", "add", host.name, "type", "veth", "peer", "name", UPLINK, "netns", name, netns=inet)
            ip("link", "set", host.name, "master", BRIDGE, netns=inet)
            ip("link", "set", host.name, "up", netns=inet)
            ip("addr", "add", f"{host.ipv4}/24", "dev", UPLINK, netns=name)
            ip("-6", "addr", "add", f"{host.ipv6}/64", "dev", UPLINK, "nodad", netns=name)
            ip("link", "set", UPLINK, "up", netns=name)
        client = self.ns_name(CLIENT)
        # The client's default route leads onto the lab's bridge, where nothing answers for addresses
        # outside the lab: apps can open sockets to any address, yet no packet can leave the machine.
        ip("route", "add", "default", "dev", UPLINK, netns=client)
        ip("-6", "route", "add", "default", "dev", UPLINK, netns=client)
        web = self.ns_name(WEB)
        # Replies to tunnel clients go back through the WireGuard host, which forwards without NAT.
        ip("route", "add", TUNNEL_NET, "via", WG_IP, netns=web)
        ip("-6", "route", "add", TUNNEL_NET6, "via", WG_IP6, netns=web)
        ip("route", "add", AWG_TUNNEL_NET, "via", WG_IP, netns=web)
        ip("-6", "route", "add", AWG_TUNNEL_NET6, "via", WG_IP6, netns=web)
        self.run(WG, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
        self.run(WG, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"], check=True)

    def close(self) -> None:
        """Kill every process started here, delete every namespace and the temp dir; idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        if not self._started:
            return
        for process in reversed(self._processes):
            terminate_process(process)
        self._processes.clear()
        for name in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                delete_netns(name)
        self._namespaces.clear()
        remove_control_sockets(self.prefix)
        release_prefix(self.prefix)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort for a lab that was neither closed nor reached by atexit (e.g. dropped early).
        if getattr(self, "_started", False) and not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()

    @property
    def tmpdir(self) -> Path:
        """A private directory for configs, logs, pcaps and test apps; removed at close()."""
        if self._tmpdir is None:
            raise LabError("the lab is not started")
        return self._tmpdir

    # -- naming -------------------------------------------------------------------------------------

    def ns_name(self, host: str) -> str:
        """The namespace name of lab host ``host`` (``client``, ``inet``, ``web``, ``socks``, ...)."""
        if host != INET and host not in HOSTS:
            raise KeyError(f"no lab host {host!r}; hosts: {', '.join([INET, *HOSTS])}")
        return f"{self.prefix}-{host}"

    def ns_path(self, host: str) -> Path:
        """``/run/netns/<name>`` of host ``host``, for ``nsenter --net=``."""
        return ns_path(self.ns_name(host))

    def addr(self, host: str, v6: bool = False) -> str:
        """The lab address of ``host`` (IPv4, or IPv6 with ``v6=True``)."""
        entry = HOSTS[host]
        return entry.ipv6 if v6 else entry.ipv4

    def new_ifname(self, kind: str = "wg") -> str:
        """A fresh interface name unique to this lab and at most 15 characters (IFNAMSIZ - 1)."""
        self._ifname_counter += 1
        name = f"{self.prefix}{kind}{self._ifname_counter}"
        if len(name) > 15:
            raise ValueError(f"interface name too long: {name!r}")
        return name

    # -- processes ----------------------------------------------------------------------------------

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped in ``nsenter`` for host ``host``."""
        return nsenter_argv(self.ns_name(host), [str(arg) for arg in argv])

    def run(
        self, host: str, argv: Sequence[str | os.PathLike[str]], *, check: bool = False, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in ``host``'s namespace and wait; text output captured unless overridden.

        ``check=True`` raises :class:`LabError` with the command's stderr when it fails.
        """
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        full = self.argv(host, [str(arg) for arg in argv])
        done: subprocess.CompletedProcess[Any] = subprocess.run(full, check=False, **kwargs)
        if check and done.returncode != 0:
            raise LabError(
                f"[{host}] {' '.join(full[3:])} failed ({done.returncode}): {(done.stderr or '').strip()}"
            )
        return done

    def spawn(
        self, host: str, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``'s namespace without waiting; killed (with its group) at close()."""
        if self._closed:
            raise LabError("the lab is closed")
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process: subprocess.Popen[Any] = subprocess.Popen(self.argv(host, [str(a) for a in argv]), **kwargs)
        self._processes.append(process)
        return process

    def python(
        self, host: str, code_or_args: str | Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run this interpreter in ``host``'s namespace: a code string (``-c``) or a list of arguments."""
        args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
        env = {**os.environ, **kwargs.pop("env", {})}
        env.setdefault("PYTHONPATH", python_path())
        return self.run(host, [sys.executable, *args], env=env, **kwargs)

    def socket(
        self,
        host: str,
        family: _socket.AddressFamily = _socket.AF_INET,
        kind: _socket.SocketKind = _socket.SOCK_STREAM,
    ) -> _socket.socket:
        """A socket created inside ``host``'s namespace, usable directly from this process."""
        return socket_in_netns(self.ns_name(host), family, kind)

    def call(self, host: str, function: Callable[[], T]) -> T:
        """Call ``function`` on a helper thread inside ``host``'s namespace and return its result.

        For objects that must be born in a lab namespace but driven from the test process: sockets,
        a TUN device (``lab.call(CLIENT, lambda: open_tun("tun0"))``), netlink handles.
        """
        return call_in_netns(self.ns_name(host), function)

    def wait_tcp(self, host: str, address: str, port: int, timeout: float = 5.0) -> None:
        """Wait until a TCP connect from ``host`` to ``address:port`` succeeds; LabError on timeout."""
        family = _socket.AF_INET6 if ":" in address else _socket.AF_INET
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            sock = socket_in_netns(self.ns_name(host), family, _socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                sock.connect((address, port))
                return
            except OSError as exc:
                last = exc
            finally:
                sock.close()
            time.sleep(0.05)
        raise LabError(f"nothing answers on {address}:{port} from {host} after {timeout:.0f}s: {last}")

    # -- helpers built on the above -------------------------------------------------------------------

    def capture(self, host: str, ifname: str = UPLINK, bpf_filter: str = "") -> PacketCapture:
        """A tcpdump capture on ``host``'s interface; use as ``with lab.capture(...) as cap:``."""
        self._capture_counter += 1
        pcap = self.tmpdir / f"capture-{host}-{ifname}-{self._capture_counter}.pcap"
        return PacketCapture(self.ns_name(host), ifname, bpf_filter, pcap)

    def app(
        self,
        name: str,
        *extra: str,
        udp: bool = False,
        v6: bool = False,
        host: str | None = None,
        port: int | None = None,
        timeout: float = 5.0,
        parent: str | None = None,
    ) -> AppResult:
        """Run test app ``name`` (see :func:`~awg_split_tunnel.lab.apps.make_app`) in ns client.

        It asks the web server (or ``host``:``port``) over TCP, or the UDP echo with ``udp=True``, and
        the result says which address the server saw. ``extra`` goes to the app client as it is. With
        ``parent``, the app runs as a child of test app ``parent``.
        """
        from awg_split_tunnel.lab.apps import app_client_args, run_app

        args = app_client_args(udp=udp, v6=v6, host=host, port=port, timeout=timeout) + list(extra)
        return run_app(self, name, args, timeout=timeout + 5.0, parent=parent)

    def spawn_app(
        self,
        name: str,
        *extra: str,
        udp: bool = False,
        v6: bool = False,
        host: str | None = None,
        port: int | None = None,
        timeout: float = 5.0,
        delay: float = 0.0,
    ) -> subprocess.Popen[str]:
        """Start test app ``name`` in ns client without waiting; stdout/stderr are pipes (text).

        ``delay`` makes the app wait before connecting, e.g. to look at ``/proc/<pid>/exe`` first.
        """
        from awg_split_tunnel.lab.apps import app_client_args, spawn_app

        args = app_client_args(udp=udp, v6=v6, host=host, port=port, timeout=timeout, delay=delay)
        return spawn_app(self, name, args + list(extra))


@dataclass(frozen=True, slots=True)
class AppResult:
    """What a test app printed: the address the web server saw (``seen_ip`` empty on failure)."""

    returncode: int
    seen_ip: str
    seen_addr: str
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """True when the app reached the server and got its answer."""
        return self.returncode == 0


def python_path() -> str:
    """A ``PYTHONPATH`` that lets any interpreter in the lab import this package."""
    import awg_split_tunnel

    root = str(Path(awg_split_tunnel.__file__).resolve().parents[1])
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


__all__ = ["AppResult", "Lab", "LabError", "LabHost", "LabUnavailable"]
