"""End to end, the central case: four apps, four routes, at the same time, under the real daemon.

One daemon (``python -m awg_split_tunnel.daemon``) in ns client per AmneziaWG parameter set, with:

- ``awg``: AmneziaWG to OUR OWN peer (the ``tun`` command) as the server in ns wg, 198.19.1.0/24 on 51821;
- ``wg``: WireGuard to wireguard-go in ns wg, 198.19.0.0/24 on 51820;
- ``socks``: SOCKS5 through dante (198.18.0.20);
- everything else direct (198.18.0.1).

ns wg forwards tunnel traffic to the web server without NAT, so the web server sees each app's tunnel
address (docs/LAB.md). In the daemon whose WireGuard peer is killed, that tunnel's .conf has short timers, so
a dead peer is seen DOWN within seconds; the device then retries every second, so a restarted peer
brings the tunnel back UP. Each app does a TCP request, a UDP echo and a checksummed download at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO
from polling import wait_for
from running_daemon import OPEN_REQUEST, read_line, stop_daemon
from test_awg_interop import PARAMETER_SETS

from awg_split_tunnel.lab import (
    AWG_PORT,
    AWG_TUNNEL_CLIENT_IP,
    CLIENT,
    CLIENT_IP,
    SOCKS_IP,
    TUNNEL_CLIENT_IP,
    TUNNEL_SERVER_IP,
    UDP_ECHO_PORT,
    WEB_IP,
    WG_PORT,
    Lab,
    WireGuardPeer,
    WireGuardServer,
    generate_keypair,
    make_app,
    our_amneziawg_client_conf,
    start_dante,
    start_our_amneziawg,
    start_web,
    start_wireguard_go,
)
from awg_split_tunnel.lab.echo_server import pattern_sha256
from awg_split_tunnel.lab.topology import python_path

pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]

GENERATIONS = ["1.0", "1.5", "2.0"]
KILL_GENERATION = "2.0"
"""The daemon whose WireGuard peer is killed and restarted (once per data path is enough)."""
DATAPLANES = ("divert", "kernel")
DAEMONS = [(dataplane, generation) for dataplane in DATAPLANES for generation in GENERATIONS]
KILL_DAEMONS = [(dataplane, KILL_GENERATION) for dataplane in DATAPLANES]


def daemon_id(param: tuple[str, str]) -> str:
    return f"{param[0]}-awg-{param[1]}"


WG_CLIENT_PORT = 51910
AWG_CLIENT_PORT = 51911
# Short timers so that a dead peer is noticed (DOWN) within seconds (see test_split_wg.py for why these).
TEST_TIMERS = "KeepaliveTimeout = 5\nRekeyTimeout = 1\nMaxHandshakeAttempts = 2\n"
BULK_SIZE = 4 << 20
START_TIMEOUT = 40.0
UP_TIMEOUT = 30.0

# Each app and the address the web server must see from it while every tunnel is UP.
APP_AWG, APP_WG_BLOCK, APP_WG_FALLBACK, APP_SOCKS, APP_DIRECT = (
    "app-awg",
    "app-wgblock",
    "app-wgfallback",
    "app-socks",
    "app-direct",
)
EXPECTED = {
    APP_AWG: AWG_TUNNEL_CLIENT_IP,
    APP_WG_BLOCK: TUNNEL_CLIENT_IP,
    APP_SOCKS: SOCKS_IP,
    APP_DIRECT: CLIENT_IP,
}

DOWNLOAD = """
import hashlib, socket, sys
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 80), timeout=30)
s.sendall(f"GET /bytes/{n} HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n".encode())
data = bytearray()
while chunk := s.recv(1 << 20):
    data += chunk
body = bytes(data[data.index(b"\\r\\n\\r\\n") + 4 :])
print(len(body), hashlib.sha256(body).hexdigest())
"""

# A UDP exchange as real apps do it (DNS, QUIC): resend until answered, since a datagram may be lost under
# load. Prints the address the echo saw and how many datagrams it took.
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.5)
for attempt in range(1, 41):
    s.send(b"probe")
    try:
        reply = s.recv(65535)
    except TimeoutError:
        continue
    print(reply.partition(b"\\n")[0].decode().rsplit(":", 1)[0], attempt)
    break
else:
    sys.exit("no answer")
"""


