"""End to end: apps split between a WireGuard/AmneziaWG tunnel and the direct path, by exe name.

Our router and our userspace device run in ns client as one small daemon (this file run with
``--serve``): one asyncio loop drives the divert handles (``AsyncRouterLoop``) and the device. The peer
is the real wireguard-go (or the reference amneziawg-go) in ns wg, forwarding tunnel traffic to the web
server without NAT, so the web server sees our tunnel address: 198.19.0.2 (198.19.1.2 for AmneziaWG)
means through the tunnel, 198.18.0.1 means direct.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and eBPF"),
    pytest.mark.skipif(
        shutil.which("wireguard-go") is None or shutil.which("wg") is None,
        reason="needs wireguard-go and wg (Debian packages wireguard-go, wireguard-tools)",
    ),
]

CLIENT_PORT = 51910
AWG_PARAMS = {"Jc": "3", "Jmin": "50", "Jmax": "60", "S1": "37", "S2": "61", "S3": "11", "S4": "7"}
AWG_PARAMS |= {
    "H1": "100-199",
    "H2": "200-299",
    "H3": "300-399",
    "H4": "400-499",
    "I1": "<b 0xc0ffee><r 5><t>",
}
AWG_SET_NAMES = {"Jc": "jc", "Jmin": "jmin", "Jmax": "jmax", "S1": "s1", "S2": "s2", "S3": "s3", "S4": "s4"}
AWG_SET_NAMES |= {"H1": "h1", "H2": "h2", "H3": "h3", "H4": "h4", "I1": "i1"}


def serve(config: dict[str, Any]) -> None:
    """The daemon under test, in ns client: router + divert handles + our device on one asyncio loop.

    While the tunnel is DOWN the device retries its handshake every second (what the daemon's health
    loop does), so a peer that comes back brings the tunnel UP again.
    """
    import asyncio
    import dataclasses
    import functools
    import logging
    import threading
    from collections.abc import Callable

    from awg_split_tunnel.core.packet_router import PacketRouter
    from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
    from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
    from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
    from awg_split_tunnel.packet_tunnels import DIVERT_SAFE_UDP_GSO
    from awg_split_tunnel.platform.divert import router_handles
    from awg_split_tunnel.provider.wireguard.conf import parse_conf
    from awg_split_tunnel.provider.wireguard.device import WireGuardDevice, settings_from_conf
    from awg_split_tunnel.router.divert_loop import AsyncRouterLoop
    from awg_split_tunnel.router.process import RouterProcess, RouterSettings
    from awg_split_tunnel.router.service import device_report

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    conf = parse_conf(config["conf"])
    settings = settings_from_conf(conf)
    rules = (
        Rule("app-wg", "wg"),
        Rule("app-wgblock", "wg", FallbackPolicy.BLOCK),
        Rule("app-direct", "direct"),
    )
    states = {"wg": TunnelState.CONNECTING}
    route = PacketTunnelRoute.from_addresses(
        [str(a) for a in conf.interface.addresses], settings.mtu, listen_port=settings.listen_port
    )
    router = PacketRouter(RuleEngine(rules, "direct"), states.get, {"wg": route}, own_pids={os.getpid()})

    async def in_process() -> None:
        """The loop and the device on this process's event loop."""
        network, events, accept_pid = router_handles([settings.listen_port])
        loop = AsyncRouterLoop(router, network, events, accept_pid=accept_pid)
        # As the daemon builds its devices: no UDP GSO next to the divert handles (packet_tunnels.py).
        device = WireGuardDevice(settings, tunnel_id="wg", udp_gso=DIVERT_SAFE_UDP_GSO)
        up = asyncio.Event()

        def on_state(state: TunnelState, reason: str) -> None:
            states["wg"] = state
            loop.tunnel_state_changed("wg", state)
            if state is TunnelState.UP:
                up.set()

        device.state_listeners.append(on_state)
        loop.attach_device("wg", device)
        await device.start()
        await loop.start()
        device.connect()
        await asyncio.wait_for(up.wait(), 10)

        async def retry() -> None:
            while True:
                await asyncio.sleep(1.0)
                if states["wg"] is TunnelState.DOWN:
                    device.connect()

        def report() -> dict[str, Any]:
            tunnels = router.packet_tunnel_stats()
            tunnels["wg"].update(device_report(device))
            return {
                "state": str(states["wg"]),
                "router": dataclasses.asdict(router.stats),
                "tunnels": tunnels,
                "error": repr(loop.error),
            }

        retrier = asyncio.create_task(retry())
        await commands(report)
        retrier.cancel()
        await loop.stop()
        await device.stop()
        print(json.dumps({"error": repr(loop.error), "stats": str(router.stats)}), flush=True)

    async def in_router_process() -> None:
        """RouterProcess: loop and device in the router's own process, as the daemon runs them."""
        up = threading.Event()

        def on_state(tunnel_id: str, state: TunnelState, reason: str) -> None:
            states[tunnel_id] = state
            if state is TunnelState.UP:
                up.set()

        process = RouterProcess(
            RouterSettings(
                rules,
                "direct",
                {"wg": route},
                dict(states),
                devices={
                    "wg": functools.partial(
                        WireGuardDevice, settings, tunnel_id="wg", udp_gso=DIVERT_SAFE_UDP_GSO
                    )
                },
            ),
            cast(Any, router_handles),  # SocketEvent is frozen; the loop's protocol only reads it
        )
        process.on_tunnel_state = on_state
        process.start()
        assert await asyncio.to_thread(up.wait, 10), "the tunnel did not come up"

        def report() -> dict[str, Any]:
            status = process.status()
            assert status is not None
            stats = dict(status.stats)
            return {"state": str(states["wg"]), "router": stats, "tunnels": stats.pop("packet_tunnels")}

        await commands(report)
        process.stop()
        print(json.dumps({"error": "None", "alive": process.alive}), flush=True)

    async def commands(report: Callable[[], dict[str, Any]]) -> None:
        print("ready", flush=True)
        while line := await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline):
            if line.strip() == "stats":
                print(json.dumps(report()), flush=True)

    asyncio.run(in_router_process() if config["mode"] == "process" else in_process())


