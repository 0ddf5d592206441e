"""End to end: a WireGuard tunnel added, changed and removed in the config while the daemon runs.

The daemon (``python -m awg_split_tunnel.daemon``, on each data path in turn) starts in ns client with a
SOCKS5 tunnel only (dante, 198.18.0.20). Then the config file is edited as a user would:

1. a WireGuard tunnel ``wg`` (wireguard-go in ns wg) and a ``block`` rule for ``app-wg`` are added: the
   app's next connections come from the tunnel address (198.19.0.2), and nothing of it leaves the
   client's uplink directly meanwhile;
2. the tunnel's ``.conf`` is swapped for one with another ListenPort and MTU: the device is replaced,
   the app is tunnelled again, still nothing direct;
3. the tunnel is removed and the app's rule moved to the SOCKS5 tunnel (``block``), while the app keeps
   sending: its traffic moves to the SOCKS5 server, never directly to the web server;
4. the rule is removed: the app goes direct, which the same capture sees (so its silence above means
   something).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from marks import NEEDS_ROOT, NEEDS_WIREGUARD_GO
from polling import wait_for

from awg_split_tunnel.lab import (
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
    start_dante,
    start_web,
    start_wireguard_go,
)
from awg_split_tunnel.lab.topology import python_path

pytestmark = [*NEEDS_ROOT, NEEDS_WIREGUARD_GO]

APP = "app-wg"
OTHER = "app-direct"
CLIENT_PORT = 51920
CHANGED_PORT = 51921
START_TIMEOUT = 40.0
DIRECT_TO_WEB = f"src host {CLIENT_IP} and dst host {WEB_IP}"
"""What leaves the client's uplink for the web server directly (tunnelled traffic goes to the WireGuard
or SOCKS5 server instead)."""

# An app that keeps a UDP flow busy: a datagram every 20 ms to the echo for ``seconds``; prints how many
# were answered and from which address the echo saw the last one.
UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
answered, seen = 0, ""
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        s.send(b"probe")
    except OSError:
        pass
    time.sleep(0.02)
    while True:
        try:
            reply = s.recv(65535)
        except (BlockingIOError, OSError):
            break
        answered += 1
        seen = reply.partition(b"\\n")[0].decode().rsplit(":", 1)[0]
print(answered, seen)
"""


def daemon_config(wg_conf: str | None = None, app_tunnel: str | None = None) -> str:
    """The config file as the test writes it: the SOCKS5 tunnel, a WireGuard tunnel reading ``wg_conf``
    (if given), and a ``block`` rule sending the app to ``app_tunnel`` (if given)."""
    text = "log_level: info\ndefault: direct\ntunnels:\n"
    text += f"  - id: socks\n    type: socks5\n    server: {SOCKS_IP}:1080\n"
    if wg_conf is not None:
        text += f"  - id: wg\n    type: wireguard\n    config_file: {wg_conf}\n"
    if app_tunnel is None:
        return text + "rules: []\n"
    return text + f"rules:\n  - process: {APP}\n    tunnel: {app_tunnel}\n    fallback: block\n"


CONFIG_START = daemon_config()
CONFIG_MOVED_TO_SOCKS = daemon_config(app_tunnel="socks")


def config_with_wg(conf_file: str) -> str:
    return daemon_config(wg_conf=conf_file, app_tunnel="wg")


def client_conf(private_key: str, peer: WireGuardServer, port: int, mtu: int) -> str:
    return (
        f"[Interface]\nPrivateKey = {private_key}\nAddress = {TUNNEL_CLIENT_IP}/24\nListenPort = {port}\n"
        f"MTU = {mtu}\n\n[Peer]\nPublicKey = {peer.public_key}\nEndpoint = {peer.endpoint}\n"
        "AllowedIPs = 0.0.0.0/0\n"
    )


