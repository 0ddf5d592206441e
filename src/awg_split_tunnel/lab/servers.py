"""Real servers in the lab: the echo web server, SOCKS5 (microsocks, dante), HTTP CONNECT (tinyproxy),
and WireGuard/AmneziaWG peers (wireguard-go, the reference amneziawg-go, and our own `tun` command).

Every ``start_*`` returns a :class:`LabServer` that is already answering (bounded wait; on failure a
:class:`LabError` carrying the server's stderr) and that can be stopped and started again mid-test.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from awg_split_tunnel.lab.netns import (
    AMNEZIAWG_SOCKET_DIR,
    WIREGUARD_SOCKET_DIR,
    LabError,
    LabUnavailable,
    kernel_log_tail,
    process_state,
    terminate_process,
)
from awg_split_tunnel.lab.topology import (
    AWG_PORT,
    AWG_TUNNEL_CLIENT_IP,
    AWG_TUNNEL_SERVER_IP,
    AWG_TUNNEL_SERVER_IP6,
    CLIENT,
    HTTP,
    HTTP_IP,
    HTTP_PROXY_PORT,
    SOCKS,
    SOCKS_IP,
    SOCKS_PORT,
    TUNNEL_SERVER_IP,
    TUNNEL_SERVER_IP6,
    UDP_ECHO_PORT,
    UPLINK,
    WEB,
    WEB_IP,
    WEB_PORT,
    WG,
    WG_PORT,
    Lab,
    python_path,
)

READY_TIMEOUT = 10.0
OUR_PEER_READY_TIMEOUT = 20.0
"""Our ``tun`` command imports the whole package first: slower to answer than a C server on a busy box."""


@dataclass(slots=True)
class LabServer:
    """A server process in a lab namespace that can be stopped and started again.

    ``configure`` runs right after the process is spawned (e.g. ``wg set``), ``ready`` is polled until
    it returns True or ``READY_TIMEOUT`` passes.
    """

    lab: Lab
    name: str
    host: str
    argv: list[str]
    ready: Callable[[], bool]
    configure: Callable[[LabServer], None] | None = None
    env: Mapping[str, str] | None = None
    before_start: Callable[[], None] | None = None
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default=Path("/dev/null"))
    _starts: int = 0

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self.process.pid if self.running and self.process is not None else None

    def stderr_text(self) -> str:
        """What the server wrote to stdout/stderr so far (its log file)."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = READY_TIMEOUT) -> LabServer:
        """Start (or restart) the server and wait until it answers."""
        if self.running:
            return self
        if self.before_start is not None:
            self.before_start()
        self._starts += 1
        self.log = self.lab.tmpdir / f"{self.name}-{self._starts}.log"
        env = {**os.environ, **self.env} if self.env is not None else None
        with open(self.log, "wb") as log:
            self.process = self.lab.spawn(self.host, self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            if self.configure is not None:
                self.configure(self)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise LabError(
                    f"{self.name} exited ({self._exit_code()}) while starting:\n{self.stderr_text()}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        raise LabError(f"{self.name} did not answer within {timeout:.0f}s:\n{self.stderr_text()}")

    def _exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it; LabError if it does not exit (a
        restart would otherwise find it "running" and leave a dead server in place)."""
        if self.process is not None and not terminate_process(self.process):
            raise LabError(f"{self.name} did not exit after SIGKILL\n{self.describe()}")

    def describe(self) -> str:
        """For failure messages: whether it runs and what the kernel says it is doing, the end of its
        log, the kernel's latest messages."""
        pid = self.pid
        state = f"pid {pid}, {process_state(pid)}" if pid is not None else "not running"
        return f"{self.name}: {state}\nits log:\n{self.stderr_text()[-3000:]}\n{kernel_log_tail()}"

    def restart(self, timeout: float = READY_TIMEOUT) -> LabServer:
        """Stop, then start again."""
        self.stop()
        return self.start(timeout)


def _tcp_ready(lab: Lab, host: str, address: str, port: int) -> Callable[[], bool]:
    def ready() -> bool:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with lab.socket(host, family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((address, port)) == 0

    return ready


# -- web -----------------------------------------------------------------------------------------------


def start_web(lab: Lab, port: int = WEB_PORT, udp_port: int = UDP_ECHO_PORT) -> LabServer:
    """The echo web server (HTTP on ``port``, UDP echo on ``udp_port``, IPv4 and IPv6) in ns web."""
    env = {"PYTHONPATH": python_path()}
    argv = [sys.executable, "-m", "awg_split_tunnel.lab.echo_server", "--port", str(port)]
    argv += ["--udp-port", str(udp_port)]

    def ready() -> bool:
        if not _tcp_ready(lab, CLIENT, WEB_IP, port)():
            return False
        if not udp_port:
            return True
        with lab.socket(CLIENT, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            try:
                sock.sendto(b"ready?", (WEB_IP, udp_port))
                return sock.recv(2048).endswith(b"ready?")
            except OSError:
                return False

    return LabServer(lab, "web", WEB, argv, ready, env=env).start()


# -- SOCKS5 --------------------------------------------------------------------------------------------


def start_microsocks(
    lab: Lab, port: int = SOCKS_PORT, username: str | None = None, password: str | None = None
) -> LabServer:
    """microsocks in ns socks on ``port`` (IPv4 and IPv6); with ``username``/``password``, auth required.

    microsocks has no UDP ASSOCIATE; use :func:`start_dante` for UDP.
    """
    argv = ["microsocks", "-i", "::", "-p", str(port)]
    if username is not None:
        argv += ["-u", username, "-P", password or ""]
    return LabServer(lab, f"microsocks-{port}", SOCKS, argv, _tcp_ready(lab, CLIENT, SOCKS_IP, port)).start()


def dante_config(port: int, interface: str = UPLINK) -> str:
    """A danted.conf allowing CONNECT and UDP ASSOCIATE from anyone, without authentication."""
    return f"""\
logoutput: stderr
internal: {interface} port = {port}
external: {interface}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 0/0 to: 0/0
}}
socks pass {{
    from: 0/0 to: 0/0
    command: connect udpassociate bindreply udpreply
}}
"""


def start_dante(lab: Lab, port: int = SOCKS_PORT) -> LabServer:
    """dante (danted) in ns socks on ``port`` of 198.18.0.20 and 2001:2::20: CONNECT + UDP ASSOCIATE."""
    if shutil.which("danted") is None:
        raise LabUnavailable("danted (Debian package dante-server) is not installed")
    config = lab.tmpdir / f"danted-{port}.conf"
    config.write_text(dante_config(port))
    pidfile = lab.tmpdir / f"danted-{port}.pid"
    argv = ["danted", "-f", str(config), "-p", str(pidfile), "-N", "1"]
    return LabServer(lab, f"dante-{port}", SOCKS, argv, _tcp_ready(lab, CLIENT, SOCKS_IP, port)).start()


# -- HTTP CONNECT --------------------------------------------------------------------------------------


def tinyproxy_config(port: int, username: str | None = None, password: str | None = None) -> str:
    """A tinyproxy.conf: lab clients only, CONNECT to any port (no ConnectPort line), no Via header."""
    lines = [
        "User nobody",
        "Group nogroup",
        f"Port {port}",
        "Timeout 600",
        "LogLevel Info",
        "MaxClients 200",
        "DisableViaHeader Yes",
        "Allow 198.18.0.0/15",
        "Allow 2001:2::/48",
    ]
    if username is not None:
        lines.append(f"BasicAuth {username} {password or ''}")
    return "\n".join(lines) + "\n"


def start_tinyproxy(
    lab: Lab, port: int = HTTP_PROXY_PORT, username: str | None = None, password: str | None = None
) -> LabServer:
    """tinyproxy in ns http on ``port`` (IPv4 and IPv6); with ``username``/``password``, Basic auth."""
    if shutil.which("tinyproxy") is None:
        raise LabUnavailable("tinyproxy is not installed")
    config = lab.tmpdir / f"tinyproxy-{port}.conf"
    config.write_text(tinyproxy_config(port, username, password))
    config.chmod(0o644)
    argv = ["tinyproxy", "-d", "-c", str(config)]
    return LabServer(lab, f"tinyproxy-{port}", HTTP, argv, _tcp_ready(lab, CLIENT, HTTP_IP, port)).start()


# -- WireGuard / AmneziaWG -----------------------------------------------------------------------------


def generate_keypair() -> tuple[str, str]:
    """A fresh WireGuard key pair, ``(private, public)``, base64 as ``wg`` prints them."""
    private = X25519PrivateKey.generate()
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw_private).decode(), base64.b64encode(raw_public).decode()


def public_key(private_key: str) -> str:
    """The base64 public key of a base64 private key."""
    private = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
    return base64.b64encode(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass(frozen=True, slots=True)
class WireGuardPeer:
    """A peer as ``wg set ... peer`` takes it."""

    public_key: str
    allowed_ips: Sequence[str] = ()
    preshared_key: str | None = None
    endpoint: str | None = None
    persistent_keepalive: int | None = None


@dataclass(frozen=True, slots=True)
class WireGuardFlavour:
    """Which userspace daemon and tool: wireguard-go + wg, or amneziawg-go + awg."""

    name: str
    daemon: str
    tool: str
    socket_dir: Path


def wg_set_argv(
    tool: str,
    ifname: str,
    private_key_file: Path,
    listen_port: int | None,
    peers: Sequence[WireGuardPeer],
    secrets_dir: Path,
    awg_params: Mapping[str, str | int] | None = None,
) -> list[str]:
    """The ``wg set`` / ``awg set`` command line configuring an interface; key files go to ``secrets_dir``."""
    argv = [tool, "set", ifname, "private-key", str(private_key_file)]
    if listen_port is not None:
        argv += ["listen-port", str(listen_port)]
    for key, value in (awg_params or {}).items():
        argv += [key, str(value)]
    for index, peer in enumerate(peers):
        argv += ["peer", peer.public_key]
        if peer.preshared_key:
            psk_file = secrets_dir / f"{ifname}-psk{index}"
            psk_file.write_text(peer.preshared_key + "\n")
            psk_file.chmod(0o600)
            argv += ["preshared-key", str(psk_file)]
        if peer.endpoint:
            argv += ["endpoint", peer.endpoint]
        if peer.persistent_keepalive is not None:
            argv += ["persistent-keepalive", str(peer.persistent_keepalive)]
        if peer.allowed_ips:
            argv += ["allowed-ips", ",".join(peer.allowed_ips)]
    return argv


@dataclass(slots=True)
class WireGuardServer:
    """A running userspace WireGuard/AmneziaWG peer: its daemon plus what a client needs to reach it."""

    server: LabServer
    ifname: str
    private_key: str
    public_key: str
    listen_port: int
    host: str
    flavour: WireGuardFlavour
    endpoint: str

    def stop(self) -> None:
        """Kill the daemon (its tun interface goes with it)."""
        self.server.stop()

    def start(self) -> WireGuardServer:
        """Start the daemon again with the same keys, peers and addresses."""
        self.server.start()
        return self

    def restart(self) -> WireGuardServer:
        """Stop and start again."""
        self.server.restart()
        return self

    @property
    def running(self) -> bool:
        """True while the daemon runs."""
        return self.server.running

    @property
    def endpoint6(self) -> str:
        """The peer's endpoint over IPv6, ``[ip6]:port``."""
        return f"[{self.server.lab.addr(self.host, v6=True)}]:{self.listen_port}"

    def show(self) -> str:
        """``wg show IFNAME`` (or ``awg show``): handshakes, transfer counters."""
        return str(
            self.server.lab.run(self.host, [self.flavour.tool, "show", self.ifname], check=True).stdout
        )


WIREGUARD_GO = WireGuardFlavour("wireguard-go", "wireguard-go", "wg", WIREGUARD_SOCKET_DIR)


def start_userspace_wireguard(
    lab: Lab,
    flavour: WireGuardFlavour,
    *,
    host: str = WG,
    ifname: str | None = None,
    private_key: str | None = None,
    peers: Sequence[WireGuardPeer] = (),
    listen_port: int | None = WG_PORT,
    address: str | Sequence[str] = f"{TUNNEL_SERVER_IP}/24",
    routes: Sequence[str] = (),
    awg_params: Mapping[str, str | int] | None = None,
    mtu: int | None = None,
    log_level: str = "verbose",
) -> WireGuardServer:
    """A userspace WireGuard-family daemon in ``host``, configured with its tool; see the wrappers.

    ``log_level`` (``verbose``, ``error``, ``silent``) goes to the daemon's log in the lab's tmpdir;
    benchmarks may want ``error``.
    """
    ifname = ifname or lab.new_ifname("w" if flavour is WIREGUARD_GO else "a")
    if len(ifname) > 15:
        raise ValueError(f"interface name longer than 15 characters: {ifname!r}")
    private_key = private_key or generate_keypair()[0]
    addresses = [address] if isinstance(address, str) else list(address)
    key_file = lab.tmpdir / f"{ifname}.key"
    key_file.write_text(private_key + "\n")
    key_file.chmod(0o600)
    control_socket = flavour.socket_dir / f"{ifname}.sock"
    tool = flavour.tool

    def before_start() -> None:
        # A socket left by a killed daemon would make the new one fail to listen.
        if control_socket.exists():
            control_socket.unlink()

    def configure(server: LabServer) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not control_socket.exists():
            if not server.running or time.monotonic() > deadline:
                raise LabError(
                    f"{flavour.daemon} {ifname} did not create {control_socket}:\n{server.stderr_text()}"
                )
            time.sleep(0.02)
        lab.run(
            host, wg_set_argv(tool, ifname, key_file, listen_port, peers, lab.tmpdir, awg_params), check=True
        )
        for addr in addresses:
            lab.run(host, ["ip", "addr", "add", addr, "dev", ifname], check=True)
        if mtu is not None:
            lab.run(host, ["ip", "link", "set", ifname, "mtu", str(mtu)], check=True)
        lab.run(host, ["ip", "link", "set", ifname, "up"], check=True)
        for route in routes:
            lab.run(host, ["ip", "route", "replace", route, "dev", ifname], check=True)

    def ready() -> bool:
        return lab.run(host, [tool, "show", ifname]).returncode == 0

    server = LabServer(
        lab,
        f"{flavour.name}-{ifname}",
        host,
        [flavour.daemon, "-f", ifname],
        ready,
        configure=configure,
        env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": log_level},
        before_start=before_start,
    )
    server.start()
    port = listen_port or 0
    endpoint_ip = lab.addr(host)
    return WireGuardServer(
        server, ifname, private_key, public_key(private_key), port, host, flavour, f"{endpoint_ip}:{port}"
    )


def start_wireguard_go(
    lab: Lab,
    ifname: str | None = None,
    private_key: str | None = None,
    peers: Sequence[WireGuardPeer] = (),
    listen_port: int | None = WG_PORT,
    address: str | Sequence[str] = f"{TUNNEL_SERVER_IP}/24",
    *,
    host: str = WG,
    routes: Sequence[str] = (),
    mtu: int | None = None,
    log_level: str = "verbose",
) -> WireGuardServer:
    """A wireguard-go peer (in ns wg by default) forwarding tunnel traffic to the lab without NAT.

    The web server therefore sees tunnel addresses (198.19.0.x). ``host=CLIENT`` with ``routes`` makes
    a kernel-free WireGuard *client* for cross-checks.
    """
    if shutil.which("wireguard-go") is None or shutil.which("wg") is None:
        raise LabUnavailable("wireguard-go / wg (Debian packages wireguard-go, wireguard-tools) missing")
    return start_userspace_wireguard(
        lab,
        WIREGUARD_GO,
        host=host,
        ifname=ifname,
        private_key=private_key,
        peers=peers,
        listen_port=listen_port,
        address=address,
        routes=routes,
        mtu=mtu,
        log_level=log_level,
    )


def amneziawg_peer_bin() -> Path:
    """Folder holding ``amneziawg-go`` and ``awg``, built by the reference peer's ``build.sh`` if needed.

    Looks at ``$AWG_PEERS_BUILD`` first, then the peer sources' build script beside the repository.
    """
    candidates = [os.environ.get("AWG_PEERS_BUILD", "")]
    repo = Path(__file__).resolve().parents[3]
    candidates.append(str(repo.parent / "shared" / "peers" / "build.sh"))
    build = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if build is None:
        raise LabUnavailable("AmneziaWG reference peer sources not found (set AWG_PEERS_BUILD to build.sh)")
    done = subprocess.run(["bash", str(build)], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise LabUnavailable(f"building the AmneziaWG peer failed: {done.stderr.strip()[-2000:]}")
    folder = Path(done.stdout.strip().splitlines()[-1])
    if not (folder / "amneziawg-go").is_file() or not (folder / "awg").is_file():
        raise LabUnavailable(f"{build} did not produce amneziawg-go and awg in {folder}")
    return folder


def start_amneziawg_go(
    lab: Lab,
    ifname: str | None = None,
    private_key: str | None = None,
    peers: Sequence[WireGuardPeer] = (),
    listen_port: int | None = WG_PORT,
    address: str | Sequence[str] = f"{TUNNEL_SERVER_IP}/24",
    awg_params: Mapping[str, str | int] | None = None,
    *,
    host: str = WG,
    routes: Sequence[str] = (),
    mtu: int | None = None,
    log_level: str = "verbose",
) -> WireGuardServer:
    """The reference amneziawg-go peer, like :func:`start_wireguard_go` plus AmneziaWG parameters.

    ``awg_params`` are passed to ``awg set`` as they are, e.g. ``{"jc": 3, "jmin": 50, "jmax": 60,
    "s1": 37, "s2": 61, "h1": "100-200", "i1": "<b 0xc0ffee><r 5><t>"}``.
    """
    folder = amneziawg_peer_bin()
    flavour = WireGuardFlavour(
        "amneziawg-go", str(folder / "amneziawg-go"), str(folder / "awg"), AMNEZIAWG_SOCKET_DIR
    )
    return start_userspace_wireguard(
        lab,
        flavour,
        host=host,
        ifname=ifname,
        private_key=private_key,
        peers=peers,
        listen_port=listen_port,
        address=address,
        routes=routes,
        awg_params=awg_params,
        mtu=mtu,
        log_level=log_level,
    )


@dataclass(slots=True)
class OurAmneziaWGServer:
    """Our own userspace WireGuard/AmneziaWG device (the ``tun`` command) serving one client in the lab."""

    server: LabServer
    conf: Path
    ifname: str
    private_key: str
    public_key: str
    endpoint: str
    awg_params: Mapping[str, str]

    def stop(self) -> None:
        """Stop the ``tun`` command (SIGTERM: it removes its interface)."""
        self.server.stop()

    def start(self, timeout: float = OUR_PEER_READY_TIMEOUT) -> OurAmneziaWGServer:
        """Start it again with the same keys and parameters."""
        self.server.start(timeout)
        return self

    def restart(self, timeout: float = OUR_PEER_READY_TIMEOUT) -> OurAmneziaWGServer:
        """Stop and start again."""
        self.server.restart(timeout)
        return self

    @property
    def running(self) -> bool:
        """True while the ``tun`` command runs."""
        return self.server.running

    def output(self) -> str:
        """The log of its latest start: the "up" line, and rx/tx per peer after a stop."""
        return self.server.stderr_text()


def our_amneziawg_server_conf(
    private_key: str,
    client_public_key: str,
    awg_params: Mapping[str, str | int],
    *,
    address: str = f"{AWG_TUNNEL_SERVER_IP}/24",
    listen_port: int = AWG_PORT,
    client_address: str = AWG_TUNNEL_CLIENT_IP,
) -> str:
    """The server side's .conf: it listens on ``listen_port`` and routes the client's address back."""
    lines = [
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"Address = {address}",
        f"ListenPort = {listen_port}",
        *(f"{key} = {value}" for key, value in awg_params.items()),
        "",
        "[Peer]",
        f"PublicKey = {client_public_key}",
        f"AllowedIPs = {client_address}/32",
    ]
    return "\n".join(lines) + "\n"


def start_our_amneziawg(
    lab: Lab,
    client_public_key: str,
    awg_params: Mapping[str, str | int] | None = None,
    *,
    host: str = WG,
    private_key: str | None = None,
    ifname: str | None = None,
    listen_port: int = AWG_PORT,
    address: str = f"{AWG_TUNNEL_SERVER_IP}/24",
    client_address: str = AWG_TUNNEL_CLIENT_IP,
    timeout: float = OUR_PEER_READY_TIMEOUT,
) -> OurAmneziaWGServer:
    """Our own AmneziaWG peer (``python -m awg_split_tunnel.provider.wireguard.tun_client``) as a server.

    It runs in ``host`` (ns wg by default, which forwards tunnel traffic to the web server without NAT,
    so the web server sees ``client_address``), with AmneziaWG parameters ``awg_params`` in .conf
    spelling (``{"Jc": "3", "H1": "100-199", ...}``; none: plain WireGuard). It needs no package beyond
    this one. Ready when its log says the interface is up. See :func:`our_amneziawg_client_conf`.
    """
    params = {key: str(value) for key, value in (awg_params or {}).items()}
    ifname = ifname or lab.new_ifname("s")
    private_key = private_key or generate_keypair()[0]
    conf = lab.tmpdir / f"our-awg-{ifname}.conf"
    conf.write_text(
        our_amneziawg_server_conf(
            private_key,
            client_public_key,
            params,
            address=address,
            listen_port=listen_port,
            client_address=client_address,
        )
    )
    conf.chmod(0o600)
    argv = [sys.executable, "-m", "awg_split_tunnel.provider.wireguard.tun_client", str(conf)]
    argv += ["--ifname", ifname]
    server = LabServer(lab, f"our-awg-{ifname}", host, argv, lambda: False, env={"PYTHONPATH": python_path()})
    server.ready = lambda: " up: " in server.stderr_text()
    server.start(timeout)
    endpoint = f"{lab.addr(host)}:{listen_port}"
    return OurAmneziaWGServer(server, conf, ifname, private_key, public_key(private_key), endpoint, params)


def our_amneziawg_client_conf(
    server: OurAmneziaWGServer,
    client_private_key: str,
    *,
    address: str = f"{AWG_TUNNEL_CLIENT_IP}/24",
    mtu: int = 1420,
    listen_port: int | None = None,
    extra_interface: str = "",
) -> str:
    """The client's .conf for ``server``: same parameters, its endpoint, AllowedIPs 0.0.0.0/0.

    ``extra_interface`` is appended to [Interface] as it is (e.g. timer settings for a test).
    """
    lines = ["[Interface]", f"PrivateKey = {client_private_key}", f"Address = {address}", f"MTU = {mtu}"]
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    lines += [f"{key} = {value}" for key, value in server.awg_params.items()]
    if extra_interface:
        lines.append(extra_interface.rstrip("\n"))
    lines += ["", "[Peer]", f"PublicKey = {server.public_key}", f"Endpoint = {server.endpoint}"]
    lines.append("AllowedIPs = 0.0.0.0/0")
    return "\n".join(lines) + "\n"


def start_iperf3(lab: Lab, host: str = WEB, port: int = 5201) -> LabServer:
    """``iperf3 -s`` in ``host`` for throughput tests."""
    argv = ["iperf3", "-s", "-p", str(port)]
    server = LabServer(lab, f"iperf3-{port}", host, argv, lambda: False)
    # A probe connection would count as a failed iperf3 test; look at the listening sockets instead.
    server.ready = lambda: server.pid is not None and _listening(server.pid, port)
    return server.start()


def _listening(pid: int, port: int) -> bool:
    """True when a TCP socket listens on ``port`` in the network namespace of process ``pid``."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


@dataclass(slots=True)
class LabInternet:
    """The lab's usual set of servers, as :func:`start_internet` starts them."""

    web: LabServer
    socks: LabServer
    http: LabServer
    wireguard: WireGuardServer | None = None
    amneziawg: WireGuardServer | None = None

    def servers(self) -> list[LabServer]:
        """Every server process, for stopping or inspecting them together."""
        found = [self.web, self.socks, self.http]
        found += [peer.server for peer in (self.wireguard, self.amneziawg) if peer is not None]
        return found


def start_internet(
    lab: Lab,
    *,
    wireguard_client: WireGuardPeer | None = None,
    amneziawg_client: WireGuardPeer | None = None,
    awg_params: Mapping[str, str | int] | None = None,
) -> LabInternet:
    """Start the web server, dante (SOCKS5 with UDP), tinyproxy, and the peers asked for.

    ``wireguard_client`` / ``amneziawg_client`` are the client's peer entries (public key and allowed
    tunnel addresses); the WireGuard peer listens on ``WG_PORT``, the AmneziaWG one on ``AWG_PORT`` with
    tunnel addresses 198.19.0.1/24 and 198.19.1.1/24 respectively.
    """
    internet = LabInternet(start_web(lab), start_dante(lab), start_tinyproxy(lab))
    if wireguard_client is not None:
        internet.wireguard = start_wireguard_go(
            lab, peers=[wireguard_client], address=[f"{TUNNEL_SERVER_IP}/24", f"{TUNNEL_SERVER_IP6}/64"]
        )
    if amneziawg_client is not None:
        internet.amneziawg = start_amneziawg_go(
            lab,
            peers=[amneziawg_client],
            listen_port=AWG_PORT,
            address=[f"{AWG_TUNNEL_SERVER_IP}/24", f"{AWG_TUNNEL_SERVER_IP6}/64"],
            awg_params=awg_params,
        )
    return internet