@dataclass(slots=True)
class Daemon:
    lab: Any
    process: subprocess.Popen[str]
    peer: Any
    tunnel_ip: str
    tunnel_ip6: str

    def stats(self) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        report: dict[str, Any] = json.loads(self.process.stdout.readline())
        return report


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    from awg_split_tunnel.lab import Lab, make_app, start_web

    with Lab() as lab:
        start_web(lab)
        for name in ("app-wg", "app-wgblock", "app-direct"):
            make_app(lab, name)
        yield lab


def _conf(private_key: str, server: Any, tunnel_ip: str, tunnel_ip6: str, awg: bool) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in AWG_PARAMS.items()) if awg else ""
    return (
        f"[Interface]\nPrivateKey = {private_key}\nAddress = {tunnel_ip}/24, {tunnel_ip6}/64\n"
        f"ListenPort = {CLIENT_PORT}\nMTU = 1420\n"
        # Short timers so that a dead peer is noticed (DOWN) within seconds, not REKEY_ATTEMPT_TIME. The
        # attempts (2 retries, 1 s apart) must end before unanswered data asks for a new handshake
        # (KeepaliveTimeout + RekeyTimeout), which starts the count again, as in wireguard-go.
        "KeepaliveTimeout = 5\nRekeyTimeout = 1\nMaxHandshakeAttempts = 2\n"
        f"{extra}\n"
        f"[Peer]\nPublicKey = {server.public_key}\nEndpoint = {server.endpoint}\n"
        "AllowedIPs = 0.0.0.0/0, ::/0\n"
    )