class RunningDaemon:
    """The daemon process on one data path, its config file and where its output goes."""

    def __init__(self, lab: Lab, dataplane: str) -> None:
        self.lab = lab
        self.dataplane = dataplane
        self.config = lab.tmpdir / "config.yaml"
        self.control = lab.tmpdir / "control.sock"
        self.stdout = lab.tmpdir / "daemon.out"
        self.stderr = lab.tmpdir / "daemon.err"
        self.write(CONFIG_START)
        env = {**os.environ, "PYTHONPATH": python_path()}
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process: subprocess.Popen[bytes] = lab.spawn(
                CLIENT,
                [
                    sys.executable,
                    "-m",
                    "awg_split_tunnel.daemon",
                    "-c",
                    self.config,
                    "--control",
                    self.control,
                ],
                stdout=out,
                stderr=err,
                env=env,
            )

    def write(self, text: str) -> None:
        """Replace the config file as an editor does (the daemon polls its modification time)."""
        self.config.write_text(f"dataplane: {self.dataplane}\n{text}")
        self.config.chmod(0o600)

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def status(self) -> dict[str, dict[str, Any]]:
        from awg_split_tunnel.api.control import request

        try:
            answer = request("status", path=self.control, timeout=5.0)
        except (OSError, ValueError, RuntimeError):
            return {}
        return {row["id"]: row for row in answer["tunnels"]}

    def connections(self) -> list[dict[str, Any]]:
        from awg_split_tunnel.api.control import request

        flows: list[dict[str, Any]] = request("connections", path=self.control, timeout=5.0)["flows"]
        return flows

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        start_web(lab)
        start_dante(lab)
        for name in (APP, OTHER):
            make_app(lab, name)
        yield lab


@pytest.fixture(scope="module")
def client_keys() -> tuple[str, str]:
    return generate_keypair()


@pytest.fixture(scope="module")
def wg_peer(lab: Lab, client_keys: tuple[str, str]) -> WireGuardServer:
    return start_wireguard_go(
        lab,
        peers=[
            WireGuardPeer(client_keys[1], [f"{TUNNEL_CLIENT_IP}/32"], endpoint=f"{CLIENT_IP}:{CLIENT_PORT}")
        ],
        listen_port=WG_PORT,
        address=f"{TUNNEL_SERVER_IP}/24",
        log_level="error",
    )


@pytest.fixture(scope="module", params=("divert", "kernel"))
def daemon(lab: Lab, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, request.param)
    try:

        def started() -> bool:
            if running.process.poll() is not None:
                pytest.fail(f"daemon exited ({running.process.returncode}) at start:\n{running.output()}")
            return "running" in running.stdout.read_text(errors="replace")

        wait_for(started, START_TIMEOUT, "the daemon's status line", running.output)
        wait_for(lambda: lab.app(OTHER, timeout=2.0).seen_ip == CLIENT_IP, 10.0, "routing", running.output)
        yield running
    finally:
        running.stop()
        print(running.output()[-5000:])


def applied(daemon: RunningDaemon, count: int) -> Callable[[], bool]:
    """True once the daemon has applied ``count`` rule changes (it logs one line per applied edit)."""
    return lambda: daemon.output().count("[Rule]") >= count


