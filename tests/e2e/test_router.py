"""End to end: the real PacketRouter on pydivert in the lab routes each app by its exe name.

The router, its divert handles and TunnelProxies for two SOCKS5 tunnels (microsocks for TCP, dante for
UDP, both in ns socks) run in ns client as one small daemon process: this file run with ``--serve``. Test
apps are copies of one interpreter under different names; the web server tells each which address it
saw: 198.18.0.20 / 2001:2::20 means via SOCKS5, 198.18.0.1 / 2001:2::1 means direct. A ``drop`` app is
refused, a ``block`` app is refused while its tunnel is down and reset when the tunnel goes down.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and eBPF"),
]

PROXY_PORT = 15001
"""The SOCKS5 tunnel's local proxy port (TCP and UDP, IPv4 and IPv6)."""
DANTE_PORT = 1081


def serve(config: dict[str, object]) -> None:
    """The daemon under test: router + divert loop + the SOCKS5 tunnels' proxies. Runs in ns client.

    ``config["mode"]`` is ``thread`` (RouterLoop on a thread of this process) or ``process``
    (RouterProcess: the loop in its own process, as docs/DESIGN.md decides).
    """
    import asyncio
    import logging

    from awg_split_tunnel.core.packet_router import PacketRouter, TunnelRoute
    from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
    from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
    from awg_split_tunnel.platform.divert import router_handles
    from awg_split_tunnel.provider.socks5.provider import Socks5Provider
    from awg_split_tunnel.proxy.tunnel_proxy import TunnelProxy
    from awg_split_tunnel.router.divert_loop import RouterLoop
    from awg_split_tunnel.router.process import RouterProcess, RouterSettings

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    rules = (
        Rule("app-socks", "socks"),
        Rule("app-udpsocks", "socksudp"),
        Rule("app-udpsocks6", "socksudp6"),
        Rule("app-drop", "socks", FallbackPolicy.DROP),
        Rule("app-down", "downtunnel", FallbackPolicy.BLOCK),
        Rule("app-block", "socks", FallbackPolicy.BLOCK),
    )
    states = {
        "socks": TunnelState.UP,
        "socksudp": TunnelState.UP,
        "socksudp6": TunnelState.UP,
        "downtunnel": TunnelState.DOWN,
    }
    tunnels = {
        "socks": TunnelRoute(PROXY_PORT, None),
        "socksudp": TunnelRoute(PROXY_PORT + 1, PROXY_PORT + 1),
        "downtunnel": TunnelRoute(PROXY_PORT + 2, None),
        "socksudp6": TunnelRoute(PROXY_PORT + 3, PROXY_PORT + 3),
    }

    async def main() -> None:
        router: PacketRouter | RouterProcess
        if config["mode"] == "process":
            router = RouterProcess(RouterSettings(rules, "direct", tunnels, states), router_handles)
        else:
            router = PacketRouter(RuleEngine(rules, "direct"), states.get, tunnels, own_pids={os.getpid()})
        socks_ip = str(config["socks_ip"])

        def proxy(tunnel_id: str, port: int, host: str, socks_port: object, udp: bool) -> TunnelProxy:
            provider = Socks5Provider(socks_ip, int(str(socks_port)))
            return TunnelProxy(
                tunnel_id, provider, router.nat_lookup, host, tcp_port=port, udp_port=port, udp=udp
            )

        proxies = [
            proxy("socks", PROXY_PORT, "0.0.0.0", config["socks_port"], False),
            proxy("socks", PROXY_PORT, "::", config["socks_port"], False),
            proxy("socksudp", PROXY_PORT + 1, "0.0.0.0", config["dante_port"], True),
            # TunnelProxy's UDP socket on [::] is dual-stack and would take the IPv4 port too, so IPv6 UDP
            # gets a tunnel (and port) of its own here.
            proxy("socksudp6", PROXY_PORT + 3, "::", config["dante_port"], True),
        ]
        for p in proxies:
            await p.start()
        if isinstance(router, RouterProcess):
            router.start()
            loop = None
        else:
            network, events, accept_pid = router_handles()
            loop = RouterLoop(router, network, events, accept_pid=accept_pid)
            loop.start()
        print("ready", flush=True)
        # Commands from the test, one per line ("down ID" / "up ID"), until it closes our stdin.
        while line := await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline):
            command, tunnel_id = line.split()
            states[tunnel_id] = TunnelState.UP if command == "up" else TunnelState.DOWN
            router.tunnel_state_changed(tunnel_id, states[tunnel_id])
            print("ok", flush=True)
        if isinstance(router, RouterProcess):
            status, rows = router.status(), router.connections() or []
            router.stop()
            stats = None if status is None else status.stats
            flows = [(f.proto, f.app_port, f.dst_ip, f.verdict) for f in rows]
            error = None
        else:
            assert loop is not None
            loop.stop()
            stats, error = router.stats, loop.error
            flows = [(e.proto, e.app_port, e.orig_dst_ip, e.verdict.name) for e in router.connections()]
        print(
            json.dumps({"stats": str(stats), "error": repr(error), "flows": [str(f) for f in flows]}),
            flush=True,
        )
        for p in proxies:
            await p.stop()

    asyncio.run(main())