# A datagram bigger than the uplink's MTU, sent with path-MTU discovery off so that the app's own kernel
# cuts it into IPv4 fragments without DF (later fragments carry no ports), each still bigger than the
# tunnel's MTU: they are cut again on the way into the tunnel. Sent argv[3] times at most, waiting
# argv[4] seconds (default 0.5) for the answer each time. Prints the echo's address and length.
BIG_DATAGRAM = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[4]) if len(sys.argv) > 4 else 0.5)
for attempt in range(int(sys.argv[3])):
    try:
        s.send(b"x" * 4000)
        reply = s.recv(65535)
    except (TimeoutError, OSError):
        continue
    print(reply.partition(b"\\n")[0].decode().rsplit(":", 1)[0], len(reply.partition(b"\\n")[2]))
    break
else:
    sys.exit("no answer")
"""
# One datagram to a port where nothing listens: the host answers ICMP port unreachable, which a connected
# UDP socket reports as "connection refused". Prints how it ended.
CLOSED_PORT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(5.0)
s.send(b"anyone there?")
try:
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("no answer in 5 s")
"""
FRAGMENTS = f"ip src {CLIENT_IP} and ip dst {WEB_IP} and (ip[6:2] & 0x3fff != 0)"
"""IPv4 fragments of the client towards the web server, as they would leave on the uplink."""


def daemon_config(wg_type: str, dataplane: str = "divert") -> str:
    return f"""\
log_level: info
dataplane: {dataplane}
default: direct
tunnels:
  - id: awg
    type: amneziawg
    config_file: awg.conf
  - id: wg
    type: {wg_type}
    config_file: wg.conf
  - id: socks
    type: socks5
    server: {SOCKS_IP}:1080
rules:
  - process: {APP_AWG}
    tunnel: awg
    fallback: block
  - process: {APP_WG_BLOCK}
    tunnel: wg
    fallback: block
  - process: {APP_WG_FALLBACK}
    tunnel: wg
    fallback: allow_direct
  - process: {APP_SOCKS}
    tunnel: socks
    fallback: block
"""


def client_conf(
    private_key: str,
    address: str,
    port: int,
    peer_public: str,
    endpoint: str,
    params: dict[str, str],
    timers: str = "",
) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in params.items())
    return (
        f"[Interface]\nPrivateKey = {private_key}\nAddress = {address}/24\nListenPort = {port}\nMTU = 1420\n"
        f"{timers}{extra}\n"
        f"[Peer]\nPublicKey = {peer_public}\nEndpoint = {endpoint}\nAllowedIPs = 0.0.0.0/0\n"
    )


@dataclass(slots=True)
class Keys:
    private: str
    public: str


@dataclass(slots=True)
class World:
    """The lab with everything but the daemon and the AmneziaWG server: web, dante, wireguard-go."""

    lab: Lab
    wg_peer: WireGuardServer
    wg_client: Keys


