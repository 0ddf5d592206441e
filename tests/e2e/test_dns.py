"""End to end: DNS follows the app, on both data paths (docs/DNS.md).

The lab's DNS server (ns web, 198.18.0.10:53) answers ``whoami.lab. TXT`` with the address it saw the
query come from; a stub resolver on 127.0.0.53 in ns client (test app ``lab-resolver``) forwards to it, as
systemd-resolved would. Under the real daemon, apps of every kind ask the stub (UDP and TCP) and the
server directly (their own resolver), and the answer names the route each lookup took:

- AmneziaWG (our own peer) / WireGuard (wireguard-go): the tunnel address, asked of the tunnel's
  ``DNS =`` server from inside the tunnel (WireGuard's is a second server, ``wg``, at the tunnel's far end,
  198.19.0.1: reachable only through the tunnel);
- SOCKS5 (dante): the proxy's address (its ``dns:`` server, ``socks``, listens beside it);
  HTTP CONNECT (tinyproxy): the proxy's address (DNS over TCP);
- direct: the client's own address, by way of the stub as without the daemon;
- ``block`` with its tunnel down: SERVFAIL through the stub, nothing at all directly.

A capture on the client's uplink sees no DNS packet while only tunnelled apps look names up.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO
from polling import wait_for
from running_daemon import stop_daemon
from test_awg_interop import PARAMETER_SETS

from awg_split_tunnel.lab import (
    AWG_TUNNEL_CLIENT_IP,
    CLIENT,
    CLIENT_IP,
    CLIENT_IP6,
    HTTP_IP,
    INET,
    SOCKS,
    SOCKS_IP,
    TUNNEL_CLIENT_IP,
    TUNNEL_SERVER_IP,
    WEB_IP,
    WEB_IP6,
    WG,
    WG_PORT,
    Lab,
    LabServer,
    WireGuardPeer,
    generate_keypair,
    make_app,
    our_amneziawg_client_conf,
    start_dante,
    start_our_amneziawg,
    start_tinyproxy,
    start_wireguard_go,
)
from awg_split_tunnel.lab.dns_server import BIG, SERVER, STUB_ADDRESS, WHOAMI, start_dns, start_dns_stub
from awg_split_tunnel.lab.topology import python_path

pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]

DATAPLANES = ("divert", "kernel")
WG_CLIENT_PORT = 51920
AWG_CLIENT_PORT = 51921
START_TIMEOUT = 40.0
UP_TIMEOUT = 30.0

APP_AWG, APP_WG, APP_SOCKS, APP_HTTP, APP_DIRECT, APP_BLOCK = (
    "dns-awg",
    "dns-wg",
    "dns-socks",
    "dns-http",
    "dns-direct",
    "dns-block",
)
RESOLVER_APP = "lab-resolver"
STUB_ADDRESS6 = "::1"
SERVFAIL = "SERVFAIL"
NO_ANSWER = "no answer"

# What the DNS server saw, by app and way of asking: through the stub (UDP, TCP) and directly.
# ``stub6`` is a second stub on ::1 (IPv6 loopback) forwarding to the server's IPv6 address.
EXPECTED = {
    APP_AWG: {
        "stub": AWG_TUNNEL_CLIENT_IP,
        "stub-tcp": AWG_TUNNEL_CLIENT_IP,
        "stub6": AWG_TUNNEL_CLIENT_IP,
        "own": AWG_TUNNEL_CLIENT_IP,
    },
    APP_WG: {
        "stub": TUNNEL_CLIENT_IP,
        "stub-tcp": TUNNEL_CLIENT_IP,
        "stub6": TUNNEL_CLIENT_IP,
        "own": TUNNEL_CLIENT_IP,
    },
    APP_SOCKS: {"stub": SOCKS_IP, "stub-tcp": SOCKS_IP, "stub6": SOCKS_IP, "own": SOCKS_IP},
    APP_HTTP: {"stub": HTTP_IP, "stub-tcp": HTTP_IP, "stub6": HTTP_IP, "own-tcp": HTTP_IP},
    APP_DIRECT: {"stub": CLIENT_IP, "stub-tcp": CLIENT_IP, "stub6": CLIENT_IP6, "own": CLIENT_IP},
    APP_BLOCK: {"stub": SERVFAIL, "stub-tcp": SERVFAIL, "stub6": SERVFAIL, "own": NO_ANSWER},
}
TUNNELLED = (APP_AWG, APP_WG, APP_SOCKS, APP_HTTP)

# A lookup as an app with its own resolver code does it (argv: server, name, udp|tcp|auto). ``auto`` asks
# over UDP and again over TCP when the answer is truncated, as glibc does. Prints a JSON object: the
# answer's rcode, its first TXT string and all of them, whether a truncated answer came first.
LOOKUP = """
import json, socket, struct, sys
import dns.flags, dns.message, dns.rcode
server, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
wire = dns.message.make_query(name, "TXT").to_wire()
family = socket.AF_INET6 if ":" in server else socket.AF_INET

