"""Our WireGuard device on a TUN (the `tun` command) against a real wireguard-go peer in the lab.

Our client runs in ns client as `python -m awg_split_tunnel.provider.wireguard.tun_client`; wireguard-go
runs in ns wg (198.18.0.40) and forwards tunnel traffic to the web server without NAT, so the web server
sees our tunnel address 198.19.0.2 — what a user checks to see that a VPN works.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO

from awg_split_tunnel.lab import Lab
from awg_split_tunnel.lab.echo_server import pattern_sha256
from awg_split_tunnel.lab.servers import WireGuardPeer, WireGuardServer, generate_keypair, start_wireguard_go
from awg_split_tunnel.lab.topology import (
    CLIENT,
    CLIENT_IP,
    TUNNEL_CLIENT_IP,
    TUNNEL_CLIENT_IP6,
    TUNNEL_SERVER_IP,
    TUNNEL_SERVER_IP6,
    UDP_ECHO_PORT,
    WEB_IP,
    WEB_IP6,
    WG,
)

pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]

CLIENT_PORT = 51900


@dataclass(slots=True)
class OurClient:
    """Our `tun` command in a lab namespace (ns client unless `host` says otherwise)."""

    lab: Lab
    ifname: str
    conf: Path
    log: Path
    host: str = CLIENT
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> OurClient:
        argv = [sys.executable, "-m", "awg_split_tunnel.provider.wireguard.tun_client"]
        argv += [str(self.conf), "--ifname", self.ifname]
        with open(self.log, "ab") as out:
            self.process = self.lab.spawn(self.host, argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while " up: " not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"our tun client did not come up:\n{self.output()}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGINT) -> int:
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None
        return process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def client_conf(
    private_key: str,
    server: WireGuardServer,
    *,
    allowed_ips: str = f"{TUNNEL_SERVER_IP}/32, {WEB_IP}/32, {WEB_IP6}/128",
    extra_interface: str = "",
    extra_peer: str = "",
) -> str:
    return (
        f"[Interface]\nPrivateKey = {private_key}\nAddress = {TUNNEL_CLIENT_IP}/24, {TUNNEL_CLIENT_IP6}/64\n"
        f"ListenPort = {CLIENT_PORT}\n"
        f"{extra_interface}\n"
        f"[Peer]\nPublicKey = {server.public_key}\nEndpoint = {server.endpoint}\nAllowedIPs = {allowed_ips}\n"
        f"{extra_peer}\n"
    )


@dataclass(slots=True)
class Setup:
    lab: Lab
    server: WireGuardServer
    client: OurClient


def make_setup(
    lab: Lab, *, extra_interface: str = "", allowed_ips: str | None = None, name: str = "c"
) -> Setup:
    client_private, client_public = generate_keypair()
    # wireguard-go knows our endpoint, so it can initiate too.
    server = start_wireguard_go(
        lab,
        peers=[
            WireGuardPeer(
                client_public,
                [f"{TUNNEL_CLIENT_IP}/32", f"{TUNNEL_CLIENT_IP6}/128"],
                endpoint=f"{CLIENT_IP}:{CLIENT_PORT}",
            )
        ],
        address=[f"{TUNNEL_SERVER_IP}/24", f"{TUNNEL_SERVER_IP6}/64"],
    )
    kwargs = {"allowed_ips": allowed_ips} if allowed_ips else {}
    conf = lab.tmpdir / f"ours-{name}.conf"
    conf.write_text(client_conf(client_private, server, extra_interface=extra_interface, **kwargs))
    client = OurClient(lab, lab.new_ifname("o"), conf, lab.tmpdir / f"ours-{name}.log")
    return Setup(lab, server, client)


@pytest.fixture
def setup(web_lab: Lab) -> Iterator[Setup]:
    s = make_setup(web_lab)
    s.client.start()
    try:
        yield s
    finally:
        s.client.stop()


def udp_echo(lab: Lab, count: int = 3, interval: float = 0.2, timeout: float = 2.0) -> list[str]:
    """Send `count` datagrams from ns client to the web server's UDP echo (routed through the tunnel);
    returns the client addresses the server reported, one per answer."""
    seen: list[str] = []
    with lab.socket(CLIENT, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for i in range(count):
            sock.sendto(f"probe {i}".encode(), (WEB_IP, UDP_ECHO_PORT))
            try:
                answer = sock.recv(2048)
            except TimeoutError:
                continue
            seen.append(answer.split(b"\n", 1)[0].decode().rsplit(":", 1)[0])
            time.sleep(interval)
    return seen


def curl(lab: Lab, url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return lab.run(CLIENT, ["curl", "-sS", "--max-time", str(int(timeout)), *args, url], timeout=timeout + 5)


def latest_handshake(server: WireGuardServer) -> int:
    """Unix time of the latest handshake wireguard-go completed (0 = none)."""
    out = server.server.lab.run(WG, ["wg", "show", server.ifname, "latest-handshakes"], check=True).stdout
    return int(out.split()[1]) if out.split() else 0


# -- tests ---------------------------------------------------------------------------------------------


def test_we_initiate_and_the_web_server_sees_our_tunnel_addresses(setup: Setup) -> None:
    assert udp_echo(setup.lab) == [TUNNEL_CLIENT_IP] * 3, setup.client.output()
    seen = curl(setup.lab, f"http://{WEB_IP}/")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.splitlines()[0] == TUNNEL_CLIENT_IP
    seen6 = curl(setup.lab, f"http://[{WEB_IP6}]/")
    assert seen6.stdout.splitlines()[:1] == [TUNNEL_CLIENT_IP6], seen6.stderr
    assert latest_handshake(setup.server) > 0


def test_ping_through_the_tunnel(setup: Setup) -> None:
    # ICMP echo to the peer's tunnel address and, forwarded by it, to the web server (v4 and v6).
    for target in (TUNNEL_SERVER_IP, WEB_IP, WEB_IP6):
        done = setup.lab.run(CLIENT, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "3", target], timeout=20)
        assert done.returncode == 0, (target, done.stdout, done.stderr, setup.client.output())
        assert " 0% packet loss" in done.stdout


def check_tcp_both_ways(
    lab: Lab, down: int, up: int, name: str, context: Callable[[], str] = lambda: ""
) -> None:
    """A download of `down` bytes from the web server and an upload of `up` bytes to it, through whatever
    routes ns client's traffic, each arrive whole (by their SHA-256); `context()` goes with a failure."""
    download = lab.run(
        CLIENT,
        ["sh", "-c", f"curl -sS --max-time 60 http://{WEB_IP}/bytes/{down} | sha256sum"],
        timeout=70,
    )
    assert download.stdout.split()[0] == pattern_sha256(down), download.stderr + context()
    payload = lab.tmpdir / f"{name}.bin"
    data = os.urandom(up)
    payload.write_bytes(data)
    upload = curl(lab, f"http://{WEB_IP}/sha256", "--data-binary", f"@{payload}", timeout=60)
    assert upload.stdout.strip() == hashlib.sha256(data).hexdigest(), upload.stderr + context()