@dataclass(slots=True)
class RunningDaemon:
    """The daemon process of one parameter set, its AmneziaWG server and where its output goes."""

    world: World
    generation: str
    process: subprocess.Popen[bytes]
    control: Path
    stdout: Path
    stderr: Path

    @property
    def lab(self) -> Lab:
        return self.world.lab

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def status(self) -> dict[str, dict[str, Any]]:
        """The daemon's `status` rows by tunnel id."""
        from awg_split_tunnel.api.control import request

        answer = request("status", path=self.control, timeout=5.0)
        return {row["id"]: row for row in answer["tunnels"]}

    def state(self, tunnel_id: str) -> str:
        try:
            return str(self.status()[tunnel_id]["state"])
        except (OSError, KeyError, ValueError):
            return "(no answer)"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        start_web(lab)
        start_dante(lab)
        for name in (APP_AWG, APP_WG_BLOCK, APP_WG_FALLBACK, APP_SOCKS, APP_DIRECT):
            make_app(lab, name)
        keys = Keys(*generate_keypair())
        wg_peer = start_wireguard_go(
            lab,
            peers=[
                WireGuardPeer(
                    keys.public, [f"{TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{WG_CLIENT_PORT}"
                )
            ],
            listen_port=WG_PORT,
            address=f"{TUNNEL_SERVER_IP}/24",
        )
        yield World(lab, wg_peer, keys)


@pytest.fixture(scope="module", params=DAEMONS, ids=daemon_id)
def daemon(world: World, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    """One daemon on this data path whose `awg` tunnel uses this AmneziaWG parameter set; stopped
    (SIGTERM) at the end."""
    lab = world.lab
    dataplane, generation = request.param
    params = PARAMETER_SETS[generation]
    # The config refuses the timer settings for `type: wireguard` (they are AmneziaWG parameters), so the
    # daemon that sees its WireGuard peer die calls that tunnel amneziawg: with no obfuscation parameter
    # it speaks plain WireGuard to wireguard-go all the same. The others are true `type: wireguard`.
    short_timers = generation == KILL_GENERATION
    # The kill test gets a daemon of its own (indirect parametrization): each instance has its folder.
    folder = Path(tempfile.mkdtemp(prefix=f"{dataplane}-{generation}-", dir=lab.tmpdir))
    awg_client = Keys(*generate_keypair())
    server = start_our_amneziawg(lab, awg_client.public, params)
    (folder / "awg.conf").write_text(
        our_amneziawg_client_conf(
            server, awg_client.private, listen_port=AWG_CLIENT_PORT, extra_interface=TEST_TIMERS
        )
    )
    (folder / "wg.conf").write_text(
        client_conf(
            world.wg_client.private,
            TUNNEL_CLIENT_IP,
            WG_CLIENT_PORT,
            world.wg_peer.public_key,
            world.wg_peer.endpoint,
            {},
            TEST_TIMERS if short_timers else "",
        )
    )
    config = folder / "config.yaml"
    config.write_text(daemon_config("amneziawg" if short_timers else "wireguard", dataplane))
    for path in (config, folder / "awg.conf", folder / "wg.conf"):
        path.chmod(0o600)  # they hold private keys

    stdout, stderr = folder / "daemon.out", folder / "daemon.err"
    control = folder / "control.sock"
    env = {**os.environ, "PYTHONPATH": python_path()}
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process: subprocess.Popen[bytes] = lab.spawn(
            CLIENT,
            [sys.executable, "-m", "awg_split_tunnel.daemon", "-c", config, "--control", control],
            stdout=out,
            stderr=err,
            env=env,
        )
    running = RunningDaemon(world, generation, process, control, stdout, stderr)
    try:

        def started() -> bool:
            if process.poll() is not None:
                pytest.fail(f"daemon exited ({process.returncode}) at start:\n{running.output()[-4000:]}")
            return "running" in stdout.read_text(errors="replace")

        wait_for(started, START_TIMEOUT, "the daemon's status line", running.output)
        wait_for(
            lambda: running.state("awg") == running.state("wg") == "up",
            UP_TIMEOUT,
            "both packet tunnels UP",
            lambda: f"{running.output()}\n--- our AmneziaWG server:\n{server.output()}",
        )
        yield running
    finally:
        stop_daemon(process)
        server.stop()
        print(running.output()[-5000:])
        print(f"--- our AmneziaWG server:\n{server.output()[-5000:]}")


def run_concurrently(lab: Lab) -> dict[tuple[str, str], str]:
    """Every app at once: a TCP request, a UDP echo and a bulk download each. What each printed."""
    procs: dict[tuple[str, str], subprocess.Popen[str]] = {}
    for name in EXPECTED:
        procs[name, "tcp"] = lab.spawn_app(name, timeout=20.0)
        procs[name, "udp"] = lab.spawn(
            CLIENT,
            [lab.apps[name], "-c", UDP_ECHO, WEB_IP, str(UDP_ECHO_PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[name, "bulk"] = lab.spawn(
            CLIENT,
            [lab.apps[name], "-c", DOWNLOAD, WEB_IP, str(BULK_SIZE)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    outputs: dict[tuple[str, str], str] = {}
    for key, process in procs.items():
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            err += "\n(timed out)"
        outputs[key] = out if process.returncode == 0 else f"FAILED ({process.returncode}): {out} {err}"
    return outputs


def test_four_apps_four_routes_at_the_same_time(daemon: RunningDaemon) -> None:
    started = time.monotonic()
    outputs = run_concurrently(daemon.lab)
    took = time.monotonic() - started
    print(f"[{daemon.generation}] 4 apps x (TCP + UDP + {BULK_SIZE >> 20} MiB) at once: {took:.1f}s")
    wanted = {
        (name, kind): [expected] if kind != "bulk" else [str(BULK_SIZE), pattern_sha256(BULK_SIZE)]
        for name, expected in EXPECTED.items()
        for kind in ("tcp", "udp", "bulk")
    }
    got = {key: outputs[key].split()[: len(want)] for key, want in wanted.items()}
    wrong = {key: outputs[key] for key, want in wanted.items() if got[key] != want}
    detail = f"{wrong}\nstatus: {daemon.status()}\n{daemon.output()[-3000:]}"
    assert not wrong, detail


def test_status_shows_the_packet_tunnels_up_with_traffic(daemon: RunningDaemon) -> None:
    # Traffic of its own, so this test does not depend on the one before.
    assert daemon.lab.app(APP_AWG).seen_ip == AWG_TUNNEL_CLIENT_IP
    assert daemon.lab.app(APP_WG_BLOCK).seen_ip == TUNNEL_CLIENT_IP
    rows = daemon.status()
    for tunnel_id in ("awg", "wg"):
        row = rows[tunnel_id]
        assert row["state"] == "up", row
        assert row["rx_bytes"] > 0 and row["tx_bytes"] > 0, row
        assert 0 <= row["handshake_age"] < 180, row  # a session's keys are replaced within 3 minutes
    assert rows["socks"]["state"] == "up", rows["socks"]


def test_amneziawg_tunnel_traffic_is_not_plain_wireguard_on_the_wire(daemon: RunningDaemon) -> None:
    """The AmneziaWG tunnel's transport datagrams carry a type from H4, not WireGuard's 4."""
    params = PARAMETER_SETS[daemon.generation]
    offset = int(params.get("S4", "0"))
    with daemon.lab.capture(CLIENT, bpf_filter=f"udp and dst port {AWG_PORT}") as capture:
        assert daemon.lab.app(APP_AWG, udp=True).seen_ip == AWG_TUNNEL_CLIENT_IP
        time.sleep(0.3)
    from test_awg_interop import read_pcap_udp

    sent = [payload for _, _, payload in read_pcap_udp(capture.pcap)]
    assert sent, "no datagram of the AmneziaWG tunnel captured"
    types = {int.from_bytes(d[offset : offset + 4], "little") for d in sent if len(d) >= offset + 32}
    assert types and 4 not in types, types


def test_an_icmp_error_from_inside_the_tunnel_reaches_the_app(daemon: RunningDaemon) -> None:
    """The web server's "port unreachable" travels back through each tunnel to the app that caused it,
    which hears "connection refused" at once, as the direct app does, instead of waiting for a timeout."""
    lab = daemon.lab
    ended = {
        name: lab.run(CLIENT, [lab.apps[name], "-c", CLOSED_PORT, WEB_IP, "9"], timeout=20).stdout.strip()
        for name in (APP_WG_BLOCK, APP_AWG, APP_DIRECT)
    }
    assert ended == {APP_WG_BLOCK: "refused", APP_AWG: "refused", APP_DIRECT: "refused"}


@pytest.mark.parametrize("daemon", KILL_DAEMONS, indirect=True, ids=daemon_id)
def test_a_fragmented_datagram_of_a_tunnelled_app_goes_through_the_tunnel_not_the_uplink(
    daemon: RunningDaemon,
) -> None:
    lab = daemon.lab
    answers = {}
    counts = {}
    for name in (APP_WG_BLOCK, APP_DIRECT):
        with lab.capture(CLIENT, bpf_filter=FRAGMENTS) as capture:
            # Sent once: the first datagram already arrives (no "too big" for a datagram without DF).
            done = lab.run(CLIENT, [lab.apps[name], "-c", BIG_DATAGRAM, WEB_IP, str(UDP_ECHO_PORT), "1", "5"])
            time.sleep(0.3)
        answers[name] = done.stdout.split() if done.returncode == 0 else done.stderr
        counts[name] = capture.count()
    assert answers == {APP_WG_BLOCK: [TUNNEL_CLIENT_IP, "4000"], APP_DIRECT: [CLIENT_IP, "4000"]}
    assert counts[APP_WG_BLOCK] == 0, "a fragment of the tunnelled app left on the uplink"
    assert counts[APP_DIRECT] >= 3, "the capture sees the direct app's fragments"


@pytest.mark.parametrize("daemon", KILL_DAEMONS, indirect=True, ids=daemon_id)
def test_wireguard_peer_dies_block_app_fails_allow_direct_app_goes_direct_then_back(
    daemon: RunningDaemon,
) -> None:
    lab = daemon.lab
    peer = daemon.world.wg_peer
    assert lab.app(APP_WG_FALLBACK).seen_ip == TUNNEL_CLIENT_IP
    peer.stop()
    killed = time.monotonic()
    try:
        # Unanswered traffic makes the device notice within a few seconds (short timers).
        wait_for(
            lambda: lab.app(APP_WG_FALLBACK, timeout=2.0).seen_ip == CLIENT_IP,
            40.0,
            "the allow_direct app of the dead tunnel goes direct",
            daemon.output,
        )
        print(f"allow_direct app went direct {time.monotonic() - killed:.1f}s after the peer died")
        assert daemon.state("wg") == "down"
        web = f"dst host {WEB_IP} and src host {CLIENT_IP}"
        with lab.capture(CLIENT, bpf_filter=web) as capture:
            blocked = lab.app(APP_WG_BLOCK, timeout=2.0)
            blocked_udp = lab.app(APP_WG_BLOCK, udp=True, timeout=1.0)
            big = lab.run(
                CLIENT, [lab.apps[APP_WG_BLOCK], "-c", BIG_DATAGRAM, WEB_IP, str(UDP_ECHO_PORT), "2"]
            )
            time.sleep(0.3)
        assert not blocked.ok and blocked.seen_ip == ""
        assert not blocked_udp.ok and blocked_udp.seen_ip == ""
        assert big.returncode != 0, f"a fragmented datagram of the block app was answered: {big.stdout}"
        assert capture.count() == 0, "\n".join(capture.packets())
        # The other routes do not notice.
        assert lab.app(APP_AWG).seen_ip == AWG_TUNNEL_CLIENT_IP
        assert lab.app(APP_SOCKS).seen_ip == SOCKS_IP
        assert lab.app(APP_DIRECT).seen_ip == CLIENT_IP
        with lab.capture(CLIENT, bpf_filter=web) as direct:
            assert lab.app(APP_WG_FALLBACK).seen_ip == CLIENT_IP
            time.sleep(0.3)
        assert direct.count() > 0, "the capture sees direct traffic, so its silence above means something"
    finally:
        peer.start()
    restarted = time.monotonic()
    wait_for(lambda: daemon.state("wg") == "up", UP_TIMEOUT, "the WireGuard tunnel UP again", daemon.output)
    wait_for(
        lambda: lab.app(APP_WG_BLOCK, timeout=2.0).seen_ip == TUNNEL_CLIENT_IP,
        10.0,
        "the block app tunnelled again",
        daemon.output,
    )
    print(f"tunnelled again {time.monotonic() - restarted:.1f}s after the peer restarted")
    assert lab.app(APP_WG_FALLBACK).seen_ip == TUNNEL_CLIENT_IP


@pytest.mark.parametrize("daemon", KILL_DAEMONS, indirect=True, ids=daemon_id)
def test_tunnel_down_by_hand_stops_a_wireguard_tunnel_and_up_brings_it_back(daemon: RunningDaemon) -> None:
    from awg_split_tunnel.api.control import request

    lab = daemon.lab
    assert lab.app(APP_WG_BLOCK).seen_ip == TUNNEL_CLIENT_IP
    waiting = lab.spawn(
        CLIENT,
        [lab.apps[APP_WG_BLOCK], "-c", OPEN_REQUEST, WEB_IP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(waiting, 5.0) == "connected"
        answer = request("tunnel", path=daemon.control, action="down", id="wg")
        taken_down = time.monotonic()
        # A connection that only waits for data learns at once that its tunnel is gone.
        assert read_line(waiting, 3.0) in ("reset", "closed"), "the block app's open connection ended"
        assert time.monotonic() - taken_down < 2.0
    finally:
        waiting.kill()
    assert answer["state"] == "down"
    try:
        web = f"dst host {WEB_IP} and src host {CLIENT_IP}"
        with lab.capture(CLIENT, bpf_filter=web) as capture:
            blocked = lab.app(APP_WG_BLOCK, timeout=2.0)
            time.sleep(0.3)
        assert not blocked.ok and blocked.seen_ip == "", "block: nothing while the tunnel is down"
        assert capture.count() == 0, "\n".join(capture.packets())
        assert lab.app(APP_WG_FALLBACK).seen_ip == CLIENT_IP, "allow_direct: direct while down"
        time.sleep(1.5)  # the device's retries must not bring it back by themselves
        row = daemon.status()["wg"]
        assert row["state"] == "down", row
        assert daemon.lab.app(APP_AWG).seen_ip == AWG_TUNNEL_CLIENT_IP, "the other tunnel does not notice"
    finally:
        answer = request("tunnel", path=daemon.control, action="up", id="wg", timeout=15.0)
    assert answer["state"] == "up", answer
    assert lab.app(APP_WG_BLOCK).seen_ip == TUNNEL_CLIENT_IP
    assert lab.app(APP_WG_FALLBACK).seen_ip == TUNNEL_CLIENT_IP


@pytest.mark.parametrize("daemon", KILL_DAEMONS, indirect=True, ids=daemon_id)
def test_tunnels_follow_the_client_when_its_uplink_address_changes(daemon: RunningDaemon) -> None:
    """A laptop moving to another network: the uplink's address is replaced while the daemon runs.
    Nothing is restarted; the peers learn the new endpoint from our next authenticated packet."""
    lab = daemon.lab
    moved = "198.18.0.5"

    def set_uplink(add: str, remove: str) -> None:
        # What a DHCP client does on a new network: the old address goes (and with it the routes of the
        # interface), the new one comes, the default route is put back.
        lab.run(CLIENT, ["ip", "addr", "del", f"{remove}/24", "dev", "eth0"], check=True)
        lab.run(CLIENT, ["ip", "addr", "add", f"{add}/24", "dev", "eth0"], check=True)
        lab.run(CLIENT, ["ip", "route", "replace", "default", "dev", "eth0"], check=True)

    def all_routes_right(client_ip: str) -> bool:
        expected = {
            APP_WG_BLOCK: TUNNEL_CLIENT_IP,
            APP_AWG: AWG_TUNNEL_CLIENT_IP,
            APP_SOCKS: SOCKS_IP,
            APP_DIRECT: client_ip,
        }
        seen.clear()
        seen.update({name: lab.app(name, timeout=2.0).seen_ip for name in expected})
        return seen == expected

    seen: dict[str, str] = {}

    def detail() -> str:
        return f"apps saw: {seen}\n{daemon.output()}"

    assert all_routes_right(CLIENT_IP), seen
    set_uplink(moved, CLIENT_IP)
    try:
        took = wait_for(
            lambda: all_routes_right(moved), 20.0, "every route again from the new address", detail
        )
        print(f"every route worked again {took:.1f}s after the uplink address changed")
        assert f"endpoint: {moved}:{WG_CLIENT_PORT}" in daemon.world.wg_peer.show()
        udp = lab.app(APP_WG_BLOCK, udp=True)
        assert udp.ok and udp.seen_ip == TUNNEL_CLIENT_IP, udp.stderr
        assert {daemon.state("wg"), daemon.state("awg")} == {"up"}
    finally:
        set_uplink(CLIENT_IP, moved)
    wait_for(lambda: all_routes_right(CLIENT_IP), 20.0, "every route back on the old address", detail)