def test_wireguard_tunnel_added_changed_and_removed_while_running(
    lab: Lab, daemon: RunningDaemon, wg_peer: WireGuardServer, client_keys: tuple[str, str]
) -> None:
    private, _ = client_keys
    (lab.tmpdir / "wg.conf").write_text(client_conf(private, wg_peer, CLIENT_PORT, 1420))
    (lab.tmpdir / "wg2.conf").write_text(client_conf(private, wg_peer, CHANGED_PORT, 1380))
    for name in ("wg.conf", "wg2.conf"):
        (lab.tmpdir / name).chmod(0o600)
    assert lab.app(APP).seen_ip == CLIENT_IP, "no rule yet: direct"
    assert "wg" not in daemon.status()

    # 1. Added: once the edit is applied, the block app is tunnelled (refused until the tunnel is UP).
    with lab.capture(CLIENT, bpf_filter=DIRECT_TO_WEB) as capture:
        edited = time.monotonic()
        daemon.write(config_with_wg("wg.conf"))
        wait_for(applied(daemon, 1), 5.0, "the edit applied", daemon.output)
        wait_for(
            lambda: lab.app(APP, timeout=1.0).seen_ip == TUNNEL_CLIENT_IP,
            10.0,
            "the new tunnel carries the app",
            daemon.output,
        )
        print(f"tunnelled {time.monotonic() - edited:.1f}s after the config was written")
        assert lab.app(APP, udp=True).seen_ip == TUNNEL_CLIENT_IP
        time.sleep(0.3)
    assert capture.count() == 0, "\n".join(capture.packets())
    row = daemon.status()["wg"]
    assert row["state"] == "up" and row["rx_bytes"] > 0 and row["tx_bytes"] > 0, row
    assert lab.app(OTHER).seen_ip == CLIENT_IP
    assert daemon.status()["socks"]["state"] == "up"

    # 2. Changed (another ListenPort and MTU): the device is replaced; the app is tunnelled again.
    with lab.capture(CLIENT, bpf_filter=DIRECT_TO_WEB) as capture:
        daemon.write(config_with_wg("wg2.conf"))
        wait_for(lambda: "tunnel wg changed" in daemon.output(), 5.0, "the change applied", daemon.output)
        wait_for(
            lambda: lab.app(APP, timeout=1.0).seen_ip == TUNNEL_CLIENT_IP,
            10.0,
            "the replaced tunnel carries the app",
            daemon.output,
        )
        time.sleep(0.3)
    assert capture.count() == 0, "\n".join(capture.packets())
    with lab.capture(CLIENT, bpf_filter=f"udp and src port {CHANGED_PORT}") as device_port:
        assert lab.app(APP).seen_ip == TUNNEL_CLIENT_IP
        time.sleep(0.3)
    assert device_port.count() > 0, "the new device sends from its new ListenPort"

    # 3. Removed, the app's rule moved to SOCKS5 (block), while the app keeps a UDP flow busy: nothing of
    # it reaches the web server directly; it goes through SOCKS5 once the edit is applied.
    sender = lab.spawn(
        CLIENT,
        [lab.apps[APP], "-c", UDP_SENDER, WEB_IP, str(UDP_ECHO_PORT), "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with lab.capture(CLIENT, bpf_filter=DIRECT_TO_WEB) as capture:
        time.sleep(0.7)
        flows = [f for f in daemon.connections() if f["exe"] and f["exe"].endswith(APP)]
        assert any(f["tunnel"] == "wg" and f["proto"] == "udp" for f in flows), flows
        daemon.write(CONFIG_MOVED_TO_SOCKS)
        wait_for(lambda: "tunnel wg removed" in daemon.output(), 5.0, "the removal applied", daemon.output)
        wait_for(
            lambda: lab.app(APP, timeout=1.0).seen_ip == SOCKS_IP,
            6.0,
            "the app goes through SOCKS5",
            daemon.output,
        )
        out, err = sender.communicate(timeout=20)
    assert sender.returncode == 0, err
    assert capture.count() == 0, "\n".join(capture.packets())
    answered, _, last_seen = out.strip().partition(" ")
    assert int(answered) > 0, out
    assert last_seen in (TUNNEL_CLIENT_IP, SOCKS_IP), out
    assert "wg" not in daemon.status()

    # 4. The rule removed too: the app goes direct, and the same capture sees it.
    daemon.write(CONFIG_START)
    with lab.capture(CLIENT, bpf_filter=DIRECT_TO_WEB) as direct:
        wait_for(lambda: lab.app(APP, timeout=1.0).seen_ip == CLIENT_IP, 6.0, "direct again", daemon.output)
        time.sleep(0.3)
    assert direct.count() > 0, "the capture sees direct traffic, so its silence above means something"
    assert "Traceback" not in daemon.output(), daemon.output()