def test_tcp_transfer_arrives_intact_both_ways(setup: Setup) -> None:
    check_tcp_both_ways(setup.lab, 8 * 1024 * 1024, 4 * 1024 * 1024, "upload")


def test_peer_initiates_to_us(web_lab: Lab) -> None:
    s = make_setup(web_lab, name="r")
    s.client.start()
    try:
        # Nothing sent from our side yet: the handshake comes from wireguard-go, which has a packet for us.
        with web_lab.socket(CLIENT, socket.AF_INET, socket.SOCK_DGRAM) as listener:
            listener.bind(("0.0.0.0", 9999))
            listener.settimeout(3)
            with web_lab.socket(WG, socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.sendto(b"hello from the server side", (TUNNEL_CLIENT_IP, 9999))
                data, source = listener.recvfrom(2048)
        assert data == b"hello from the server side"
        assert source[0] == TUNNEL_SERVER_IP
        assert latest_handshake(s.server) > 0
        assert "handshake completed" in s.client.output()
    finally:
        s.client.stop()


def test_rekey_keeps_traffic_flowing(web_lab: Lab) -> None:
    # 3.x timer keys are local and do not change the wire format: wireguard-go still understands us.
    s = make_setup(web_lab, extra_interface="RekeyAfterTime = 2\nRekeyTimeout = 1\n", name="k")
    s.client.start()
    try:
        with web_lab.capture(WG, bpf_filter=f"udp and src host {CLIENT_IP} and udp[8:4] = 0x01000000") as cap:
            answers = udp_echo(web_lab, count=30)
        assert len(answers) >= 29, s.client.output()
        # 6 s of traffic with a 2 s rekey interval (and initiations allowed every 1 s): several handshakes.
        assert cap.count() >= 3
    finally:
        s.client.stop()


def test_recovers_after_the_peer_restarts(web_lab: Lab) -> None:
    s = make_setup(web_lab, extra_interface="KeepaliveTimeout = 1\nRekeyTimeout = 1\n", name="p")
    s.client.start()
    try:
        assert len(udp_echo(web_lab, count=2)) == 2
        s.server.restart()  # a new wireguard-go: same keys, no sessions
        deadline = time.monotonic() + 20
        while not udp_echo(web_lab, count=1, timeout=0.5):
            assert time.monotonic() < deadline, s.client.output()
    finally:
        s.client.stop()


def test_default_route_goes_through_the_tunnel_and_stop_removes_everything(web_lab: Lab) -> None:
    # An "internet" address outside the lab's /24 (which stays directly reachable, as with wg-quick):
    # the web server also answers on 198.18.200.10, reachable from ns wg only.
    far = "198.18.200.10"
    web_lab.run("web", ["ip", "addr", "add", f"{far}/32", "dev", "lo"], check=True)
    web_lab.run(WG, ["ip", "route", "add", f"{far}/32", "via", WEB_IP], check=True)
    s = make_setup(web_lab, allowed_ips="0.0.0.0/0", name="d")
    rules_before = web_lab.run(CLIENT, ["ip", "rule"]).stdout
    s.client.start()
    try:
        assert web_lab.run(CLIENT, ["ip", "rule"]).stdout != rules_before
        seen = curl(web_lab, f"http://{far}/")
        assert seen.stdout.splitlines()[:1] == [TUNNEL_CLIENT_IP], seen.stderr + s.client.output()
        lan = curl(web_lab, f"http://{WEB_IP}/")
        assert lan.stdout.splitlines()[:1] == [CLIENT_IP]  # the connected lab network stays direct
    finally:
        code = s.client.stop(signal.SIGTERM)
    assert code == 0, s.client.output()
    assert web_lab.run(CLIENT, ["ip", "rule"]).stdout == rules_before
    assert s.client.ifname not in web_lab.run(CLIENT, ["ip", "link"]).stdout
    # With our routes gone the same address is reached directly again.
    assert curl(web_lab, f"http://{far}/").stdout.splitlines()[:1] == [CLIENT_IP]


def test_tun_command_reports_a_missing_file_clearly(tmp_path: Path) -> None:
    from awg_split_tunnel.provider.wireguard.tun_client import run_tun_client

    assert run_tun_client(tmp_path / "missing.conf") == 1