def ask(tcp):
    s = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((server, 53))
    if tcp:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = s.recv(65535)
            if not chunk:
                raise OSError("closed")
            data += chunk
        return dns.message.from_wire(data[2:])
    for _ in range(2):
        s.send(wire)
        try:
            return dns.message.from_wire(s.recv(65535))
        except TimeoutError:
            continue
    raise TimeoutError

try:
    answer = ask(mode == "tcp")
    truncated = bool(answer.flags & dns.flags.TC)
    if truncated and mode == "auto":
        answer = ask(True)
except (OSError, TimeoutError) as exc:
    print(json.dumps({"error": type(exc).__name__}))
    sys.exit(0)
texts = [b"".join(r.strings).decode() for rrset in answer.answer for r in rrset]
print(json.dumps({"rcode": dns.rcode.to_text(answer.rcode()), "text": texts[0] if texts else None,
                  "texts": texts, "truncated": truncated}))
"""


def packet_conf(private: str, address: str, port: int, peer_public: str, endpoint: str) -> str:
    return (
        f"[Interface]\nPrivateKey = {private}\nAddress = {address}/24\nListenPort = {port}\nMTU = 1420\n"
        f"DNS = {TUNNEL_SERVER_IP}\n\n[Peer]\nPublicKey = {peer_public}\nEndpoint = {endpoint}\n"
        "AllowedIPs = 0.0.0.0/0\n"
    )


def daemon_config(dataplane: str) -> str:
    return f"""\
log_level: debug
dataplane: {dataplane}
default: direct
tunnels:
  - id: awg
    type: amneziawg
    config_file: awg.conf
  - id: wg
    type: wireguard
    config_file: wg.conf
  - id: socks
    type: socks5
    server: {SOCKS_IP}:1080
    dns: [{SOCKS_IP}]
  - id: http
    type: http
    server: {HTTP_IP}:3128
    dns: [{WEB_IP}]
  - id: dead
    type: socks5
    server: {SOCKS_IP}:1999
    dns: [{WEB_IP}]
rules:
  - {{process: {APP_AWG}, tunnel: awg, fallback: block}}
  - {{process: {APP_WG}, tunnel: wg, fallback: block}}
  - {{process: {APP_SOCKS}, tunnel: socks, fallback: block}}
  - {{process: {APP_HTTP}, tunnel: http, fallback: block}}
  - {{process: {APP_BLOCK}, tunnel: dead, fallback: block}}