@pytest.fixture(
    scope="module",
    params=[("wireguard", "loop"), ("wireguard", "process"), ("amneziawg", "process")],
    ids=str,
)
def daemon(lab: Any, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """Our daemon against a real peer: ``loop`` runs router and device on the test daemon's own event
    loop, ``process`` in a ``RouterProcess`` (docs/DESIGN.md)."""
    from awg_split_tunnel.lab import (
        AWG_PORT,
        AWG_TUNNEL_CLIENT_IP,
        AWG_TUNNEL_CLIENT_IP6,
        AWG_TUNNEL_SERVER_IP,
        AWG_TUNNEL_SERVER_IP6,
        CLIENT,
        CLIENT_IP,
        TUNNEL_CLIENT_IP,
        TUNNEL_CLIENT_IP6,
        TUNNEL_SERVER_IP,
        TUNNEL_SERVER_IP6,
        LabUnavailable,
        WireGuardPeer,
        generate_keypair,
        start_amneziawg_go,
        start_wireguard_go,
    )

    flavour, mode = request.param
    awg = flavour == "amneziawg"
    private, public = generate_keypair()
    if awg:
        tunnel_ip, tunnel_ip6 = AWG_TUNNEL_CLIENT_IP, AWG_TUNNEL_CLIENT_IP6
        peer_spec = WireGuardPeer(
            public, [f"{tunnel_ip}/32", f"{tunnel_ip6}/128"], endpoint=f"{CLIENT_IP}:{CLIENT_PORT}"
        )
        try:
            server = start_amneziawg_go(
                lab,
                peers=[peer_spec],
                listen_port=AWG_PORT,
                address=[f"{AWG_TUNNEL_SERVER_IP}/24", f"{AWG_TUNNEL_SERVER_IP6}/64"],
                awg_params={AWG_SET_NAMES[k]: v for k, v in AWG_PARAMS.items()},
            )
        except LabUnavailable as exc:
            pytest.skip(str(exc))
    else:
        tunnel_ip, tunnel_ip6 = TUNNEL_CLIENT_IP, TUNNEL_CLIENT_IP6
        peer_spec = WireGuardPeer(
            public, [f"{tunnel_ip}/32", f"{tunnel_ip6}/128"], endpoint=f"{CLIENT_IP}:{CLIENT_PORT}"
        )
        server = start_wireguard_go(
            lab, peers=[peer_spec], address=[f"{TUNNEL_SERVER_IP}/24", f"{TUNNEL_SERVER_IP6}/64"]
        )
    config = {"conf": _conf(private, server, tunnel_ip, tunnel_ip6, awg), "mode": mode}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    process = lab.spawn(
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
        server.stop()
        pytest.fail(f"daemon did not start: {line!r} {process.stderr.read() if process.stderr else ''}")
    try:
        yield Daemon(lab, process, server, tunnel_ip, tunnel_ip6)
    finally:
        try:
            out, err = process.communicate(timeout=10)  # closes stdin: the daemon's signal to stop
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        server.stop()
        print(out, err[-3000:])
    assert '"error": "None"' in out, out + err[-3000:]


def test_tunnelled_and_direct_apps_at_the_same_time(daemon: Daemon) -> None:
    lab = daemon.lab
    names = ["app-wg", "app-direct"] * 3
    procs = [lab.spawn_app(name) for name in names]
    outputs = [p.communicate(timeout=15)[0] for p in procs]
    for name, out in zip(names, outputs, strict=True):
        expected = daemon.tunnel_ip if name == "app-wg" else "198.18.0.1"
        assert out.splitlines()[:1] == [expected], (name, out, json.dumps(daemon.stats()))


def test_tunnelled_app_over_ipv6_is_seen_from_the_tunnel_address(daemon: Daemon) -> None:
    result = daemon.lab.app("app-wg", v6=True)
    assert result.ok, result.stderr
    assert result.seen_ip == daemon.tunnel_ip6


def test_udp_echo_through_the_tunnel(daemon: Daemon) -> None:
    tunnelled = daemon.lab.app("app-wg", udp=True)
    assert tunnelled.ok, tunnelled.stderr
    assert tunnelled.seen_ip == daemon.tunnel_ip
    direct = daemon.lab.app("app-direct", udp=True)
    assert direct.seen_ip == "198.18.0.1"


def test_tunnelled_app_sends_nothing_to_the_web_server_directly(daemon: Daemon) -> None:
    from awg_split_tunnel.lab import CLIENT

    web_filter = "(ip dst 198.18.0.10) or (ip6 dst 2001:2::10)"
    with daemon.lab.capture(CLIENT, bpf_filter=web_filter) as capture:
        assert daemon.lab.app("app-wg").seen_ip == daemon.tunnel_ip
        assert daemon.lab.app("app-wg", udp=True).seen_ip == daemon.tunnel_ip
    assert capture.count() == 0, "\n".join(capture.packets())


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


def test_download_through_the_tunnel_arrives_intact(daemon: Daemon) -> None:
    from awg_split_tunnel.lab import CLIENT, WEB_IP, make_app
    from awg_split_tunnel.lab.echo_server import pattern_sha256

    size = 16 << 20
    done = daemon.lab.run(
        CLIENT, [make_app(daemon.lab, "app-wg"), "-c", DOWNLOAD, WEB_IP, str(size)], timeout=60
    )
    assert done.returncode == 0, done.stderr
    length, digest, mbit = done.stdout.split()
    assert (int(length), digest) == (size, pattern_sha256(size))
    stats = daemon.stats()
    print(f"16 MiB through the tunnel: {mbit} Mbit/s; {stats['tunnels']}")
    assert stats["tunnels"]["wg"]["packets_in"] > 10_000 // 1.5


def peer_report(daemon: Daemon) -> str:
    """The peer's side, for a failure message: `wg show`, then whether it runs, its log, the kernel's."""
    from awg_split_tunnel.lab import LabError

    try:
        show = daemon.peer.show()
    except LabError as exc:
        show = f"show failed: {exc}"
    return f"{show}\n{daemon.peer.server.describe()}"


def test_peer_dies_block_app_fails_allow_direct_app_goes_direct_then_back(daemon: Daemon) -> None:
    from awg_split_tunnel.lab import CLIENT

    lab = daemon.lab
    daemon.peer.stop()
    # The device notices within a few seconds (short timers) once traffic goes unanswered.
    deadline = time.monotonic() + 30
    while (seen := lab.app("app-wg", timeout=2.0).seen_ip) != "198.18.0.1":
        assert time.monotonic() < deadline, f"allow_direct app never went direct (last: {seen!r})"
    assert daemon.stats()["state"] == "down"
    web_filter = "ip dst 198.18.0.10 or ip6 dst 2001:2::10"
    with lab.capture(CLIENT, bpf_filter=web_filter) as capture:
        blocked = lab.app("app-wgblock", timeout=2.0)
        blocked_udp = lab.app("app-wgblock", udp=True, timeout=1.0)
    assert not blocked.ok and not blocked_udp.ok
    assert capture.count() == 0, "\n".join(capture.packets())
    daemon.peer.start()
    deadline = time.monotonic() + 30
    while (stats := daemon.stats())["state"] != "up":
        if time.monotonic() > deadline:
            ours = json.dumps(stats["tunnels"])
            pytest.fail(f"the tunnel did not come back up\nours: {ours}\n{peer_report(daemon)}")
        time.sleep(0.3)
    assert lab.app("app-wg").seen_ip == daemon.tunnel_ip
    assert lab.app("app-wgblock").seen_ip == daemon.tunnel_ip


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    serve(json.loads(sys.argv[2]))