@pytest.fixture(scope="module")
def lab() -> Iterator[object]:
    from awg_split_tunnel.lab import Lab, make_app, start_dante, start_microsocks, start_web

    with Lab() as lab:
        start_web(lab)
        start_microsocks(lab)
        start_dante(lab, port=DANTE_PORT)
        for name in (
            "app-socks",
            "app-udpsocks",
            "app-direct",
            "app-drop",
            "app-down",
            "app-block",
            "app-udpsocks6",
        ):
            make_app(lab, name)
        yield lab


@pytest.fixture(scope="module", params=["thread", "process"])
def daemon(lab: object, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    from awg_split_tunnel.lab import CLIENT, SOCKS_IP, SOCKS_PORT

    config = {"socks_ip": SOCKS_IP, "socks_port": SOCKS_PORT, "dante_port": DANTE_PORT, "mode": request.param}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    process = lab.spawn(  # type: ignore[attr-defined]
        CLIENT,
        [sys.executable, __file__, "--serve", json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None and process.stdin is not None
    ready, _, _ = select.select([process.stdout], [], [], 20)
    line = process.stdout.readline() if ready else ""
    if line.strip() != "ready":
        process.kill()
        pytest.fail(
            f"router daemon did not start: {line!r} {process.stderr.read() if process.stderr else ''}"
        )
    yield process
    try:
        out, err = process.communicate(timeout=10)  # closes stdin: the daemon's signal to stop
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    print(out, err[-3000:])
    assert "'error': 'None'" in out.replace('"', "'") or '"error": "None"' in out, out


def test_app_routed_to_socks5_is_seen_from_the_socks_server(lab: object, daemon: object) -> None:
    result = lab.app("app-socks")  # type: ignore[attr-defined]
    assert result.ok, result.stderr
    assert result.seen_ip == "198.18.0.20"


def test_app_routed_direct_is_seen_from_the_client(lab: object, daemon: object) -> None:
    result = lab.app("app-direct")  # type: ignore[attr-defined]
    assert result.ok, result.stderr
    assert result.seen_ip == "198.18.0.1"


def test_drop_app_cannot_connect_and_fails_fast(lab: object, daemon: object) -> None:
    started = time.monotonic()
    result = lab.app("app-drop", timeout=5.0)  # type: ignore[attr-defined]
    assert not result.ok and result.seen_ip == ""
    assert time.monotonic() - started < 4.0, (
        "a dropped TCP connect is refused with an RST, not left to time out"
    )


def test_block_app_cannot_connect_while_its_tunnel_is_down(lab: object, daemon: object) -> None:
    result = lab.app("app-down", timeout=3.0)  # type: ignore[attr-defined]
    assert not result.ok and result.seen_ip == ""


def test_ipv6_app_routed_to_socks5_is_seen_from_the_socks_server(lab: object, daemon: object) -> None:
    result = lab.app("app-socks", v6=True)  # type: ignore[attr-defined]
    assert result.ok, result.stderr
    assert result.seen_ip == "2001:2::20"


def test_ipv6_app_routed_direct_is_seen_from_the_client(lab: object, daemon: object) -> None:
    result = lab.app("app-direct", v6=True)  # type: ignore[attr-defined]
    assert result.ok, result.stderr
    assert result.seen_ip == "2001:2::1"


def test_udp_direct_and_through_socks5(lab: object, daemon: object) -> None:
    direct = lab.app("app-direct", udp=True)  # type: ignore[attr-defined]
    assert direct.ok, direct.stderr
    assert direct.seen_ip == "198.18.0.1"
    tunnelled = lab.app("app-udpsocks", udp=True)  # type: ignore[attr-defined]
    assert tunnelled.ok, tunnelled.stderr
    assert tunnelled.seen_ip == "198.18.0.20"


def test_udp_over_ipv6_direct_and_through_socks5(lab: object, daemon: object) -> None:
    direct = lab.app("app-direct", udp=True, v6=True)  # type: ignore[attr-defined]
    assert direct.ok, direct.stderr
    assert direct.seen_ip == "2001:2::1"
    tunnelled = lab.app("app-udpsocks6", udp=True, v6=True)  # type: ignore[attr-defined]
    assert tunnelled.ok, tunnelled.stderr
    assert tunnelled.seen_ip == "2001:2::20"


def test_tunnelled_app_sends_nothing_to_the_web_server_directly(lab: object, daemon: object) -> None:
    from awg_split_tunnel.lab import CLIENT

    # Only what leaves for the web server: injected (hairpinned) packets show up on the uplink's tap too,
    # as inbound packets from the web server's address.
    web_filter = "(ip src 198.18.0.1 and ip dst 198.18.0.10) or (ip6 src 2001:2::1 and ip6 dst 2001:2::10)"
    with lab.capture(CLIENT, bpf_filter=web_filter) as tunnelled:  # type: ignore[attr-defined]
        assert lab.app("app-socks").seen_ip == "198.18.0.20"  # type: ignore[attr-defined]
        assert lab.app("app-udpsocks", udp=True).seen_ip == "198.18.0.20"  # type: ignore[attr-defined]
        assert lab.app("app-socks", v6=True).seen_ip == "2001:2::20"  # type: ignore[attr-defined]
    assert tunnelled.count() == 0, "\n".join(tunnelled.packets())
    with lab.capture(CLIENT, bpf_filter=web_filter) as direct:  # type: ignore[attr-defined]
        assert lab.app("app-direct").seen_ip == "198.18.0.1"  # type: ignore[attr-defined]
    assert direct.count() > 0, "the capture sees direct traffic, so its silence above means something"


WAITING_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: web\\r\\n")  # incomplete: the server keeps waiting
print("connected", flush=True)
try:
    print("data" if s.recv(100) else "closed", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except TimeoutError:
    print("timeout", flush=True)
"""


def _command(daemon: subprocess.Popen[str], line: str) -> None:
    assert daemon.stdin is not None and daemon.stdout is not None
    daemon.stdin.write(line + "\n")
    daemon.stdin.flush()
    assert daemon.stdout.readline().strip() == "ok"


def test_tunnel_down_resets_open_connections_of_block_apps(
    lab: object, daemon: subprocess.Popen[str]
) -> None:
    from awg_split_tunnel.lab import CLIENT, WEB_IP, make_app

    app = lab.spawn(  # type: ignore[attr-defined]
        CLIENT,
        [make_app(lab, "app-block"), "-c", WAITING_CLIENT, WEB_IP],
        stdout=subprocess.PIPE,
        text=True,  # type: ignore[arg-type]
    )
    try:
        assert app.stdout.readline().strip() == "connected"
        started = time.monotonic()
        _command(daemon, "down socks")
        assert app.stdout.readline().strip() == "reset"
        assert time.monotonic() - started < 2.0
        assert lab.app("app-block", timeout=2.0).seen_ip == ""  # type: ignore[attr-defined]
    finally:
        app.kill()
        _command(daemon, "up socks")
    assert lab.app("app-block").seen_ip == "198.18.0.20"  # type: ignore[attr-defined]


BIG_DATAGRAM = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_PMTUDISC_DONT: let the kernel fragment it
s.sendto(b"x" * 4000, (sys.argv[1], 7))
"""


def test_fragments_of_a_tunnelled_datagram_never_leave_directly(lab: object, daemon: object) -> None:
    from awg_split_tunnel.lab import CLIENT, WEB_IP, make_app

    fragments = "ip src 198.18.0.1 and ip dst 198.18.0.10 and (ip[6:2] & 0x3fff != 0)"
    counts = {}
    for name in ("app-udpsocks", "app-down", "app-direct"):
        with lab.capture(CLIENT, bpf_filter=fragments) as capture:  # type: ignore[attr-defined]
            done = lab.run(CLIENT, [make_app(lab, name), "-c", BIG_DATAGRAM, WEB_IP])  # type: ignore[attr-defined,arg-type]
            assert done.returncode == 0, done.stderr
            time.sleep(0.3)
        counts[name] = capture.count()
    # app-down's tunnel is down and it fails closed: none of its fragments may leave either.
    assert counts == {"app-udpsocks": 0, "app-down": 0, "app-direct": 3}


DOWNLOAD = """
import hashlib, socket, sys, time
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 80), timeout=20)
started = time.monotonic()
s.sendall(f"GET /bytes/{n} HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n".encode())
data = bytearray()
while chunk := s.recv(1 << 20):
    data += chunk
body = bytes(data[data.index(b"\\r\\n\\r\\n") + 4 :])
mbit = len(body) * 8 / (time.monotonic() - started) / 1e6
print(len(body), hashlib.sha256(body).hexdigest(), f"{mbit:.0f}")
"""


def test_bulk_download_through_the_tunnel_arrives_intact(lab: object, daemon: object) -> None:
    from awg_split_tunnel.lab import CLIENT, WEB_IP, make_app
    from awg_split_tunnel.lab.echo_server import pattern_sha256

    size = 32 << 20
    speeds = {}
    for name in ("app-socks", "app-direct"):
        done = lab.run(CLIENT, [make_app(lab, name), "-c", DOWNLOAD, WEB_IP, str(size)])  # type: ignore[attr-defined,arg-type]
        assert done.returncode == 0, done.stderr
        length, digest, mbit = done.stdout.split()
        assert (int(length), digest) == (size, pattern_sha256(size))
        speeds[name] = int(mbit)
    print(f"32 MiB download, Mbit/s: {speeds}")


def test_interfaces_added_while_running_are_diverted_too(lab: object, daemon: object) -> None:
    import subprocess as sp

    from awg_split_tunnel.lab import CLIENT, WEB

    client, web = lab.ns_name(CLIENT), lab.ns_name(WEB)  # type: ignore[attr-defined]
    index = len(
        sp.run(["ip", "-n", client, "-o", "link"], capture_output=True, text=True).stdout.splitlines()
    )
    subnet = f"198.18.{100 + index}"
    ours, theirs = f"late{index}a", f"late{index}b"
    sp.run(
        ["ip", "-n", client, "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", web],
        check=True,
    )
    sp.run(["ip", "-n", client, "addr", "add", f"{subnet}.1/24", "dev", ours], check=True)
    sp.run(["ip", "-n", web, "addr", "add", f"{subnet}.10/24", "dev", theirs], check=True)
    sp.run(["ip", "-n", client, "link", "set", ours, "up"], check=True)
    sp.run(["ip", "-n", web, "link", "set", theirs, "up"], check=True)
    assert lab.app("app-direct", host=f"{subnet}.10").seen_ip == f"{subnet}.1"  # type: ignore[attr-defined]
    time.sleep(2.5)  # the loop looks for new interfaces every 2 s
    # Without the reopened handle the SYN would leave undiverted and the drop app would connect.
    assert not lab.app("app-drop", host=f"{subnet}.10", timeout=2.0).ok  # type: ignore[attr-defined]


def test_many_apps_at_once_each_get_their_own_route(lab: object, daemon: object) -> None:
    from awg_split_tunnel.lab import spawn_app
    from awg_split_tunnel.lab.apps import app_client_args

    names = ["app-socks", "app-direct"] * 5
    procs = [spawn_app(lab, name, app_client_args(timeout=5.0)) for name in names]  # type: ignore[arg-type]
    outputs = [p.communicate(timeout=15)[0] for p in procs]
    for name, out in zip(names, outputs, strict=True):
        expected = "198.18.0.20" if name == "app-socks" else "198.18.0.1"
        assert expected in out, (name, out)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    serve(json.loads(sys.argv[2]))