"""


@dataclass(slots=True)
class World:
    lab: Lab
    stub: LabServer
    wg_peer: Any
    wg_keys: tuple[str, str]


@dataclass(slots=True)
class Daemon:
    lab: Lab
    dataplane: str
    process: subprocess.Popen[bytes]
    config: Path
    control: Path
    out: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def request(self, what: str) -> dict[str, Any]:
        from awg_split_tunnel.api.control import request

        answer: dict[str, Any] = request(what, path=self.control, timeout=5.0)
        return answer

    def request_tunnel(self, tunnel_id: str, action: str) -> str:
        from awg_split_tunnel.api.control import request

        answer: dict[str, Any] = request(
            "tunnel", path=self.control, timeout=10.0, id=tunnel_id, action=action
        )
        return str(answer.get("state"))

    def state(self, tunnel_id: str) -> str:
        try:
            rows = {row["id"]: row for row in self.request("status")["tunnels"]}
            return str(rows[tunnel_id]["state"])
        except (OSError, KeyError, ValueError):
            return "(no answer)"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        start_dns(lab)
        start_dante(lab)
        start_tinyproxy(lab)
        for name in (*EXPECTED, RESOLVER_APP):
            make_app(lab, name)
        stub = start_dns_stub(lab, WEB_IP, RESOLVER_APP)
        start_dns_stub(lab, WEB_IP6, RESOLVER_APP, listen=STUB_ADDRESS6)
        keys = generate_keypair()
        wg_peer = start_wireguard_go(
            lab,
            peers=[
                WireGuardPeer(keys[1], [f"{TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{WG_CLIENT_PORT}")
            ],
            listen_port=WG_PORT,
            address=f"{TUNNEL_SERVER_IP}/24",
        )
        start_dns(lab, WG, TUNNEL_SERVER_IP, name="wg")  # wg's DNS server, at the tunnel's far end
        start_dns(lab, SOCKS, SOCKS_IP, name="socks")  # socks's, beside the proxy
        yield World(lab, stub, wg_peer, keys)


@pytest.fixture(scope="module", params=DATAPLANES)
def daemon(world: World, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    lab, dataplane = world.lab, request.param
    folder = lab.tmpdir / f"dns-{dataplane}"
    folder.mkdir()
    awg_keys = generate_keypair()
    server = start_our_amneziawg(lab, awg_keys[1], PARAMETER_SETS["2.0"])
    awg_conf = our_amneziawg_client_conf(
        server, awg_keys[0], listen_port=AWG_CLIENT_PORT, extra_interface=f"DNS = {WEB_IP}\n"
    )
    (folder / "awg.conf").write_text(awg_conf)
    wg_conf = packet_conf(
        world.wg_keys[0], TUNNEL_CLIENT_IP, WG_CLIENT_PORT, world.wg_peer.public_key, world.wg_peer.endpoint
    )
    (folder / "wg.conf").write_text(wg_conf)
    config = folder / "config.yaml"
    config.write_text(daemon_config(dataplane))
    for path in (config, folder / "awg.conf", folder / "wg.conf"):
        path.chmod(0o600)
    out, control = folder / "daemon.out", folder / "control.sock"
    env = {**os.environ, "PYTHONPATH": python_path()}
    with open(out, "wb") as sink:
        process: subprocess.Popen[bytes] = lab.spawn(
            CLIENT,
            [sys.executable, "-m", "awg_split_tunnel.daemon", "-c", config, "--control", control],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    running = Daemon(lab, dataplane, process, config, control, out)
    try:

        def started() -> bool:
            if process.poll() is not None:
                pytest.fail(f"daemon exited ({process.returncode}) at start:\n{running.output()[-4000:]}")
            return "running" in running.output()

        wait_for(started, START_TIMEOUT, "the daemon's status line", running.output)
        wait_for(
            lambda: all(running.state(t) == "up" for t in ("awg", "wg", "socks", "http")),
            UP_TIMEOUT,
            "every tunnel but `dead` UP",
            running.output,
        )
        wait_for(lambda: running.state("dead") == "down", UP_TIMEOUT, "`dead` DOWN", running.output)
        yield running
    finally:
        stop_daemon(process)
        server.stop()
        print(running.output()[-6000:])


def lookup(lab: Lab, app: str, how: str, name: str | None = None) -> dict[str, Any]:
    """App ``app`` looks ``name`` up ``how``: ``stub`` / ``stub-tcp`` (127.0.0.53), ``stub6`` (::1) or
    ``own`` / ``own-tcp``
    (the lab's server directly); ``auto`` mode (TCP after a truncated UDP answer) unless ``-tcp``. The
    default name is new each time (``<random>.whoami.lab.``), so no cache answers it."""
    name = name or f"{secrets.token_hex(4)}.{WHOAMI}"
    server = {"stub": STUB_ADDRESS, "stub6": STUB_ADDRESS6}.get(how.removesuffix("-tcp"), WEB_IP)
    mode = "tcp" if how.endswith("-tcp") else "auto"
    done = lab.run(CLIENT, [lab.apps[app], "-c", LOOKUP, server, name, mode], timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def seen(result: dict[str, Any]) -> str:
    """What a lookup's result says about its route: the address the server saw, SERVFAIL, no answer."""
    if "error" in result:
        return NO_ANSWER
    if result["rcode"] != "NOERROR":
        return str(result["rcode"])
    return str(result["text"])


def answered_by(lab: Lab, how: str) -> str:
    """Which of the lab's DNS servers (``web``, ``wg``) answered a direct app's lookup ``how``."""
    return seen(lookup(lab, APP_DIRECT, how, f"{secrets.token_hex(4)}.{SERVER}"))


def stub_forwards(world: World) -> int:
    return world.stub.stderr_text().count("forwarded ")


def test_each_app_resolves_through_its_own_route(world: World, daemon: Daemon) -> None:
    got = {app: {how: seen(lookup(world.lab, app, how)) for how in ways} for app, ways in EXPECTED.items()}
    assert got == EXPECTED, daemon.output()[-4000:]


def test_no_dns_packet_of_a_tunnelled_app_leaves_on_the_uplink(world: World, daemon: Daemon) -> None:
    forwarded = stub_forwards(world)
    # On the lab's side of the client's cable: what really left the client (a capture on its eth0 would
    # also list the answers the divert data path injects there for the apps).
    with world.lab.capture(INET, CLIENT, "port 53") as capture:
        results = {
            (app, how): seen(lookup(world.lab, app, how)) for app in TUNNELLED for how in EXPECTED[app]
        }
        results[APP_BLOCK, "stub"] = seen(lookup(world.lab, APP_BLOCK, "stub"))
        results[APP_BLOCK, "own"] = seen(lookup(world.lab, APP_BLOCK, "own"))
    assert results == {
        **{(app, how): EXPECTED[app][how] for app in TUNNELLED for how in EXPECTED[app]},
        (APP_BLOCK, "stub"): SERVFAIL,
        (APP_BLOCK, "own"): NO_ANSWER,
    }
    assert capture.count() == 0, capture.packets()
    assert stub_forwards(world) == forwarded  # the local resolver never saw those lookups


def test_a_truncated_answer_is_asked_again_over_tcp_through_the_tunnel(world: World, daemon: Daemon) -> None:
    for app in (APP_AWG, APP_WG, APP_SOCKS):
        result = lookup(world.lab, app, "stub", BIG)
        assert EXPECTED[app]["stub"] in result["texts"], result
        assert len(result["texts"]) > 10, result


def test_status_and_connections_show_dns(world: World, daemon: Daemon) -> None:
    lookup(world.lab, APP_WG, "stub")
    rows = {row["id"]: row for row in daemon.request("status")["tunnels"]}
    assert rows["wg"]["dns"]["servers"] == [TUNNEL_SERVER_IP], rows["wg"]
    assert rows["wg"]["dns"]["answered"] + rows["wg"]["dns"]["cached"] > 0, rows["wg"]
    assert rows["dead"]["dns"]["refused"] > 0, rows["dead"]
    summary = daemon.request("status")["dns"]
    assert {r["address"] for r in summary["resolvers"]} == {STUB_ADDRESS, STUB_ADDRESS6}, summary
    flows = daemon.request("connections")["flows"]
    lookups = [f for f in flows if f["proto"].startswith("dns") and f["exe"] and f["exe"].endswith(APP_WG)]
    assert lookups and lookups[-1]["tunnel"] == "wg" and lookups[-1]["name"].endswith(WHOAMI), flows


def test_dns_system_sends_the_local_resolvers_own_lookups_through_the_chosen_tunnel(
    world: World, daemon: Daemon
) -> None:
    lab, original = world.lab, daemon.config.read_text()
    assert seen(lookup(lab, APP_DIRECT, "stub")) == CLIENT_IP  # the stub asks from the client's address
    assert answered_by(lab, "stub") == "web"  # the server the stub is configured with
    try:
        daemon.config.write_text(original + "dns:\n  system: wg\n")
        wait_for(
            lambda: seen(lookup(lab, APP_DIRECT, "stub")) == TUNNEL_CLIENT_IP,
            UP_TIMEOUT,
            "the stub's upstream lookups through wg",
            daemon.output,
        )
        # ...and to wg's own DNS server (reachable only through wg), UDP and TCP: not the stub's.
        assert answered_by(lab, "stub") == "wg"
        assert answered_by(lab, "stub-tcp") == "wg"
        assert seen(lookup(lab, APP_SOCKS, "stub")) == SOCKS_IP  # an app with a route keeps it
        assert seen(lookup(lab, APP_DIRECT, "own")) == CLIENT_IP  # only the resolver's lookups move
    finally:
        daemon.config.write_text(original)
        wait_for(
            lambda: seen(lookup(lab, APP_DIRECT, "stub")) == CLIENT_IP,
            UP_TIMEOUT,
            "the stub's lookups direct again",
            daemon.output,
        )


def test_dns_system_into_a_socks5_tunnel_sends_the_resolvers_lookups_to_its_dns_server(
    world: World, daemon: Daemon
) -> None:
    lab, original = world.lab, daemon.config.read_text()
    try:
        daemon.config.write_text(original + "dns:\n  system: socks\n")
        wait_for(
            lambda: answered_by(lab, "stub") == "socks",
            UP_TIMEOUT,
            "the stub's upstream lookups to socks's DNS server",
            daemon.output,
        )
        assert answered_by(lab, "stub-tcp") == "socks"
        assert seen(lookup(lab, APP_DIRECT, "stub")) == SOCKS_IP  # by way of the proxy
    finally:
        daemon.config.write_text(original)
        wait_for(
            lambda: answered_by(lab, "stub") == "web",
            UP_TIMEOUT,
            "the stub's lookups to its own server again",
            daemon.output,
        )


def test_a_packet_tunnel_taken_down_answers_its_block_apps_servfail_and_sends_nothing(
    world: World, daemon: Daemon
) -> None:
    lab = world.lab
    forwarded = stub_forwards(world)
    try:
        assert daemon.request_tunnel("wg", "down") == "down"
        with lab.capture(INET, CLIENT, "port 53") as capture:
            results = {how: seen(lookup(lab, APP_WG, how)) for how in ("stub", "stub-tcp", "stub6", "own")}
        expected = {"stub": SERVFAIL, "stub-tcp": SERVFAIL, "stub6": SERVFAIL, "own": NO_ANSWER}
        if results != expected:  # which way the router sent the app's lookups, and what it logged
            flows = [f for f in daemon.request("connections")["flows"] if f["dst"].endswith(":53")]
            raise AssertionError(f"{results} != {expected}\n{flows}\n{daemon.output()[-6000:]}")
        assert capture.count() == 0, capture.packets()
        assert stub_forwards(world) == forwarded
    finally:
        daemon.request_tunnel("wg", "up")
        wait_for(lambda: daemon.state("wg") == "up", UP_TIMEOUT, "wg UP again", daemon.output)
    assert seen(lookup(lab, APP_WG, "stub")) == TUNNEL_CLIENT_IP


def test_a_direct_apps_lookup_is_still_answered_by_the_local_resolver(world: World, daemon: Daemon) -> None:
    before = stub_forwards(world)
    assert seen(lookup(world.lab, APP_DIRECT, "stub")) == CLIENT_IP
    assert stub_forwards(world) == before + 1  # the stub forwarded it, as without the daemon
